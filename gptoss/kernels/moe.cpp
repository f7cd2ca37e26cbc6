// Fused MXFP4 expert matmul for the CPU: decode the 4-bit weights in registers and multiply at once,
// never writing a dequantized weight to memory.
//
//   y[s, r] = sum_k x[s, k] * W[e(s), r, k] + bias[e(s), r]
//
// x [S, K] holds the activations of S (token, expert) slots, sorted by expert: rows
// offsets[e] .. offsets[e+1] belong to expert e. W is MXFP4: blocks [E, R, K/32, 16] uint8 and
// scales [E, R, K/32] uint8 (see gptoss/quant/mxfp4.py for the format). Each weight row is decoded
// once per group of up to TOKENS slots, so decode (one slot per expert) is a GEMV that streams the
// weights once and prefill amortises the decoding over the tokens routed to each expert.
//
// Two inner loops: AVX-512 VNNI for bf16 activations (llama.cpp's route: activations quantized to
// int8 per block of 32, weights decoded to int8 by a byte shuffle, vpdpbusd), and a portable fp32
// loop, exact, for fp32 activations and for CPUs without AVX-512 VNNI.
//
// Also here: an AMX path for experts with many slots (prefill), and `dequantize_bf16` for the prefill
// branch that hands many tokens to a bf16 GEMM.

#include "common.h"

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
  const int64_t* offsets;         // [E + 1]: slots offsets[e] .. offsets[e+1] - 1 belong to expert e
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

// ---- AVX-512 VNNI path -------------------------------------------------------------------------
//
// llama.cpp's route: activations are quantized to int8 (one fp32 scale per 8 values; llama.cpp's Q8_0
// has one per 32),
// weights are decoded from nibbles to int8 by a 16-entry byte shuffle, and vpdpbusd multiplies 64
// byte pairs per instruction. 64 bytes of packed weights (4 blocks, 128 values) per step:
//   lo = nibbles of even elements, hi = odd ones; each 128-bit lane holds one block.
// vpdpbusd needs one unsigned operand, so the table holds 2 * FP4 + 12 (0..24): the "+12" adds
// 12 * sum(q) per lane, which the activation side precomputes and starts the accumulator from.
// Each int32 lane then sums the 8 products of 8 consecutive values of one block: converted to fp32 and
// multiplied by the weight scale (an E8M0 byte shifted into a float's exponent) times the activations'
// scale / 2.

#ifdef GPTOSS_AVX512_VNNI
// (quantize_group8, which the int8 GEMV shares, is in common.h.)

// One slot's activations, quantized and laid out for the weight steps: per step q_even and q_odd
// (64 int8 each: 16 per block), the accumulator start (16 int32) and the per-lane scale (16 fp32).
struct QuantizedRow {
  std::vector<int8_t> even, odd;
  std::vector<int32_t> start;
  std::vector<float> scale;
};

void quantize_activations(const float* x, int64_t groups, QuantizedRow& q) {
  const int64_t steps = (groups + 3) / 4;
  q.even.assign(steps * 64, 0);
  q.odd.assign(steps * 64, 0);
  q.start.assign(steps * 16, 0);
  q.scale.assign(steps * 16, 0.0f);
  // int32 lane l of a step sums the products of 8 consecutive values (4 even, 4 odd) of one block:
  // each such group of 8 gets its own scale, as fine as the lane layout allows at no cost.
  for (int64_t group = 0; group < groups * 4; ++group) {
    int32_t qi[8];
    const float amax = quantize_group8(x + group * 8, qi);
    const int64_t step = group / 16, lane = group % 16, at = step * 64 + (lane / 4) * 16 + (lane % 4) * 4;
    int32_t sum = 0;
    for (int j = 0; j < 4; ++j) {
      q.even[at + j] = int8_t(qi[2 * j]);
      q.odd[at + j] = int8_t(qi[2 * j + 1]);
      sum += qi[2 * j] + qi[2 * j + 1];
    }
    q.start[step * 16 + lane] = -12 * sum;
    q.scale[step * 16 + lane] = 0.5f * amax / 127.0f;
  }
}

// One weight row against NT slots; NT is a template parameter so that the accumulators stay in
// registers. The row is decoded once and serves all NT slots.
template <int NT>
void row_vnni(const Problem& p, int64_t row, const QuantizedRow* const* xq, float* const* y, int64_t r) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // Byte i of the 4 scale bytes into bits 16..23 of every int32 of lane i; << 7 then puts it at 23..30.
  const __m512i spread = _mm512_set_epi8(
      -1, 3, -1, -1, -1, 3, -1, -1, -1, 3, -1, -1, -1, 3, -1, -1, -1, 2, -1, -1, -1, 2, -1, -1, -1, 2, -1, -1,
      -1, 2, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 0, -1, -1, -1, 0, -1, -1,
      -1, 0, -1, -1, -1, 0, -1, -1);
  const uint8_t* blocks = p.blocks + row * p.groups * 16;
  const uint8_t* scales = p.scales + row * p.groups;
  const int8_t* even[NT];
  const int8_t* odd[NT];
  const int32_t* start[NT];
  const float* xscale[NT];
  for (int t = 0; t < NT; ++t)
    even[t] = xq[t]->even.data(), odd[t] = xq[t]->odd.data(), start[t] = xq[t]->start.data(), xscale[t] = xq[t]->scale.data();
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  auto step = [&](int64_t st, __m512i w, __m128i s4) {
    const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(w, nibble));
    const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble));
    const __m512 wscale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_shuffle_epi8(_mm512_broadcastd_epi32(s4), spread), 7));
    for (int t = 0; t < NT; ++t) {
      __m512i dot = _mm512_loadu_si512(start[t] + st * 16);
      dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(even[t] + st * 64));
      dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(odd[t] + st * 64));
      const __m512 scale = _mm512_mul_ps(wscale, _mm512_loadu_ps(xscale[t] + st * 16));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
    }
  };
  const int64_t full = p.groups / 4, tail = p.groups % 4;
  for (int64_t st = 0; st < full; ++st) {
    _mm_prefetch(reinterpret_cast<const char*>(blocks + st * 64 + PREFETCH_BYTES), _MM_HINT_T0);
    step(st, _mm512_loadu_si512(blocks + st * 64), _mm_loadu_si32(scales + st * 4));
  }
  if (tail)  // the row's last, partial step: missing blocks read as zero weights (and zero activations)
    step(full, _mm512_maskz_loadu_epi8((__mmask64(1) << (16 * tail)) - 1, blocks + full * 64),
         _mm_maskz_loadu_epi8((__mmask16(1) << tail) - 1, scales + full * 4));
  for (int t = 0; t < NT; ++t) y[t][r] = _mm512_reduce_add_ps(acc[t]);
}

void rows_vnni(const Problem& p, int64_t e, int64_t r0, int64_t r1, const std::vector<QuantizedRow>& xq, float* y) {
  const int64_t s0 = p.offsets[e], s1 = p.offsets[e + 1];
  for (int64_t t0 = s0; t0 < s1; t0 += TOKENS) {
    const int nt = int(std::min<int64_t>(TOKENS, s1 - t0));
    const QuantizedRow* q[TOKENS];
    float* out[TOKENS];
    for (int t = 0; t < nt; ++t) q[t] = &xq[t0 + t], out[t] = y + (t0 + t) * p.R;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = e * p.R + r;
      switch (nt) {
        case 1: row_vnni<1>(p, row, q, out, r); break;
        case 2: row_vnni<2>(p, row, q, out, r); break;
        case 3: row_vnni<3>(p, row, q, out, r); break;
        default: row_vnni<4>(p, row, q, out, r); break;
      }
    }
  }
}
#endif

// ---- dequantization to bf16 ---------------------------------------------------------------------

#ifdef GPTOSS_AVX512_BF16
// 16 packed bytes + their scale -> 32 bf16 weights in element order. Exact: FP4 values times powers of
// two are bf16 numbers (vcvtneps2bf16 flushes results below 2^-126, which no real scale reaches). The
// scale goes into the 16-entry table first (fp32, then bf16), so each block is one vpermw lookup.
inline void decode_block_bf16(const uint8_t* b, uint8_t s, at::BFloat16* out) {
  const __m512 scale = _mm512_castsi512_ps(_mm512_set1_epi32(s ? int32_t(s) << 23 : 0x00400000));  // 2^(s-127)
  const __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(FP4_VALUES), scale));
  // dword j = byte j; its low word indexes element 2j (low nibble), its high word element 2j + 1.
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  const __m512i index = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0x000F000F), bytes, _mm512_slli_epi32(bytes, 12), 0xE0);
  const __m512i values = _mm512_permutexvar_epi16(index, _mm512_castsi256_si512((__m256i)table));
  _mm512_storeu_si512(out, values);
}
#endif

}  // namespace

// blocks [R, K/32, 16], scales [R, K/32] -> bf16 [R, K]: one expert's weight, for the prefill branch
// that hands many tokens to torch's bf16 GEMM.
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
    for (int64_t i = begin * groups; i < end * groups; ++i) decode_block_bf16(b + i * 16, s[i], o + i * BLOCK);
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

// ---- AMX path (prefill) --------------------------------------------------------------------------
//
// Where the CPU has AMX, an expert with many slots multiplies bf16 tiles: A = 16 weight rows x one
// block (32 values, decoded straight into a tile buffer, the block's scale folded in), B = 32 values
// x 16 slots of activations (packed once per expert in the pair-interleaved layout the instruction
// wants), C = 16 rows x 16 slots in fp32, accumulated over all blocks. Decoding dominates, and each
// decoded panel of 16 rows serves every slot of the expert.

#ifdef GPTOSS_AMX
namespace {

bool amx_granted() {  // Linux hands the tile state to a process only when asked, once
  static const bool granted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}

}  // namespace

bool amx_available() { return amx_granted(); }

namespace {

constexpr int TILE = 16;        // rows of A and C, slots of B and C
constexpr int SLOT_TILES = 4;   // C tiles (tmm0..3) accumulated at once; tmm4 = A, tmm5 = B

// Slots [S, K] fp32 -> bf16 B tiles: [K/32][ceil(S/16)][16 pairs][16 slots][2], zero-padded slots.
std::vector<at::BFloat16> pack_slots(const float* x, int64_t S, int64_t K) {
  const int64_t groups = K / BLOCK, tiles = (S + TILE - 1) / TILE;
  std::vector<at::BFloat16> packed(groups * tiles * 512, at::BFloat16(0.0f));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k)
      packed[((k / BLOCK * tiles + s / TILE) * 16 + (k % BLOCK) / 2) * 32 + (s % TILE) * 2 + k % 2] = at::BFloat16(x[s * K + k]);
  return packed;
}

template <int NT>
void amx_slot_tiles(const at::BFloat16* panel, const at::BFloat16* packed, int64_t groups, int64_t tiles, int64_t j0,
                    float* c) {
  if (NT > 0) _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  for (int64_t g = 0; g < groups; ++g) {
    _tile_loadd(4, panel + g * TILE * BLOCK, 64);
    const at::BFloat16* b = packed + (g * tiles + j0) * 512;
    if (NT > 0) { _tile_loadd(5, b, 64); _tile_dpbf16ps(0, 4, 5); }
    if (NT > 1) { _tile_loadd(5, b + 512, 64); _tile_dpbf16ps(1, 4, 5); }
    if (NT > 2) { _tile_loadd(5, b + 1024, 64); _tile_dpbf16ps(2, 4, 5); }
    if (NT > 3) { _tile_loadd(5, b + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  if (NT > 0) _tile_stored(0, c, 64);
  if (NT > 1) _tile_stored(1, c + 256, 64);
  if (NT > 2) _tile_stored(2, c + 512, 64);
  if (NT > 3) _tile_stored(3, c + 768, 64);
}

// Rows [16 * rt, 16 * rt + 16) of expert e against its S slots (packed), into y rows s0.. (no bias).
void amx_row_tile(const Problem& p, int64_t e, int64_t rt, const std::vector<at::BFloat16>& packed, int64_t s0,
                  int64_t S, float* y, std::vector<at::BFloat16>& panel) {
  const int64_t tiles = (S + TILE - 1) / TILE, r0 = rt * TILE, nr = std::min<int64_t>(TILE, p.R - r0);
  panel.resize(p.groups * TILE * BLOCK);
  if (nr < TILE) std::fill(panel.begin(), panel.end(), at::BFloat16(0.0f));  // rows past R multiply as zeros
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t row = e * p.R + r0 + i;
    for (int64_t g = 0; g < p.groups; ++g)
      decode_block_bf16(p.blocks + (row * p.groups + g) * 16, p.scales[row * p.groups + g], panel.data() + (g * TILE + i) * BLOCK);
  }
  alignas(64) float c[SLOT_TILES * TILE * TILE];
  for (int64_t j0 = 0; j0 < tiles; j0 += SLOT_TILES) {
    const int nt = int(std::min<int64_t>(SLOT_TILES, tiles - j0));
    switch (nt) {
      case 1: amx_slot_tiles<1>(panel.data(), packed.data(), p.groups, tiles, j0, c); break;
      case 2: amx_slot_tiles<2>(panel.data(), packed.data(), p.groups, tiles, j0, c); break;
      case 3: amx_slot_tiles<3>(panel.data(), packed.data(), p.groups, tiles, j0, c); break;
      default: amx_slot_tiles<4>(panel.data(), packed.data(), p.groups, tiles, j0, c); break;
    }
    for (int j = 0; j < nt; ++j)
      for (int i = 0; i < nr; ++i)
        for (int t = 0; t < TILE && (j0 + j) * TILE + t < S; ++t)
          y[(s0 + (j0 + j) * TILE + t) * p.R + r0 + i] = c[(j * TILE + i) * TILE + t];
  }
}

}  // namespace
#endif

// ---- grouped matmul over experts -----------------------------------------------------------------

#ifndef GPTOSS_AMX
bool amx_available() { return false; }
#endif

namespace {

void check_mxfp4(const torch::Tensor& blocks, const torch::Tensor& scales, const torch::Tensor& bias) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && scales.dtype() == torch::kUInt8, "MXFP4 blocks/scales must be uint8");
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(3) == 16, "blocks must be [E, R, K/32, 16]");
  TORCH_CHECK(blocks.is_cpu() && scales.is_cpu() && bias.is_cpu(), "CPU tensors only");
  TORCH_CHECK(scales.sizes() == blocks.sizes().slice(0, 3), "scales must be [E, R, K/32]");
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == blocks.size(0) && bias.size(1) == blocks.size(1), "bias must be [E, R]");
}

// x32 [S, K] fp32, slots sorted by expert (offsets [E + 1]) -> y [S, R] fp32, bias added.
// fast = false: the exact fp32 path for every expert. fast = true (bf16 models): an expert with at least
// amx_min_slots slots takes the AMX path where the CPU has one, else with at least gemm_min_slots its
// weight is dequantized to bf16 for one torch GEMM; the others take the VNNI path where the CPU has it.
// (Past a few slots, decoding each weight once and multiplying many slots by it beats the VNNI loop,
// whose work grows with the slots.)
torch::Tensor grouped_matmul(const torch::Tensor& x32, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                             const std::vector<int64_t>& offsets, bool fast, int64_t amx_min_slots,
                             int64_t gemm_min_slots) {
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  const int64_t E = blocks.size(0), R = blocks.size(1), groups = blocks.size(2), K = groups * BLOCK, S = x32.size(0);
  TORCH_CHECK(x32.dim() == 2 && x32.size(1) == K, "x must be [S, ", K, "]");
  TORCH_CHECK(int64_t(offsets.size()) == E + 1 && offsets[E] == S, "offsets must be [E + 1] and end at S");
  auto y = torch::empty({S, R}, x32.options());
  float* out = y.data_ptr<float>();
  const float* x = x32.data_ptr<float>();
  Problem p{K, R, groups, blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), offsets.data()};

  // Tasks: (expert, tile of ROWS_PER_TASK rows) for every expert with slots that the GEMM does not take.
  std::vector<std::pair<int64_t, int64_t>> tasks, amx_tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (fast && n >= amx_min_slots && amx_available()) {
      for (int64_t rt = 0; rt < (R + 15) / 16; ++rt) amx_tasks.emplace_back(e, rt);
    } else if (fast && n >= gemm_min_slots) {
      const torch::Tensor w = dequantize_bf16(blocks[e], scales[e]);
      y.slice(0, offsets[e], offsets[e + 1]).copy_(at::linear(x32.slice(0, offsets[e], offsets[e + 1]).to(torch::kBFloat16), w));
    } else if (n > 0) {
      for (int64_t r = 0; r < R; r += ROWS_PER_TASK) tasks.emplace_back(e, r);
    }
  }
#ifdef GPTOSS_AMX
  if (!amx_tasks.empty()) {
    std::vector<std::vector<at::BFloat16>> packed(E);
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        if (offsets[e + 1] - offsets[e] >= amx_min_slots) packed[e] = pack_slots(x + offsets[e] * K, offsets[e + 1] - offsets[e], K);
    });
    at::parallel_for(0, int64_t(amx_tasks.size()), 1, [&](int64_t begin, int64_t end) {
      TileConfig config;
      for (int t = 0; t < 6; ++t) config.rows[t] = TILE, config.colsb[t] = 64;
      _tile_loadconfig(&config);
      std::vector<at::BFloat16> panel;
      for (int64_t i = begin; i < end; ++i) {
        const auto [e, rt] = amx_tasks[i];
        amx_row_tile(p, e, rt, packed[e], offsets[e], offsets[e + 1] - offsets[e], out, panel);
      }
      _tile_release();
    });
  }
#endif
  bool done = false;
#ifdef GPTOSS_AVX512_VNNI
  if (fast) {
    done = true;
    std::vector<QuantizedRow> xq(S);
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) quantize_activations(x + s * K, groups, xq[s]);
    });
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        rows_vnni(p, tasks[i].first, tasks[i].second, std::min(R, tasks[i].second + ROWS_PER_TASK), xq, out);
    });
  }
#endif
  if (!done) {
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        rows_f32(p, tasks[i].first, tasks[i].second, std::min(R, tasks[i].second + ROWS_PER_TASK), x, out);
    });
  }
  // Each slot's expert bias, read in its own dtype (converting all E experts' biases would cost more).
  bias = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bias.scalar_type(), "grouped_matmul_bias", [&] {
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t s = offsets[e]; s < offsets[e + 1]; ++s)
        for (int64_t r = 0; r < R; ++r) out[s * R + r] += float(bp[e * R + r]);
  });
  return y;
}

}  // namespace

// One grouped matmul as the tests and benchmarks see it: x [S, K] bf16 (fast paths) or fp32 (exact path),
// slots sorted by expert, offsets [E + 1] int64 -> y [S, R] fp32 (bias added). The AMX and GEMM
// branches are off unless their slot thresholds are given.
torch::Tensor moe_matmul(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                         torch::Tensor offsets, int64_t amx_min_slots, int64_t gemm_min_slots) {
  check_mxfp4(blocks, scales, bias);
  TORCH_CHECK(x.is_cpu() && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "x must be bf16 or fp32, on the CPU");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == blocks.size(0) + 1, "offsets must be int64 [E + 1]");
  offsets = offsets.contiguous();
  std::vector<int64_t> off(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel());
  return grouped_matmul(x.to(torch::kFloat32).contiguous(), blocks, scales, bias, off,
                        x.scalar_type() == torch::kBFloat16, amx_min_slots, gemm_min_slots);
}

// The whole MoE expert step of GPT-OSS for N tokens routed to k experts each:
//   out[t] = sum_j w[t, j] * down_e(swiglu(gate_up_e(x[t]))),  e = expert_ids[t, j]
// with the clamped SwiGLU on interleaved columns (gate = h[2i], linear = h[2i + 1]). One call instead of
// a dozen small torch ops per layer, which cost as much as the matmuls at decode.
// x [N, H] bf16 or fp32; expert_ids [N, k] int64; expert_weights [N, k] fp32 -> [N, H] in x's dtype.
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor expert_weights,
                          torch::Tensor gate_up_blocks, torch::Tensor gate_up_scales, torch::Tensor gate_up_bias,
                          torch::Tensor down_blocks, torch::Tensor down_scales, torch::Tensor down_bias,
                          double alpha, double limit, int64_t amx_min_slots, int64_t gemm_min_slots) {
  check_mxfp4(gate_up_blocks, gate_up_scales, gate_up_bias);
  check_mxfp4(down_blocks, down_scales, down_bias);
  TORCH_CHECK(x.is_cpu() && x.dim() == 2 && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "x must be [N, H] bf16 or fp32, on the CPU");
  TORCH_CHECK(expert_ids.dtype() == torch::kInt64 && expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0) &&
              expert_weights.sizes() == expert_ids.sizes(), "expert_ids int64 and expert_weights must be [N, k]");
  const int64_t N = x.size(0), k = expert_ids.size(1), E = gate_up_blocks.size(0), S = N * k;
  const int64_t I = gate_up_blocks.size(1) / 2, H = down_blocks.size(1);
  TORCH_CHECK(down_blocks.size(2) * BLOCK == I && gate_up_blocks.size(2) * BLOCK == x.size(1) && x.size(1) == H,
              "gate_up must be [E, 2I, H/32, 16] and down [E, H, I/32, 16] for x [N, H]");
  expert_ids = expert_ids.contiguous();
  const torch::Tensor w32 = expert_weights.to(torch::kFloat32).contiguous();
  const int64_t* ids = expert_ids.data_ptr<int64_t>();

  // Slots (t, j) sorted by expert, stably: a counting sort. sorted[i] = t * k + j; position[t * k + j] = i.
  std::vector<int64_t> offsets(E + 1, 0), sorted(S), position(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, "expert id ", ids[s], " out of range [0, ", E, ")");
    ++offsets[ids[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t s = 0; s < S; ++s) position[s] = next[ids[s]]++, sorted[position[s]] = s;

  const torch::Tensor x32 = x.to(torch::kFloat32).contiguous();
  auto xs = torch::empty({S, H}, x32.options());
  const float* xp = x32.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  for (int64_t i = 0; i < S; ++i) std::memcpy(xsp + i * H, xp + (sorted[i] / k) * H, H * sizeof(float));

  const bool fast = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor h = grouped_matmul(xs, gate_up_blocks, gate_up_scales, gate_up_bias, offsets, fast, amx_min_slots,
                                          gemm_min_slots);
  auto act = torch::empty({S, I}, x32.options());
  const float* hp = h.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  const float a = float(alpha), lim = float(limit);
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * I; i < end * I; ++i) {
      const float gate = std::min(hp[2 * i], lim), linear = std::clamp(hp[2 * i + 1], -lim, lim);
      ap[i] = gate / (1.0f + std::exp(-a * gate)) * (linear + 1.0f);
    }
  });
  const torch::Tensor y = grouped_matmul(act, down_blocks, down_scales, down_bias, offsets, fast, amx_min_slots,
                                          gemm_min_slots);

  auto out = torch::empty({N, H}, x32.options());
  const float* yp = y.data_ptr<float>();
  const float* wp = w32.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* o = op + t * H;
      std::fill(o, o + H, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = wp[t * k + j];
        const float* yr = yp + position[t * k + j] * H;
        for (int64_t c = 0; c < H; ++c) o[c] += w * yr[c];
      }
    }
  });
  return out.to(x.scalar_type());
}
