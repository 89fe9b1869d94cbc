// flash_bwd.cu: the backward translation unit of one JIT spec.
//
// The spec's defines pick the one instantiation compiled here: FLASHJIT_DTYPE_FP16 /
// FLASHJIT_DTYPE_BF16, FLASHJIT_HEAD_DIM (bucket), FLASHJIT_IS_CAUSAL, FLASHJIT_HAS_DROPOUT, and
// FLASHJIT_BWD_FAMILY_SM90=1 for the Hopper (wgmma) family, else the sm80 family.
// Also holds the dropout-mask test kernel. Torch-free. Compile check by hand, e.g.:
//   nvcc -c -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-v \
//        -gencode=arch=compute_90a,code=sm_90a -DFLASHJIT_DTYPE_BF16=1 -DFLASHJIT_HEAD_DIM=128 \
//        -DFLASHJIT_IS_CAUSAL=1 -DFLASHJIT_HAS_DROPOUT=0 -Icsrc csrc/flash_bwd.cu
#include "dropout.cuh"
#include "flash_api.h"
#if FLASHJIT_BWD_FAMILY_SM90
#include "flash_bwd_sm90_launch.cuh"
#else
#include "flash_bwd_launch.cuh"
#endif
#include "spec_config.h"
#include "varlen_tail.cuh"

namespace flashjit {

const char* bwd_run(const BwdParams& params, void* stream) {
#if FLASHJIT_BWD_FAMILY_SM90
  const cudaError_t err =
      run_bwd_sm90<spec::Element, spec::kHeadDim, spec::kIsCausal, spec::kHasDropout>(
          params, static_cast<cudaStream_t>(stream));
#else
  const cudaError_t err =
      run_bwd<spec::Element, spec::kHeadDim, spec::kIsCausal, spec::kHasDropout>(
          params, static_cast<cudaStream_t>(stream));
#endif
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Test kernel: the dropout keep mask (uint8, 1 = kept) of a fixed-length call, (batch, heads,
// seqlen_q, seqlen_k) contiguous, element for element what the attention kernels use. One thread
// per (b, h, m16 x n8 tile, lane), in a grid-stride loop.
__global__ void dropout_mask_kernel(uint8_t* mask, DropoutParams p, int batch, int heads,
                                    int seqlen_q, int seqlen_k) {
  const int m16 = ceil_div(seqlen_q, 16), n8 = ceil_div(seqlen_k, 8);
  const int64_t lanes = int64_t(batch) * heads * m16 * n8 * 32;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < lanes;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int lane = int(idx % 32);
    const int64_t tile = idx / 32;
    const int j8 = int(tile % n8), i16 = int(tile / n8 % m16), bh = int(tile / n8 / m16);
    const int g = lane / 4, t = lane % 4;
    const DropoutMask drop(p, bh / heads, bh % heads, heads, seqlen_q, seqlen_k);
    const uint32_t keep = drop.keep_bits(i16, j8, g, t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i16 * 16 + (e / 2) * 8 + g, j = j8 * 8 + 2 * t + e % 2;
      if (i < seqlen_q && j < seqlen_k)
        mask[(int64_t(bh) * seqlen_q + i) * seqlen_k + j] = uint8_t((keep >> e) & 1u);
    }
  }
}

const char* dropout_mask_run(uint8_t* mask, const DropoutParams& dropout, int batch, int heads,
                             int seqlen_q, int seqlen_k, void* stream) {
  constexpr int kThreads = 256;
  const int64_t lanes =
      int64_t(batch) * heads * ceil_div(seqlen_q, 16) * ceil_div(seqlen_k, 8) * 32;
  const int blocks = int(lanes < int64_t(kThreads) * 65536 ? (lanes + kThreads - 1) / kThreads
                                                           : 65536);
  dropout_mask_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      mask, dropout, batch, heads, seqlen_q, seqlen_k);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
