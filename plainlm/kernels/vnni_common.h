// What plainlm's integer matmul kernels share (int4_matmul.cpp, int8_matmul.cpp): activations rounded to
// int8 per group once per call, and the reduction of 16 rows' dot products into one register.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace plainlm_vnni {

constexpr int64_t kRows = 16;   // output rows per block: one zmm of results
constexpr int64_t kChunk = 64;  // inputs per zmm of int8 or unpacked int4 weights

// The activations of one call, rounded to int8 per group of G: x ~= d * xq. The buffers are per
// thread and reused from call to call: a decode step makes some 200 calls.
struct QuantizedInputs {
  std::vector<int8_t> values;  // (M, K): xq, in the order the weights unpack to
  std::vector<float> scales;   // (M, K/G): d per group
  std::vector<int32_t> sums;   // (M, K/G): sum of the group's xq
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* bf16) {  // bf16 -> fp32 is a shift into the upper 16 bits
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bf16));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// nibble_order: reorder each chunk of 64 as unpacked nibbles come out (the 32 even inputs, then the
// 32 odd ones); otherwise keep the inputs in order. T: float, or uint16_t holding bf16.
template <typename T>
void quantize_inputs(const T* x, int64_t M, int64_t K, int64_t G, bool nibble_order, QuantizedInputs& out) {
  out.values.resize(M * K);
  out.scales.resize(M * (K / G));
  out.sums.resize(M * (K / G));
  alignas(64) int32_t even[16], odd[16];
  for (int j = 0; j < 16; ++j) even[j] = 2 * j, odd[j] = 2 * j + 1;  // lanes of a two-register permute
  const __m512i evens = _mm512_load_si512(even), odds = _mm512_load_si512(odd);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K / G; ++g) {
      const T* in = x + m * K + g * G;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(in + k)));
      const float largest = _mm512_reduce_max_ps(amax);
      const __m512 inverse = _mm512_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
      int8_t* xq = out.values.data() + m * K + g * G;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t c = 0; c < G; c += kChunk) {
        __m512 v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm512_mul_ps(load16(in + c + 16 * i), inverse);
        if (nibble_order) {
          const __m512 e0 = _mm512_permutex2var_ps(v[0], evens, v[1]), e1 = _mm512_permutex2var_ps(v[2], evens, v[3]);
          const __m512 o0 = _mm512_permutex2var_ps(v[0], odds, v[1]), o1 = _mm512_permutex2var_ps(v[2], odds, v[3]);
          v[0] = e0, v[1] = e1, v[2] = o0, v[3] = o1;
        }
        for (int i = 0; i < 4; ++i) {
          const __m512i q = _mm512_cvtps_epi32(v[i]);  // rounds half to even, as std::nearbyint
          sum = _mm512_add_epi32(sum, q);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + c + 16 * i), _mm512_cvtsepi32_epi8(q));
        }
      }
      out.scales[m * (K / G) + g] = largest / 127.f;
      out.sums[m * (K / G) + g] = _mm512_reduce_add_epi32(sum);
    }
  }
}

// Permute indices for sum_each_of_16, one (low, high) pair per level of the tree. Level l combines two
// vectors whose rows hold `width` partial sums each into one whose rows hold width / 2: the result's
// lanes hold, in order, the halved rows of the first vector, then those of the second.
struct ReductionIndices {
  alignas(64) int32_t low[4][16];
  alignas(64) int32_t high[4][16];
  ReductionIndices() {
    for (int level = 0, width = 16; level < 4; ++level, width /= 2) {
      const int half = width / 2, rows = 16 / width;
      for (int j = 0; j < 16; ++j) {
        const int row = j / half, offset = j % half;
        const int base = row < rows ? row * width : 16 + (row - rows) * width;
        low[level][j] = base + offset;
        high[level][j] = base + offset + half;
      }
    }
  }
};
inline const ReductionIndices kReduction;

// One zmm whose lane r is the sum of acc[r]'s 16 lanes: a halving tree of two-source permutes,
// 15 adds in all instead of 16 separate horizontal reductions.
inline __m512i sum_each_of_16(__m512i acc[kRows]) {
  for (int level = 0, count = kRows; count > 1; ++level, count /= 2) {
    const __m512i lo = _mm512_load_si512(kReduction.low[level]);
    const __m512i hi = _mm512_load_si512(kReduction.high[level]);
    for (int i = 0; i < count / 2; ++i) {
      acc[i] = _mm512_add_epi32(_mm512_permutex2var_epi32(acc[2 * i], lo, acc[2 * i + 1]),
                                _mm512_permutex2var_epi32(acc[2 * i], hi, acc[2 * i + 1]));
    }
  }
  return acc[0];
}

}  // namespace plainlm_vnni
