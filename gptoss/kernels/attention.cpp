#include "common.h"

// ---- attention for a few queries (decode) ---------------------------------------------------------
//
// Per (row, KV head): each query position of the row, for each of the G query heads reading that KV
// head, scores the visible keys only (causal, inside the window, slot filled), softmax with the sink as
// one more logit, and the weighted sum of values, all in fp32. Skipping invisible keys matters: a
// sliding layer's ring holds window - 1 + chunk slots of which a decode query sees `window`.

namespace {

inline void bf16_to_float(const at::BFloat16* x, float* out, int64_t n) {
  int64_t i = 0;
#ifdef GPTOSS_AVX512_BF16
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16)));
#endif
  for (; i < n; ++i) out[i] = float(x[i]);
}

inline void prefetch_row(const at::BFloat16* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) __builtin_prefetch(x + i, 0, 3);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef GPTOSS_AVX512_BF16
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef GPTOSS_AVX512_BF16
  const __m512 wv = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

// q [B, Hkv, G, T, D] bf16; k, v [B, S, Hkv, D] bf16 (any strides over B and S); q_pos [B, T], k_pos [B, S]
// int64 (negative: padding / empty); window <= 0: none; sinks [Hkv * G] or None -> [B, Hkv, G, T, D] bf16.
torch::Tensor attend_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor q_pos, torch::Tensor k_pos,
                            int64_t window, c10::optional<torch::Tensor> sinks) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 4 && v.sizes() == k.sizes() && q.scalar_type() == torch::kBFloat16 &&
              k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16 && q.is_cpu() && k.is_cpu(),
              "attend_decode: q [B, Hkv, G, T, D], k and v [B, S, Hkv, D], bf16 on the CPU");
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), T = q.size(3), D = q.size(4), S = k.size(1);
  TORCH_CHECK(D <= 512, "attend_decode: head_dim up to 512");
  TORCH_CHECK(k.size(0) == B && k.size(2) == Hkv && k.size(3) == D && k.stride(3) == 1 && v.stride(3) == 1,
              "attend_decode: k, v must be [B, S, Hkv, D] with contiguous D");
  q = q.contiguous();
  const torch::Tensor qp = q_pos.to(torch::kInt64).contiguous(), kp = k_pos.to(torch::kInt64).contiguous();
  const torch::Tensor sk = sinks.has_value() ? sinks->to(torch::kFloat32).contiguous() : torch::Tensor();
  auto out = torch::empty_like(q);
  const float scale = 1.0f / std::sqrt(float(D));
  const at::BFloat16* qd = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kd = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vd = v.data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  const int64_t* qpp = qp.data_ptr<int64_t>();
  const int64_t* kpp = kp.data_ptr<int64_t>();
  const float* sink = sk.defined() ? sk.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> visible;
    std::vector<float> scores, acc(G * D), top(G), denominator(G), qf(G * D), vf(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t pos = qpp[b * T + t];
        visible.clear();
        for (int64_t j = 0; j < S; ++j) {
          const int64_t kpos = kpp[b * S + j];
          if (pos >= 0 && kpos >= 0 && kpos <= pos && (window <= 0 || pos - kpos < window)) visible.push_back(j);
        }
        const int64_t n = int64_t(visible.size());
        // Scores [n, G]: each key is read once for the G query heads.
        scores.resize(n * G);
        for (int64_t g = 0; g < G; ++g) {
          const at::BFloat16* qg = qd + (((b * Hkv + h) * G + g) * T + t) * D;
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = float(qg[d]) * scale;
          top[g] = sink ? sink[h * G + g] : -INFINITY;
        }
        auto key = [&](int64_t i) { return kd + b * k.stride(0) + visible[i] * k.stride(1) + h * k.stride(2); };
        auto value = [&](int64_t i) { return vd + b * v.stride(0) + visible[i] * v.stride(1) + h * v.stride(2); };
        constexpr int64_t AHEAD = 16;  // keys and values sit a whole slot apart (Hkv heads): prefetch ahead
        for (int64_t i = 0; i < n; ++i) {
          float kf[512];
          if (i + AHEAD < n) prefetch_row(key(i + AHEAD), D);
          bf16_to_float(key(i), kf, D);
          for (int64_t g = 0; g < G; ++g) {
            const float score = dot(qf.data() + g * D, kf, D);
            scores[i * G + g] = score;
            top[g] = std::max(top[g], score);
          }
        }
        // Weighted sum of values, each value read once for the G heads.
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t g = 0; g < G; ++g) denominator[g] = sink ? std::exp(sink[h * G + g] - top[g]) : 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          if (i + AHEAD < n) prefetch_row(value(i + AHEAD), D);
          bf16_to_float(value(i), vf.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const float w = std::exp(scores[i * G + g] - top[g]);
            denominator[g] += w;
            axpy(w, vf.data(), acc.data() + g * D, D);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          // A query that sees nothing (padding, no sink) gets zeros rather than 0 / 0.
          const float inv = denominator[g] > 0.0f ? 1.0f / denominator[g] : 0.0f;
          at::BFloat16* o = od + (((b * Hkv + h) * G + g) * T + t) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = at::BFloat16(acc[g * D + d] * inv);
        }
      }
    }
  });
  return out;
}
