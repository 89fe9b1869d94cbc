// bwd.cu: the backward translation unit of one JIT spec of the sm90 family (wgmma).
//
// The spec's defines pick the one instantiation compiled here (common/spec_config.h): dtype,
// head-dim bucket and the Variant. Torch-free. Compile check by hand, e.g.:
//   nvcc -c -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-v \
//        -gencode=arch=compute_90a,code=sm_90a -DFLASHJIT_DTYPE_BF16=1 -DFLASHJIT_HEAD_DIM=128 \
//        -DFLASHJIT_IS_CAUSAL=1 -Icsrc csrc/sm90/bwd.cu
#include "common/spec_config.h"
#include "common/varlen_tail.cuh"
#include "flash_api.h"
#include "sm90/bwd_launch.cuh"

namespace flashjit {

int bwd_dq_accum_width() { return kPaddedHeadDim<spec::kHeadDim>; }

const char* bwd_run(const BwdParams& params, void* stream) {
  const cudaError_t err = run_bwd<spec::Element, spec::kHeadDim, spec::Variant>(
      params, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
