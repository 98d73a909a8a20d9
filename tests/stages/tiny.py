"""A tiny tokenizer, teacher and 3-intent dataset built in the tests (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from stages.model.encoder import TextClassifier
from tests.conftest import frame

WORDS = [
    "refund",
    "money",
    "back",
    "cancel",
    "plan",
    "stop",
    "where",
    "parcel",
    "track",
    "my",
    "the",
    "please",
    "now",
    "today",
    "order",
    "want",
    "i",
    "is",
    "subscription",
    "delivery",
]
LABELS = {"cancel": 0, "refund": 1, "track": 2}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + WORDS + chars + ["##" + c for c in chars] + ["zebra", "##s"]
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_teacher(seed: int = 0, heads: int = 2) -> tuple[TextClassifier, object]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return TextClassifier(BertModel(cfg, add_pooling_layer=False), len(LABELS)), tok


def dataset(n_per_label: int = 12, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    cues = {
        "cancel": ["cancel", "stop", "plan", "subscription"],
        "refund": ["refund", "money", "back"],
        "track": ["where", "parcel", "track", "delivery"],
    }
    filler = ["my", "the", "please", "now", "today", "i", "want", "is", "order"]
    rows = []
    for lab, words in cues.items():
        for i in range(n_per_label):
            text = " ".join(rng.choice(words, 2).tolist() + rng.choice(filler, 3).tolist())
            rows.append((f"{lab}-{i:03d}", text, lab))
    return frame(rows)


def write_stage_inputs(root: Path, heads: int = 4) -> None:
    """What prune and quantize read, under `root/data/`: clean's val/test/labels, augment's train, distill's
    soft labels, and train's student (a tiny model fine-tuned here for a few seconds)."""
    import json

    from stages.distill import soft_labels
    from stages.model.encoder import save
    from stages.model.training import OptimParams, finetune

    data = root / "data"
    for sub in ("02_clean", "03_augment", "04_distill", "05_train"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    train, val, test = dataset(12, 0), dataset(4, 1), dataset(4, 2)
    model, tok = tiny_teacher(0, heads=heads)
    finetune(model, tok, train, val, LABELS, OptimParams(epochs=8, lr=3e-3, batch_size=8, patience=8, max_length=16))
    val.write_parquet(data / "02_clean/val.parquet")
    test.write_parquet(data / "02_clean/test.parquet")
    (data / "02_clean/labels.json").write_text(json.dumps(LABELS))
    train.write_parquet(data / "03_augment/train.parquet")
    soft_labels(model, tok, train, 16).write_parquet(data / "04_distill/soft_labels.parquet")
    save(model, tok, LABELS, data / "05_train/student")
