// distillery._ops: the Python binding (pybind11), the code-path choice and the thread pool.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DISTILLERY_PAUSE() _mm_pause()
#else
#define DISTILLERY_PAUSE() std::this_thread::yield()
#endif

#include "ops.h"

namespace py = pybind11;
using namespace distillery;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// A fixed pool of worker threads. `run(n, fn)` splits tasks [0, n) into one contiguous range per thread (thread t
// gets [t n / T, (t + 1) n / T)), the caller taking range 0: the split, and so every result, depends only on n
// and T. Idle workers spin for a while (a model's next operator follows within microseconds), then sleep.
class Pool {
  public:
    ~Pool() {
        if (pid_ == getpid()) resize(1);
    }

    int threads() const { return threads_; }

    // How long idle workers spin for the next job before they sleep: 0 frees their cores at once (a server whose
    // event loop shares them), at the cost of a wake-up (a futex call) per operator.
    void set_spinning(bool on) { spin_.store(on ? 20000 : 0, std::memory_order_relaxed); }
    bool spinning() const { return spin_.load(std::memory_order_relaxed) > 0; }

    void resize(int n) {
        std::lock_guard<std::mutex> guard(run_mutex_);
        after_fork();
        if (n == threads_) return;
        stop_.store(true);
        epoch_.fetch_add(1, std::memory_order_release);
        epoch_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        stop_.store(false);
        threads_ = n;
        for (int t = 1; t < n; ++t) workers_.emplace_back([this, t, e = epoch_.load()] { work(t, e); });
    }

    void run(int n, const std::function<void(int, int)>& fn) {
        if (n <= 0) return;
        std::lock_guard<std::mutex> guard(run_mutex_);
        after_fork();
        const int used = std::min(threads_, n);
        if (used <= 1) {
            fn(0, n);
            return;
        }
        job_ = &fn;
        tasks_ = n;
        pending_.store(threads_ - 1, std::memory_order_relaxed);
        epoch_.fetch_add(1, std::memory_order_release);
        epoch_.notify_all();
        fn(0, n / threads_);
        while (pending_.load(std::memory_order_acquire) > 0) DISTILLERY_PAUSE();
        job_ = nullptr;
    }

  private:
    // A forked child (multiprocessing, a server's workers) has none of the parent's threads: forget them (their
    // std::thread objects cannot be joined or destroyed there, so they are leaked) and start as many anew.
    void after_fork() {
        if (pid_ == getpid()) return;
        new std::vector<std::thread>(std::move(workers_));
        workers_ = std::vector<std::thread>();
        pid_ = getpid();
        stop_.store(false);
        for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t, e = epoch_.load()] { work(t, e); });
    }

    // `seen`: the epoch when the thread was made (read there, not here: a job may already have been posted).
    void work(int t, uint64_t seen) {
        for (;;) {
            uint64_t now = seen;
            const int limit = spin_.load(std::memory_order_relaxed);
            for (int spin = 0; spin < limit && (now = epoch_.load(std::memory_order_acquire)) == seen; ++spin)
                DISTILLERY_PAUSE();
            if (now == seen) {
                epoch_.wait(seen, std::memory_order_acquire);
                now = epoch_.load(std::memory_order_acquire);
            }
            seen = now;
            if (stop_.load()) return;
            const int begin = static_cast<int>(static_cast<int64_t>(tasks_) * t / threads_);
            const int end = static_cast<int>(static_cast<int64_t>(tasks_) * (t + 1) / threads_);
            if (begin < end) (*job_)(begin, end);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }

    std::atomic<int> spin_{20000};  // pause instructions an idle worker spins before sleeping (~0.4 ms here)
    int threads_ = 1;
    pid_t pid_ = getpid();
    std::vector<std::thread> workers_;
    std::mutex run_mutex_;
    std::atomic<uint64_t> epoch_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    const std::function<void(int, int)>* job_ = nullptr;
    int tasks_ = 0;
};

Pool& pool() {
    static Pool p;
    return p;
}

bool g_avx512 = false;

bool use_avx512() { return g_avx512; }

std::string isa() { return g_avx512 ? "avx512_vnni" : "portable"; }

void set_isa(const std::string& name) {
    if (name == "portable") {
        g_avx512 = false;
    } else if (name == "avx512_vnni" || name == "auto") {
        if (name == "avx512_vnni" && !avx512::supported())
            throw std::invalid_argument("this CPU lacks AVX-512 VNNI (needs avx512f, bw, vl, dq and vnni)");
        g_avx512 = avx512::supported();
    } else {
        throw std::invalid_argument("unknown code path '" + name + "' (auto, avx512_vnni or portable)");
    }
}

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// ---------------------------------------------------------------------------------------------------------------
class PackedWeights {
  public:
    // `block`: None packs the weights densely; (block_k, block_n) packs them block-sparse (block_k a multiple of 4,
    // block_n 16, 32 or 64), keeping only the blocks that hold a non-zero weight.
    PackedWeights(const Array<int8_t>& w, const Array<float>& scale, const py::object& bias, const py::object& block) {
        if (w.ndim() != 2) throw std::invalid_argument("weight must be 2-D [in, out]");
        const int k = static_cast<int>(w.shape(0)), n = static_cast<int>(w.shape(1));
        if (k < 1 || n < 1) throw std::invalid_argument("weight must have at least one row and one column");
        if (scale.ndim() != 1 || scale.shape(0) != n)
            throw std::invalid_argument("scale must be 1-D with one value per output column (" + std::to_string(n) +
                                        ")");
        p_.k = k;
        p_.n = n;
        p_.k4 = (k + 3) / 4;
        p_.n16 = (n + 15) / 16;
        p_.panels = (n + 63) / 64;
        data_.assign(static_cast<size_t>(p_.k4) * p_.n16 * 64, 0);
        colsum_.assign(p_.n16 * 16, 0);
        scale_.assign(p_.n16 * 16, 0.0f);
        bias_.assign(p_.n16 * 16, 0.0f);
        auto wv = w.unchecked<2>();
        for (int panel = 0; panel < p_.panels; ++panel) {
            const int blocks = p_.blocks(panel);
            int8_t* dst = data_.data() + static_cast<size_t>(panel) * p_.k4 * 256;
            for (int k4 = 0; k4 < p_.k4; ++k4)
                for (int c = 0; c < blocks * 16; ++c)
                    for (int kk = 0; kk < 4; ++kk) {
                        const int row = 4 * k4 + kk, col = panel * 64 + c;
                        dst[(static_cast<size_t>(k4) * blocks * 16 + c) * 4 + kk] =
                            row < k && col < n ? wv(row, col) : 0;
                    }
        }
        for (int j = 0; j < n; ++j) {
            int32_t s = 0;
            for (int i = 0; i < k; ++i) s += wv(i, j);
            colsum_[j] = s;
        }
        auto sv = scale.unchecked<1>();
        for (int j = 0; j < n; ++j) scale_[j] = sv(j);
        if (!bias.is_none()) {
            Array<float> b = bias.cast<Array<float>>();
            if (b.ndim() != 1 || b.shape(0) != n)
                throw std::invalid_argument("bias must be 1-D with one value per output column (" + std::to_string(n) +
                                            ")");
            auto bv = b.unchecked<1>();
            for (int j = 0; j < n; ++j) bias_[j] = bv(j);
        }
        p_.data = data_.data();
        p_.colsum = colsum_.data();
        p_.scale = scale_.data();
        p_.bias = bias_.data();
        if (!block.is_none()) pack_sparse(wv, block.cast<std::pair<int, int>>());
    }

    GemmArgs args(const QuantRows* a, float* out, int32_t* out_s32, bool gelu) const {
        return GemmArgs{a, sparse_ ? nullptr : &p_, sparse_ ? &s_ : nullptr, out, out_s32, p_.n, gelu};
    }
    int k() const { return p_.k; }
    int n() const { return p_.n; }
    size_t nbytes() const {
        if (!sparse_) return data_.size() + 12 * colsum_.size();
        return sdata_.size() + 4 * (ptr_.size() + kblock_.size()) + 8 * offset_.size() + 12 * colsum_.size();
    }
    py::object block() const { return sparse_ ? py::object(py::make_tuple(4 * s_.bk4, 16 * s_.nb)) : py::none(); }
    // The share of blocks kept (1.0 for dense weights).
    double density() const {
        if (!sparse_) return 1.0;
        const int kblocks = (p_.k4 + s_.bk4 - 1) / s_.bk4;
        return static_cast<double>(kblock_.size()) / (static_cast<double>(kblocks) * s_.groups);
    }

  private:
    template <typename View>
    void pack_sparse(const View& wv, std::pair<int, int> shape) {
        const auto [bk, bn] = shape;
        if (bk < 4 || bk % 4 || bk > 4 * p_.k4)
            throw std::invalid_argument("block_k must be a multiple of 4 in [4, " + std::to_string(4 * p_.k4) +
                                        "], got " + std::to_string(bk));
        if (bn != 16 && bn != 32 && bn != 64)
            throw std::invalid_argument("block_n must be 16, 32 or 64, got " + std::to_string(bn));
        s_.k = p_.k;
        s_.n = p_.n;
        s_.k4 = p_.k4;
        s_.n16 = p_.n16;
        s_.bk4 = bk / 4;
        s_.nb = bn / 16;
        s_.groups = (p_.n16 + s_.nb - 1) / s_.nb;
        const int kblocks = (p_.k4 + s_.bk4 - 1) / s_.bk4;
        ptr_.assign(1, 0);
        for (int g = 0; g < s_.groups; ++g) {
            const int blocks = s_.blocks(g), col0 = g * bn;
            offset_.push_back(static_cast<int64_t>(sdata_.size()));
            for (int kb = 0; kb < kblocks; ++kb) {
                const int row0 = kb * bk;
                bool kept = false;
                for (int row = row0; row < std::min(row0 + bk, p_.k) && !kept; ++row)
                    for (int col = col0; col < std::min(col0 + 16 * blocks, p_.n) && !kept; ++col)
                        kept = wv(row, col) != 0;
                if (!kept) continue;
                kblock_.push_back(kb);
                const size_t at = sdata_.size();
                sdata_.resize(at + static_cast<size_t>(s_.bk4) * blocks * 64, 0);
                for (int k4 = 0; k4 < s_.bk4; ++k4)
                    for (int c = 0; c < blocks * 16; ++c)
                        for (int kk = 0; kk < 4; ++kk) {
                            const int row = row0 + 4 * k4 + kk, col = col0 + c;
                            if (row < p_.k && col < p_.n)
                                sdata_[at + (static_cast<size_t>(k4) * blocks * 16 + c) * 4 + kk] = wv(row, col);
                        }
            }
            ptr_.push_back(static_cast<int32_t>(kblock_.size()));
        }
        sdata_.resize(sdata_.size() + 64, 0);  // never empty, so data() is a valid pointer
        s_.ptr = ptr_.data();
        s_.kblock = kblock_.data();
        s_.offset = offset_.data();
        s_.data = sdata_.data();
        s_.colsum = colsum_.data();
        s_.scale = scale_.data();
        s_.bias = bias_.data();
        sparse_ = true;
        data_ = std::vector<int8_t>();  // the dense copy is not used
    }

    Packed p_;
    std::vector<int8_t> data_;
    std::vector<int32_t> colsum_;
    std::vector<float> scale_, bias_;
    bool sparse_ = false;
    SparsePacked s_;
    std::vector<int32_t> ptr_, kblock_;
    std::vector<int64_t> offset_;
    std::vector<int8_t> sdata_;
};

struct Quantized {
    std::vector<uint8_t> q;
    std::vector<float> scale;
    std::vector<int32_t> zp;
    QuantRows rows;
};

void check_rows(const py::buffer_info& x, int k, const char* name) {
    if (x.ndim < 1 || x.shape[x.ndim - 1] != k)
        throw std::invalid_argument(std::string(name) + "'s last dimension must be " + std::to_string(k) + ", got " +
                                    (x.ndim ? std::to_string(x.shape[x.ndim - 1]) : std::string("a scalar")));
}

int64_t leading_rows(const py::buffer_info& x) {
    int64_t m = 1;
    for (py::ssize_t i = 0; i + 1 < x.ndim; ++i) m *= x.shape[i];
    return m;
}

void prepare(Quantized& out, int m, int k) {
    out.rows.m = m;
    out.rows.k = k;
    out.rows.lda = 4 * ((k + 3) / 4);
    out.q.resize(static_cast<size_t>(m) * out.rows.lda + 64);
    out.scale.resize(m);
    out.zp.resize(m);
    out.rows.q = out.q.data();
    out.rows.scale = out.scale.data();
    out.rows.zp = out.zp.data();
}

void quantize_into(const float* x, int m, int k, Quantized& out) {
    prepare(out, m, k);
    const bool fast = use_avx512();
    pool().run(m, [&](int r0, int r1) {
        if (fast)
            avx512::quantize_rows(x, r0, r1, out.rows);
        else
            portable::quantize_rows(x, r0, r1, out.rows);
    });
}

void gemm(const GemmArgs& g) {
    const int tasks = gemm_tasks(g);
    const bool fast = use_avx512();
    pool().run(tasks, [&](int t0, int t1) {
        if (fast)
            avx512::gemm_tiles(g, t0, t1);
        else
            portable::gemm_tiles(g, t0, t1);
    });
}

std::vector<py::ssize_t> out_shape(const py::buffer_info& x, int n) {
    std::vector<py::ssize_t> shape(x.shape.begin(), x.shape.end());
    shape.back() = n;
    return shape;
}

// y = dequant(quant(x) @ w) + bias (then GELU): x [..., K] float32 -> [..., N] float32.
// The linear on raw rows (the GIL released by the caller): x [rows, K] -> out [rows, N].
void linear_into(const float* xp, int rows, const PackedWeights& w, bool gelu, float* out) {
    {
        // Reused across calls (no allocation once the widest input was seen). A thread_local named inside a lambda
        // is the running thread's own, so the pool's threads reach the caller's through this reference.
        thread_local Quantized mine;
        Quantized& a = mine;
        const int threads = pool().threads();
        if (threads == 1 || gemm_tasks(w.args(&a.rows, out, nullptr, gelu)) < 2) {
            quantize_into(xp, rows, w.k(), a);
            gemm(w.args(&a.rows, out, nullptr, gelu));
        } else {
            // One wake-up of the pool for both phases: each thread quantizes its share of the rows, waits at a
            // barrier until all rows are, then computes its share of the tiles. (Two pool calls cost a second
            // round trip between the cores, a visible share of a 13-row matmul.)
            prepare(a, rows, w.k());
            const GemmArgs g = w.args(&a.rows, out, nullptr, gelu);
            const int tasks = gemm_tasks(g);
            const bool fast = use_avx512();
            std::atomic<int> arrived{0};
            pool().run(threads, [&](int t0, int t1) {
                for (int t = t0; t < t1; ++t) {
                    const int r0 = static_cast<int>(int64_t{rows} * t / threads);
                    const int r1 = static_cast<int>(int64_t{rows} * (t + 1) / threads);
                    if (fast)
                        avx512::quantize_rows(xp, r0, r1, a.rows);
                    else
                        portable::quantize_rows(xp, r0, r1, a.rows);
                }
                arrived.fetch_add(t1 - t0, std::memory_order_acq_rel);
                while (arrived.load(std::memory_order_acquire) < threads) DISTILLERY_PAUSE();
                for (int t = t0; t < t1; ++t) {
                    const int k0 = static_cast<int>(int64_t{tasks} * t / threads);
                    const int k1 = static_cast<int>(int64_t{tasks} * (t + 1) / threads);
                    if (fast)
                        avx512::gemm_tiles(g, k0, k1);
                    else
                        portable::gemm_tiles(g, k0, k1);
                }
            });
        }
    }
}

py::array_t<float> linear(const Array<float>& x, const PackedWeights& w, bool gelu) {
    const py::buffer_info xb = x.request();
    check_rows(xb, w.k(), "x");
    const int64_t m = leading_rows(xb);
    py::array_t<float> y(out_shape(xb, w.n()));
    float* out = y.mutable_data();
    {
        py::gil_scoped_release release;
        linear_into(static_cast<const float*>(xb.ptr), static_cast<int>(m), w, gelu, out);
    }
    return y;
}

// The raw INT32 accumulators of u8 activations [M, K] against the packed weights: [M, N].
py::array_t<int32_t> gemm_s32(const Array<uint8_t>& a, const PackedWeights& w) {
    const py::buffer_info ab = a.request();
    if (ab.ndim != 2) throw std::invalid_argument("a must be 2-D [rows, in]");
    check_rows(ab, w.k(), "a");
    const int m = static_cast<int>(ab.shape[0]), k = w.k(), lda = 4 * ((k + 3) / 4);
    py::array_t<int32_t> y({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(w.n())});
    int32_t* out = y.mutable_data();
    {
        py::gil_scoped_release release;
        Quantized q;
        q.q.assign(static_cast<size_t>(m) * lda + 64, 0);
        q.scale.assign(m, 1.0f);
        q.zp.assign(m, 0);
        for (int r = 0; r < m; ++r)
            std::memcpy(q.q.data() + static_cast<size_t>(r) * lda, static_cast<const uint8_t*>(ab.ptr) +
                        static_cast<size_t>(r) * k, k);
        q.rows = QuantRows{m, k, lda, q.q.data(), q.scale.data(), q.zp.data()};
        gemm(w.args(&q.rows, nullptr, out, false));
    }
    return y;
}

py::tuple quantize_rows(const Array<float>& x) {
    const py::buffer_info xb = x.request();
    if (xb.ndim != 2) throw std::invalid_argument("x must be 2-D [rows, in]");
    const int m = static_cast<int>(xb.shape[0]), k = static_cast<int>(xb.shape[1]);
    Quantized a;
    {
        py::gil_scoped_release release;
        quantize_into(static_cast<const float*>(xb.ptr), m, k, a);
    }
    py::array_t<uint8_t> q({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(k)});
    for (int r = 0; r < m; ++r)
        std::memcpy(q.mutable_data(r, 0), a.q.data() + static_cast<size_t>(r) * a.rows.lda, k);
    py::array_t<float> scale(m);
    py::array_t<int32_t> zp(m);
    std::memcpy(scale.mutable_data(), a.scale.data(), m * sizeof(float));
    std::memcpy(zp.mutable_data(), a.zp.data(), m * sizeof(int32_t));
    return py::make_tuple(q, scale, zp);
}

// LayerNorm(x + residual) of `rows` rows (out may be x or residual: each row is read before it is written).
void layernorm_into(const float* x, const float* residual, const float* gamma, const float* beta, float eps, int rows,
                    int width, float* out) {
    const bool fast = use_avx512();
    pool().run(rows, [&](int r0, int r1) {
        if (fast)
            avx512::add_layernorm(x, residual, gamma, beta, eps, r0, r1, width, out);
        else
            portable::add_layernorm(x, residual, gamma, beta, eps, r0, r1, width, out);
    });
}

// `offsets` null: padded [batch, seq] rows under `mask`; else packed sequences (see ops.h).
void attention_into(const float* q, const float* k, const float* v, int ld, const int64_t* mask, int batch, int seq,
                    const int* offsets, int heads, int head_dim, float* out, int ldo) {
    const bool fast = use_avx512();
    pool().run(batch * heads, [&](int t0, int t1) {
        if (fast)
            avx512::attention(q, k, v, ld, mask, seq, offsets, heads, head_dim, t0, t1, out, ldo);
        else
            portable::attention(q, k, v, ld, mask, seq, offsets, heads, head_dim, t0, t1, out, ldo);
    });
}

// LayerNorm(x + residual) over the last dimension (residual may be None).
py::array_t<float> add_layernorm(const Array<float>& x, const py::object& residual, const Array<float>& gamma,
                                 const Array<float>& beta, float eps) {
    const py::buffer_info xb = x.request();
    if (xb.ndim < 1) throw std::invalid_argument("x must have at least one dimension");
    const int width = static_cast<int>(xb.shape[xb.ndim - 1]);
    check_rows(gamma.request(), width, "gamma");
    check_rows(beta.request(), width, "beta");
    Array<float> r;
    const float* rp = nullptr;
    if (!residual.is_none()) {
        r = residual.cast<Array<float>>();
        if (r.request().shape != xb.shape) throw std::invalid_argument("residual must have x's shape");
        rp = r.data();
    }
    const int64_t m = leading_rows(xb);
    py::array_t<float> y(xb.shape);
    float* out = y.mutable_data();
    const float* xp = static_cast<const float*>(xb.ptr);
    const float *g = gamma.data(), *b = beta.data();
    {
        py::gil_scoped_release release;
        layernorm_into(xp, rp, g, b, eps, static_cast<int>(m), width, out);
    }
    return y;
}

// Multi-head attention over short sequences: q, k, v [B, S, H * D] (or one [B, S, 3 H D] tensor split in
// three), mask [B, S] (non-zero = a real token) -> [B, S, H * D].
py::array_t<float> attention(const Array<float>& q, const Array<float>& k, const Array<float>& v,
                             const Array<int64_t>& mask, int heads) {
    const py::buffer_info qb = q.request(), kb = k.request(), vb = v.request(), mb = mask.request();
    if (qb.ndim != 3) throw std::invalid_argument("q must be 3-D [batch, seq, heads * head_dim]");
    if (kb.shape != qb.shape || vb.shape != qb.shape) throw std::invalid_argument("k and v must have q's shape");
    const int batch = static_cast<int>(qb.shape[0]), seq = static_cast<int>(qb.shape[1]);
    const int width = static_cast<int>(qb.shape[2]);
    if (heads < 1 || width % heads) throw std::invalid_argument("heads must divide the width " + std::to_string(width));
    if (mb.ndim != 2 || mb.shape[0] != batch || mb.shape[1] != seq)
        throw std::invalid_argument("mask must be [batch, seq]");
    py::array_t<float> y(qb.shape);
    float* out = y.mutable_data();
    const float *qp = q.data(), *kp = k.data(), *vp = v.data();
    const int64_t* mp = mask.data();
    {
        py::gil_scoped_release release;
        attention_into(qp, kp, vp, width, mp, batch, seq, nullptr, heads, width / heads, out, width);
    }
    return y;
}


// ---------------------------------------------------------------------------------------------------------------
// The student's forward pass on the operators above, in one call with the GIL released (engine.py builds it from
// the quantized ONNX model): embeddings + LayerNorm; per layer Q/K/V in one linear, attention, output projection +
// residual LayerNorm, GELU feed-forward + residual LayerNorm; masked mean pooling; the head.
std::vector<float> copy_floats(const Array<float>& a, py::ssize_t size, const std::string& what) {
    if (a.size() != size)
        throw std::invalid_argument(what + " must have " + std::to_string(size) + " values, got " +
                                    std::to_string(a.size()));
    return std::vector<float>(a.data(), a.data() + size);
}

class Model {
  public:
    Model(const Array<float>& words, const Array<float>& positions, const Array<float>& gamma,
          const Array<float>& beta, float eps, int head_dim, std::shared_ptr<PackedWeights> head)
        : eps_(eps), head_dim_(head_dim), head_(std::move(head)) {
        if (words.ndim() != 2 || positions.ndim() != 2 || positions.shape(1) != words.shape(1))
            throw std::invalid_argument("words [vocab, width] and positions [max_len, width] must share their width");
        vocab_ = static_cast<int>(words.shape(0));
        width_ = static_cast<int>(words.shape(1));
        max_len_ = static_cast<int>(positions.shape(0));
        words_ = copy_floats(words, words.size(), "words");
        positions_ = copy_floats(positions, positions.size(), "positions");
        gamma_ = copy_floats(gamma, width_, "gamma");
        beta_ = copy_floats(beta, width_, "beta");
        if (head_dim < 1) throw std::invalid_argument("head_dim must be positive");
        if (head_->k() != width_) throw std::invalid_argument("the head must read the model's width");
    }

    void add_layer(int heads, std::shared_ptr<PackedWeights> qkv, std::shared_ptr<PackedWeights> out,
                   std::shared_ptr<PackedWeights> ffn1, std::shared_ptr<PackedWeights> ffn2, const Array<float>& g1,
                   const Array<float>& b1, const Array<float>& g2, const Array<float>& b2) {
        const int inner = heads * head_dim_;
        const std::string at = "layer " + std::to_string(layers_.size()) + ": ";
        if (heads < 1 || qkv->k() != width_ || qkv->n() != 3 * inner)
            throw std::invalid_argument(at + "qkv must map the width to 3 x heads x head_dim");
        if (out->k() != inner || out->n() != width_)
            throw std::invalid_argument(at + "the output projection must map heads x head_dim to the width");
        if (ffn1->k() != width_ || ffn2->k() != ffn1->n() || ffn2->n() != width_)
            throw std::invalid_argument(at + "the feed-forward must map the width to a hidden size and back");
        layers_.push_back(Layer{heads, std::move(qkv), std::move(out), std::move(ffn1), std::move(ffn2),
                                copy_floats(g1, width_, at + "gamma1"), copy_floats(b1, width_, at + "beta1"),
                                copy_floats(g2, width_, at + "gamma2"), copy_floats(b2, width_, at + "beta2")});
    }

    py::tuple run(const Array<int64_t>& ids, const Array<int64_t>& mask) const {
        if (ids.ndim() != 2 || mask.ndim() != 2 || ids.shape(0) != mask.shape(0) || ids.shape(1) != mask.shape(1))
            throw std::invalid_argument("input_ids and attention_mask must both be [batch, sequence]");
        const int batch = static_cast<int>(ids.shape(0)), seq = static_cast<int>(ids.shape(1));
        if (seq > max_len_)
            throw std::invalid_argument("input_ids has " + std::to_string(seq) + " tokens; the model reads at most " +
                                        std::to_string(max_len_));
        const int64_t* idp = ids.data();
        for (py::ssize_t i = 0; i < ids.size(); ++i)
            if (idp[i] < 0 || idp[i] >= vocab_)
                throw std::invalid_argument("input_ids holds a token id outside the vocabulary [0, " +
                                            std::to_string(vocab_) + ")");
        py::array_t<float> logits({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(head_->n())});
        py::array_t<float> pooled({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(width_)});
        float* lp = logits.mutable_data();
        float* pp = pooled.mutable_data();
        const int64_t* mp = mask.data();
        {
            py::gil_scoped_release release;
            forward(idp, mp, batch, seq, lp, pp);
        }
        return py::make_tuple(logits, pooled);
    }

  private:
    struct Layer {
        int heads;
        std::shared_ptr<PackedWeights> qkv, out, ffn1, ffn2;
        std::vector<float> g1, b1, g2, b2;
    };

    // Padding is dropped first: only real tokens (mask != 0) are rows of the linears, LayerNorms and attention,
    // packed sequence after sequence in their order. Every operator works row by row (per-row activation scales,
    // exact INT32 sums) and attention sums a sequence's keys in order, so each real token's values are the bits
    // the padded [batch, seq] layout gives; a batch of queries of mixed lengths costs the tokens it holds.
    void forward(const int64_t* ids, const int64_t* mask, int batch, int seq, float* logits, float* pooled) const {
        const int w = width_;
        thread_local std::vector<int> offsets, slots;
        thread_local std::vector<int64_t> ones;
        offsets.assign(static_cast<size_t>(batch) + 1, 0);
        slots.clear();
        int longest = 0;
        for (int b = 0; b < batch; ++b) {
            for (int t = 0; t < seq; ++t)
                if (mask[static_cast<size_t>(b) * seq + t]) slots.push_back(b * seq + t);
            offsets[b + 1] = static_cast<int>(slots.size());
            longest = std::max(longest, offsets[b + 1] - offsets[b]);
        }
        ones.assign(static_cast<size_t>(longest), 1);
        const int rows = static_cast<int>(slots.size());
        thread_local std::vector<float> x, r, qkv, ctx, h;
        int widest = 0, inner = 0;
        for (const Layer& l : layers_) {
            widest = std::max(widest, l.ffn1->n());
            inner = std::max(inner, l.heads * head_dim_);
        }
        x.resize(static_cast<size_t>(rows) * w);
        r.resize(static_cast<size_t>(rows) * w);
        qkv.resize(static_cast<size_t>(rows) * 3 * inner);
        ctx.resize(static_cast<size_t>(rows) * inner);
        h.resize(static_cast<size_t>(rows) * std::max(widest, w));
        for (int row = 0; row < rows; ++row) {
            const int slot = slots[row];
            std::memcpy(x.data() + static_cast<size_t>(row) * w, words_.data() + static_cast<size_t>(ids[slot]) * w,
                        w * sizeof(float));
            std::memcpy(r.data() + static_cast<size_t>(row) * w,
                        positions_.data() + static_cast<size_t>(slot % seq) * w, w * sizeof(float));
        }
        if (rows > 0) {
            layernorm_into(x.data(), r.data(), gamma_.data(), beta_.data(), eps_, rows, w, x.data());
            for (const Layer& l : layers_) {
                const int in = l.heads * head_dim_;
                linear_into(x.data(), rows, *l.qkv, false, qkv.data());
                attention_into(qkv.data(), qkv.data() + in, qkv.data() + 2 * in, 3 * in, ones.data(), batch, longest,
                               offsets.data(), l.heads, head_dim_, ctx.data(), in);
                linear_into(ctx.data(), rows, *l.out, false, r.data());
                layernorm_into(r.data(), x.data(), l.g1.data(), l.b1.data(), eps_, rows, w, x.data());
                linear_into(x.data(), rows, *l.ffn1, true, h.data());
                linear_into(h.data(), rows, *l.ffn2, false, r.data());
                layernorm_into(r.data(), x.data(), l.g2.data(), l.b2.data(), eps_, rows, w, x.data());
            }
        }
        for (int b = 0; b < batch; ++b) {
            float* y = pooled + static_cast<size_t>(b) * w;
            std::fill(y, y + w, 0.0f);
            for (int row = offsets[b]; row < offsets[b + 1]; ++row) {
                const float* xr = x.data() + static_cast<size_t>(row) * w;
                for (int i = 0; i < w; ++i) y[i] += xr[i];
            }
            const float div = static_cast<float>(std::max(offsets[b + 1] - offsets[b], 1));
            for (int i = 0; i < w; ++i) y[i] = y[i] / div;
        }
        linear_into(pooled, batch, *head_, false, logits);
    }

    int vocab_ = 0, width_ = 0, max_len_ = 0;
    float eps_;
    int head_dim_;
    std::vector<float> words_, positions_, gamma_, beta_;
    std::shared_ptr<PackedWeights> head_;
    std::vector<Layer> layers_;
};

// INT8 multiply-adds per second of the AVX-512 VNNI peak loop on every pool thread at once (0 without VNNI).
double peak_macs_per_second(double seconds) {
    if (!avx512::supported()) return 0.0;
    py::gil_scoped_release release;
    const int n = pool().threads();
    int64_t iterations = 1 << 16;
    for (;;) {
        const auto start = std::chrono::steady_clock::now();
        std::atomic<int64_t> sink{0};
        pool().run(n, [&](int t0, int t1) {
            for (int t = t0; t < t1; ++t) sink += avx512::peak_loop(iterations);
        });
        const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (took >= seconds || iterations >= (int64_t{1} << 40)) return 1536.0 * iterations * n / took;
        iterations *= 2;
    }
}

}  // namespace

PYBIND11_MODULE(_ops, m) {
    m.doc() = "distillery's compiled CPU operators (see kernels/__init__.py)";
    set_isa("auto");
    m.def("isa", &isa, "the code path in use: avx512_vnni or portable");
    m.def("set_isa", &set_isa, py::arg("name"), "auto, avx512_vnni or portable");
    m.def("avx512_supported", &avx512::supported);
    m.def("threads", [] { return pool().threads(); });
    m.def("set_spinning", [](bool on) { pool().set_spinning(on); }, py::arg("on"),
          "whether idle pool threads spin for the next operator (default) or sleep at once");
    m.def("spinning", [] { return pool().spinning(); });
    m.def("set_threads", [](int n) {
        if (n < 1 || n > 256) throw std::invalid_argument("threads must be in [1, 256], got " + std::to_string(n));
        py::gil_scoped_release release;
        pool().resize(n);
    }, py::arg("n"));
    m.def("peak_macs_per_second", &peak_macs_per_second, py::arg("seconds") = 0.2,
          "INT8 multiply-adds per second of a register-only VNNI loop on all pool threads (0 without VNNI)");
    py::class_<PackedWeights, std::shared_ptr<PackedWeights>>(m, "PackedWeights")
        .def(py::init<const Array<int8_t>&, const Array<float>&, const py::object&, const py::object&>(),
             py::arg("weight"), py::arg("scale"), py::arg("bias") = py::none(), py::arg("block") = py::none())
        .def_property_readonly("k", &PackedWeights::k)
        .def_property_readonly("n", &PackedWeights::n)
        .def_property_readonly("nbytes", &PackedWeights::nbytes)
        .def_property_readonly("block", &PackedWeights::block, "(block_k, block_n) when block-sparse, else None")
        .def_property_readonly("density", &PackedWeights::density, "the share of blocks kept (1.0 when dense)");
    py::class_<Model>(m, "Model")
        .def(py::init<const Array<float>&, const Array<float>&, const Array<float>&, const Array<float>&, float, int,
                      std::shared_ptr<PackedWeights>>(),
             py::arg("words"), py::arg("positions"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
             py::arg("head_dim"), py::arg("head"))
        .def("add_layer", &Model::add_layer, py::arg("heads"), py::arg("qkv"), py::arg("out"), py::arg("ffn1"),
             py::arg("ffn2"), py::arg("gamma1"), py::arg("beta1"), py::arg("gamma2"), py::arg("beta2"))
        .def("run", &Model::run, py::arg("input_ids"), py::arg("attention_mask"),
             "(logits [batch, labels], pooled [batch, width]) for int64 input_ids and attention_mask [batch, seq]");
    m.def("linear", &linear, py::arg("x"), py::arg("weights"), py::arg("gelu") = false);
    m.def("gemm_s32", &gemm_s32, py::arg("a"), py::arg("weights"));
    m.def("quantize_rows", &quantize_rows, py::arg("x"));
    m.def("add_layernorm", &add_layernorm, py::arg("x"), py::arg("residual"), py::arg("gamma"), py::arg("beta"),
          py::arg("eps"));
    m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("heads"));
}
