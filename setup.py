"""The compiled part of distillery: distillery_kernels._ops (C++ in kernels/csrc), built by `pip install` with
pybind11 from PyPI and the machine's C++ compiler. It is optional: where it cannot be built, the install still
succeeds, `distillery_kernels.available()` is False with the reason, and everything else runs."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup

ops = Pybind11Extension(
    "distillery_kernels._ops",
    sorted(["kernels/csrc/module.cpp", "kernels/csrc/portable.cpp", "kernels/csrc/avx512.cpp"]),
    depends=["kernels/csrc/ops.h"],
    cxx_std=20,  # std::atomic wait/notify for the thread pool
    # -ffp-contract=off: no multiply-add fused by the compiler, so the portable and AVX-512 paths (which write the
    # same operations in the same order) give the same bits. The AVX-512 file selects its instructions itself.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
)
ops.optional = True  # a failed compile leaves the package without the kernels engine, not uninstalled

# The operators' Python package is imported as distillery_kernels and lives in kernels/distillery_kernels: a top-level
# package named `kernels` would shadow Hugging Face's `kernels`, which transformers imports. (kernels/ itself has no
# __init__.py, so running from the repository root shadows nothing.)
setup(
    packages=find_packages(include=["stages", "stages.*", "flows", "flows.*", "deploy", "deploy.*"])
    + ["distillery_kernels"],
    package_dir={"distillery_kernels": "kernels/distillery_kernels"},
    ext_modules=[ops],
)
