// flash_fwd.cu: the forward translation unit of one JIT spec.
//
// The spec's defines pick the one instantiation compiled here:
//   FLASHJIT_DTYPE_FP16 / FLASHJIT_DTYPE_BF16, FLASHJIT_HEAD_DIM (bucket), FLASHJIT_IS_CAUSAL, FLASHJIT_HAS_DROPOUT,
//   and FLASHJIT_FWD_FAMILY_SM90=1 for the Hopper (wgmma) family, else the sm80 (mma.sync) family.
// Torch-free. Compile check by hand, e.g.:
//   nvcc -c -O3 -gencode=arch=compute_80,code=sm_80 -DFLASHJIT_DTYPE_BF16=1 \
//        -DFLASHJIT_HEAD_DIM=128 -DFLASHJIT_IS_CAUSAL=0 -DFLASHJIT_HAS_DROPOUT=0 -Icsrc csrc/flash_fwd.cu
#include "flash_api.h"
#if FLASHJIT_FWD_FAMILY_SM90
#include "flash_fwd_sm90_launch.cuh"
#else
#include "flash_fwd_launch.cuh"
#endif
#include "spec_config.h"
#include "varlen_tail.cuh"

namespace flashjit {

const char* fwd_run(const FwdParams& params, void* stream) {
#if FLASHJIT_FWD_FAMILY_SM90
  const cudaError_t err =
      run_fwd_sm90<spec::Element, spec::kHeadDim, spec::kIsCausal, spec::kHasDropout>(
          params, static_cast<cudaStream_t>(stream));
#else
  const cudaError_t err = run_fwd<spec::Element, spec::kHeadDim, spec::kIsCausal, spec::kHasDropout>(
      params, static_cast<cudaStream_t>(stream));
#endif
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
