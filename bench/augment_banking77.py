"""Does augmentation help? Banking77, with and without each augmentation setting, same seeds and epochs.

    python bench/augment_banking77.py [--seeds 3] [--epochs 12]

The student-training stage does not exist yet, so this measures with a fixed quick classifier: a
fastText-style bag of hashed word unigrams and bigrams (EmbeddingBag + linear), trained with Adam, the
epoch chosen on validation. Data: ../shared/datasets/banking77 through the real ingest and clean cores,
then the augment core. Prints one table (test accuracy and macro-F1, mean over seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.augment import AugmentParams, Editor, augment, content_words  # noqa: E402
from stages.clean import CleanParams, clean  # noqa: E402
from stages.data.synonyms import build_synonyms, load_embeddings  # noqa: E402
from stages.ingest import IngestParams, ingest, read_source  # noqa: E402
from stages.model.evaluation import accuracy, macro_f1  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "banking77"
BUCKETS = 1 << 18
WORD = re.compile(r"\w+")

SETTINGS = {
    "none": {"per_row": 0},
    "synonym": {"ops": {"synonym": 1.0, "swap": 0, "delete": 0, "insert": 0}},
    "eda (swap, delete, insert)": {"ops": {"synonym": 0, "swap": 1.0, "delete": 1.0, "insert": 1.0}},
    "synonym + eda": {"ops": {"synonym": 1.0, "swap": 1.0, "delete": 1.0, "insert": 1.0}},
    "synonym + eda, 2 per row": {"ops": {"synonym": 1.0, "swap": 1.0, "delete": 1.0, "insert": 1.0}, "per_row": 2},
    "balance to max (synonym + eda)": {"balance_to": "max", "per_row": 3},
}


def features(text: str) -> list[int]:
    words = WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    return [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") % BUCKETS for g in grams] or [
        0
    ]


class BagOfNgrams(torch.nn.Module):
    def __init__(self, n_labels: int, dim: int = 64):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(BUCKETS, dim, mode="mean", sparse=True)
        self.out = torch.nn.Linear(dim, n_labels)

    def forward(self, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(flat, offsets))


def batchify(feats: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
    return torch.tensor([i for f in feats for i in f]), offsets


def predict(model: BagOfNgrams, feats: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return model(*batchify(feats)).argmax(1).numpy()


def train_eval(
    train: pl.DataFrame, val: pl.DataFrame, test: pl.DataFrame, labels: dict[str, int], seed: int, epochs: int
) -> tuple[float, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = [features(t) for t in train["text"]], torch.tensor([labels[x] for x in train["label"]])
    x_va, y_va = [features(t) for t in val["text"]], np.array([labels[x] for x in val["label"]])
    x_te, y_te = [features(t) for t in test["text"]], np.array([labels[x] for x in test["label"]])
    model = BagOfNgrams(len(labels))
    # Sparse updates for the hashed table: only the rows a batch touches move (fastText does the same).
    opts = [torch.optim.SparseAdam(model.emb.parameters(), lr=0.01), torch.optim.AdamW(model.out.parameters(), lr=0.01)]
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            logits = model(*batchify([x_tr[i] for i in idx]))
            loss = torch.nn.functional.cross_entropy(logits, y_tr[idx])
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
        val_acc = accuracy(y_va, predict(model, x_va))
        if val_acc > best_val:
            best_val, best_state = val_acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    pred = predict(model, x_te)
    return accuracy(y_te, pred), macro_f1(y_te, pred, len(labels))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    if not (DATA / "train.csv").is_file():
        raise SystemExit(f"bench: {DATA} not found (../shared/datasets/banking77 beside the checkout)")
    ip = IngestParams(source=str(DATA / "train.csv"), test_source=str(DATA / "test.csv"), label_column="category")
    tr, te, _ = ingest(read_source(ip.source, "auto"), read_source(ip.test_source, "auto"), ip)
    cleaned = clean(tr, te, CleanParams())
    labels = cleaned.labels
    vocab, emb = load_embeddings(None)
    words = content_words(cleaned.train["text"].to_list(), Editor({}, AugmentParams()))
    synonyms = build_synonyms(words, vocab, emb, 0.5, 5)
    print(
        f"bench: {cleaned.train.height} train / {cleaned.val.height} val / {cleaned.test.height} test rows, "
        f"{len(synonyms)} words with synonyms; {args.seeds} seeds x {args.epochs} epochs",
        file=sys.stderr,
    )
    rows = []
    for name, overrides in SETTINGS.items():
        p = AugmentParams(**overrides)
        start = time.perf_counter()
        data, report = augment(cleaned.train, cleaned.val, cleaned.test, p, synonyms)
        aug_s = time.perf_counter() - start
        scores = [train_eval(data, cleaned.val, cleaned.test, labels, seed, args.epochs) for seed in range(args.seeds)]
        acc, f1 = np.mean([s[0] for s in scores]), np.mean([s[1] for s in scores])
        rows.append((name, data.height, acc, np.std([s[0] for s in scores]), f1, aug_s))
        print(f"bench: {name}: {acc:.4f}", file=sys.stderr)
    base = rows[0][2]
    print(
        f"{'augmentation':<32} {'train rows':>10} {'test acc':>9} {'± sd':>6} {'macro-F1':>9} "
        f"{'Δ acc':>7} {'augment s':>9}"
    )
    for name, n, acc, sd, f1, aug_s in rows:
        print(f"{name:<32} {n:>10} {acc:>9.4f} {sd:>6.4f} {f1:>9.4f} {100 * (acc - base):>+6.2f}p {aug_s:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
