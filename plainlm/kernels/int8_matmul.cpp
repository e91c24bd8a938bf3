// y = x @ W^T for int8 weights, on x86 CPUs with AVX512-VNNI: plainlm's own kernel for decoding.
//
// It reads the weights in its own order of the same bytes ("tiles", made by quantize.tile_int8 when a
// layer picks this kernel; checkpoints keep the row order):
//   tiles   (N/16, K/4, 64) int8: block b of 16 output rows, inputs 4j..4j+3; byte 4r + i is row
//           16b + r's input 4j + i. w = q * scale, q in -127..127
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
// The tiles put one row's four weights in each 32-bit lane, as in int4_matmul.cpp: one instruction
// advances 16 rows by four inputs and the lanes are the rows, so nothing is reduced across lanes.
//
// Built on first use by plainlm/kernels/__init__.py and registered as torch.ops.plainlm.int8_matmul.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "vnni_common.h"

namespace {

using plainlm_vnni::broadcast_four;
using plainlm_vnni::kRows;

constexpr int64_t kGroup = 64;  // inputs per activation scale
constexpr int64_t kPrefetchAhead = 2048;  // bytes, as in int4_matmul.cpp (prefetches never fault)

// y[m, n0:n0+16] for one block of 16 rows and every row m of the inputs; y's rows are row_stride apart.
void rows_block(const int8_t* tiles, const uint16_t* scales, const plainlm_vnni::QuantizedInputs& in, int64_t M,
                int64_t K, int64_t n0, float* y, int64_t row_stride) {
  const int8_t* block = tiles + n0 * K;
  const __m512i sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t groups = K / kGroup;
  const __m256i raw_scales = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + n0));
  const __m512 row_scales = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw_scales), 16));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = in.values.data() + m * K;
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      // Four accumulators: vpdpbusd's latency is several cycles, one chain would wait on itself.
      __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 16) {
        for (int i = 0; i < 4; ++i) {
          const int8_t* tile = block + (k + 4 * i) * kRows;  // 16 rows x 4 inputs
          _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchAhead), _MM_HINT_T0);
          const __m512i shifted = _mm512_xor_si512(_mm512_loadu_si512(tile), sign_bit);  // q + 128, unsigned
          acc[i] = _mm512_dpbusd_epi32(acc[i], shifted, broadcast_four(xq + k + 4 * i));
        }
      }
      const __m512i sums = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
      const __m512i dots = _mm512_sub_epi32(sums, _mm512_set1_epi32(128 * in.sums[m * groups + g]));
      result = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(in.scales[m * groups + g]), result);
    }
    _mm512_storeu_ps(y + m * row_stride + n0, _mm512_mul_ps(result, row_scales));
  }
}

void check_weights(const at::Tensor& tiles, const at::Tensor& scales, int64_t K) {
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tiles.is_contiguous() && tiles.dim() == 3 && tiles.size(2) == 64,
              "int8_matmul: the weights must be contiguous int8 tiles (N/16, K/4, 64); see quantize.tile_int8");
  TORCH_CHECK(tiles.size(1) * 4 == K, "int8_matmul: the tiles hold ", tiles.size(1) * 4, " inputs, x has ", K);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == tiles.size(0) * kRows,
              "int8_matmul: scales must be contiguous bf16 (N,)");
}

// x @ W_i^T for every weight i, all reading the same x: as int4_matmuls in int4_matmul.cpp.
at::Tensor int8_matmuls(const at::Tensor& x, at::TensorList tiles, at::TensorList scales) {
  plainlm_vnni::check_inputs("int8_matmul", x);
  TORCH_CHECK(!tiles.empty() && tiles.size() == scales.size(), "int8_matmuls: one scales per tiles, at least one");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0, "int8_matmul: needs a multiple of 64 inputs");
  for (size_t i = 0; i < tiles.size(); ++i) check_weights(tiles[i], scales[i], K);
  return plainlm_vnni::multiply_each(
      x, tiles, kGroup, kRows * K,
      [&](size_t i, int64_t n0, const plainlm_vnni::QuantizedInputs& in, float* y, int64_t row_stride) {
        rows_block(tiles[i].data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(scales[i].data_ptr<c10::BFloat16>()),
                   in, M, K, n0, y, row_stride);
      });
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales) {
  return int8_matmuls(x, {tiles}, {scales});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("int8_matmul(Tensor x, Tensor tiles, Tensor scales) -> Tensor");
  m.def("int8_matmuls(Tensor x, Tensor[] tiles, Tensor[] scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_matmuls", &int8_matmuls);
}
