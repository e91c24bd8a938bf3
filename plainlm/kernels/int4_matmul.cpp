// y = x @ W^T for int4 weights, on x86 CPUs with AVX512-VNNI: plainlm's own kernel for decoding.
//
// It reads the weights in its own order of the same bytes ("tiles", made by quantize.tile_nibbles when
// a layer picks this kernel; checkpoints keep the portable row order):
//   tiles              (N/16, K/8, 64) uint8: block b of 16 output rows, inputs 8j..8j+7; byte 4r + i
//                      holds row 16b + r's input 8j + i in its low nibble and input 8j + 4 + i in its high
//   scales_and_zeros   (K/G, N, 2) bf16 or fp32: per group of G inputs and output row,
//                      w = (q - 8) * scale + zero. fp32 holds a GPTQ or AWQ checkpoint's fp16 scales and
//                      zero points exactly (convert/hf_quantized.py); bf16 is plainlm's own int4.
//
// Batch-1 decoding reads every weight once per token, so speed is bytes per token over memory
// bandwidth: the kernel has to keep up with memory while doing the arithmetic. As llama.cpp does, it
// rounds the activations to int8 once per call (one scale per group of G) and multiplies int8 x uint8
// with `vpdpbusd`, 64 multiply-adds per instruction. Per group, with d the activations' scale and xq
// their int8 values (x ~= d * xq):
//   sum_k x_k w_k  ~=  scale * d * sum_k q_k xq_k  +  (zero - 8 * scale) * d * sum_k xq_k
// The second term uses the rounded inputs' sum, not the exact one: then the result is exactly
// w . (d * xq), whose error is sum_k w_k e_k. The exact sum would leave sum_k (w_k - min) e_k,
// about twice as large, since w - min is all positive.
//
// Why tiles: each 32-bit lane of one 64-byte load is one row's four weights, so `vpdpbusd` against
// four inputs broadcast to every lane advances 16 rows at once, and the lanes are the rows from the
// start: no per-group reduction across lanes, and the bytes stream in order. Against the row order
// (one register per row, reduced at the end of each group), this ran twice as fast from cache and
// 1.35x from memory on SmolLM2's layers.
//
// Built on first use by plainlm/kernels/__init__.py (torch.utils.cpp_extension) and registered as
// the operator torch.ops.plainlm.int4_matmul, so torch.compile calls it inside a compiled graph.

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
using plainlm_vnni::load_pairs;

constexpr int64_t kInputsPerStep = 16;  // two 64-byte tiles per step of the inner loop
// The hardware prefetcher alone left 3-8% of memory speed unused on SmolLM2's layers. A prefetch past
// the end of the weights is harmless: prefetches never fault.
constexpr int64_t kPrefetchAhead = 2048;  // bytes

// y[m, n0:n0+16] for one block of 16 rows and every row m of the inputs; y's rows are row_stride apart.
// Pair: uint16_t (bf16 scales_and_zeros) or float.
template <typename Pair>
void rows_block(const uint8_t* tiles, const Pair* scales_and_zeros, const plainlm_vnni::QuantizedInputs& in,
                int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, float* y, int64_t row_stride) {
  const uint8_t* block = tiles + n0 * (K / 2);
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = in.values.data() + m * K;
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      // Four accumulators: vpdpbusd's latency is several cycles, one chain would wait on itself.
      __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t k = g * G; k < (g + 1) * G; k += kInputsPerStep) {
        const uint8_t* tile = block + k * (kRows / 2);  // 16 rows x 8 inputs = 64 bytes per 8 inputs
        _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchAhead + 64), _MM_HINT_T0);
        const __m512i first = _mm512_loadu_si512(tile), second = _mm512_loadu_si512(tile + 64);
        const __m512i first_high = _mm512_and_si512(_mm512_srli_epi16(first, 4), low_nibble);
        const __m512i second_high = _mm512_and_si512(_mm512_srli_epi16(second, 4), low_nibble);
        acc0 = _mm512_dpbusd_epi32(acc0, _mm512_and_si512(first, low_nibble), broadcast_four(xq + k));
        acc1 = _mm512_dpbusd_epi32(acc1, first_high, broadcast_four(xq + k + 4));
        acc2 = _mm512_dpbusd_epi32(acc2, _mm512_and_si512(second, low_nibble), broadcast_four(xq + k + 8));
        acc3 = _mm512_dpbusd_epi32(acc3, second_high, broadcast_four(xq + k + 12));
      }
      const __m512i sums = _mm512_add_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(acc2, acc3));
      const __m512 dots = _mm512_cvtepi32_ps(sums);
      __m512 scale, zero;
      load_pairs(scales_and_zeros + (g * N + n0) * 2, scale, zero);
      const __m512 min = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);  // zero - 8 * scale
      const float d = in.scales[m * groups + g];
      result = _mm512_fmadd_ps(dots, _mm512_mul_ps(scale, _mm512_set1_ps(d)), result);
      result = _mm512_fmadd_ps(min, _mm512_set1_ps(d * static_cast<float>(in.sums[m * groups + g])), result);
    }
    _mm512_storeu_ps(y + m * row_stride + n0, result);
  }
}

void check_weights(const at::Tensor& tiles, const at::Tensor& scales_and_zeros, int64_t K, int64_t G) {
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 && tiles.size(2) == 64,
              "int4_matmul: the weights must be contiguous uint8 tiles (N/16, K/8, 64); see quantize.tile_nibbles");
  TORCH_CHECK(tiles.size(1) * 8 == K, "int4_matmul: the tiles hold ", tiles.size(1) * 8, " inputs, x has ", K);
  TORCH_CHECK(G > 0 && G % kInputsPerStep == 0 && K % G == 0, "int4_matmul: needs groups of a multiple of 16 inputs");
  TORCH_CHECK((scales_and_zeros.scalar_type() == at::kBFloat16 || scales_and_zeros.scalar_type() == at::kFloat) &&
                  scales_and_zeros.is_contiguous() && scales_and_zeros.dim() == 3 &&
                  scales_and_zeros.size(0) == K / G && scales_and_zeros.size(1) == tiles.size(0) * kRows,
              "int4_matmul: scales_and_zeros must be contiguous bf16 or fp32 (K/G, N, 2)");
}

// x @ W_i^T for every weight i, all reading the same x (a layer's q, k and v; gate and up), side by side
// in the columns of one result: the activations are rounded once, and one parallel loop covers every
// matrix's blocks. Decoding a small model makes some 200 calls a step, and each call costs microseconds
// of dispatch: one call for several matrices saves them.
at::Tensor int4_matmuls(const at::Tensor& x, at::TensorList tiles, at::TensorList scales_and_zeros,
                        int64_t group_size) {
  plainlm_vnni::check_inputs("int4_matmul", x);
  TORCH_CHECK(!tiles.empty() && tiles.size() == scales_and_zeros.size(),
              "int4_matmuls: one scales_and_zeros per tiles, at least one");
  const int64_t M = x.size(0), K = x.size(1), G = group_size;
  for (size_t i = 0; i < tiles.size(); ++i) check_weights(tiles[i], scales_and_zeros[i], K, G);
  return plainlm_vnni::multiply_each(
      x, tiles, G, kRows * K / 2,
      [&](size_t i, int64_t n0, const plainlm_vnni::QuantizedInputs& in, float* y, int64_t row_stride) {
        const int64_t N = tiles[i].size(0) * kRows;
        if (scales_and_zeros[i].scalar_type() == at::kFloat) {
          rows_block(tiles[i].data_ptr<uint8_t>(), scales_and_zeros[i].data_ptr<float>(), in, M, N, K, G, n0, y,
                     row_stride);
        } else {
          const auto* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros[i].data_ptr<c10::BFloat16>());
          rows_block(tiles[i].data_ptr<uint8_t>(), sz, in, M, N, K, G, n0, y, row_stride);
        }
      });
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales_and_zeros,
                       int64_t group_size) {
  return int4_matmuls(x, {tiles}, {scales_and_zeros}, group_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("int4_matmul(Tensor x, Tensor tiles, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("int4_matmuls(Tensor x, Tensor[] tiles, Tensor[] scales_and_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
  m.impl("int4_matmuls", &int4_matmuls);
}
