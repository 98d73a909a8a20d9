// The portable code path: plain C++ over the same packed layout and in the same arithmetic order as the AVX-512
// path (ops.h), for CPUs without AVX-512 VNNI and for DISTILLERY_KERNELS_ISA=portable. It defines the same results
// and is the correctness fallback, not a fast one: its INT8 matmul runs about 17x slower than the VNNI path here.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace distillery::portable {

void quantize_rows(const float* x, int row0, int row1, QuantRows& out) {
    const int k = out.k;
    for (int r = row0; r < row1; ++r) {
        const float* row = x + static_cast<size_t>(r) * k;
        float lo = 0.0f, hi = 0.0f;
        for (int i = 0; i < k; ++i) {
            lo = std::min(lo, row[i]);
            hi = std::max(hi, row[i]);
        }
        float scale = (hi - lo) / 255.0f;
        if (scale == 0.0f) scale = 1.0f;
        const float zpf = std::min(255.0f, std::max(0.0f, std::nearbyint(-lo / scale)));
        const int zp = static_cast<int>(zpf);
        uint8_t* q = out.q + static_cast<size_t>(r) * out.lda;
        for (int i = 0; i < k; ++i) {
            const int v = static_cast<int>(std::nearbyint(row[i] / scale)) + zp;
            q[i] = static_cast<uint8_t>(std::min(255, std::max(0, v)));
        }
        for (int i = k; i < out.lda; ++i) q[i] = 0;
        out.scale[r] = scale;
        out.zp[r] = zp;
    }
}

// The epilogue of a tile: `rows` rows from r0 by `cols` columns from col0 of the accumulators, as INT32 or as
// (acc - zp colsum) (sa sw) + bias (then GELU).
static void store_tile(const GemmArgs& g, const int32_t* colsum, const float* scale, const float* bias, int r0,
                       int rows, int col0, int cols, const int32_t (*acc)[64]) {
    const QuantRows& a = *g.a;
    for (int r = 0; r < rows; ++r) {
        const int row = r0 + r;
        if (g.out_s32) {
            std::memcpy(g.out_s32 + static_cast<size_t>(row) * g.ldo + col0, acc[r], cols * sizeof(int32_t));
            continue;
        }
        float* y = g.out + static_cast<size_t>(row) * g.ldo + col0;
        const float sa = a.scale[row];
        const int32_t zp = a.zp[row];
        for (int c = 0; c < cols; ++c) {
            const int j = col0 + c;
            float v = static_cast<float>(acc[r][c] - zp * colsum[j]) * (sa * scale[j]) + bias[j];
            y[c] = g.gelu ? gelu(v) : v;
        }
    }
}

// Adds 4-row groups [k4_0, k4_1) of packed bytes `b` (`blocks` 16-column blocks per group of 4 rows) to acc.
static void accumulate(const QuantRows& a, int r0, int rows, const int8_t* b, int blocks, int k4_0, int k4_1,
                       int32_t (*acc)[64]) {
    for (int k4 = k4_0; k4 < k4_1; ++k4) {
        const int8_t* bk = b + static_cast<size_t>(k4 - k4_0) * blocks * 64;
        for (int r = 0; r < rows; ++r) {
            const uint8_t* ar = a.q + static_cast<size_t>(r0 + r) * a.lda + 4 * k4;
            for (int c = 0; c < blocks * 16; ++c) {
                const int8_t* bc = bk + c * 4;
                acc[r][c] += ar[0] * bc[0] + ar[1] * bc[1] + ar[2] * bc[2] + ar[3] * bc[3];
            }
        }
    }
}

void gemm_tiles(const GemmArgs& g, int task0, int task1) {
    if (g.s) return sparse_tiles(g, task0, task1);
    const QuantRows& a = *g.a;
    const Packed& w = *g.w;
    const int tiles = row_tiles(a.m);
    int32_t acc[kRowTile][64];
    for (int task = task0; task < task1; ++task) {
        const int panel = task / tiles, r0 = (task % tiles) * kRowTile;
        const int rows = std::min(kRowTile, a.m - r0), blocks = w.blocks(panel);
        std::memset(acc, 0, sizeof(acc));
        accumulate(a, r0, rows, w.panel_data(panel), blocks, 0, w.k4, acc);
        const int col0 = panel * 64;
        store_tile(g, w.colsum, w.scale, w.bias, r0, rows, col0, std::min(64, w.n - col0), acc);
    }
}

void sparse_tiles(const GemmArgs& g, int task0, int task1) {
    const QuantRows& a = *g.a;
    const SparsePacked& w = *g.s;
    const int tiles = row_tiles(a.m);
    int32_t acc[kRowTile][64];
    for (int task = task0; task < task1; ++task) {
        const int group = task / tiles, r0 = (task % tiles) * kRowTile;
        const int rows = std::min(kRowTile, a.m - r0), blocks = w.blocks(group);
        std::memset(acc, 0, sizeof(acc));
        const int8_t* b = w.data + w.offset[group];
        const size_t block_bytes = static_cast<size_t>(w.bk4) * blocks * 64;
        for (int i = w.ptr[group]; i < w.ptr[group + 1]; ++i, b += block_bytes) {
            const int k4_0 = w.kblock[i] * w.bk4;
            accumulate(a, r0, rows, b, blocks, k4_0, std::min(k4_0 + w.bk4, w.k4), acc);
        }
        const int col0 = group * w.nb * 16;
        store_tile(g, w.colsum, w.scale, w.bias, r0, rows, col0, std::min(w.nb * 16, w.n - col0), acc);
    }
}

// Sums of a row in 16 interleaved lanes (lane l holds elements l, l + 16, ...), then the lanes in order: the
// order the AVX-512 path's one register of partial sums gives.
static float lane_sum(const float* x, int n) {
    float lanes[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += x[i + l];
    for (int l = 0; i + l < n; ++l) lanes[l] += x[i + l];
    float s = 0.0f;
    for (int l = 0; l < 16; ++l) s += lanes[l];
    return s;
}

void add_layernorm(const float* x, const float* residual, const float* gamma, const float* beta, float eps,
                   int row0, int row1, int width, float* out) {
    std::vector<float> sum(width), dev(width);
    for (int r = row0; r < row1; ++r) {
        const float* xr = x + static_cast<size_t>(r) * width;
        const float* rr = residual ? residual + static_cast<size_t>(r) * width : nullptr;
        for (int i = 0; i < width; ++i) sum[i] = rr ? xr[i] + rr[i] : xr[i];
        const float mean = lane_sum(sum.data(), width) / static_cast<float>(width);
        for (int i = 0; i < width; ++i) dev[i] = (sum[i] - mean) * (sum[i] - mean);
        const float var = lane_sum(dev.data(), width) / static_cast<float>(width);
        const float inv = 1.0f / std::sqrt(var + eps);
        float* y = out + static_cast<size_t>(r) * width;
        for (int i = 0; i < width; ++i) y[i] = (sum[i] - mean) * inv * gamma[i] + beta[i];
    }
}

// One (batch row, head) per task: scores = q k^T / sqrt(d) over the unmasked keys, softmax, times v. The keys are
// first transposed into kt[d][j], so a score is summed over d in order, all keys at once (the AVX-512 path takes
// 16 keys per register in the same order).
void attention(const float* q, const float* k, const float* v, int ld, const int64_t* mask, int seq,
               const int* offsets, int heads, int head_dim, int task0, int task1, float* out, int ldo) {
    const int widest = (seq + 15) / 16 * 16;
    std::vector<float> p(widest), kt(static_cast<size_t>(head_dim) * widest, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    for (int task = task0; task < task1; ++task) {
        const int b = task / heads, h = task % heads;
        const size_t base = offsets ? static_cast<size_t>(offsets[b]) : static_cast<size_t>(b) * seq;
        const int len = offsets ? offsets[b + 1] - offsets[b] : seq;
        const int sp = (len + 15) / 16 * 16;
        const int64_t* m = offsets ? mask : mask + base;
        transpose_keys(k, ld, base, len, h, head_dim, sp, kt.data());
        for (int i = 0; i < len; ++i) {
            const float* qi = q + (base + i) * ld + h * head_dim;
            for (int j = 0; j < sp; ++j) p[j] = 0.0f;
            for (int d = 0; d < head_dim; ++d) {
                const float qd = qi[d];
                const float* row = kt.data() + static_cast<size_t>(d) * sp;
                for (int j = 0; j < sp; ++j) p[j] += qd * row[j];
            }
            float hi = -INFINITY;
            for (int j = 0; j < len; ++j) {
                p[j] = p[j] * scale;
                if (m[j]) hi = std::max(hi, p[j]);
            }
            float total = 0.0f;
            for (int j = 0; j < len; ++j) {
                p[j] = m[j] ? exp_approx(p[j] - hi) : 0.0f;
                total += p[j];
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            float* y = out + (base + i) * ldo + h * head_dim;
            for (int d = 0; d < head_dim; ++d) y[d] = 0.0f;
            for (int j = 0; j < len; ++j) {
                if (!m[j]) continue;
                const float pj = p[j] * inv;  // the same product the AVX-512 path stores before its sums
                const float* vj = v + (base + j) * ld + h * head_dim;
                for (int d = 0; d < head_dim; ++d) y[d] += pj * vj[d];
            }
        }
    }
}

}  // namespace distillery::portable
