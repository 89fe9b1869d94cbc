// flash_bwd_sm90_launch.cuh: host-side launches of the sm90-family (wgmma) backward and its tile
// choice per head-dim bucket. The preprocess, the dQ postprocess and the deterministic dQ kernel
// are the sm80 family's (flash_bwd_launch.cuh).
#pragma once

#include <cuda_runtime.h>

#include "flash_bwd_launch.cuh"
#include "flash_bwd_sm90_kernel.cuh"

namespace flashjit {

// Query-block rows per iteration. Registers per thread: dK, dV (2 x 64 x d / 128 threads) for the
// whole CTA, plus S^T and dP^T (2 x 64 x kBlockM / 128) at a time:
//   d  64: kBlockM 128 (64 + 128 floats; dQ split by rows);
//   d 128: kBlockM 64 (128 + 64 floats; dQ split by columns).
// A spec's tile (JitSpec.tile: FLASHJIT_TILE_BLOCK_M) overrides both (tile sweeps).
template <int kHeadDim>
struct BwdSm90Tile {
#ifdef FLASHJIT_TILE
  static constexpr int kBlockM = FLASHJIT_TILE_BLOCK_M;
#else
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;
#endif
};

// The whole backward: preprocess (D, zero dq_accum); the wgmma dK/dV kernel (+ atomic dQ) and the
// dQ postprocess; or, with p.deterministic, the dK/dV kernel then the sm80 dQ kernel.
template <typename Element, int kHeadDim, bool kIsCausal, bool kHasDropout>
cudaError_t run_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  using Traits = BwdSm90Traits<Element, kHeadDim, BwdSm90Tile<kHeadDim>::kBlockM>;
  cudaError_t err = launch_bwd_preprocess<Element, kHeadDim>(p, stream);
  if (err != cudaSuccess) return err;
  auto kernel = flash_bwd_dk_dv_sm90_kernel<Traits, kIsCausal, kHasDropout>;
  err = set_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Grid: (key blocks, heads x batch: attention_grid); with causal masking the first key blocks
  // see the most queries and start first.
  const dim3 grid = attention_grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.deterministic)
    return launch_bwd_dq<BwdDqTile<Element, kHeadDim>, kIsCausal, kHasDropout>(p, stream);
  return launch_bwd_postprocess<typename Traits::DqLayout>(p, stream);
}

}  // namespace flashjit
