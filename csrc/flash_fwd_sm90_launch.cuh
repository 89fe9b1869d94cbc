// flash_fwd_sm90_launch.cuh: host-side launch of the sm90-family (wgmma) forward kernel and its
// tile choice per head-dim bucket.
#pragma once

#include <cuda_runtime.h>

#include "flash_fwd_sm90_kernel.cuh"

namespace flashjit {

// Tile choice: two warpgroups (128 query rows per CTA, so each K/V tile read from L2 serves 128
// rows), kBlockN 64, two CTAs per SM (4 warpgroups: one's softmax overlaps another's wgmma).
// Registers per thread: O (64 x d / 128 threads) + S (64 x 64 / 128) + P (half of S): 116 at
// d 64; at d 128 the 128-register cap spills ~150 bytes, and still wins (benchmarks/NOTES.md,
// logs/tile_sweep_sm90.log: kBlockN 128 with one CTA per SM is 1-9% slower, one warpgroup per
// CTA 0-5% slower). Shared memory: 49 KB (d 64), 97 KB (d 128) per CTA.
// FLASHJIT_SM90_BLOCK_N / FLASHJIT_SM90_MIN_BLOCKS / FLASHJIT_SM90_WARPGROUPS override both
// (tile sweeps).
#ifndef FLASHJIT_SM90_BLOCK_N
#define FLASHJIT_SM90_BLOCK_N 64
#endif
#ifndef FLASHJIT_SM90_MIN_BLOCKS
#define FLASHJIT_SM90_MIN_BLOCKS 2
#endif
#ifndef FLASHJIT_SM90_WARPGROUPS
#define FLASHJIT_SM90_WARPGROUPS 2
#endif

template <typename Element, int kHeadDim, bool kIsCausal, bool kHasDropout>
cudaError_t run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdSm90Traits<Element, kHeadDim, FLASHJIT_SM90_BLOCK_N,
                               FLASHJIT_SM90_WARPGROUPS, FLASHJIT_SM90_MIN_BLOCKS>;
  auto kernel = flash_fwd_sm90_kernel<Traits, kIsCausal, kHasDropout>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  // Grid: (query blocks, heads, batch).
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashjit
