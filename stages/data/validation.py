"""Great Expectations validation of the cleaned splits (ephemeral context on pandas frames).

Writes a deterministic `results.json` summary and GE's Data Docs HTML (which carry run timestamps).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl


@dataclass(frozen=True)
class Check:
    """One validated frame: its name, the frame, and the expectations to run on it."""

    name: str
    frame: pl.DataFrame
    expectations: list[Any]


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    results: list[dict[str, Any]]  # one entry per expectation, deterministic

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]


def _summarize(check: str, result: Any) -> dict[str, Any]:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    res = result.result or {}
    out: dict[str, Any] = {"check": check, "expectation": cfg.type, "kwargs": kwargs, "success": bool(result.success)}
    for key in ("element_count", "unexpected_count", "observed_value"):
        if res.get(key) is not None:
            out[key] = res[key]
    if res.get("partial_unexpected_list"):
        out["unexpected_examples"] = [str(v) for v in res["partial_unexpected_list"][:5]]
    if result.exception_info and result.exception_info.get("raised_exception"):
        out["exception"] = str(result.exception_info.get("exception_message"))
    return out


def run_checks(checks: list[Check], docs_dir: Path | None) -> ValidationReport:
    """Validate each frame with its expectations; build Data Docs under `docs_dir` when given."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    actions = []
    if docs_dir is not None:
        site = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
        }
        ctx.add_data_docs_site(site_name="clean", site_config=site)
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["clean"])]
    source = ctx.data_sources.add_pandas("clean")
    results: list[dict[str, Any]] = []
    for check in checks:
        batch_def = source.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=check.name, expectations=check.expectations))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=check.name, data=batch_def, suite=suite))
        cp = ctx.checkpoints.add(
            gx.Checkpoint(
                name=check.name,
                validation_definitions=[vd],
                actions=actions,
                result_format={"result_format": "SUMMARY"},
            )
        )
        outcome = cp.run(batch_parameters={"dataframe": check.frame.to_pandas()})
        for vr in outcome.run_results.values():
            results.extend(_summarize(check.name, r) for r in vr.results)
    results.sort(key=lambda r: (r["check"], r["expectation"], str(sorted(r["kwargs"].items()))))
    return ValidationReport(success=all(r["success"] for r in results), results=results)


def split_expectations(labels: list[str], max_chars: int) -> list[Any]:
    """Row-level contract of a cleaned split: schema, types, no nulls, known labels, length bounds, unique ids."""
    import great_expectations as gx

    ex = gx.expectations
    out: list[Any] = [ex.ExpectTableColumnsToMatchOrderedList(column_list=["id", "text", "label", "group"])]
    for col in ("id", "text", "label", "group"):
        out.append(ex.ExpectColumnValuesToNotBeNull(column=col))
        out.append(ex.ExpectColumnValuesToBeOfType(column=col, type_="str"))
    out += [
        ex.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        ex.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1, max_value=max_chars),
        ex.ExpectColumnValuesToBeUnique(column="id"),
    ]
    return out


def dataset_expectations(min_per_label: int, max_quarantine_fraction: float) -> dict[str, list[Any]]:
    """Dataset-level contract: training rows per label, share of rows quarantined."""
    import great_expectations as gx

    ex = gx.expectations
    return {
        "label_counts": [ex.ExpectColumnValuesToBeBetween(column="train_rows", min_value=min_per_label)],
        "summary": [ex.ExpectColumnValuesToBeBetween(column="quarantine_fraction", max_value=max_quarantine_fraction)],
    }
