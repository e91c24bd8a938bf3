// y = x @ W^T for int8 weights, on x86 CPUs with AVX512-VNNI: plainlm's own kernel for decoding.
//
// It reads the weights in its own order of the same bytes ("tiles", made by quantize.tile_int8 when a
// layer picks this kernel; checkpoints keep the row order):
//   tiles   (N/16, K/4, 64) int8: block b of 16 output rows, inputs 4j..4j+3; byte 4r + i is row
//           16b + r's input 4j + i
// and one of two kinds of scales:
//   int8_matmul        scales (N,) bf16, one per output row: w = q * scale, q in -127..127 (plainlm's int8)
//   int8_group_matmul  scales_and_zeros (K/G, N, 2) fp32, per group of G inputs and output row:
//                      w = q * scale + zero, q in -128..127 (an 8-bit GPTQ checkpoint's integers 0..255 less
//                      128, its fp16 scale and zero = (128 - z) * scale, both exact in fp32)
//
// PyTorch's int8-weight kernel converts every weight to float and runs at about 6 GB/s on one thread
// here, below memory speed. This one stays in integers: the activations are rounded to int8 once per
// call (one scale d per group of 64 inputs, or of G when G is smaller), and `vpdpbusd` multiplies 64
// pairs per instruction. It takes unsigned x signed bytes, so the weights are shifted into 0..255
// (q + 128, an XOR of the sign bit) and the shift is taken back exactly, in integers, with the inputs' sum:
//   sum_k q_k xq_k  =  sum_k (q_k + 128) xq_k  -  128 * sum_k xq_k
//   sum_k x_k w_k  ~=  scale * sum_groups d * sum_k q_k xq_k                       (per row)
// In groups the shift folds into the zero term, as in int4_matmul.cpp (min = zero - 128 * scale, the
// weight of q + 128 = 0; the inputs' sum is the rounded one):
//   sum_k x_k w_k  ~=  sum_groups [scale * sum_a d_a sum_k (q_k + 128) xq_k  +  min * sum_a d_a sum_k xq_k]
// over the activations' groups a inside each weight group.
//
// The tiles put one row's four weights in each 32-bit lane, as in int4_matmul.cpp: one instruction
// advances 16 rows by four inputs and the lanes are the rows, so nothing is reduced across lanes.
//
// Built on first use by plainlm/kernels/__init__.py and registered as torch.ops.plainlm.int8_matmul and
// torch.ops.plainlm.int8_group_matmul.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "vnni_common.h"

namespace {

using plainlm_vnni::broadcast_four;
using plainlm_vnni::kRows;
using plainlm_vnni::load_pairs;

constexpr int64_t kGroup = 64;  // inputs per activation scale (at most)
constexpr int64_t kInputsPerStep = 16;  // four tiles of four inputs per step of the inner loops
constexpr int64_t kPrefetchAhead = 2048;  // bytes, as in int4_matmul.cpp (prefetches never fault)

// sum_k (q_k + 128) xq_k over inputs begin..end-1 (a multiple of 16 of them) for the 16 rows of `block`, one
// lane a row.
inline __m512i shifted_dots(const int8_t* block, const int8_t* xq, int64_t begin, int64_t end) {
  const __m512i sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  // Four accumulators: vpdpbusd's latency is several cycles, one chain would wait on itself.
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t k = begin; k < end; k += kInputsPerStep) {
    for (int i = 0; i < 4; ++i) {
      const int8_t* tile = block + (k + 4 * i) * kRows;  // 16 rows x 4 inputs
      _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchAhead), _MM_HINT_T0);
      const __m512i shifted = _mm512_xor_si512(_mm512_loadu_si512(tile), sign_bit);  // q + 128, unsigned
      acc[i] = _mm512_dpbusd_epi32(acc[i], shifted, broadcast_four(xq + k + 4 * i));
    }
  }
  return _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
}

// y[m, n0:n0+16] for one block of 16 rows and every row m of the inputs; y's rows are row_stride apart.
void rows_block(const int8_t* tiles, const uint16_t* scales, const plainlm_vnni::QuantizedInputs& in, int64_t M,
                int64_t K, int64_t n0, float* y, int64_t row_stride) {
  const int8_t* block = tiles + n0 * K;
  const int64_t groups = K / kGroup;
  const __m256i raw_scales = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + n0));
  const __m512 row_scales = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw_scales), 16));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = in.values.data() + m * K;
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i sums = shifted_dots(block, xq, g * kGroup, (g + 1) * kGroup);
      const __m512i dots = _mm512_sub_epi32(sums, _mm512_set1_epi32(128 * in.sums[m * groups + g]));
      result = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(in.scales[m * groups + g]), result);
    }
    _mm512_storeu_ps(y + m * row_stride + n0, _mm512_mul_ps(result, row_scales));
  }
}

// The same for weights in groups of G inputs with fp32 (scale, zero) pairs; the activations were rounded per A
// inputs, A dividing G.
void group_rows_block(const int8_t* tiles, const float* scales_and_zeros, const plainlm_vnni::QuantizedInputs& in,
                      int64_t M, int64_t N, int64_t K, int64_t G, int64_t A, int64_t n0, float* y, int64_t row_stride) {
  const int8_t* block = tiles + n0 * K;
  const int64_t groups = K / G, rounded_groups = K / A;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = in.values.data() + m * K;
    const float* d = in.scales.data() + m * rounded_groups;
    const int32_t* xq_sums = in.sums.data() + m * rounded_groups;
    __m512 result = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 dots = _mm512_setzero_ps();  // sum_a d_a sum_k (q_k + 128) xq_k, one lane a row
      float inputs = 0.f;                 // sum_a d_a sum_k xq_k
      for (int64_t a = g * G / A; a < (g + 1) * G / A; ++a) {
        const __m512i sums = shifted_dots(block, xq, a * A, (a + 1) * A);
        dots = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(d[a]), dots);
        inputs += d[a] * static_cast<float>(xq_sums[a]);
      }
      __m512 scale, zero;
      load_pairs(scales_and_zeros + (g * N + n0) * 2, scale, zero);
      const __m512 min = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), scale, zero);  // zero - 128 * scale
      result = _mm512_fmadd_ps(dots, scale, result);
      result = _mm512_fmadd_ps(min, _mm512_set1_ps(inputs), result);
    }
    _mm512_storeu_ps(y + m * row_stride + n0, result);
  }
}

void check_tiles(const at::Tensor& tiles, int64_t K) {
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tiles.is_contiguous() && tiles.dim() == 3 && tiles.size(2) == 64,
              "int8_matmul: the weights must be contiguous int8 tiles (N/16, K/4, 64); see quantize.tile_int8");
  TORCH_CHECK(tiles.size(1) * 4 == K, "int8_matmul: the tiles hold ", tiles.size(1) * 4, " inputs, x has ", K);
}

void check_weights(const at::Tensor& tiles, const at::Tensor& scales, int64_t K) {
  check_tiles(tiles, K);
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

// x @ W_i^T for weights in groups with (scale, zero) pairs, all reading the same x: as int8_matmuls.
at::Tensor int8_group_matmuls(const at::Tensor& x, at::TensorList tiles, at::TensorList scales_and_zeros,
                              int64_t group_size) {
  plainlm_vnni::check_inputs("int8_group_matmul", x);
  TORCH_CHECK(!tiles.empty() && tiles.size() == scales_and_zeros.size(),
              "int8_group_matmuls: one scales_and_zeros per tiles, at least one");
  const int64_t M = x.size(0), K = x.size(1), G = group_size;
  TORCH_CHECK(G > 0 && G % kInputsPerStep == 0 && K % G == 0,
              "int8_group_matmul: needs groups of a multiple of 16 inputs that divide the ", K, " inputs");
  const int64_t A = std::gcd(G, kGroup);  // the activations' groups: 64 inputs, or 16 or 32 inside smaller groups
  for (size_t i = 0; i < tiles.size(); ++i) {
    check_tiles(tiles[i], K);
    const at::Tensor& sz = scales_and_zeros[i];
    TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == K / G &&
                    sz.size(1) == tiles[i].size(0) * kRows && sz.size(2) == 2,
                "int8_group_matmul: scales_and_zeros must be contiguous fp32 (K/G, N, 2)");
  }
  return plainlm_vnni::multiply_each(
      x, tiles, A, kRows * K,
      [&](size_t i, int64_t n0, const plainlm_vnni::QuantizedInputs& in, float* y, int64_t row_stride) {
        const int64_t N = tiles[i].size(0) * kRows;
        group_rows_block(tiles[i].data_ptr<int8_t>(), scales_and_zeros[i].data_ptr<float>(), in, M, N, K, G, A, n0,
                         y, row_stride);
      });
}

at::Tensor int8_group_matmul(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales_and_zeros,
                             int64_t group_size) {
  return int8_group_matmuls(x, {tiles}, {scales_and_zeros}, group_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("int8_matmul(Tensor x, Tensor tiles, Tensor scales) -> Tensor");
  m.def("int8_matmuls(Tensor x, Tensor[] tiles, Tensor[] scales) -> Tensor");
  m.def("int8_group_matmul(Tensor x, Tensor tiles, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("int8_group_matmuls(Tensor x, Tensor[] tiles, Tensor[] scales_and_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_matmuls", &int8_matmuls);
  m.impl("int8_group_matmul", &int8_group_matmul);
  m.impl("int8_group_matmuls", &int8_group_matmuls);
}
