// Attention of new tokens over a KV cache, on x86 CPUs with AVX512.
//
// A decode step attends over the whole preallocated cache, with the slots not yet written (and any
// left padding) masked out: the shapes stay fixed, so a compiled step never recompiles. SDPA then
// spends its time on masked slots and on call overhead (about 70 us a layer on SmolLM2 at one
// thread); this kernel visits only the slots the mask allows, so its cost follows the tokens
// actually in the cache. Grouped-query attention reads each key and value once for the whole group
// of query heads that share it.
//
//   q     (B * T, H, D) float  the T new tokens' queries, sequence-major: token t of sequence b is row b * T + t
//   k, v  (B, KH, S, D) float  the cache; H is a multiple of KH
//   mask  (B * T or T, S) bool true where the token may attend (T rows: the same for every sequence)
// returns (B * T, H, D): softmax(scale * q k^T over allowed slots) v, in fp32 throughout. T is 1 for a
// decode step, a few for a speculative verification, many for a prompt.
//
// paged_attention is the same over the serving engine's paged KV pool (plainlm/serve/kv_pool.py), read
// in place instead of first gathered into the layout above, for T new tokens of each sequence at once
// (a decode step, T = 1, or a chunk of a prompt):
//   q     (B * T, H, D) float the queries, as above
//   k, v  (R, D) float        the pool's rows: every block's tokens, KV heads outermost
//   rows  (B, KH, S) int64    the pool row of each sequence's s-th key for each KV head
//   mask  (B * T, S) bool     true where token t of sequence b may attend (causality, windows, padding)
// Both: with few queries a KV head (T x group < kManyQueries) each is one pass over its keys. With many,
// the keys and values a tile of queries may see are gathered into contiguous buffers once and the tile
// is two small matrix products (scores, then weighted values) with a masked softmax between, so T tokens
// read their sequence's keys once a tile rather than once a query.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats per zmm
constexpr int64_t kManyQueries = 8;  // from this many queries a (sequence, KV head), the tiled matrix-product path
constexpr int64_t kTileQueries = 128;  // queries a tile: its scores (tile x keys) stay within the L2 cache

inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

// e^x for 16 floats, x <= 0 here (scores less their maximum): 2^(x log2 e) = 2^n 2^f, n the nearest integer,
// f in [-0.5, 0.5] and 2^f a degree-6 Taylor polynomial (relative error ~1e-7). One call of the C
// library's expf per score cost more than the rest of the kernel together.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381610e-4f);            // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, 0 once n is far enough below the float range
}

// Softmax over the n scores at w, in place, 16 at a time. Scores of -infinity (slots the query may not see)
// get weight 0; a row with none left gets zeros throughout.
inline void softmax(float* w, int64_t n) {
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 highest = minus_infinity;
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 valid = i + kLanes <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    highest = _mm512_mask_max_ps(highest, valid, highest, _mm512_loadu_ps(w + i));
  }
  const float top_score = _mm512_reduce_max_ps(highest);
  if (top_score == -std::numeric_limits<float>::infinity()) {
    std::fill(w, w + n, 0.f);
    return;
  }
  const __m512 top = _mm512_set1_ps(top_score);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 valid = i + kLanes <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 score = _mm512_maskz_loadu_ps(valid, w + i);
    const __mmask16 seen = _mm512_mask_cmp_ps_mask(valid, score, minus_infinity, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(score, top)));
    _mm512_mask_storeu_ps(w + i, valid, e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 valid = i + kLanes <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(w + i, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, w + i), inverse));
  }
}

// One (sequence, KV head): its group of query heads against the allowed slots of its keys and values.
// Each key and value row is read once for the whole group. Slot s's key is row s of k, or row rows[s]
// when the keys lie in a paged pool.
void attend_group(const float* q, const float* k, const float* v, const int64_t* rows, const bool* mask,
                  int64_t group, int64_t S, int64_t D, float scale, float* out) {
  thread_local std::vector<int64_t> slots;  // reused: a decode step calls this once per layer and KV head
  thread_local std::vector<float> weights;  // (group, slots), padded to whole registers
  slots.clear();
  for (int64_t s = 0; s < S; ++s) {
    if (mask[s]) slots.push_back(rows == nullptr ? s : rows[s]);
  }
  const int64_t n = static_cast<int64_t>(slots.size()), stride = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = 0; i < group * D; ++i) out[i] = 0.f;
  if (n == 0) return;  // nothing to attend to: zeros, where SDPA would give NaN
  weights.assign(group * stride, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const float* key = k + slots[i] * D;
    for (int64_t j = 0; j < group; ++j) weights[j * stride + i] = scale * dot(q + j * D, key, D);
  }
  for (int64_t j = 0; j < group; ++j) softmax(weights.data() + j * stride, n);
  for (int64_t i = 0; i < n; ++i) {
    const float* value = v + slots[i] * D;
    for (int64_t d = 0; d < D; d += kLanes) {
      const __m512 row = _mm512_loadu_ps(value + d);
      for (int64_t j = 0; j < group; ++j) {
        float* result = out + j * D + d;
        _mm512_storeu_ps(result, _mm512_fmadd_ps(_mm512_set1_ps(weights[j * stride + i]), row, _mm512_loadu_ps(result)));
      }
    }
  }
}

// One tile of many queries of one sequence and KV head: tokens [t0, t0 + tokens) of the sequence, each
// with the `group` query heads that share the KV head. q and out point at token t0's first such head;
// `token_stride` floats lie between one token's heads and the next's. rows (S; null: slot s is row s) and
// mask (T, S) are the sequence's; the tile gathers the keys and values that any of its queries may see into contiguous
// buffers, then scores = queries keys^T and out = softmax(scores) values are two matrix products.
void attend_tile(const float* q, int64_t token_stride, const float* k, const float* v, const int64_t* rows,
                 const bool* mask, int64_t t0, int64_t tokens, int64_t group, int64_t S, int64_t D, float scale,
                 float* out) {
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<float> queries, keys, values, weights, results;
  slots.clear();
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t t = t0 + tokens - 1; t >= t0; --t) {  // the last token usually sees the most: checked first
      if (mask[t * S + s]) {
        slots.push_back(s);
        break;
      }
    }
  }
  const int64_t n = static_cast<int64_t>(slots.size()), m = tokens * group;
  if (n == 0) {  // nothing to attend to: zeros, where SDPA would give NaN
    for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * token_stride, out + t * token_stride + group * D, 0.f);
    return;
  }
  queries.resize(m * D);
  keys.resize(n * D);
  values.resize(n * D);
  weights.resize(m * n);
  results.resize(m * D);
  for (int64_t t = 0; t < tokens; ++t) std::memcpy(&queries[t * group * D], q + t * token_stride, group * D * sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = rows == nullptr ? slots[i] : rows[slots[i]];
    std::memcpy(&keys[i * D], k + row * D, D * sizeof(float));
    std::memcpy(&values[i * D], v + row * D, D * sizeof(float));
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor scores = at::from_blob(weights.data(), {m, n}, options);
  at::mm_out(scores, at::from_blob(queries.data(), {m, D}, options), at::from_blob(keys.data(), {n, D}, options).t());
  // Scale the scores, and set those of slots a query may not see to -infinity. The slots are usually all of
  // 0..n-1 (a causal chunk after its prefix), and then 16 mask bytes at a time give 16 scores' fates.
  const bool dense = slots.back() == n - 1;
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), factor = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < m; ++r) {
    const bool* sees = mask + (t0 + r / group) * S;
    float* w = &weights[r * n];
    if (dense) {
      for (int64_t i = 0; i < n; i += kLanes) {
        const __mmask16 valid = i + kLanes <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
        const __m128i bytes = _mm_maskz_loadu_epi8(valid, sees + i);
        const __mmask16 allowed = _mm_test_epi8_mask(bytes, bytes);
        const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, w + i), factor);
        _mm512_mask_storeu_ps(w + i, valid, _mm512_mask_blend_ps(allowed, minus_infinity, scaled));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) w[i] = sees[slots[i]] ? scale * w[i] : -std::numeric_limits<float>::infinity();
    }
    softmax(w, n);
  }
  at::Tensor result = at::from_blob(results.data(), {m, D}, options);
  at::mm_out(result, scores, at::from_blob(values.data(), {n, D}, options));
  for (int64_t t = 0; t < tokens; ++t) std::memcpy(out + t * token_stride, &results[t * group * D], group * D * sizeof(float));
}

// Every (sequence, KV head) of a call: key_stride floats lie between one (sequence, KV head)'s keys and the
// next's (S * D in a cache, 0 in the pool, where rows says where each key is: rows_stride apart, or null);
// mask_stride bools between one sequence's T mask rows and the next's (0 where they share them).
void attend_all(const float* q, const float* k, const float* v, int64_t key_stride, const int64_t* rows,
                int64_t rows_stride, const bool* mask, int64_t mask_stride, int64_t B, int64_t T, int64_t H,
                int64_t KH, int64_t S, int64_t D, float scale, float* out) {
  const int64_t group = H / KH;
  if (T * group < kManyQueries) {  // a decode step: one pass over the keys a token
    // A (sequence, KV head, token) is microseconds of work: threads share them only when there are several each.
    at::parallel_for(0, B * KH * T, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (KH * T), h = i / T % KH, t = i % T, head = b * KH + h, first = (b * T + t) * H + h * group;
        attend_group(q + first * D, k + head * key_stride, v + head * key_stride,
                     rows == nullptr ? nullptr : rows + head * rows_stride, mask + b * mask_stride + t * S, group, S, D,
                     scale, out + first * D);
      }
    });
    return;
  }
  // Tiles of alike size, at most kTileQueries queries each: a sequence's T tokens split into `tiles` parts.
  const int64_t tiles = (T * group + kTileQueries - 1) / kTileQueries, tile_tokens = (T + tiles - 1) / tiles;
  at::parallel_for(0, B * KH * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (KH * tiles), h = i / tiles % KH, t0 = i % tiles * tile_tokens, head = b * KH + h;
      const int64_t tokens = std::min(tile_tokens, T - t0);
      if (tokens <= 0) continue;
      const int64_t first = (b * T + t0) * H + h * group;
      attend_tile(q + first * D, H * D, k + head * key_stride, v + head * key_stride,
                  rows == nullptr ? nullptr : rows + head * rows_stride, mask + b * mask_stride, t0, tokens, group, S,
                  D, scale, out + first * D);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q (B * T, H, D), k and v (B, KH, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && mask.is_contiguous(),
              "decode_attention: contiguous tensors only");
  const int64_t B = k.size(0), H = q.size(1), D = q.size(2), KH = k.size(1), S = k.size(2);
  TORCH_CHECK(B > 0 && q.size(0) % B == 0 && k.size(3) == D && H % KH == 0 && D % kLanes == 0,
              "decode_attention: shapes do not match, or the head size is not a multiple of 16");
  const int64_t T = q.size(0) / B;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && (mask.size(0) == T || mask.size(0) == B * T) &&
                  mask.size(1) == S,
              "decode_attention: mask must be bool (B * T or T, S)");
  at::Tensor out = at::empty({B * T, H, D}, q.options());
  attend_all(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), S * D, nullptr, 0, mask.data_ptr<bool>(),
             mask.size(0) == T ? 0 : T * S, B, T, H, KH, S, D, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                           const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 2 && v.sizes() == k.sizes() && rows.dim() == 3,
              "paged_attention: q (B * T, H, D), k and v (R, D), rows (B, KH, S)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  rows.scalar_type() == at::kLong,
              "paged_attention: fp32 q, k, v and int64 rows only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && rows.is_contiguous() &&
                  mask.is_contiguous(),
              "paged_attention: contiguous tensors only");
  const int64_t B = rows.size(0), H = q.size(1), D = q.size(2), KH = rows.size(1), S = rows.size(2);
  TORCH_CHECK(B > 0 && q.size(0) % B == 0 && k.size(1) == D && H % KH == 0 && D % kLanes == 0,
              "paged_attention: shapes do not match, or the head size is not a multiple of 16");
  const int64_t T = q.size(0) / B;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B * T && mask.size(1) == S,
              "paged_attention: mask must be bool (B * T, S)");
  at::Tensor out = at::empty({B * T, H, D}, q.options());
  attend_all(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), 0, rows.data_ptr<int64_t>(), S,
             mask.data_ptr<bool>(), T * S, B, T, H, KH, S, D, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(plainlm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(plainlm, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_attention", &paged_attention);
}
