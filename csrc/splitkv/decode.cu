// decode.cu: the decode translation unit of one JIT spec of the split-KV family (mma.sync).
//
// The spec's defines pick the instantiation (common/spec_config.h: dtype, head-dim bucket, the
// Variant; never dropout). Torch-free. Compile check by hand, e.g.:
//   nvcc -c -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-v \
//        -gencode=arch=compute_90a,code=sm_90a -DFLASHJIT_DTYPE_BF16=1 -DFLASHJIT_HEAD_DIM=128 \
//        -DFLASHJIT_IS_CAUSAL=1 -Icsrc csrc/splitkv/decode.cu
#include "common/spec_config.h"
#include "flash_api.h"
#include "splitkv/launch.cuh"

namespace flashjit {

const char* decode_run(const DecodeParams& params, const AppendParams& append, void* stream) {
  const cudaError_t err = run_decode<spec::Element, spec::kHeadDim, spec::Variant>(
      params, append, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
