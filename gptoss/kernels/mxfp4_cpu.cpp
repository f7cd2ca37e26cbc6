// Fused MXFP4 expert matmul for the CPU: decode the 4-bit weights in registers and multiply at once,
// never writing a dequantized weight to memory.
//
//   y[s, r] = sum_k x[s, k] * W[e(s), r, k] + bias[e(s), r]
//
// x [S, K] holds the activations of S (token, expert) slots, sorted by expert: rows
// offsets[e] .. offsets[e+1] belong to expert e. W is MXFP4: blocks [E, R, K/32, 16] uint8 and
// scales [E, R, K/32] uint8 (see gptoss/weights/mxfp4.py for the format). Each weight row is decoded
// once per group of up to TOKENS slots, so decode (one slot per expert) is a GEMV that streams the
// weights once and prefill amortises the decoding over the tokens routed to each expert.
//
// Two inner loops: AVX-512 BF16 (vpermw turns nibbles into bf16 weights already scaled by the block's
// power of two, vdpbf16ps multiplies them with bf16 activations, fp32 accumulation), and a portable
// fp32 loop for fp32 activations and for CPUs without AVX-512 BF16.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GPTOSS_AVX512_BF16 1
#endif

namespace {

constexpr int BLOCK = 32;       // values per MXFP4 block
constexpr int TOKENS = 4;       // slots sharing one decoded weight block (register blocking)
constexpr int ROWS_PER_TASK = 16;

const float FP4_VALUES[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

struct Problem {
  int64_t K, R, groups;           // input size, output rows, blocks per row
  const uint8_t* blocks;          // [E, R, groups, 16]
  const uint8_t* scales;          // [E, R, groups]
  const int64_t* offsets;         // [E + 1]
};

// ---- portable fp32 path ------------------------------------------------------------------------

// Decodes one weight row into fp32 (exact: FP4 values times powers of two).
inline void decode_row_f32(const uint8_t* blocks, const uint8_t* scales, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = std::ldexp(1.0f, int(scales[g]) - 127);
    const uint8_t* b = blocks + g * 16;
    float* o = out + g * BLOCK;
    for (int j = 0; j < 16; ++j) {
      o[2 * j] = FP4_VALUES[b[j] & 0xF] * scale;
      o[2 * j + 1] = FP4_VALUES[b[j] >> 4] * scale;
    }
  }
}

void rows_f32(const Problem& p, int64_t e, int64_t r0, int64_t r1, const float* x, float* y) {
  const int64_t s0 = p.offsets[e], s1 = p.offsets[e + 1];
  std::vector<float> w(p.K);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = e * p.R + r;
    decode_row_f32(p.blocks + row * p.groups * 16, p.scales + row * p.groups, p.groups, w.data());
    for (int64_t s = s0; s < s1; ++s) {
      const float* xs = x + s * p.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += xs[k] * w[k];
      y[s * p.R + r] = acc;
    }
  }
}

// ---- AVX-512 BF16 path -------------------------------------------------------------------------

#ifdef GPTOSS_AVX512_BF16
// The 16 FP4 values as bf16 bit patterns, in the low 16 lanes of a 32-lane word table for vpermw.
inline __m512i fp4_bf16_table() {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    float v = FP4_VALUES[i & 15];
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    table[i] = uint16_t(bits >> 16);  // exact: FP4 values need 2 mantissa bits
  }
  return _mm512_load_si512(table);
}

// 16 packed bytes -> 32 bf16 weights in element order (2j: low nibble, 2j+1: high nibble), times 2^(scale-127).
inline __m512bh decode_block_bf16(const uint8_t* b, uint8_t scale, __m512i table) {
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0xF));
  __m512i hi = _mm512_slli_epi32(_mm512_srli_epi32(bytes, 4), 16);
  __m512i w = _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), table);
  // Scaling by a power of two adds to the bf16 exponent field (bits 7..14); zeros stay zero.
  __m512i exp = _mm512_set1_epi16(int16_t((int(scale) - 127) << 7));
  __mmask32 nonzero = _mm512_test_epi16_mask(w, _mm512_set1_epi16(0x7FFF));
  w = _mm512_mask_add_epi16(w, nonzero, w, exp);
  return (__m512bh)w;
}

// Tiles of ROWS weight rows x NT slots: ROWS * NT independent accumulators hide the latency of
// vdpbf16ps, and each decoded block serves NT slots. NT is a template parameter so that the
// accumulators stay in registers.
constexpr int ROWS = 4;

template <int NT>
void tile_bf16(const Problem& p, int64_t e, int64_t r, int nr, int64_t t0, const at::BFloat16* x, float* y,
               __m512i table) {
  const uint8_t* blocks[ROWS];
  const uint8_t* scales[ROWS];
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = e * p.R + r + std::min(i, nr - 1);  // short tiles repeat their last row
    blocks[i] = p.blocks + row * p.groups * 16;
    scales[i] = p.scales + row * p.groups;
  }
  const at::BFloat16* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = x + (t0 + t) * p.K;
  __m512 acc[ROWS][NT];
  for (int i = 0; i < ROWS; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512bh w[ROWS];
    for (int i = 0; i < ROWS; ++i) w[i] = decode_block_bf16(blocks[i] + g * 16, scales[i][g], table);
    for (int t = 0; t < NT; ++t) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(xs[t] + g * BLOCK);
      for (int i = 0; i < ROWS; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], w[i], v);
    }
  }
  for (int i = 0; i < nr; ++i)
    for (int t = 0; t < NT; ++t) y[(t0 + t) * p.R + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

void rows_bf16(const Problem& p, int64_t e, int64_t r0, int64_t r1, const at::BFloat16* x, float* y) {
  const __m512i table = fp4_bf16_table();
  const int64_t s0 = p.offsets[e], s1 = p.offsets[e + 1];
  for (int64_t t0 = s0; t0 < s1; t0 += TOKENS) {
    const int nt = int(std::min<int64_t>(TOKENS, s1 - t0));
    for (int64_t r = r0; r < r1; r += ROWS) {
      const int nr = int(std::min<int64_t>(ROWS, r1 - r));
      switch (nt) {
        case 1: tile_bf16<1>(p, e, r, nr, t0, x, y, table); break;
        case 2: tile_bf16<2>(p, e, r, nr, t0, x, y, table); break;
        case 3: tile_bf16<3>(p, e, r, nr, t0, x, y, table); break;
        default: tile_bf16<4>(p, e, r, nr, t0, x, y, table); break;
      }
    }
  }
}
#endif

}  // namespace

// x [S, K] (bf16 or fp32, slots sorted by expert), offsets [E + 1] -> y [S, R] fp32 (bias added).
torch::Tensor moe_matmul(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                         torch::Tensor offsets) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && scales.dtype() == torch::kUInt8, "MXFP4 blocks/scales must be uint8");
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(3) == 16, "blocks must be [E, R, K/32, 16]");
  TORCH_CHECK(x.is_cpu() && blocks.is_cpu() && scales.is_cpu() && bias.is_cpu(), "CPU tensors only");
  TORCH_CHECK(scales.sizes() == blocks.sizes().slice(0, 3), "scales must be [E, R, K/32]");
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == blocks.size(0) && bias.size(1) == blocks.size(1), "bias must be [E, R]");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == blocks.size(0) + 1, "offsets must be int64 [E + 1]");
  x = x.contiguous();
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const int64_t E = blocks.size(0), R = blocks.size(1), groups = blocks.size(2), K = groups * BLOCK;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [S, ", K, "]");
  const int64_t S = x.size(0);
  TORCH_CHECK(offsets[E].item<int64_t>() == S, "offsets must end at the number of rows of x");
  auto y = torch::empty({S, R}, x.options().dtype(torch::kFloat32));
  Problem p{K, R, groups, blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>()};

  // Tasks: (expert, tile of ROWS_PER_TASK rows) for every expert with slots.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t e = 0; e < E; ++e)
    if (p.offsets[e + 1] > p.offsets[e])
      for (int64_t r = 0; r < R; r += ROWS_PER_TASK) tasks.emplace_back(e, r);

  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == torch::kFloat32, "x must be bf16 or fp32");
#ifndef GPTOSS_AVX512_BF16
  torch::Tensor x32 = bf16 ? x.to(torch::kFloat32) : x;
#endif
  float* out = y.data_ptr<float>();
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [e, r0] = tasks[i];
      const int64_t r1 = std::min(R, r0 + ROWS_PER_TASK);
#ifdef GPTOSS_AVX512_BF16
      if (bf16) {
        rows_bf16(p, e, r0, r1, x.data_ptr<at::BFloat16>(), out);
        continue;
      }
      rows_f32(p, e, r0, r1, x.data_ptr<float>(), out);
#else
      rows_f32(p, e, r0, r1, x32.data_ptr<float>(), out);
#endif
    }
  });
  // Bias per slot: expand each expert's bias over its slots.
  auto counts = offsets.slice(0, 1) - offsets.slice(0, 0, E);
  y.add_(bias.to(torch::kFloat32).repeat_interleave(counts, 0, S));
  return y;
}

// blocks [R, K/32, 16], scales [R, K/32] -> bf16 [R, K]: one expert's weight, for prefill, where many
// tokens share each expert and a bf16 GEMM (AMX/AVX-512 in oneDNN) beats decoding per token group.
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && scales.dtype() == torch::kUInt8 && blocks.dim() == 3 &&
              blocks.size(2) == 16 && scales.sizes() == blocks.sizes().slice(0, 2) && blocks.is_cpu(),
              "blocks must be uint8 [R, K/32, 16] and scales uint8 [R, K/32], on the CPU");
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  const int64_t R = blocks.size(0), groups = blocks.size(1);
  auto out = torch::empty({R, groups * BLOCK}, torch::TensorOptions().dtype(torch::kBFloat16));
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
#ifdef GPTOSS_AVX512_BF16
    const __m512i table = fp4_bf16_table();
    for (int64_t i = begin * groups; i < end * groups; ++i)
      _mm512_storeu_si512(o + i * BLOCK, (__m512i)decode_block_bf16(b + i * 16, s[i], table));
#else
    std::vector<float> row(groups * BLOCK);
    for (int64_t r = begin; r < end; ++r) {
      decode_row_f32(b + r * groups * 16, s + r * groups, groups, row.data());
      for (int64_t k = 0; k < groups * BLOCK; ++k) o[r * groups * BLOCK + k] = at::BFloat16(row[k]);
    }
#endif
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_bf16", &dequantize_bf16, "one expert's MXFP4 weight as bf16 [R, K]");
  m.def("moe_matmul", &moe_matmul, "MXFP4 grouped matmul over experts (slots sorted by expert)");
}
