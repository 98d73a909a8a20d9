"""The one error type a stage shows to a user as a single line (no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps


class StageError(Exception):
    """A failure the user can act on: bad params, bad input rows, a failed validation."""


def stage_entrypoint(name: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a stage `main(argv)`: a StageError or ValueError becomes one line on stderr and exit code 1."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except (StageError, ValueError) as exc:
                # ValueError comes from params dataclasses validating themselves.
                print(f"{name}: error: {exc}", file=sys.stderr)
                return 1

        return run

    return wrap
