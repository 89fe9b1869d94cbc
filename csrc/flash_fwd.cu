// flash_fwd.cu: the forward translation unit of one JIT spec (sm80 family).
//
// The spec's defines pick the one instantiation compiled here:
//   FLASHJIT_DTYPE_FP16 / FLASHJIT_DTYPE_BF16, FLASHJIT_HEAD_DIM (bucket), FLASHJIT_IS_CAUSAL, FLASHJIT_HAS_DROPOUT.
// Torch-free. Compile check by hand, e.g.:
//   nvcc -c -std=c++17 -O3 -gencode=arch=compute_80,code=sm_80 -DFLASHJIT_DTYPE_BF16=1 \
//        -DFLASHJIT_HEAD_DIM=128 -DFLASHJIT_IS_CAUSAL=0 -DFLASHJIT_HAS_DROPOUT=0 -Icsrc csrc/flash_fwd.cu
#include "flash_api.h"
#include "flash_fwd_launch.cuh"
#include "spec_config.h"

namespace flashjit {

const char* fwd_run(const FwdParams& params, void* stream) {
  const cudaError_t err = run_fwd<spec::Element, spec::kHeadDim, spec::kIsCausal, spec::kHasDropout>(
      params, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
