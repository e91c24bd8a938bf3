// y = x @ W^T for int8 weights, on x86 CPUs with AVX512-VNNI: plainlm's own kernel for decoding.
//
// It reads the weights as plainlm stores them (quantize.py):
//   weight  (N, K) int8: w = q * scale, q in -127..127
//   scales  (N,) bf16: one per output row
//
// PyTorch's int8-weight kernel converts every weight to float and runs at about 6 GB/s on one thread
// here, below memory speed. This one stays in integers: the activations are rounded to int8 once per
// call (one scale d per group of 64 inputs), and `vpdpbusd` multiplies 64 pairs per instruction. It
// takes unsigned x signed bytes, so the weights are shifted into 1..255 (q + 128, an XOR of the sign
// bit) and the shift is taken back exactly, in integers, with the inputs' sum:
//   sum_k q_k xq_k  =  sum_k (q_k + 128) xq_k  -  128 * sum_k xq_k
//   sum_k x_k w_k  ~=  scale * sum_groups d * sum_k q_k xq_k
//
// Rows go 16 at a time, as in int4_matmul.cpp: each row's dot products accumulate in its own
// register and are reduced at the end of a group into one register whose lanes are the 16 rows.
//
// Built on first use by plainlm/kernels/__init__.py and registered as torch.ops.plainlm.int8_matmul.

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

// y[m, n0:n0+16] for one block of 16 rows and every row m of the inputs; groups of kChunk inputs.
void rows_block(const int8_t* weight, const uint16_t* scales, const plainlm_vnni::QuantizedInputs& in, int64_t M,
                int64_t N, int64_t K, int64_t n0, float* y) {
  const __m512i sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t groups = K / kChunk;
  const __m256i raw_scales = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + n0));
  const __m512 row_scales = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw_scales), 16));
  for (int64_t m = 0; m < M; ++m) {
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = g * kChunk;
      const __m512i x = _mm512_loadu_si512(in.values.data() + m * K + c);
      __m512i acc[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int8_t* row = weight + (n0 + r) * K + c;
        // The same row's chunk in the next block: fetched now, so the loads there find it in cache.
        _mm_prefetch(reinterpret_cast<const char*>(row + kRows * K), _MM_HINT_T0);
        const __m512i shifted = _mm512_xor_si512(_mm512_loadu_si512(row), sign_bit);  // q + 128, unsigned
        acc[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), shifted, x);
      }
      const __m512i shift_back = _mm512_set1_epi32(128 * in.sums[m * groups + g]);
      const __m512i dots = _mm512_sub_epi32(plainlm_vnni::sum_each_of_16(acc), shift_back);
      result = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(in.scales[m * groups + g]), result);
    }
    _mm512_storeu_ps(y + m * N + n0, _mm512_mul_ps(result, row_scales));
  }
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int8_matmul: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_matmul: x must be fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.size(1) == K,
              "int8_matmul: weight must be contiguous int8 (N, K)");
  TORCH_CHECK(K % kChunk == 0 && N % kRows == 0, "int8_matmul: needs a multiple of 64 inputs and of 16 output rows");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == N,
              "int8_matmul: scales must be contiguous bf16 (N,)");

  thread_local plainlm_vnni::QuantizedInputs in;
  if (x.scalar_type() == at::kFloat) {
    plainlm_vnni::quantize_inputs(x.data_ptr<float>(), M, K, kChunk, /*nibble_order=*/false, in);
  } else {
    plainlm_vnni::quantize_inputs(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), M, K, kChunk, false, in);
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* w = weight.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) rows_block(w, s, in, M, N, K, block * kRows, out);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) { m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(plainlm, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
