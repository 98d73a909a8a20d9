"""The one error type a stage shows to a user as a single line (no traceback), and the wrapper every stage
`main` runs in (one-line errors, OpenLineage run events)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps

from stages.common.openlineage import stage_run


class StageError(Exception):
    """A failure the user can act on: bad params, bad input rows, a failed validation."""


def stage_entrypoint(name: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a stage `main(argv)`: a StageError or ValueError becomes one line on stderr and exit code 1.
    Under DVC the run also emits OpenLineage START and COMPLETE or FAIL events (stages.common.openlineage)."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                with stage_run(name) as events:
                    code = main(argv)
                    if events is not None and code:
                        events.finish(f"exit code {code}")
                    return code
            except (StageError, ValueError) as exc:
                # ValueError comes from params dataclasses validating themselves. The FAIL event has
                # been sent by stage_run as the exception left it.
                print(f"{name}: error: {exc}", file=sys.stderr)
                return 1

        return run

    return wrap
