// Shared by the CPU kernel sources (moe.cpp, gemv.cpp, attention.cpp, module.cpp), compiled separately with the
// same flags and linked into one module: includes, feature macros, the helpers more than one file uses, and
// the functions the module exports.

#pragma once

#include <torch/types.h>  // not torch/extension.h: only module.cpp needs pybind11, and it triples the compile time
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GPTOSS_AVX512_VNNI 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GPTOSS_AVX512_BF16 1
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(GPTOSS_AVX512_BF16)
#define GPTOSS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

// The 64-byte operand of ldtilecfg (palette 1): bytes per row and rows of each of the 8 tiles.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
#endif

// How far ahead of a GEMV's weight stream the next bytes are prefetched. A decode step streams gigabytes
// of weights in rows of a few KiB; the hardware prefetcher restarts at every row, and on AMD Zen 5 the
// streams ran at about 0.65 of the read bandwidth without this (docs/benchmarks.md).
constexpr int PREFETCH_BYTES = 4096;

#ifdef GPTOSS_AVX512_VNNI
// 8 activations -> 8 int8 steps of absmax / 127 (in qi, as int32; round to nearest, ties to even);
// returns absmax. Both int8 kernels quantize their activations through this, 8 values at a time.
inline float quantize_group8(const float* x, int32_t* qi) {
  const __m256 v = _mm256_loadu_ps(x);
  __m256 m = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);             // |v|, then the max of the 8
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1));
  const float amax = _mm256_cvtss_f32(m);
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qi), _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(inv))));
  return amax;
}
#endif

// ---- the functions module.cpp exports ----------------------------------------------------------------

// moe.cpp
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales);
torch::Tensor moe_matmul(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                         torch::Tensor offsets, int64_t amx_min_slots, int64_t gemm_min_slots);
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor expert_weights,
                          torch::Tensor gate_up_blocks, torch::Tensor gate_up_scales, torch::Tensor gate_up_bias,
                          torch::Tensor down_blocks, torch::Tensor down_scales, torch::Tensor down_bias,
                          double alpha, double limit, int64_t amx_min_slots, int64_t gemm_min_slots);
bool amx_available();

// gemv.cpp
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias);
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, c10::optional<torch::Tensor> bias);
torch::Tensor dequantize_int8(torch::Tensor values, torch::Tensor scales);

// attention.cpp
torch::Tensor attend_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor q_pos, torch::Tensor k_pos,
                            int64_t window, c10::optional<torch::Tensor> sinks);
