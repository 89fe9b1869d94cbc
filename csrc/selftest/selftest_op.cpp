// selftest_op.cpp: a tiny CPU op that exercises flashjit's JIT path (spec -> cache -> lock ->
// cpp_extension build -> torch.library registration) without a GPU.
//
// Built as the "selftest" spec: python -m flashjit.prebuild --kernel selftest
// Used from Python as:  load_spec(JitSpec("selftest")).scale_(x, 2.0)   # x *= 2, in place
//
// Only torch/library.h and ATen/core/Tensor.h are included: CI builds this file often, and
// headers, not code, dominate its compile time.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#ifndef FLASHJIT_OP_NAMESPACE
#error "FLASHJIT_OP_NAMESPACE must be defined by the build (flashjit.jit.spec)"
#endif

// Some torch releases name the namespace with #ns, which does not expand macros; one more macro
// level expands FLASHJIT_OP_NAMESPACE first on every release.
#define FLASHJIT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FLASHJIT_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace {

// x *= alpha, for a contiguous float32 CPU tensor.
void scale_(at::Tensor& x, double alpha) {
  TORCH_CHECK(x.device().is_cpu(), "scale_: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "scale_: expected float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "scale_: expected a contiguous tensor");
  float* data = x.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  for (int64_t i = 0, n = x.numel(); i < n; ++i) {
    data[i] *= a;
  }
}

}  // namespace

FLASHJIT_LIBRARY(FLASHJIT_OP_NAMESPACE, m) {
  m.def("scale_(Tensor(a!) x, float alpha) -> ()");
}

FLASHJIT_LIBRARY_IMPL(FLASHJIT_OP_NAMESPACE, CPU, m) {
  m.impl("scale_", &scale_);
}
