// Fused RCF kernel for x86-64 CPUs with AVX2 and FMA, float32 (eocausal/embed/rcf_cpu.py builds
// and loads it; the torch path is used wherever it is not available).
//
// For every valid output position of a chip (a list built by the caller, with each position's
// pooling rectangle), the dot products of its k x k x C patch (read straight from the NHWC chip,
// no im2col) with 16 filters at a time, plus the shift (-bias), ReLU, added to the rectangle's
// sums: no patch matrix and no activation map is ever written. Masked (invalid) windows are
// simply not in the list, so they contribute exactly 0, as in the torch path.
//
// Micro-kernel: 6 positions x 16 filters (12 ymm accumulators), the filters packed as
// [filter block][depth][16] so that each depth step is two loads and six broadcasts. Positions
// go in chunks of CHUNK (their patches stay in L1) over which each filter block of a group
// passes in turn; sums accumulate in float over a chunk, then in double. Work items are
// (chip, group of filter blocks), shared by n_threads std::threads.
//
// Compiled without -march flags: the AVX2/FMA code is in target("avx2,fma") functions and is only
// run after rcf_cpu_supported() says the CPU has both.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int FB = 16;       // filters per block (two ymm)
constexpr int TILE = 6;      // positions per micro-tile
constexpr int CHUNK = 192;   // positions per chunk (summed in float, then in double)

struct Args {
    const float* x;          // [N, H, W, C] NHWC, normalised (invalid pixels already 0)
    int64_t chip_stride;     // H * W * C
    int64_t row_stride;      // W * C
    int k, kc;               // patch side, k * C
    const float* wpack;      // [n_blocks][k * kc][FB]
    const float* shift;      // [n_blocks * FB]
    int n_blocks;
    const int32_t* offset;   // per valid position: (i * W + j) * C within its chip
    const int32_t* cell;     // per valid position: its rectangle
    const int64_t* start;    // [N + 1]: chip b's positions are start[b] .. start[b + 1]
    int n_cells;
    float* sums;             // [N, n_cells, n_blocks * FB]
    double* patch_sums;      // [N, n_cells, k * kc] or null
};

template <int P>
__attribute__((target("avx2,fma"), always_inline)) inline void micro_tile(
    const Args& a, const float* chip, const int32_t* off, const int32_t* cel, const float* w,
    __m256 s0, __m256 s1, float* local) {
    __m256 acc0[P], acc1[P];
    const float* ptr[P];
#pragma GCC unroll 6
    for (int p = 0; p < P; ++p) {
        acc0[p] = _mm256_setzero_ps();
        acc1[p] = _mm256_setzero_ps();
        ptr[p] = chip + off[p];
    }
    const int kc = a.kc;
    for (int di = 0; di < a.k; ++di) {
        const int64_t ro = di * a.row_stride;
#pragma GCC unroll 2
        for (int e = 0; e < kc; ++e) {
            const __m256 b0 = _mm256_loadu_ps(w);
            const __m256 b1 = _mm256_loadu_ps(w + 8);
            w += FB;
#pragma GCC unroll 6
            for (int p = 0; p < P; ++p) {
                const __m256 v = _mm256_broadcast_ss(ptr[p] + ro + e);
                acc0[p] = _mm256_fmadd_ps(v, b0, acc0[p]);
                acc1[p] = _mm256_fmadd_ps(v, b1, acc1[p]);
            }
        }
    }
    const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int p = 0; p < P; ++p) {
        float* dst = local + static_cast<int64_t>(cel[p]) * FB;
        const __m256 r0 = _mm256_max_ps(_mm256_add_ps(acc0[p], s0), zero);
        const __m256 r1 = _mm256_max_ps(_mm256_add_ps(acc1[p], s1), zero);
        _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), r0));
        _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), r1));
    }
}

__attribute__((target("avx2,fma"))) void run_item(const Args& a, int64_t chip_index, int block0, int block1,
                                                  std::vector<float>& local, std::vector<double>& total) {
    // Positions in chunks whose patches stay in L1 while every filter block of the group passes
    // over them; each block's 16 x depth weights stay in L1 for the chunk.
    const float* chip = a.x + chip_index * a.chip_stride;
    const int depth = a.k * a.kc;
    const int group = block1 - block0;
    const int64_t begin = a.start[chip_index], end = a.start[chip_index + 1];
    std::fill(local.begin(), local.end(), 0.0f);
    std::fill(total.begin(), total.begin() + static_cast<int64_t>(a.n_cells) * group * FB, 0.0);
    for (int64_t c0 = begin; c0 < end; c0 += CHUNK) {
        const int64_t c1 = std::min<int64_t>(c0 + CHUNK, end);
        int lo = a.cell[c0], hi = a.cell[c0];
        for (int64_t q = c0 + 1; q < c1; ++q) {
            lo = std::min(lo, a.cell[q]);
            hi = std::max(hi, a.cell[q]);
        }
        for (int blk = block0; blk < block1; ++blk) {
            const float* w = a.wpack + static_cast<int64_t>(blk) * depth * FB;
            const __m256 s0 = _mm256_loadu_ps(a.shift + blk * FB);
            const __m256 s1 = _mm256_loadu_ps(a.shift + blk * FB + 8);
            int64_t q = c0;
            for (; q + TILE <= c1; q += TILE)
                micro_tile<TILE>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data());
            switch (c1 - q) {
                case 5: micro_tile<5>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data()); break;
                case 4: micro_tile<4>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data()); break;
                case 3: micro_tile<3>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data()); break;
                case 2: micro_tile<2>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data()); break;
                case 1: micro_tile<1>(a, chip, a.offset + q, a.cell + q, w, s0, s1, local.data()); break;
                default: break;
            }
            // Float sums of at most CHUNK positions -> the double totals (only the cells touched).
            const int64_t col = static_cast<int64_t>(blk - block0) * FB;
            for (int c = lo; c <= hi; ++c) {
                float* src = local.data() + static_cast<int64_t>(c) * FB;
                double* dst = total.data() + static_cast<int64_t>(c) * group * FB + col;
                for (int f = 0; f < FB; ++f) {
                    dst[f] += src[f];
                    src[f] = 0.0f;
                }
            }
        }
    }
    const int64_t width = static_cast<int64_t>(a.n_blocks) * FB;
    float* out = a.sums + chip_index * a.n_cells * width + static_cast<int64_t>(block0) * FB;
    for (int c = 0; c < a.n_cells; ++c)
        for (int f = 0; f < group * FB; ++f)
            out[c * width + f] = static_cast<float>(total[static_cast<int64_t>(c) * group * FB + f]);

    if (a.patch_sums != nullptr && block0 == 0) {
        // The sum of each rectangle's valid patches (the negative branch's mean-z term): k * kc
        // adds per position, next to k * kc * F multiply-adds.
        double* ps = a.patch_sums + chip_index * a.n_cells * depth;
        std::fill(ps, ps + static_cast<int64_t>(a.n_cells) * depth, 0.0);
        for (int64_t q = begin; q < end; ++q) {
            const float* src = chip + a.offset[q];
            double* dst = ps + static_cast<int64_t>(a.cell[q]) * depth;
            for (int di = 0; di < a.k; ++di)
                for (int e = 0; e < a.kc; ++e) dst[di * a.kc + e] += src[di * a.row_stride + e];
        }
    }
}

}  // namespace

extern "C" {

int rcf_cpu_abi_version() { return 2; }

// out[b, i, j, c] = (x[b, c, i, j] - center[c]) / scale[c]: the band normalisation and the NHWC
// layout in one pass (plain float32 arithmetic, as numpy or torch does it).
void rcf_cpu_normalise_nhwc(const float* x, int64_t n_chips, int64_t bands, int64_t height, int64_t width,
                            const float* center, const float* scale, float* out) {
    const int64_t plane = height * width;
    for (int64_t b = 0; b < n_chips; ++b) {
        const float* src = x + b * bands * plane;
        float* dst = out + b * bands * plane;
        for (int64_t c = 0; c < bands; ++c) {
            const float m = center[c], s = scale[c];
            const float* from = src + c * plane;
            for (int64_t q = 0; q < plane; ++q) dst[q * bands + c] = (from[q] - m) / s;
        }
    }
}

int rcf_cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// Returns 0 on success, a negative number on bad arguments or a failure.
int rcf_cpu_pool_sums(const float* x, int64_t n_chips, int64_t height, int64_t width, int64_t bands,
                      int k, const float* wpack, const float* shift, int n_blocks,
                      const int32_t* offset, const int32_t* cell, const int64_t* start, int n_cells,
                      float* sums, double* patch_sums, int n_threads) {
    if (!rcf_cpu_supported()) return -1;
    if (n_chips < 1 || k < 1 || bands < 1 || n_blocks < 1 || n_cells < 1 || height < k || width < k)
        return -2;
    Args a{x, height * width * bands, width * bands, k, static_cast<int>(k * bands), wpack, shift,
           n_blocks, offset, cell, start, n_cells, sums, patch_sums};
    // Work items: (chip, group of filter blocks); groups of up to 8 blocks (128 filters), fewer
    // when that would leave under eight items per thread (a thread that other processes hold up
    // then delays the call by a small item only).
    const int64_t want_items = 8 * static_cast<int64_t>(std::max(1, n_threads));
    const int64_t fit = (n_chips * n_blocks) / want_items;
    const int group = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, fit)));
    const int groups = (n_blocks + group - 1) / group;
    const int64_t items = n_chips * groups;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, items)));
    std::atomic<int64_t> next{0};
    std::atomic<int> failed{0};
    auto worker = [&]() {
        try {
            std::vector<float> local(static_cast<size_t>(n_cells) * FB);
            std::vector<double> total(static_cast<size_t>(n_cells) * group * FB);
            for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
                const int g = static_cast<int>(item % groups);
                run_item(a, item / groups, g * group, std::min(n_blocks, (g + 1) * group), local, total);
            }
        } catch (...) {
            failed.store(1);
        }
    };
    if (threads == 1) {
        worker();
    } else {
        std::vector<std::thread> pool;
        try {
            for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
        } catch (...) {
            // Could not start a thread: the ones running (and this one) finish the items.
        }
        worker();
        for (auto& t : pool) t.join();
    }
    return failed.load() ? -3 : 0;
}

}  // extern "C"
