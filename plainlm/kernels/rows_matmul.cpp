// x @ W^T in float32 for a few rows of x: a decode step (1 row) or a speculative verification (2-16 rows),
// on x86 CPUs with AVX2 and FMA.
//
// Such a product is bound by reading W, which is far larger than the caches. PyTorch's float32 linear
// reads it at about half the memory's speed for one row (MKL's gemv on the machines measured) and copies
// it into packed panels for a few rows (its gemm), so 2 rows cost nearly twice 1. Here each row of W is
// read from memory once and dotted with every row of x, which stays in the L1 cache, all rows of x in one
// pass over W (rows_block), so that reading W and the multiply-adds overlap.
//
// Every output is one dot product summed in the same order (8-float lanes over K in sequence, then the
// lanes in a fixed tree, then the tail): a row's result does not depend on how many rows run beside it,
// nor on how the rows of W are split across threads. So a verification over k tokens computes each
// token's projections exactly as a one-token decode step would.
//
//   x  (M, K) float, contiguous
//   w  (N, K) float, contiguous
// returns (M, N) float.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t kRows = 8;  // rows of W a thread takes at a time
// Software prefetch distance, in rows of W: without it, a few rows of x cost a third more than one (the
// loads of W waited on memory while the multiply-adds ran); 4, 8 and 16 measured alike, 8 best for one row.
constexpr int64_t kPrefetchRows = 8;

inline float lanes_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The dots of RW consecutive rows of W with RX consecutive rows of x: y[j * ldy + r] = w_r . x_j. One load of
// W feeds RX multiply-adds and one load of x feeds RW, so a few rows of x cost little more than one (the
// product stays bound by reading W from memory). The smaller side is held in registers for the step, the
// other loaded as it is used: RW * RX + min(RW, RX) + 1 of AVX2's 16 registers. Each dot is summed the same
// way whatever RW and RX are: 8 lanes over K in sequence, the lanes in a fixed tree, then the tail.
template <int64_t RW, int64_t RX>
inline void dots(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
  static_assert(RW * RX + (RW < RX ? RW : RX) + 1 <= 16, "more registers than AVX2 has");
  constexpr int64_t kAhead = RW > kPrefetchRows ? RW : kPrefetchRows;
  __m256 acc[RW][RX];
  for (int64_t r = 0; r < RW; ++r)
    for (int64_t j = 0; j < RX; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t body = K - K % 8;
  for (int64_t k = 0; k < body; k += 8) {
    if ((k & 15) == 0) {  // a cache line of RW rows kAhead rows on (a prefetch past W never faults)
      for (int64_t r = 0; r < RW; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (kAhead + r) * K + k), _MM_HINT_T0);
      }
    }
    if constexpr (RW <= RX) {
      __m256 wv[RW];
      for (int64_t r = 0; r < RW; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
      for (int64_t j = 0; j < RX; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + j * K + k);
        for (int64_t r = 0; r < RW; ++r) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
      }
    } else {
      __m256 xv[RX];
      for (int64_t j = 0; j < RX; ++j) xv[j] = _mm256_loadu_ps(x + j * K + k);
      for (int64_t r = 0; r < RW; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + r * K + k);
        for (int64_t j = 0; j < RX; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
      }
    }
  }
  for (int64_t r = 0; r < RW; ++r) {
    for (int64_t j = 0; j < RX; ++j) {
      float sum = lanes_sum(acc[r][j]);
      for (int64_t k = body; k < K; ++k) sum += w[r * K + k] * x[j * K + k];
      y[j * ldy + r] = sum;
    }
  }
}

// The dots of `rows` (at most kRows) consecutive rows of W with RX consecutive rows of x, in one pass over
// W: its bytes stream from memory once while the multiply-adds of all RX rows run beside them. RW rows of W
// a step, RW a power of two (so eight rows split evenly), as many as the registers allow: at least six
// accumulators (FMA chains) in flight where there are that many outputs.
template <int64_t RX>
inline void rows_block(const float* w, int64_t rows, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int64_t RW = RX == 1 ? 8 : RX <= 3 ? 4 : RX <= 6 ? 2 : 1;
  int64_t r = 0;
  for (; r + RW <= rows; r += RW) dots<RW, RX>(w + r * K, x, K, y + r, ldy);
  for (; r < rows; ++r) dots<1, RX>(w + r * K, x, K, y + r, ldy);
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);
constexpr int64_t kMaxRowsAtOnce = 14;
constexpr BlockFn kBlocks[kMaxRowsAtOnce + 1] = {
    nullptr,         rows_block<1>,  rows_block<2>,  rows_block<3>,  rows_block<4>,
    rows_block<5>,   rows_block<6>,  rows_block<7>,  rows_block<8>,  rows_block<9>,
    rows_block<10>,  rows_block<11>, rows_block<12>, rows_block<13>, rows_block<14>,
};

at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_matmul: x (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rows_matmul: float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rows_matmul: contiguous x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // A thread's share: whole blocks of kRows rows, at least 64 KB of weights, so that small layers do not
  // pay more in thread handoffs than they read.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kRows, 1));
  const int64_t blocks = (N + kRows - 1) / kRows;
  // At most kMaxRowsAtOnce rows of x a pass, in passes of equal size: 16 rows run as two passes of 8.
  const int64_t passes = (M + kMaxRowsAtOnce - 1) / kMaxRowsAtOnce;
  const int64_t rows_a_pass = (M + passes - 1) / passes;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kRows;
      for (int64_t m = 0; m < M;) {
        const int64_t count = std::min(M - m, rows_a_pass);
        kBlocks[count](W + n * K, std::min(kRows, N - n), X + m * K, K, Y + m * N + n, N);
        m += count;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm_fp32, m) { m.def("rows_matmul(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(plainlm_fp32, CPU, m) { m.impl("rows_matmul", &rows_matmul); }
