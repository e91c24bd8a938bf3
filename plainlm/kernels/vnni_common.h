// What plainlm's integer matmul kernels share (int4_matmul.cpp, int8_matmul.cpp): activations rounded to
// int8 per group once per call, the broadcast of four of them against a tile of 16 rows, a group's 16
// (scale, zero) pairs, and the loop that runs every 16-row block of every matrix of a call.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace plainlm_vnni {

constexpr int64_t kRows = 16;  // output rows per block: one zmm of results, one 32-bit lane each
// A thread's share of a matmul is at least this many bytes of weights: a smaller one (a few us of
// reading) would cost about as much in handing it to another thread as it saves.
constexpr int64_t kBytesPerTask = 64 * 1024;

// The activations of one call, rounded to int8 per group of G: x ~= d * xq. The buffers are per
// thread and reused from call to call: a decode step makes some 200 calls.
struct QuantizedInputs {
  std::vector<int8_t> values;  // (M, K): xq
  std::vector<float> scales;   // (M, K/G): d per group
  std::vector<int32_t> sums;   // (M, K/G): sum of the group's xq
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* bf16) {  // bf16 -> fp32 is a shift into the upper 16 bits
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bf16));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The 16 rows' (scale, zero) pairs of one group, from `pairs` (32 values: scale, zero, scale, ...).
// bf16: 64 contiguous bytes, and bf16 -> fp32 is a shift.
inline void load_pairs(const uint16_t* pairs, __m512& scale, __m512& zero) {
  const __m512i raw = _mm512_loadu_si512(pairs);
  scale = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  zero = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000))));
}
// fp32: 128 bytes, the even values the scales and the odd ones the zeros.
inline void load_pairs(const float* pairs, __m512& scale, __m512& zero) {
  const __m512 first = _mm512_loadu_ps(pairs), second = _mm512_loadu_ps(pairs + 16);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  scale = _mm512_permutex2var_ps(first, even, second);
  zero = _mm512_permutex2var_ps(first, _mm512_add_epi32(even, _mm512_set1_epi32(1)), second);
}

// x rounded per group of G inputs (G a multiple of 16), in order. T: float, or uint16_t holding bf16.
template <typename T>
void quantize_inputs(const T* x, int64_t M, int64_t K, int64_t G, QuantizedInputs& out) {
  out.values.resize(M * K);
  out.scales.resize(M * (K / G));
  out.sums.resize(M * (K / G));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K / G; ++g) {
      const T* in = x + m * K + g * G;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(in + k)));
      const float largest = _mm512_reduce_max_ps(amax);
      const __m512 inverse = _mm512_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
      int8_t* xq = out.values.data() + m * K + g * G;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < G; k += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(in + k), inverse));  // half to even
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k), _mm512_cvtsepi32_epi8(q));
      }
      out.scales[m * (K / G) + g] = largest / 127.f;
      out.sums[m * (K / G) + g] = _mm512_reduce_add_epi32(sum);
    }
  }
}

// xq[0..3] in every 32-bit lane: the four inputs that one tile's lanes (16 rows x 4 weights) multiply.
inline __m512i broadcast_four(const int8_t* xq) {
  int32_t four;
  std::memcpy(&four, xq, sizeof(four));
  return _mm512_set1_epi32(four);
}

inline void check_inputs(const char* kernel, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), kernel, ": x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kernel, ": x must be fp32 or bf16");
}

// x @ W_i^T for every matrix i of `tiles` (checked by the caller), all reading the same x, side by side in
// the columns of one (M, N_0 + N_1 + ...) fp32 result: x is rounded once per group of G, and one parallel
// loop runs block(i, first_row, rounded x, y, row_stride) for every 16-row block of every matrix, y
// pointing at matrix i's first column, a thread's share at least kBytesPerTask of weights.
template <typename Block>
at::Tensor multiply_each(const at::Tensor& x, at::TensorList tiles, int64_t G, int64_t bytes_per_block,
                         const Block& block) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> first_block = {0};  // matrix i has blocks first_block[i] .. first_block[i + 1] - 1
  for (const at::Tensor& t : tiles) first_block.push_back(first_block.back() + t.size(0));
  const int64_t N = first_block.back() * kRows;  // all matrices' rows: the result's columns
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  thread_local QuantizedInputs rounded;
  QuantizedInputs& in = rounded;  // the loop's workers have thread_locals of their own: they read the caller's
  if (x.scalar_type() == at::kFloat) {
    quantize_inputs(x.data_ptr<float>(), M, K, G, in);
  } else {
    quantize_inputs(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), M, K, G, in);
  }
  float* out = y.data_ptr<float>();
  at::parallel_for(0, first_block.back(), std::max<int64_t>(1, kBytesPerTask / bytes_per_block),
                   [&](int64_t begin, int64_t end) {
                     size_t i = 0;
                     for (int64_t b = begin; b < end; ++b) {
                       while (b >= first_block[i + 1]) ++i;
                       block(i, (b - first_block[i]) * kRows, in, out + first_block[i] * kRows, N);
                     }
                   });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace plainlm_vnni
