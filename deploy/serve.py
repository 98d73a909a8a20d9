"""`python -m deploy.serve --model distillery-intent[@version|#stage]` (also `distillery-serve`): serve one
published version over the Open Inference Protocol (REST and gRPC) and `/v1/classify`, with dynamic batching,
backpressure, Prometheus metrics on `/metrics` and, with `--shadow`, a second version compared off the answer
path. Settings come from the `serve:` section of params.yaml; each has a flag that overrides it.

It refuses to start (exit 2, one line naming the file or setting) on a version whose files fail its SHA256SUMS,
a folder the registry's index does not list, or a bad setting. It exits 0 after a SIGTERM/SIGINT drain.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from deploy import metrics
from deploy.runtime import Classifier, check_files
from deploy.settings import ServeParams
from stages.registry import resolve
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict

log = logging.getLogger("distillery.serve")


def flag_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args else hint
    if hint is bool:
        return lambda v: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[v.lower()]
    return hint


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m deploy.serve", description=__doc__.split("\n\n")[0])
    model = os.environ.get("DISTILLERY_MODEL")
    ap.add_argument("--model", required=model is None, default=model,
                    help="model, model@version or model#stage (the latest version with neither); default: "
                    "$DISTILLERY_MODEL")  # fmt: skip
    ap.add_argument("--registry", type=Path, default=Path("registry"), help="the registry folder (default: registry)")
    ap.add_argument("--shadow", default=None, help="a second version (model@version) compared off the answer path")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="where the serve: section is read")
    hints = typing.get_type_hints(ServeParams)
    for f in dataclasses.fields(ServeParams):
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=flag_type(hints[f.name]), default=None,
                        metavar=f.name.upper(), help=f"serve.{f.name} (default {f.default!r})")  # fmt: skip
    return ap


def serve_params(args: argparse.Namespace) -> ServeParams:
    """params.yaml's serve: section (when the file has one), with the flags given on top."""
    values: dict[str, Any] = {}
    if args.params.is_file():
        doc = yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}
        section = doc.get("serve") if isinstance(doc, dict) else None
        if section is not None and not isinstance(section, dict):
            raise ParamError(f"{args.params}: section 'serve' must be a mapping")
        values.update(section or {})
    for f in dataclasses.fields(ServeParams):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return from_dict(ServeParams, values, "serve")


def model_info(c: Classifier) -> dict[str, str]:
    return {"model": c.model, "version": c.version, "variant": c.record.variant, "backend": c.record.backend}


def prepare(service: Any, primary: Path, shadow: Path | None, p: ServeParams) -> None:
    """Load and warm the primary (and the shadow), in a worker thread while the server already listens."""
    from deploy.shadow import Shadow

    classifier = Classifier(primary, p.threads, p.max_batch_size, p.spinning)
    classifier.warm_up(0.5)
    metrics.MODEL.labels("primary").info(model_info(classifier))
    if shadow is not None:
        runner = Shadow(shadow, Path(p.shadow_log), p.shadow_log_mb, p.shadow_queue, p.max_batch_size,
                        p.shadow_sample, lambda: service.batcher.queued_texts > 0)  # fmt: skip
        metrics.MODEL.labels("shadow").info(runner.start())
        service.shadow = runner
    service.classifier = classifier
    gc.collect()
    gc.freeze()  # what is loaded now lives as long as the server: later collections need not scan it


def event_loop() -> Any:
    """uvloop's loop when installed (KServe installs it): a third less CPU per request than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated")  # KServe's default response class
    try:
        p = serve_params(args)
        primary = resolve(args.registry, args.model)
        check_files(primary)
        shadow = resolve(args.registry, args.shadow) if args.shadow else None
        if shadow is not None:
            check_files(shadow)
    except (ParamError, StageError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    sys.argv = sys.argv[:1]  # kserve parses the command line when imported; these flags are not its own
    from deploy.server import Lifecycle, kserve_model_class
    from deploy.service import Service

    service = Service(primary.parent.name, primary.name, p)
    model = kserve_model_class()(service)
    try:
        with asyncio.Runner(loop_factory=event_loop()) as runner:
            return runner.run(Lifecycle(service, model, p).run(lambda: prepare(service, primary, shadow, p)))
    except (StageError, OSError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
