// Dense GEMVs for the CPU: `linear_bf16`, a bf16 GEMV for a few rows of activations against [out, in]
// weights (attention projections and unembedding at decode, a small server batch), streaming each weight
// row once with vdpbf16ps, and from 5 rows in AMX tiles where the CPU has them; `linear_int8`, the same
// for the optional int8 format of those layers; and `dequantize_int8` for prefill.

#include "common.h"

// ---- bf16 GEMV ------------------------------------------------------------------------------------

namespace {

constexpr int ROWS = 4;         // weight rows per register tile
constexpr int PREFETCH_ROWS = 8;  // the bf16 GEMV reads ROWS rows side by side: it prefetches two tiles ahead

#ifdef GPTOSS_AVX512_BF16
// ROWS weight rows x NT activation rows; 32 values of K per vdpbf16ps, the last step masked.
template <int NT>
void gemv_tile(const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t N, int64_t r, int nr,
               const at::BFloat16* bias, at::BFloat16* y) {
  __m512 acc[ROWS][NT];
  for (int i = 0; i < ROWS; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  const at::BFloat16* rows[ROWS];
  for (int i = 0; i < ROWS; ++i) rows[i] = w + (r + std::min(i, nr - 1)) * K;  // short tiles repeat their last row
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * K + k);
    for (int i = 0; i < ROWS; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[i] + PREFETCH_ROWS * K + k), _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[i] + k);
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv, xv[t]);
    }
  }
  for (int i = 0; i < nr; ++i)
    for (int t = 0; t < NT; ++t)
      y[t * N + r + i] = at::BFloat16(_mm512_reduce_add_ps(acc[i][t]) + (bias ? float(bias[r + i]) : 0.0f));
}
#endif

#ifdef GPTOSS_AMX
// Where the CPU has AMX, the GEMV of 5 to 16 rows is y^T = W x^T in tiles: A = 16 weight rows x 32
// values of K, loaded straight from the weights (a row stride of K), B = the same 32 values of the M
// activation rows in the pair-interleaved layout TDPBF16PS wants (packed once), C = 16 weight rows x M in
// fp32, over all of K.
// One instruction does 16 x M x 32 products where vdpbf16ps does M x 32 for one row: past 4 rows the
// vdpbf16ps loop is bound by its instructions, the tiles still by memory. Each row of C is summed in the
// same order whatever M is (but not in vdpbf16ps's order). Needs K % 32 == 0; a last tile of fewer than
// 16 weight rows goes through a zero-padded copy.
void gemv_amx(const at::BFloat16* x, const at::BFloat16* w, int64_t M, int64_t K, int64_t N,
              const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t groups = K / 32, tiles = (N + 15) / 16;
  std::vector<at::BFloat16> packed(groups * 16 * M * 2);  // [K/32][16 pairs][M][2]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) packed[((k / 32 * 16 + (k % 32) / 2) * M + m) * 2 + k % 2] = x[m * K + k];
  std::vector<at::BFloat16> tail;  // the last tile's rows, zero-padded to 16
  if (N % 16) {
    tail.assign(16 * K, at::BFloat16(0.0f));
    std::memcpy(tail.data(), w + (N - N % 16) * K, N % 16 * K * sizeof(at::BFloat16));
  }
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    TileConfig config;  // tmm0 = C [16 x M fp32], tmm1 = A [16 x 32 bf16], tmm2 = B [16 pairs x M x 2 bf16]
    config.rows[0] = config.rows[1] = config.rows[2] = 16;
    config.colsb[0] = config.colsb[2] = uint16_t(M * 4);
    config.colsb[1] = 64;
    _tile_loadconfig(&config);
    alignas(64) float c[16 * 16];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * 16;
      const bool short_tile = r0 + 16 > N;
      const at::BFloat16* a = short_tile ? tail.data() : w + r0 * K;
      _tile_zero(0);
      for (int64_t g = 0; g < groups; ++g) {
        for (int i = 0; i < 16; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(a + i * K + g * 32) + PREFETCH_BYTES, _MM_HINT_T0);
        _tile_loadd(1, a + g * 32, K * 2);
        _tile_loadd(2, packed.data() + g * 32 * M, M * 4);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, c, M * 4);
      for (int64_t i = 0; i < std::min<int64_t>(16, N - r0); ++i)
        for (int64_t m = 0; m < M; ++m)
          y[m * N + r0 + i] = at::BFloat16(c[i * M + m] + (bias ? float(bias[r0 + i]) : 0.0f));
    }
    _tile_release();
  });
}
#endif

}  // namespace

// x [M, K] bf16 (M <= 4, or up to 16 where AMX runs), weight [N, K] bf16, bias [N] bf16 or None -> [M, N]
// bf16, like F.linear: fp32 accumulation, the bias added in fp32, one rounding. torch's GEMV streams bf16 weights at well
// under the memory bandwidth on some CPUs; this reads each weight row once, for all M rows of x.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_cpu() && weight.is_cpu() && x.scalar_type() == torch::kBFloat16 &&
              weight.scalar_type() == torch::kBFloat16, "linear_bf16: bf16 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.size(0) <= 16,
              "linear_bf16: x [M <= 16, K] and weight [N, K]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  torch::Tensor b = bias.has_value() ? bias->to(torch::kBFloat16).contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == N, "linear_bf16: bias must be [N]");
  TORCH_CHECK(M <= 4 || (K % 32 == 0 && amx_available()), "linear_bf16: more than 4 rows need AMX and K a multiple of 32");
  auto y = torch::empty({M, N}, x.options());
#ifdef GPTOSS_AVX512_BF16
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  const at::BFloat16* bp = b.defined() ? b.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
#ifdef GPTOSS_AMX
  if (M > 4) {
    gemv_amx(xp, wp, M, K, N, bp, yp);
    return y;
  }
#endif
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r = tile * ROWS;
      const int nr = int(std::min<int64_t>(ROWS, N - r));
      switch (M) {
        case 1: gemv_tile<1>(xp, wp, K, N, r, nr, bp, yp); break;
        case 2: gemv_tile<2>(xp, wp, K, N, r, nr, bp, yp); break;
        case 3: gemv_tile<3>(xp, wp, K, N, r, nr, bp, yp); break;
        default: gemv_tile<4>(xp, wp, K, N, r, nr, bp, yp); break;
      }
    }
  });
#else
  y.copy_(at::linear(x.to(torch::kFloat32), weight.to(torch::kFloat32),
                     b.defined() ? c10::optional<torch::Tensor>(b.to(torch::kFloat32)) : c10::nullopt));
#endif
  return y;
}

// ---- int8 GEMV -----------------------------------------------------------------------------------
//
// The optional int8 format of the dense layers (gptoss/quant/int8.py): weight [N, K] int8 with one fp32
// scale per block of 32 values of a row. Same route as the MXFP4 kernel: activations quantized to int8
// (one scale per 8 values), vpdpbusd on 64 weights per step. vpdpbusd wants unsigned bytes on one side:
// flipping the sign bit turns an int8 weight w into the byte w + 128, and the activation side starts each
// accumulator lane at -128 times its 4 values' sum.

namespace {

#ifdef GPTOSS_AVX512_VNNI
struct QuantizedActivations {  // natural order; per 64-value step: 64 int8, 16 lane starts, 16 lane scales
  std::vector<int8_t> q;
  std::vector<int32_t> start;
  std::vector<float> scale;
};

void quantize_natural(const float* x, int64_t K, QuantizedActivations& a) {
  const int64_t steps = (K + 63) / 64;
  a.q.assign(steps * 64, 0);
  a.start.assign(steps * 16, 0);
  a.scale.assign(steps * 16, 0.0f);
  for (int64_t group = 0; group < K / 8; ++group) {
    int32_t qi[8];
    const float amax = quantize_group8(x + group * 8, qi);
    for (int j = 0; j < 8; ++j) a.q[group * 8 + j] = int8_t(qi[j]);
    for (int half = 0; half < 2; ++half) {  // two int32 lanes of 4 values each
      const int64_t lane = group * 2 + half;
      a.start[lane] = -128 * (qi[4 * half] + qi[4 * half + 1] + qi[4 * half + 2] + qi[4 * half + 3]);
      a.scale[lane] = amax / 127.0f;
    }
  }
}

template <int NT>
void row_q8(const int8_t* w, const float* wscale, int64_t K, const QuantizedActivations* const* xa, float* acc_out) {
  const __m512i sign = _mm512_set1_epi8(int8_t(0x80));
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  auto step = [&](int64_t st, __m512i wv, __m128 s2) {
    const __m512i u = _mm512_xor_si512(wv, sign);
    const __m512 ws = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(s2));  // lanes 0-7: block 0, 8-15: block 1
    for (int t = 0; t < NT; ++t) {
      __m512i dot = _mm512_loadu_si512(xa[t]->start.data() + st * 16);
      dot = _mm512_dpbusd_epi32(dot, u, _mm512_loadu_si512(xa[t]->q.data() + st * 64));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_loadu_ps(xa[t]->scale.data() + st * 16)), acc[t]);
    }
  };
  const int64_t full = K / 64;
  for (int64_t st = 0; st < full; ++st) {
    _mm_prefetch(reinterpret_cast<const char*>(w + st * 64 + PREFETCH_BYTES), _MM_HINT_T0);
    step(st, _mm512_loadu_si512(w + st * 64), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(wscale + st * 2))));
  }
  if (K % 64)  // a last half step: one block of 32 (K is a multiple of 32)
    step(full, _mm512_maskz_loadu_epi8((__mmask64(1) << 32) - 1, w + full * 64), _mm_load_ss(wscale + full * 2));
  for (int t = 0; t < NT; ++t) acc_out[t] = _mm512_reduce_add_ps(acc[t]);
}
#endif

}  // namespace

// x [M, K] bf16 (M <= 4), weight [N, K] int8, scales [N, K/32] fp32, bias [N] or None -> [M, N] bf16.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.size(0) <= 4,
              "linear_int8: x must be bf16 [M <= 4, K] on the CPU");
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.size(1) == x.size(1) &&
              weight.size(1) % 32 == 0, "linear_int8: weight must be int8 [N, K], K a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 2 && scales.size(0) == weight.size(0) &&
              scales.size(1) * 32 == weight.size(1), "linear_int8: scales must be fp32 [N, K/32]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  weight = weight.contiguous();
  scales = scales.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == N, "linear_int8: bias must be [N]");
  const torch::Tensor x32 = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, x.options());
#ifdef GPTOSS_AVX512_VNNI
  std::vector<QuantizedActivations> xa(M);
  const QuantizedActivations* xp[4];
  for (int64_t m = 0; m < M; ++m) quantize_natural(x32.data_ptr<float>() + m * K, K, xa[m]), xp[m] = &xa[m];
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    float out[4];
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* row = wp + r * K;
      const float* rs = sp + r * (K / 32);
      switch (M) {
        case 1: row_q8<1>(row, rs, K, xp, out); break;
        case 2: row_q8<2>(row, rs, K, xp, out); break;
        case 3: row_q8<3>(row, rs, K, xp, out); break;
        default: row_q8<4>(row, rs, K, xp, out); break;
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + r] = at::BFloat16(out[m] + (bp ? bp[r] : 0.0f));
    }
  });
#else
  const torch::Tensor w = weight.to(torch::kFloat32).view({N, K / 32, 32}).mul(scales.unsqueeze(-1)).view({N, K});
  y.copy_(at::linear(x32, w, b));
#endif
  return y;
}

// int8-block weight [N, K] + scales [N, K/32] -> bf16 [N, K], for prefill chunks (then a torch GEMM).
torch::Tensor dequantize_int8(torch::Tensor values, torch::Tensor scales) {
  TORCH_CHECK(values.scalar_type() == torch::kInt8 && values.dim() == 2 && values.size(1) % 32 == 0 &&
              scales.scalar_type() == torch::kFloat32 && scales.dim() == 2 && scales.size(0) == values.size(0) &&
              scales.size(1) * 32 == values.size(1) && values.is_cpu(),
              "dequantize_int8: values int8 [N, K] and scales fp32 [N, K/32], on the CPU");
  values = values.contiguous();
  scales = scales.contiguous();
  const int64_t blocks = scales.numel();
  auto out = torch::empty(values.sizes(), torch::TensorOptions().dtype(torch::kBFloat16));
  const int8_t* v = values.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
#ifdef GPTOSS_AVX512_BF16
      const __m512 s = _mm512_set1_ps(sc[b]);
      for (int half = 0; half < 2; ++half) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + b * 32 + half * 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + b * 32 + half * 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q), s)));
      }
#else
      for (int j = 0; j < 32; ++j) o[b * 32 + j] = at::BFloat16(float(v[b * 32 + j]) * sc[b]);
#endif
    }
  });
  return out;
}
