// Attention of one new token per sequence over a preallocated KV cache, on x86 CPUs with AVX512.
//
// A decode step attends over the whole preallocated cache, with the slots not yet written (and any
// left padding) masked out: the shapes stay fixed, so a compiled step never recompiles. SDPA then
// spends its time on masked slots and on call overhead (about 70 us a layer on SmolLM2 at one
// thread); this kernel visits only the slots the mask allows, so its cost follows the tokens
// actually in the cache. Grouped-query attention reads each key and value once for the whole group
// of query heads that share it.
//
//   q     (B, H, D) float     the new token's queries
//   k, v  (B, KH, S, D) float the cache; H is a multiple of KH
//   mask  (B or 1, S) bool    true where the token may attend
// returns (B, H, D): softmax(scale * q k^T over allowed slots) v, in fp32 throughout.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats per zmm

inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

inline void add_scaled(float* out, const float* v, float weight, int64_t D) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t d = 0; d < D; d += kLanes) {
    _mm512_storeu_ps(out + d, _mm512_fmadd_ps(w, _mm512_loadu_ps(v + d), _mm512_loadu_ps(out + d)));
  }
}

// One (sequence, KV head): its group of query heads against the allowed slots of its keys and values.
void attend_group(const float* q, const float* k, const float* v, const bool* mask, int64_t group, int64_t S,
                  int64_t D, float scale, float* out) {
  thread_local std::vector<int32_t> slots;  // reused: a decode step calls this once per layer and KV head
  thread_local std::vector<float> scores;
  slots.clear();
  for (int64_t s = 0; s < S; ++s) {
    if (mask[s]) slots.push_back(static_cast<int32_t>(s));
  }
  scores.resize(slots.size());
  for (int64_t j = 0; j < group; ++j) {
    const float* query = q + j * D;
    float* result = out + j * D;
    for (int64_t d = 0; d < D; ++d) result[d] = 0.f;
    if (slots.empty()) continue;  // nothing to attend to: zeros, where SDPA would give NaN
    float highest = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < slots.size(); ++i) {
      scores[i] = scale * dot(query, k + slots[i] * D, D);
      highest = std::fmax(highest, scores[i]);
    }
    float total = 0.f;
    for (size_t i = 0; i < slots.size(); ++i) {
      scores[i] = std::exp(scores[i] - highest);
      total += scores[i];
    }
    for (size_t i = 0; i < slots.size(); ++i) add_scaled(result, v + slots[i] * D, scores[i] / total, D);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: q (B, H, D), k and v (B, KH, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && mask.is_contiguous(),
              "decode_attention: contiguous tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KH = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % KH == 0 && D % kLanes == 0,
              "decode_attention: shapes do not match, or the head size is not a multiple of 16");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && (mask.size(0) == 1 || mask.size(0) == B) &&
                  mask.size(1) == S,
              "decode_attention: mask must be bool (1 or B, S)");
  const int64_t group = H / KH;
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KH, h = i % KH;
      attend_group(qp + (b * H + h * group) * D, kp + i * S * D, vp + i * S * D, mp + (mask.size(0) == 1 ? 0 : b * S),
                   group, S, D, static_cast<float>(scale), op + (b * H + h * group) * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) { m.impl("decode_attention", &decode_attention); }
