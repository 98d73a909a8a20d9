// The AVX-512 code path (F, BW, VL, DQ and VNNI), compiled for those instructions whatever the build's target and
// called only when the CPU has them (avx512::supported). It mirrors portable.cpp operation by operation.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace distillery::avx512 {

bool supported() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

// The machine's INT8 peak as this code can reach it: 24 independent accumulators (more than the multiply-add
// latency times its issue rate), each vpdpbusd 64 multiply-adds, no memory traffic.
int64_t peak_loop(int64_t iterations) {
    __m512i acc[24];
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_epi32(i);
    const __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01FF01FF);
    for (int64_t it = 0; it < iterations; ++it)
        for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __m512i s = acc[0];
    for (int i = 1; i < 24; ++i) s = _mm512_add_epi32(s, acc[i]);
    return _mm512_reduce_add_epi32(s);  // used, so the loop is not optimized away
}

static inline __mmask16 tail_mask(int n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

void quantize_rows(const float* x, int row0, int row1, QuantRows& out) {
    const int k = out.k;
    for (int r = row0; r < row1; ++r) {
        const float* row = x + static_cast<size_t>(r) * k;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        for (int i = 0; i < k; i += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(tail_mask(k - i), row + i);  // zeros in the tail: 0 is in range
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi);
        float scale = (mx - mn) / 255.0f;
        if (scale == 0.0f) scale = 1.0f;
        const float zpf = std::min(255.0f, std::max(0.0f, std::nearbyint(-mn / scale)));
        const int zp = static_cast<int>(zpf);
        const __m512 vs = _mm512_set1_ps(scale);
        const __m512i vz = _mm512_set1_epi32(zp), v0 = _mm512_setzero_si512(), v255 = _mm512_set1_epi32(255);
        uint8_t* q = out.q + static_cast<size_t>(r) * out.lda;
        for (int i = 0; i < out.lda; i += 16) {
            const __mmask16 m = tail_mask(k - i);
            const __m512 v = _mm512_maskz_loadu_ps(m, row + i);
            const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(t), vz);
            qi = _mm512_min_epi32(_mm512_max_epi32(qi, v0), v255);
            qi = _mm512_maskz_mov_epi32(m, qi);  // the padding to lda is 0
            _mm_mask_storeu_epi8(q + i, tail_mask(out.lda - i), _mm512_cvtepi32_epi8(qi));
        }
        out.scale[r] = scale;
        out.zp[r] = zp;
    }
}

// exp_approx (ops.h), lane by lane with the same operations.
static inline __m512 exp_v(__m512 x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-86.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145752f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(1.42860677e-06f)));
    __m512 p = _mm512_set1_ps(1.38888889e-3f);
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(8.33333333e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(4.16666667e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.66666667e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}

// gelu (ops.h), lane by lane.
static inline __m512 gelu_v(__m512 y) {
    const __m512 x = _mm512_mul_ps(y, _mm512_set1_ps(0.707106781f));
    const __m512 ax = _mm512_abs_ps(x);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                   _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(_mm512_set1_ps(0.3275911f), ax)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(-1.453152027f));
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(1.421413741f));
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(-0.284496736f));
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 r = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(p, exp_v(_mm512_sub_ps(_mm512_setzero_ps(),
                                                                                         _mm512_mul_ps(ax, ax)))));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    r = _mm512_mask_sub_ps(r, neg, _mm512_setzero_ps(), r);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), _mm512_add_ps(_mm512_set1_ps(1.0f), r));
}

// The epilogue of an MR x (16 NB) tile of accumulators from row r0, column col0: INT32, or (acc - zp colsum)
// (sa sw) + bias (then GELU).
template <int MR, int NB>
static inline void store_tile(const GemmArgs& g, int n, const int32_t* colsum, const float* scale, const float* bias,
                              int r0, int col0, __m512i (&acc)[MR][NB]) {
    const QuantRows& a = *g.a;
    for (int r = 0; r < MR; ++r) {
        const int row = r0 + r;
        const __m512 sa = _mm512_set1_ps(a.scale[row]);
        const __m512i zp = _mm512_set1_epi32(a.zp[row]);
        for (int j = 0; j < NB; ++j) {
            const int c = col0 + 16 * j;
            const __mmask16 m = tail_mask(n - c);
            if (g.out_s32) {
                _mm512_mask_storeu_epi32(g.out_s32 + static_cast<size_t>(row) * g.ldo + c, m, acc[r][j]);
                continue;
            }
            const __m512i centred = _mm512_sub_epi32(acc[r][j], _mm512_mullo_epi32(zp, _mm512_loadu_si512(colsum + c)));
            __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(sa, _mm512_loadu_ps(scale + c)));
            y = _mm512_add_ps(y, _mm512_loadu_ps(bias + c));
            if (g.gelu) y = gelu_v(y);
            _mm512_mask_storeu_ps(g.out + static_cast<size_t>(row) * g.ldo + c, m, y);
        }
    }
}

// acc[s] += rows `ar` times the packed weights at `b` over the groups of 4 rows of K [k4_0, k4_1) (NB 16-column
// blocks, 64 bytes each, per group): consecutive groups go to the S accumulator sets in turn (S = 4 / NB, so with
// fewer than 4 column blocks MR x 4 multiply-add chains still run; summed at the end, INT32 addition is exact).
// The dense tile and the block-sparse one share it: the same loop, and the same registers (no spills).
template <int MR, int NB, int S>
static inline void accumulate(__m512i (&acc)[S][MR][NB], const uint8_t* const (&ar)[MR], const int8_t* b, int k4_0,
                              int k4_1) {
    int k4 = k4_0;
    for (; k4 + S <= k4_1; k4 += S)
        for (int s = 0; s < S; ++s) {
            const int8_t* bk = b + static_cast<size_t>(k4 + s - k4_0) * NB * 64;
            __m512i bv[NB];
            for (int j = 0; j < NB; ++j) bv[j] = _mm512_loadu_si512(bk + j * 64);
            for (int r = 0; r < MR; ++r) {
                int32_t four;
                std::memcpy(&four, ar[r] + 4 * (k4 + s), 4);
                const __m512i av = _mm512_set1_epi32(four);
                for (int j = 0; j < NB; ++j) acc[s][r][j] = _mm512_dpbusd_epi32(acc[s][r][j], av, bv[j]);
            }
        }
    for (; k4 < k4_1; ++k4) {
        const int8_t* bk = b + static_cast<size_t>(k4 - k4_0) * NB * 64;
        for (int r = 0; r < MR; ++r) {
            int32_t four;
            std::memcpy(&four, ar[r] + 4 * k4, 4);
            const __m512i av = _mm512_set1_epi32(four);
            for (int j = 0; j < NB; ++j)
                acc[0][r][j] = _mm512_dpbusd_epi32(acc[0][r][j], av, _mm512_loadu_si512(bk + j * 64));
        }
    }
}

template <int MR, int NB, int S>
static inline void start(__m512i (&acc)[S][MR][NB], const uint8_t* (&ar)[MR], const QuantRows& a, int r0) {
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NB; ++j) acc[s][r][j] = _mm512_setzero_si512();
    for (int r = 0; r < MR; ++r) ar[r] = a.q + static_cast<size_t>(r0 + r) * a.lda;
}

template <int MR, int NB, int S>
static inline void finish(__m512i (&acc)[S][MR][NB]) {
    for (int s = 1; s < S; ++s)
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NB; ++j) acc[0][r][j] = _mm512_add_epi32(acc[0][r][j], acc[s][r][j]);
}

template <int MR, int NB>
static void tile(const GemmArgs& g, int panel, int r0) {
    constexpr int S = 4 / NB;
    const Packed& w = *g.w;
    __m512i acc[S][MR][NB];
    const uint8_t* ar[MR];
    start(acc, ar, *g.a, r0);
    const int8_t* b = w.panel_data(panel);
    // in chunks of K, as the block-sparse tile walks its blocks: in this shape GCC keeps all accumulators in
    // registers (one loop over all of K spilled one per step)
    constexpr int kChunk = 16;
    for (int k4 = 0; k4 < w.k4; k4 += kChunk, b += static_cast<size_t>(kChunk) * NB * 64)
        accumulate(acc, ar, b, k4, std::min(k4 + kChunk, w.k4));
    finish(acc);
    store_tile<MR, NB>(g, w.n, w.colsum, w.scale, w.bias, r0, panel * 64, acc[0]);
}

// A tile of a block-sparse matmul: only the group's kept blocks, each accumulated as the dense tile's K is.
template <int MR, int NB>
static void sparse_tile(const GemmArgs& g, int group, int r0) {
    constexpr int S = 4 / NB;
    const SparsePacked& w = *g.s;
    __m512i acc[S][MR][NB];
    const uint8_t* ar[MR];
    start(acc, ar, *g.a, r0);
    const int8_t* b = w.data + w.offset[group];
    const size_t block_bytes = static_cast<size_t>(w.bk4) * NB * 64;
    for (int i = w.ptr[group]; i < w.ptr[group + 1]; ++i, b += block_bytes) {
        const int k4_0 = w.kblock[i] * w.bk4;
        accumulate(acc, ar, b, k4_0, std::min(k4_0 + w.bk4, w.k4));
    }
    finish(acc);
    store_tile<MR, NB>(g, w.n, w.colsum, w.scale, w.bias, r0, group * w.nb * 16, acc[0]);
}

template <int MR>
static void sparse_tile_rows(const GemmArgs& g, int group, int r0) {
    switch (g.s->blocks(group)) {
        case 1: return sparse_tile<MR, 1>(g, group, r0);
        case 2: return sparse_tile<MR, 2>(g, group, r0);
        case 3: return sparse_tile<MR, 3>(g, group, r0);
        default: return sparse_tile<MR, 4>(g, group, r0);
    }
}

void sparse_tiles(const GemmArgs& g, int task0, int task1) {
    const int tiles = row_tiles(g.a->m);
    for (int task = task0; task < task1; ++task) {
        const int group = task / tiles, r0 = (task % tiles) * kRowTile;
        switch (std::min(kRowTile, g.a->m - r0)) {
            case 1: sparse_tile_rows<1>(g, group, r0); break;
            case 2: sparse_tile_rows<2>(g, group, r0); break;
            case 3: sparse_tile_rows<3>(g, group, r0); break;
            default: sparse_tile_rows<4>(g, group, r0); break;
        }
    }
}

template <int MR>
static void tile_rows(const GemmArgs& g, int panel, int r0) {
    switch (g.w->blocks(panel)) {
        case 1: return tile<MR, 1>(g, panel, r0);
        case 2: return tile<MR, 2>(g, panel, r0);
        case 3: return tile<MR, 3>(g, panel, r0);
        default: return tile<MR, 4>(g, panel, r0);
    }
}

void gemm_tiles(const GemmArgs& g, int task0, int task1) {
    if (g.s) return sparse_tiles(g, task0, task1);
    const int tiles = row_tiles(g.a->m);
    for (int task = task0; task < task1; ++task) {
        const int panel = task / tiles, r0 = (task % tiles) * kRowTile;
        switch (std::min(kRowTile, g.a->m - r0)) {
            case 1: tile_rows<1>(g, panel, r0); break;
            case 2: tile_rows<2>(g, panel, r0); break;
            case 3: tile_rows<3>(g, panel, r0); break;
            default: tile_rows<4>(g, panel, r0); break;
        }
    }
}

// Lanes 0..15 of a register added in order (portable.cpp's lane_sum order).
static inline float lanes_in_order(__m512 v) {
    alignas(64) float l[16];
    _mm512_store_ps(l, v);
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += l[i];
    return s;
}

void add_layernorm(const float* x, const float* residual, const float* gamma, const float* beta, float eps,
                   int row0, int row1, int width, float* out) {
    std::vector<float> sum(width + 16);
    for (int r = row0; r < row1; ++r) {
        const float* xr = x + static_cast<size_t>(r) * width;
        const float* rr = residual ? residual + static_cast<size_t>(r) * width : nullptr;
        __m512 total = _mm512_setzero_ps();
        for (int i = 0; i < width; i += 16) {
            const __mmask16 m = tail_mask(width - i);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
            if (rr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rr + i));
            _mm512_storeu_ps(sum.data() + i, v);
            total = _mm512_add_ps(total, v);
        }
        const float mean = lanes_in_order(total) / static_cast<float>(width);
        const __m512 vm = _mm512_set1_ps(mean);
        __m512 sq = _mm512_setzero_ps();
        for (int i = 0; i < width; i += 16) {
            const __m512 d = _mm512_maskz_sub_ps(tail_mask(width - i), _mm512_loadu_ps(sum.data() + i), vm);
            sq = _mm512_add_ps(sq, _mm512_mul_ps(d, d));
        }
        const float var = lanes_in_order(sq) / static_cast<float>(width);
        const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
        float* y = out + static_cast<size_t>(r) * width;
        for (int i = 0; i < width; i += 16) {
            const __mmask16 m = tail_mask(width - i);
            const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(sum.data() + i), vm);
            const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, inv), _mm512_maskz_loadu_ps(m, gamma + i)),
                                           _mm512_maskz_loadu_ps(m, beta + i));
            _mm512_mask_storeu_ps(y + i, m, v);
        }
    }
}

// QB queries of one (batch row, head) at a time: their score and output sums are independent chains, which keeps
// the adder busy (one query alone waits on the latency of each add); every lane still sums in portable.cpp's order.
template <int QB>
static void attention_queries(const float* q, const float* v, int ld, const int64_t* m, int seq, int sp,
                              int head_dim, const float* kt, float* p, float scale, float* out, int ldo) {
    for (int j = 0; j < sp; j += 16) {
        __m512 acc[QB];
        for (int r = 0; r < QB; ++r) acc[r] = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; ++d) {
            const __m512 kv = _mm512_loadu_ps(kt + static_cast<size_t>(d) * sp + j);
            for (int r = 0; r < QB; ++r)
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_set1_ps(q[static_cast<size_t>(r) * ld + d]), kv));
        }
        for (int r = 0; r < QB; ++r) _mm512_storeu_ps(p + r * sp + j, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
    }
    for (int r = 0; r < QB; ++r) {
        float* pr = p + r * sp;
        float hi = -INFINITY;
        for (int j = 0; j < seq; ++j)
            if (m[j]) hi = std::max(hi, pr[j]);
        float total = 0.0f;
        for (int j = 0; j < seq; j += 16) {
            const int n = std::min(16, seq - j);
            alignas(64) float e[16];
            _mm512_store_ps(e, exp_v(_mm512_sub_ps(_mm512_loadu_ps(pr + j), _mm512_set1_ps(hi))));
            for (int l = 0; l < n; ++l) {
                pr[j + l] = m[j + l] ? e[l] : 0.0f;
                total += pr[j + l];
            }
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int j = 0; j < seq; ++j) pr[j] = pr[j] * inv;
    }
    for (int d = 0; d < head_dim; d += 16) {
        const __mmask16 md = tail_mask(head_dim - d);
        __m512 acc[QB];
        for (int r = 0; r < QB; ++r) acc[r] = _mm512_setzero_ps();
        for (int j = 0; j < seq; ++j) {
            if (!m[j]) continue;
            const __m512 vj = _mm512_maskz_loadu_ps(md, v + static_cast<size_t>(j) * ld + d);
            for (int r = 0; r < QB; ++r) acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_set1_ps(p[r * sp + j]), vj));
        }
        for (int r = 0; r < QB; ++r) _mm512_mask_storeu_ps(out + static_cast<size_t>(r) * ldo + d, md, acc[r]);
    }
}

void attention(const float* q, const float* k, const float* v, int ld, const int64_t* mask, int seq,
               const int* offsets, int heads, int head_dim, int task0, int task1, float* out, int ldo) {
    constexpr int kQueries = 4;
    const int widest = (seq + 15) / 16 * 16;
    std::vector<float> p(static_cast<size_t>(kQueries) * widest), kt(static_cast<size_t>(head_dim) * widest, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    for (int task = task0; task < task1; ++task) {
        const int b = task / heads, h = task % heads;
        const size_t base = offsets ? static_cast<size_t>(offsets[b]) : static_cast<size_t>(b) * seq;
        const int len = offsets ? offsets[b + 1] - offsets[b] : seq;
        const int sp = (len + 15) / 16 * 16;
        const int64_t* m = offsets ? mask : mask + base;
        transpose_keys(k, ld, base, len, h, head_dim, sp, kt.data());
        const float* vh = v + base * ld + h * head_dim;
        for (int i = 0; i < len; i += kQueries) {
            const float* qi = q + (base + i) * ld + h * head_dim;
            float* y = out + (base + i) * ldo + h * head_dim;
            switch (std::min(kQueries, len - i)) {
                case 1: attention_queries<1>(qi, vh, ld, m, len, sp, head_dim, kt.data(), p.data(), scale, y, ldo); break;
                case 2: attention_queries<2>(qi, vh, ld, m, len, sp, head_dim, kt.data(), p.data(), scale, y, ldo); break;
                case 3: attention_queries<3>(qi, vh, ld, m, len, sp, head_dim, kt.data(), p.data(), scale, y, ldo); break;
                default: attention_queries<4>(qi, vh, ld, m, len, sp, head_dim, kt.data(), p.data(), scale, y, ldo);
            }
        }
    }
}

}  // namespace distillery::avx512
#pragma GCC pop_options
