"""Every compiled operator against its NumPy reference (distillery_kernels.reference), over generated shapes, on both
code paths and on 1 and 2 threads; the INT32 accumulation and the linear's output without GELU bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distillery_kernels as kernels
from distillery_kernels import reference as ref

# The CI machines have a compiler and AVX-512 VNNI: the extension must have been built there, never skipped.
ops = kernels.require()
PATHS = ["portable"] + (["avx512_vnni"] if ops.avx512_supported() else [])
# The student's widths: hidden 384, feed-forward 1536, and what pruning leaves (heads of 32, FFN rows), plus odd ones.
WIDTHS = st.sampled_from([1, 3, 16, 37, 64, 96, 288, 384, 500, 921, 1536])
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)  # the fixture sets a global


@pytest.fixture(params=[(p, t) for p in PATHS for t in (1, 2)], ids=lambda pt: f"{pt[0]}-{pt[1]}t")
def path(request):
    isa, threads = request.param
    kernels.set_isa(isa)
    kernels.set_threads(threads)
    yield isa
    kernels.set_isa("auto")
    kernels.set_threads(1)


def weights(rng, k, n):
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    return w, rng.uniform(1e-3, 3e-2, n).astype(np.float32), rng.standard_normal(n).astype(np.float32)


@SETTINGS
@given(rows=st.integers(1, 128), k=WIDTHS, n=WIDTHS, seed=st.integers(0, 2**32 - 1))
def test_int8_accumulation_is_exact(path, rows, k, n, seed):
    rng = np.random.default_rng(seed)
    w, scale, _ = weights(rng, k, n)
    a = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    np.testing.assert_array_equal(ops.gemm_s32(a, ops.PackedWeights(w, scale)), ref.gemm_s32(a, w))


def block_sparse(rng, w, block, sparsity):
    """w with a `sparsity` share of its (block_k x block_n) blocks zeroed at random."""
    bk, bn = block
    kb, nb = -(-w.shape[0] // bk), -(-w.shape[1] // bn)
    drop = rng.random((kb, nb)) < sparsity
    mask = np.repeat(np.repeat(drop, bk, axis=0), bn, axis=1)[: w.shape[0], : w.shape[1]]
    return np.where(mask, 0, w).astype(np.int8)


BLOCKS = st.sampled_from([(4, 16), (8, 16), (16, 16), (32, 16), (4, 32), (16, 32), (4, 64), (16, 64), (32, 64)])


@SETTINGS
@given(rows=st.integers(1, 128), k=WIDTHS, n=WIDTHS, block=BLOCKS, sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0]),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_block_sparse_accumulation_is_exact_and_keeps_only_non_zero_blocks(path, rows, k, n, block, sparsity, seed):
    rng = np.random.default_rng(seed)
    w, scale, b = weights(rng, k, n)
    w = block_sparse(rng, w, block, sparsity)
    if block[0] > 4 * -(-k // 4):
        with pytest.raises(ValueError, match="block_k must be a multiple of 4"):
            ops.PackedWeights(w, scale, b, block=block)
        return
    packed = ops.PackedWeights(w, scale, b, block=block)
    assert packed.block == block and packed.density == pytest.approx(ref.block_density(w, block))
    a = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    np.testing.assert_array_equal(ops.gemm_s32(a, packed), ref.gemm_s32(a, w))
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float32)
    np.testing.assert_array_equal(ops.linear(x, packed), ops.linear(x, ops.PackedWeights(w, scale, b)))
    np.testing.assert_array_equal(
        ops.linear(x, packed, gelu=True), ops.linear(x, ops.PackedWeights(w, scale, b), gelu=True)
    )


def test_a_bad_block_shape_is_named():
    w = np.ones((64, 32), np.int8)
    scale = np.ones(32, np.float32)
    for block, match in [((6, 16), "block_k must be a multiple of 4"), ((16, 48), "block_n must be 16, 32 or 64")]:
        with pytest.raises(ValueError, match=match):
            ops.PackedWeights(w, scale, block=block)
    assert ops.PackedWeights(w, scale).block is None and ops.PackedWeights(w, scale).density == 1.0


@SETTINGS
@given(rows=st.integers(1, 128), k=WIDTHS, seed=st.integers(0, 2**32 - 1), spread=st.sampled_from([0.0, 1e-3, 1, 50]))
def test_rows_quantize_as_the_reference(path, rows, k, seed, spread):
    x = (np.random.default_rng(seed).standard_normal((rows, k)) * spread).astype(np.float32)
    for got, want in zip(ops.quantize_rows(x), ref.quantize_rows(x), strict=True):
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(rows=st.integers(1, 128), k=WIDTHS, n=WIDTHS, seed=st.integers(0, 2**32 - 1), bias=st.booleans())
def test_linear_equals_the_reference_bit_for_bit(path, rows, k, n, seed, bias):
    rng = np.random.default_rng(seed)
    w, scale, b = weights(rng, k, n)
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float32)
    packed = ops.PackedWeights(w, scale, b if bias else None)
    np.testing.assert_array_equal(ops.linear(x, packed), ref.linear(x, w, scale, b if bias else None))


@SETTINGS
@given(rows=st.integers(1, 64), k=WIDTHS, n=WIDTHS, seed=st.integers(0, 2**32 - 1))
def test_linear_with_gelu_is_within_the_erf_approximation_of_the_exact_gelu(path, rows, k, n, seed):
    rng = np.random.default_rng(seed)
    w, scale, b = weights(rng, k, n)
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float32)
    got = ops.linear(x, ops.PackedWeights(w, scale, b), gelu=True)
    want, pre = ref.linear(x, w, scale, b, gelu_=True), ref.linear(x, w, scale, b)
    # erf's approximation is within 1.5e-7 absolute, so GELU's within 0.75e-7 |pre-activation|
    bound = 2e-6 * np.abs(want) + 1e-7 * np.abs(pre) + 1e-30
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))


def test_linear_keeps_leading_dimensions_and_names_a_wrong_width(path):
    rng = np.random.default_rng(0)
    w, scale, b = weights(rng, 8, 5)
    packed = ops.PackedWeights(w, scale, b)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(ops.linear(x, packed), ref.linear(x, w, scale, b))
    with pytest.raises(ValueError, match="last dimension must be 8, got 7"):
        ops.linear(x[..., :7], packed)
    with pytest.raises(ValueError, match="one value per output column"):
        ops.PackedWeights(w, scale[:4])


@SETTINGS
@given(rows=st.integers(1, 128), width=WIDTHS, seed=st.integers(0, 2**32 - 1), residual=st.booleans())
def test_add_layernorm(path, rows, width, seed, residual):
    rng = np.random.default_rng(seed)
    x, r = (rng.standard_normal((2, rows, width)) * 3).astype(np.float32)
    gamma, beta = rng.standard_normal((2, width)).astype(np.float32)
    got = ops.add_layernorm(x, r if residual else None, gamma, beta, 1e-12)
    want = ref.add_layernorm(x, r if residual else None, gamma, beta, 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@SETTINGS
@given(batch=st.integers(1, 8), seq=st.integers(1, 64), heads=st.integers(1, 12), head_dim=st.sampled_from([1, 8, 32]),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_attention(path, batch, seq, heads, head_dim, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((3, batch, seq, heads * head_dim)) * 2).astype(np.float32)
    lengths = rng.integers(0, seq + 1, batch)  # 0: a row of padding only, which gives zeros
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    np.testing.assert_allclose(ops.attention(q, k, v, mask, heads), ref.attention(q, k, v, mask, heads), atol=2e-5)


def test_results_do_not_depend_on_the_code_path_or_the_thread_count():
    rng = np.random.default_rng(7)
    w, scale, b = weights(rng, 384, 1536)
    x = rng.standard_normal((45, 384)).astype(np.float32)
    q, k, v = rng.standard_normal((3, 4, 13, 384)).astype(np.float32)
    mask = np.ones((4, 13), np.int64)
    mask[1, 5:] = 0
    outputs = []
    for isa in PATHS:
        for threads in (1, 2):
            kernels.set_isa(isa)
            kernels.set_threads(threads)
            packed = ops.PackedWeights(w, scale, b)
            outputs.append(
                [
                    ops.linear(x, packed, gelu=True),
                    ops.add_layernorm(x, x, w[0, :384] * 0.1, b[:384], 1e-12),
                    ops.attention(q, k, v, mask, 12),
                ]  # fmt: skip
            )
    kernels.set_isa("auto")
    kernels.set_threads(1)
    for other in outputs[1:]:
        for got, first in zip(other, outputs[0], strict=True):
            assert got.tobytes() == first.tobytes()


def test_the_environment_forces_the_portable_path_and_rejects_an_unknown_one():
    code = "import distillery_kernels as k; print(k.isa())"
    env = {**os.environ, kernels.ISA_ENV: "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"
    env[kernels.ISA_ENV] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown code path 'sse9'" in bad.stderr


def test_a_forked_child_gets_threads_of_its_own():
    """The pool's threads do not survive fork: a child starts its own instead of waiting on its parent's."""
    import multiprocessing

    kernels.set_threads(2)
    rng = np.random.default_rng(3)
    w, scale, b = weights(rng, 64, 64)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_linear_in_child, (x, w, scale, b)).get(timeout=60)
    kernels.set_threads(1)
    np.testing.assert_array_equal(got, ref.linear(x, w, scale, b))


def _linear_in_child(x, w, scale, b):
    return ops.linear(x, ops.PackedWeights(w, scale, b))


def test_pool_threads_that_sleep_between_operators_wake_for_each():
    """With spinning off every operator wakes the sleeping workers (the futex path): 200 calls, each answered."""
    rng = np.random.default_rng(5)
    w, scale, b = weights(rng, 96, 80)
    packed = ops.PackedWeights(w, scale, b)
    x = rng.standard_normal((9, 96)).astype(np.float32)
    kernels.set_threads(2)
    ops.set_spinning(False)
    try:
        for _ in range(200):
            np.testing.assert_array_equal(ops.linear(x, packed), ref.linear(x, w, scale, b))
    finally:
        ops.set_spinning(True)
        kernels.set_threads(1)
