// The Python module: the kernels of moe.cpp, gemv.cpp and attention.cpp, linked into gptoss_cpu_kernels.

#include <torch/extension.h>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_bf16", &dequantize_bf16, "one expert's MXFP4 weight as bf16 [R, K]");
  constexpr int64_t never = std::numeric_limits<int64_t>::max();
  m.def("moe_matmul", &moe_matmul, "MXFP4 grouped matmul over experts (slots sorted by expert)", py::arg("x"),
        py::arg("blocks"), py::arg("scales"), py::arg("bias"), py::arg("offsets"), py::arg("amx_min_slots") = never,
        py::arg("gemm_min_slots") = never);
  m.def("moe_experts", &moe_experts, "GPT-OSS MoE experts: grouped MXFP4 matmuls, clamped SwiGLU, weighted sum");
  m.def("linear_bf16", &linear_bf16, "bf16 GEMV for up to 4 rows of x, up to 16 where AMX runs");
  m.def("linear_int8", &linear_int8, "int8-block GEMV for up to 4 rows of x");
  m.def("attend_decode", &attend_decode, "attention with sinks and a window for a few bf16 queries");
  m.def("dequantize_int8", &dequantize_int8, "int8-block weight as bf16 [N, K]");
  m.def("has_vnni", [] {
#ifdef GPTOSS_AVX512_VNNI
    return true;
#else
    return false;
#endif
  }, "whether bf16 activations take the AVX-512 VNNI path (int8 activations) rather than the exact fp32 one");
  m.def("has_amx", &amx_available, "whether the AMX path can run here (CPU, compiler and OS)");
}
