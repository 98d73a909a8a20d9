"""Compiled CPU operators for the student's shapes, each defined by a NumPy reference (`distillery_kernels.reference`).

The operators live in the extension `distillery_kernels._ops` (C++ in `kernels/csrc`, built by the project's
install with pybind11 and the machine's compiler). Two code paths: AVX-512 VNNI where the CPU has it, else a
portable one; `DISTILLERY_KERNELS_ISA=portable` forces the portable path (`auto`, the default, picks by CPU),
and `set_isa` switches at run time. Where the extension was not built (no compiler at install) `available()` is
False and `unavailable_reason()` says why; nothing else in the project needs it.

Results do not depend on the code path or on the thread count: both paths do the same floating-point operations in
the same order, and work is split into ranges whose results are written, never summed, across threads.
"""

from __future__ import annotations

import os
from typing import Any

ISA_ENV = "DISTILLERY_KERNELS_ISA"

try:
    from distillery_kernels import _ops as ops
except ImportError as exc:  # the optional extension was not built: say so, never fail the import
    ops: Any = None
    _REASON = f"distillery_kernels._ops is not built ({exc}); reinstall with a C++ compiler present: pip install -e ."
else:
    _REASON = ""
    ops.set_isa(os.environ.get(ISA_ENV, "auto") or "auto")


def available() -> bool:
    return ops is not None


def unavailable_reason() -> str:
    """Why the compiled operators cannot run here ('' when they can)."""
    return _REASON


def require() -> Any:
    """The extension module, or a RuntimeError naming why it is missing."""
    if ops is None:
        raise RuntimeError(_REASON)
    return ops


def isa() -> str:
    """The code path in use: 'avx512_vnni' or 'portable'."""
    return require().isa()


def set_isa(name: str) -> None:
    """'auto', 'avx512_vnni' (a ValueError where the CPU lacks it) or 'portable'."""
    require().set_isa(name)


def set_threads(n: int) -> None:
    """Threads the operators split their work over (the caller's thread is one of them)."""
    require().set_threads(n)
