// x @ W^T in float32 for a few rows of x: a decode step (1 row) or a speculative verification (2-16 rows),
// on x86 CPUs with AVX2 and FMA.
//
// Such a product is bound by reading W, which is far larger than the caches. PyTorch's float32 linear
// reads it at about half the memory's speed for one row (MKL's gemv on the machines measured) and copies
// it into packed panels for a few rows (its gemm), so 2 rows cost nearly twice 1. Here each row of W is
// read from memory once and dotted with every row of x, which stays in the L1 cache; eight rows of W at a
// time give the FMA units eight independent chains.
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

constexpr int64_t kRows = 8;  // rows of W dotted together

inline float lanes_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The dots of ROWS consecutive rows of W with one row of x, into y[0..ROWS). Each dot is summed the same
// way whatever ROWS is.
template <int64_t ROWS>
inline void dots(const float* w, const float* x, int64_t K, float* y) {
  __m256 acc[ROWS];
  for (int64_t r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t body = K - K % 8;
  for (int64_t k = 0; k < body; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int64_t r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, acc[r]);
  }
  for (int64_t r = 0; r < ROWS; ++r) {
    float sum = lanes_sum(acc[r]);
    for (int64_t k = body; k < K; ++k) sum += w[r * K + k] * x[k];
    y[r] = sum;
  }
}

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
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kRows;
      for (int64_t m = 0; m < M; ++m) {
        if (n + kRows <= N) {
          dots<kRows>(W + n * K, X + m * K, K, Y + m * N + n);
        } else {  // the last rows of W, one at a time
          for (int64_t r = n; r < N; ++r) dots<1>(W + r * K, X + m * K, K, Y + m * N + r);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm_fp32, m) { m.def("rows_matmul(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(plainlm_fp32, CPU, m) { m.impl("rows_matmul", &rows_matmul); }
