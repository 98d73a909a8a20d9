"""The errors a user can act on. A stage's entrypoint (stages.runner.cli.stage_entrypoint) shows these as
one line without a traceback; every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class StageError(Exception):
    """A failure the user can act on: bad input rows, a missing upstream file, a failed validation."""


class ParamError(StageError, ValueError):
    """A bad value in params.yaml; the message names the parameter (`section.key`)."""
