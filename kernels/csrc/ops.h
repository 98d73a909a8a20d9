// distillery kernels: declarations shared by the portable and the AVX-512 code paths, and the module.
//
// Every operator is written twice, once per code path, and both compute the same floating-point operations in
// the same order (the build passes -ffp-contract=off, so no multiply-add is fused behind our back): a result does
// not depend on the path or on the thread count. kernels/reference.py defines each result in NumPy.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

namespace distillery {

// INT8 weights [K, N] packed for the matmul's inner loop: 64-column panels; inside a panel, for each group of 4
// rows of K, the panel's 16-column blocks one after another, each 64 bytes = 16 columns x 4 consecutive k. This
// is the operand layout of VNNI's vpdpbusd (16 int32 lanes, each the dot product of 4 u8 x 4 s8), and the
// portable loop reads the same bytes.
struct Packed {
    int k = 0, n = 0;       // logical shape
    int k4 = 0;             // ceil(k / 4)
    int n16 = 0;            // ceil(n / 16): 16-column blocks
    int panels = 0;         // ceil(n / 64)
    int8_t* data = nullptr; // panels x k4 x blocks(panel) x 64 bytes
    int32_t* colsum = nullptr;  // [n16 * 16]: sum over k of each column (the activations' zero point term)
    float* scale = nullptr;     // [n16 * 16]: per-column weight scales (0 in the padding)
    float* bias = nullptr;      // [n16 * 16]: bias (0 when none, and in the padding)
    int blocks(int panel) const { return panel == panels - 1 ? n16 - 4 * panel : 4; }
    const int8_t* panel_data(int panel) const { return data + static_cast<size_t>(panel) * k4 * 256; }
};

// INT8 weights [K, N] in block-sparse rows (BSR) for a matmul that skips zero blocks. A block is `bk4` groups of 4
// rows of K by `nb` 16-column blocks (block shape 4 bk4 x 16 nb); columns come in groups of `nb` 16-column blocks,
// and each group keeps only its blocks that hold a non-zero weight: `ptr[g] .. ptr[g + 1]` index `kblock` (which
// block of K, ascending) and the group's packed bytes start at `data + offset[g]`. A kept block is packed as the
// dense panel is (for each group of 4 rows of K, the group's 16-column blocks one after another, 64 bytes each),
// `bk4` groups of 4 rows long (rows past K are 0). colsum, scale and bias are as in Packed.
struct SparsePacked {
    int k = 0, n = 0, k4 = 0, n16 = 0;
    int bk4 = 1, nb = 1;  // block: 4 bk4 rows of K x 16 nb columns
    int groups = 0;       // ceil(n16 / nb)
    const int32_t* ptr = nullptr;     // [groups + 1]
    const int32_t* kblock = nullptr;  // [ptr[groups]]
    const int64_t* offset = nullptr;  // [groups]: byte offset of the group's first kept block
    const int8_t* data = nullptr;
    const int32_t* colsum = nullptr;
    const float* scale = nullptr;
    const float* bias = nullptr;
    int blocks(int group) const { return group == groups - 1 ? n16 - nb * group : nb; }
};

// Activations quantized per row: u8 with the row's zero point, as ONNX's DynamicQuantizeLinear does for a tensor
// (the range always holds 0; scale = (max - min) / 255; zp = rint(-min / scale); q = clamp(rint(x / scale) + zp)).
struct QuantRows {
    int m = 0, k = 0, lda = 0;  // lda = 4 * ceil(k / 4), the tail zero-filled
    uint8_t* q = nullptr;
    float* scale = nullptr;
    int32_t* zp = nullptr;
};

// One matmul call: rows [m] of `a` against `w` (or `s`), written as floats (y = (acc - zp * colsum) * (sa * sw) + bias,
// then GELU when `gelu`) or, when `out_s32` is set, as the raw INT32 accumulators.
struct GemmArgs {
    const QuantRows* a;
    const Packed* w;  // dense weights, or null when `s` holds block-sparse ones
    const SparsePacked* s;
    float* out;
    int32_t* out_s32;
    int ldo;
    bool gelu;
};

// attention(): one task per (sequence, head), tasks [task0, task1). Without `offsets`, sequence b is rows
// [b * seq, (b + 1) * seq) and mask[b * seq + j] says whether key j is a real token. With `offsets` (batch + 1
// ascending row indices), sequence b is the packed rows [offsets[b], offsets[b + 1]), all real, `seq` is the
// longest of them and `mask` holds `seq` ones: the layout the engine uses, padding dropped.

// Scalar helpers both paths use for the same arithmetic (the vector code mirrors them lane by lane).
inline float erf_approx(float x);
inline float exp_approx(float x);

namespace portable {
void quantize_rows(const float* x, int row0, int row1, QuantRows& out);
void gemm_tiles(const GemmArgs& g, int task0, int task1);  // tasks: panel-major (panel, 4-row tile)
void sparse_tiles(const GemmArgs& g, int task0, int task1);  // tasks: group-major (column group, 4-row tile)
void add_layernorm(const float* x, const float* residual, const float* gamma, const float* beta, float eps,
                   int row0, int row1, int width, float* out);
void attention(const float* q, const float* k, const float* v, int ld, const int64_t* mask, int seq,
               const int* offsets, int heads, int head_dim, int task0, int task1, float* out, int ldo);
}  // namespace portable

namespace avx512 {
bool supported();
int64_t peak_loop(int64_t iterations);  // iterations x 24 independent vpdpbusd: INT8 multiply-adds = 1536 x iterations
void quantize_rows(const float* x, int row0, int row1, QuantRows& out);
void gemm_tiles(const GemmArgs& g, int task0, int task1);
void sparse_tiles(const GemmArgs& g, int task0, int task1);
void add_layernorm(const float* x, const float* residual, const float* gamma, const float* beta, float eps,
                   int row0, int row1, int width, float* out);
void attention(const float* q, const float* k, const float* v, int ld, const int64_t* mask, int seq,
               const int* offsets, int heads, int head_dim, int task0, int task1, float* out, int ldo);
}  // namespace avx512

constexpr int kRowTile = 4;

inline int row_tiles(int m) { return (m + kRowTile - 1) / kRowTile; }

// The matmul's tasks: (column panel or group) x 4-row tile.
inline int gemm_tasks(const GemmArgs& g) { return (g.s ? g.s->groups : g.w->panels) * row_tiles(g.a->m); }

// Attention's key layout, shared by both paths: head `h` of the `seq` keys from row `base` of k (row stride ld),
// transposed into kt[d][j] with rows of `sp` (seq rounded up to 16; the padding stays 0), so a score sums over d
// in order for 16 keys at a time.
inline void transpose_keys(const float* k, int ld, size_t base, int seq, int h, int head_dim, int sp, float* kt) {
    for (int j = 0; j < seq; ++j)
        for (int d = 0; d < head_dim; ++d) kt[static_cast<size_t>(d) * sp + j] = k[(base + j) * ld + h * head_dim + d];
}

// exp(x) for float: x = n ln2 + f (|f| <= ln2 / 2), 2^n exactly, e^f by its degree-6 Taylor polynomial (relative
// error < 2e-7 over the range); under -86 it is 0 (no subnormal results), which softmax and GELU want.
inline float exp_approx(float x) {
    if (x < -86.0f) return 0.0f;
    if (x > 88.0f) x = 88.0f;
    const float n = std::nearbyint(x * 1.44269504f);
    const float f = (x - n * 0.693145752f) - n * 1.42860677e-06f;
    float p = 1.38888889e-3f;
    p = p * f + 8.33333333e-3f;
    p = p * f + 4.16666667e-2f;
    p = p * f + 1.66666667e-1f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return std::ldexp(p, static_cast<int>(n));
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): 1 - (a1 t + ... + a5 t^5) e^(-x^2), t = 1/(1+px).
inline float erf_approx(float x) {
    const float ax = std::fabs(x);
    const float t = 1.0f / (1.0f + 0.3275911f * ax);
    float p = 1.061405429f;
    p = p * t + -1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t + -0.284496736f;
    p = p * t + 0.254829592f;
    p = p * t;
    const float r = 1.0f - p * exp_approx(-(ax * ax));
    return x < 0.0f ? -r : r;
}

inline float gelu(float y) { return 0.5f * y * (1.0f + erf_approx(y * 0.707106781f)); }

}  // namespace distillery
