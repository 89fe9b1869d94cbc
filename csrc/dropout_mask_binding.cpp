// dropout_mask_binding.cpp: the torch binding of the test-only dropout-mask probe (its own JIT
// spec, "dropout_mask", never part of the attention binaries): writes the keep mask that the
// attention kernels of a call with this rng_state use (flashjit/testing.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "flash_api.h"

#ifndef FLASHJIT_OP_NAMESPACE
#error "FLASHJIT_OP_NAMESPACE must be defined by the build (flashjit.jit.spec)"
#endif

namespace flashjit {
namespace {

// mask: uint8 (batch, heads, seqlen_q, seqlen_k) contiguous; 1 where dropout keeps the element.
void dropout_mask(const at::Tensor& mask, const at::Tensor& rng_state, int64_t batch,
                  int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double dropout_p,
                  int64_t stream) {
  TORCH_CHECK(mask.is_cuda() && mask.is_contiguous() && mask.scalar_type() == at::kByte &&
                  mask.numel() == batch * heads * seqlen_q * seqlen_k,
              "flashjit: mask must be a contiguous CUDA uint8 tensor of batch*heads*sq*sk");
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, "flashjit: dropout_p must be in (0, 1)");
  if (mask.numel() == 0) return;
  const DropoutParams d = make_dropout_params(rng_state, dropout_p);
  const char* err = dropout_mask_run(mask.data_ptr<uint8_t>(), d, int(batch), int(heads),
                                     int(seqlen_q), int(seqlen_k), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "flashjit dropout mask launch failed: ", err);
}

}  // namespace

FLASHJIT_LIBRARY(FLASHJIT_OP_NAMESPACE, m) {
  m.def(
      "dropout_mask(Tensor(a!) mask, Tensor rng_state, int batch, int heads, int seqlen_q, "
      "int seqlen_k, float dropout_p, int stream) -> ()");
  m.impl("dropout_mask", c10::DispatchKey::CUDA, TORCH_FN(dropout_mask));
}

}  // namespace flashjit
