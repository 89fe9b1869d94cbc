// fwd.cu: the forward translation unit of one JIT spec of the warp-specialised Hopper family.
//
// The spec's defines pick the one instantiation compiled here (common/spec_config.h). Torch-free.
// Compile check by hand, e.g.:
//   nvcc -c -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-v \
//        -gencode=arch=compute_90a,code=sm_90a -DFLASHJIT_DTYPE_BF16=1 -DFLASHJIT_HEAD_DIM=128 \
//        -DFLASHJIT_IS_CAUSAL=0 -Icsrc csrc/sm90ws/fwd.cu
#include "common/spec_config.h"
#include "common/varlen_tail.cuh"
#include "flash_api.h"
#include "sm90ws/fwd_launch.cuh"

namespace flashjit {

const char* fwd_run(const FwdParams& params, void* stream) {
  const cudaError_t err = run_fwd<spec::Element, spec::kHeadDim, spec::Variant>(
      params, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
