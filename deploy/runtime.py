"""A published version loaded to serve: checked against its SHA256SUMS, run as its runtime.json says, with
tokenization, batching and label mapping as `benchmark` measures end to end (so its end-to-end figures
predict the server's).

- ONNX Runtime (the default): a session with the options runtime.json records (`stages.runtime.sessions`),
  on the providers it names; a GPU provider that falls back to the CPU is refused, never served silently.
- TensorRT (`model.plan`): `stages.runtime.tensorrt.TrtRunner`, on hosts with CUDA and TensorRT.

Texts are tokenized with the `tokenizers` library from the version's `tokenizer/tokenizer.json` (what the
transformers fast tokenizer benchmark uses runs the same code), truncated to the version's `max_length`,
sorted by token count and run in chunks of at most `max_batch` rows, each padded to its longest row.
No torch is imported for an ONNX version.

A version's out-of-scope rule (`reject.json`, and `reject.safetensors` for Mahalanobis; `stages.model.rejection`)
is applied to every prediction: a text scoring under its threshold is answered the rule's label, flagged.
max_softmax and energy are taken from the softmax the classifier computes anyway; only a Mahalanobis rule asks
the model for its `pooled` output too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.model import rejection
from stages.registry import (
    SIGNATURE,
    SUMS,
    RegistryError,
    RejectRecord,
    RuntimeRecord,
    file_sums,
    read_reject,
    read_runtime,
    read_sums,
    resolve,
)


@dataclass(frozen=True)
class Prediction:
    label: str  # the intent, or reject.json's label when the text is out of scope
    score: float  # the top intent's softmax probability
    top: list[tuple[str, float]]  # the top-k labels and their softmax scores, best first
    out_of_scope: bool = False
    scope_score: float | None = None  # the rejection method's in-scope score (None: the version rejects nothing)


def serving_rule(folder: Path) -> RejectRecord | None:
    """The version's out-of-scope rule (reject.json), or None when it rejects nothing (method none, or a version
    published before rules were)."""
    record = read_reject(folder)
    if record is None or record.method == "none":
        return None
    path = folder / "reject.json"
    if record.method not in rejection.METHODS or record.threshold is None:
        raise RegistryError(f"{path}: method {record.method!r} with threshold {record.threshold!r} cannot be served "
                            f"(one of {', '.join(rejection.METHODS)} with a threshold)")  # fmt: skip
    if record.method == "mahalanobis" and not record.stats:
        raise RegistryError(f"{path}: mahalanobis names no statistics file")
    return record


def read_stats(folder: Path, record: RejectRecord | None) -> rejection.MahalanobisStats | None:
    """The class means and precision a mahalanobis rule scores with (safetensors, no pickle)."""
    if record is None or record.method != "mahalanobis":
        return None
    from safetensors.numpy import load_file

    path = folder / str(record.stats)
    try:
        return rejection.MahalanobisStats.from_tensors(load_file(str(path)))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot be read as Mahalanobis statistics ({exc})") from exc


def check_files(folder: Path) -> None:
    """Every file of the version matches SHA256SUMS, none is missing and none was added; else a RegistryError
    naming the first file that differs."""
    listed = read_sums(folder)
    found = file_sums(folder)
    for name, digest in listed.items():
        if name not in found:
            raise RegistryError(f"{folder / name}: listed in {SUMS} but missing; refusing to serve this version")
        if found[name] != digest:
            raise RegistryError(f"{folder / name}: SHA-256 differs from {SUMS} (the file was changed after "
                                "publish); refusing to serve this version")  # fmt: skip
    extra = sorted(set(found) - set(listed) - {SIGNATURE})
    if extra:
        raise RegistryError(f"{folder / extra[0]}: not listed in {SUMS} (added after publish); refusing to serve")


def version_max_length(folder: Path, record: RuntimeRecord) -> int:
    """Tokens per text: runtime.json's `max_length`, else (versions published before it was recorded) the
    tokenizer config's, which publish copied from the model benchmark measured."""
    if record.max_length:
        return int(record.max_length)
    config = folder / "tokenizer" / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_length")
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{config}: cannot be read ({type(exc).__name__}); max_length is unknown") from exc
    if not isinstance(value, int) or value < 1:
        raise RegistryError(f"{folder}: neither runtime.json nor {config.name} gives max_length")
    return value


class Classifier:
    """One published version, ready to classify texts. `folder` is a version folder (see `load`)."""

    def __init__(self, folder: Path, threads: int | None = None, max_batch: int = 64, spinning: bool = True):
        check_files(folder)
        self.folder, self.model, self.version = folder, folder.parent.name, folder.name
        self.record = read_runtime(folder)
        self.max_length = version_max_length(folder, self.record)
        self.max_batch, self.spinning = max_batch, spinning
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        self.labels = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        if sorted(labels.values()) != list(range(len(labels))):
            raise RegistryError(f"{folder / 'labels.json'}: label ids must be 0..{len(labels) - 1}")
        options = self.record.session_options or {}
        self.threads = threads or int(options.get("intra_op_num_threads", 2))
        self.reject = serving_rule(folder)
        self.stats = read_stats(folder, self.reject)
        self._tokenizer = self._load_tokenizer()
        self.pad_id = self._pad_id()
        self._run = self._load_model()

    def _load_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.folder / "tokenizer" / "tokenizer.json"))
        tok.enable_truncation(self.max_length)
        tok.no_padding()
        return tok

    def _load_model(self) -> Any:
        path = self.folder / self.record.file
        if self.record.backend == "tensorrt":
            from stages.runtime.tensorrt import TrtRunner, gpu_unavailable, tensorrt_unavailable

            why = tensorrt_unavailable() or gpu_unavailable()
            if why:
                raise RegistryError(f"{self.folder}: a TensorRT plan for {self.record.device}, and this machine has "
                                    f"{why}; serve a CPU version instead")  # fmt: skip
            if self.stats is not None:
                raise RegistryError(f"{self.folder}: a mahalanobis rule needs the pooled output, which the TensorRT "
                                    "runner does not return")  # fmt: skip
            return TrtRunner(path.read_bytes()).run
        if self.record.backend == "kernels":
            sess = self._kernels_session(path)
        elif self.record.backend != "onnxruntime":
            raise RegistryError(f"{self.folder / 'runtime.json'}: unknown backend {self.record.backend!r}")
        else:
            sess = self._ort_session(path)
        if self.stats is not None:
            if "pooled" not in {o.name for o in sess.get_outputs()}:
                raise RegistryError(f"{path}: a mahalanobis rule needs the model's pooled output, and it has none")
            return lambda feeds: sess.run(["logits", "pooled"], feeds)
        return lambda feeds: sess.run(["logits"], feeds)[0]

    def _kernels_session(self, path: Path) -> Any:
        """quantize's INT8 model on distillery's compiled operators (backend `kernels`)."""
        import distillery_kernels

        if not distillery_kernels.available():
            raise RegistryError(f"{self.folder}: a version for the compiled operators of kernels/, which are not "
                                f"built here ({distillery_kernels.unavailable_reason()})")  # fmt: skip
        from distillery_kernels.engine import EngineError, EngineSession

        try:
            return EngineSession(path, self.threads, spinning=self.spinning, block=self.record.block)
        except EngineError as exc:
            raise RegistryError(f"{path}: {exc}") from exc

    def _ort_session(self, path: Path) -> Any:
        from stages.runtime.sessions import session

        providers = self.record.providers or ["CPUExecutionProvider"]
        sess = session(path, self.threads, providers=providers, spinning=self.spinning)
        if sess.get_providers()[0] != providers[0]:
            raise RegistryError(f"{self.folder}: runtime.json asks for {providers[0]}, and ONNX Runtime here fell "
                                f"back to {sess.get_providers()}; serve a CPU version instead")  # fmt: skip
        return sess

    def _pad_id(self) -> int:
        """The id of the tokenizer config's pad token (as the transformers tokenizer pads), else [PAD]'s, else 0."""
        try:
            config = json.loads((self.folder / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        token = config.get("pad_token") if isinstance(config.get("pad_token"), str) else "[PAD]"
        found = self._tokenizer.token_to_id(token)
        return int(found) if found is not None else 0

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits of every text, in the order given: sorted by token count, run in chunks of `max_batch`."""
        return self.forward(texts)[0]

    def forward(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled embeddings or None: only a mahalanobis rule asks the model for them)."""
        ids = [e.ids for e in self._tokenizer.encode_batch(texts)]
        order = np.argsort([len(s) for s in ids], kind="stable")
        out = []
        for start in range(0, len(ids), self.max_batch):
            rows = [ids[i] for i in order[start : start + self.max_batch]]
            width = max(len(r) for r in rows)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
            result = self._run({"input_ids": input_ids, "attention_mask": mask})
            out.append(result if isinstance(result, list) else [result])
        back = np.argsort(order, kind="stable")
        logits = np.concatenate([np.asarray(o[0], dtype=np.float32) for o in out])[back]
        pooled = np.concatenate([o[1] for o in out])[back] if self.stats is not None else None
        return logits, pooled

    def classify(self, texts: list[str], top_k: int) -> list[Prediction]:
        logits, pooled = self.forward(texts)
        probs, top, total = rejection.softmax_parts(logits)
        k = min(top_k, len(self.labels))
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        rule = self.reject
        if rule is None:
            scope = [None] * len(texts)
        elif rule.method == "mahalanobis":
            scope = rejection.scores("mahalanobis", None, pooled, self.stats).tolist()
        else:  # from the softmax's own parts: no extra pass over the logits
            scope = rejection.logit_scores(rule.method, top, total).tolist()
        out = []
        for row, p, s in zip(best.tolist(), probs.tolist(), scope, strict=True):
            rejected = s is not None and s < rule.threshold
            label = rule.label if rejected else self.labels[row[0]]
            out.append(Prediction(label, p[row[0]], [(self.labels[j], p[j]) for j in row], rejected, s))
        return out

    def warm_up(self, seconds: float = 1.0) -> int:
        """Run batches of every width the server will see first, so the first requests do not pay for ONNX
        Runtime's lazy allocations; returns the calls made."""
        texts = ["warm up " * n for n in (1, 4, 16, self.max_length)]
        calls, end = 0, time.monotonic() + seconds
        while calls < 4 or time.monotonic() < end:
            self.logits(texts[calls % len(texts) :] * (1 + calls % self.max_batch))
            calls += 1
        return calls


def load(
    registry: Path, spec: str, threads: int | None = None, max_batch: int = 64, spinning: bool = True
) -> Classifier:
    """`model`, `model@version` or `model#stage` in `registry` (the registry's own rules: an unindexed or
    forged folder is refused), checked against its SHA256SUMS and loaded."""
    return Classifier(resolve(registry, spec), threads=threads, max_batch=max_batch, spinning=spinning)
