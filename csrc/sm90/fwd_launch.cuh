// fwd_launch.cuh: host-side launch of the sm90-family (wgmma) forward kernel and its tile choice
// per head-dim bucket. Exports run_fwd (the same entry point as every family).
#pragma once

#include <cuda_runtime.h>

#include "sm90/fwd_kernel.cuh"

namespace flashjit {

// Tile choice: two warpgroups (128 query rows per CTA, so each K/V tile read from L2 serves 128
// rows). Registers per thread: O (64 x d / 128 threads) + S (64 x kBlockN / 128) + the previous
// block's P (half of S), all live during the softmax.
//   d  64: kBlockN 64, two CTAs per SM (114 registers, 49 KB of shared memory per CTA);
//   d 128: kBlockN 128, one CTA per SM (202 registers, 161 KB).
// benchmarks/NOTES.md and results/<gpu>/logs/tile_sweep_sm90.log have the sweep behind this.
// A spec's tile (JitSpec.tile: FLASHJIT_TILE_BLOCK_N, _WARPGROUPS, _MIN_BLOCKS) overrides it.
template <int kHeadDim>
struct Sm90Tile {
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 128;
  static constexpr int kMinBlocks = kHeadDim <= 64 ? 2 : 1;
  static constexpr int kWarpGroups = 2;
};
#ifdef FLASHJIT_TILE
#define FLASHJIT_SM90_TILE_N \
  FLASHJIT_TILE_BLOCK_N, FLASHJIT_TILE_WARPGROUPS, FLASHJIT_TILE_MIN_BLOCKS
#else
#define FLASHJIT_SM90_TILE_N \
  Sm90Tile<kHeadDim>::kBlockN, Sm90Tile<kHeadDim>::kWarpGroups, Sm90Tile<kHeadDim>::kMinBlocks
#endif

template <typename Element, int kHeadDim, typename V>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdSm90Traits<Element, kHeadDim, FLASHJIT_SM90_TILE_N>;
  constexpr auto kernel = flash_fwd_sm90_kernel<Traits, V>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (cudaError_t err = set_smem<kernel>(smem); err != cudaSuccess) return err;
  // Grid: (query blocks, heads x batch: attention_grid).
  const dim3 grid = attention_grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashjit
