// y = x @ W^T for int4 weights, on x86 CPUs with AVX512-VNNI: plainlm's own kernel for decoding.
//
// It reads the weights exactly as plainlm stores them (quantize.py), so there is no packed copy:
//   nibbles            (N, K/2) uint8: row n's values q in 0..15, the even column in the low nibble
//   scales_and_zeros   (K/G, N, 2) bf16: per group of G inputs and output row, w = (q - 8) * scale + zero
//
// Batch-1 decoding reads every weight once per token, so speed is bytes per token over memory
// bandwidth: the kernel has to keep up with memory while doing the arithmetic. It does it the way
// llama.cpp does: the activations are quantized to int8 once per call (one scale per group of G),
// and the dot products run on int8 x uint8 with `vpdpbusd`, 64 multiply-adds per instruction.
// Per group, with d the activations' scale and xq their int8 values (x ~= d * xq):
//   sum_k x_k w_k  ~=  scale * d * sum_k q_k xq_k  +  (zero - 8 * scale) * d * sum_k xq_k
// The second term uses the rounded inputs' sum, not the exact one: then the result is exactly
// w . (d * xq), whose error is sum_k w_k e_k. The exact sum would leave sum_k (w_k - min) e_k,
// about twice as large, since w - min is all positive.
//
// Rows go 16 at a time so that one 64-byte load brings the 16 rows' (scale, zero) pairs of a group.
// Each row's dot products accumulate in its own register (lanes = inputs) and are reduced at the
// end of a group into one register whose lanes are the 16 rows, where the scales apply.
//
// Built on first use by plainlm/kernels/__init__.py (torch.utils.cpp_extension) and registered as
// the operator torch.ops.plainlm.int4_matmul, so torch.compile calls it inside a compiled graph.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

#include "vnni_common.h"

namespace {

using plainlm_vnni::kChunk;
using plainlm_vnni::kRows;

// y[m, n0:n0+16] for one block of 16 rows and every row m of the inputs.
void rows_block(const uint8_t* nibbles, const uint16_t* scales_and_zeros, const plainlm_vnni::QuantizedInputs& in,
                int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, float* y) {
  const int8_t* xq = in.values.data();
  // Shift counts per 16-bit lane: 0 in the lower 256 bits, 4 in the upper.
  const __m512i shift_words = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                               0x0004000400040004, 0, 0, 0, 0);
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000));
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
      for (int64_t c = g * G; c < (g + 1) * G; c += kChunk) {
        // The next block's rows follow this block's in memory (16 rows x K/2 bytes): fetch them in
        // step with this one, 512 bytes per chunk, so the loads there find them in cache.
        const uint8_t* next = nibbles + (n0 + kRows) * (K / 2) + c * (kRows / 2);
        for (int line = 0; line < kRows * 32; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T0);
        const __m512i x = _mm512_loadu_si512(xq + m * K + c);
        for (int r = 0; r < kRows; ++r) {
          // Both halves get the same 32 bytes; the upper half shifts right by 4: low nibbles, then high.
          __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(nibbles + (n0 + r) * (K / 2) + c / 2)));
          w = _mm512_and_si512(_mm512_srlv_epi16(w, shift_words), low_nibble);
          acc[r] = _mm512_dpbusd_epi32(acc[r], w, x);
        }
      }
      const __m512 dots = _mm512_cvtepi32_ps(plainlm_vnni::sum_each_of_16(acc));
      // The 16 rows' (scale, zero) pairs of group g are 64 contiguous bytes: bf16 -> fp32 is a shift.
      const __m512i pairs = _mm512_loadu_si512(scales_and_zeros + (g * N + n0) * 2);
      _mm_prefetch(reinterpret_cast<const char*>(scales_and_zeros + (g * N + n0 + kRows) * 2), _MM_HINT_T0);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      const __m512 min = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);  // zero - 8 * scale
      const float d = in.scales[m * groups + g];
      result = _mm512_fmadd_ps(dots, _mm512_mul_ps(scale, _mm512_set1_ps(d)), result);
      result = _mm512_fmadd_ps(min, _mm512_set1_ps(d * static_cast<float>(in.sums[m * groups + g])), result);
    }
    _mm512_storeu_ps(y + m * N + n0, result);
  }
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales_and_zeros,
                       int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_matmul: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_matmul: x must be fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), N = nibbles.size(0), G = group_size;
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.is_contiguous() && nibbles.size(1) * 2 == K,
              "int4_matmul: nibbles must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(G % kChunk == 0 && K % G == 0 && N % kRows == 0,
              "int4_matmul: needs groups of a multiple of 64 inputs and a multiple of 16 output rows");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.size(0) == K / G && scales_and_zeros.size(1) == N,
              "int4_matmul: scales_and_zeros must be contiguous bf16 (K/G, N, 2)");

  thread_local plainlm_vnni::QuantizedInputs in;
  if (x.scalar_type() == at::kFloat) {
    plainlm_vnni::quantize_inputs(x.data_ptr<float>(), M, K, G, /*nibble_order=*/true, in);
  } else {
    plainlm_vnni::quantize_inputs(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), M, K, G, true, in);
  }

  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* w = nibbles.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<c10::BFloat16>());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      rows_block(w, sz, in, M, N, K, G, block * kRows, out);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("int4_matmul(Tensor x, Tensor nibbles, Tensor scales_and_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) { m.impl("int4_matmul", &int4_matmul); }
