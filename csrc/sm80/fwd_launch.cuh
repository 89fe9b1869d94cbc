// fwd_launch.cuh: host-side launch of the sm80-family forward kernel, and its tile choice per
// head-dim bucket. Exports run_fwd (the same entry point as every family).
#pragma once

#include <cuda_runtime.h>

#include "sm80/fwd_kernel.cuh"

namespace flashjit {

// Grid: (query blocks, heads x batch: attention_grid); CTAs of Traits::kNThreads threads.
template <typename Traits, typename V>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr auto kernel = flash_fwd_kernel<Traits, V>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (cudaError_t err = set_smem<kernel>(smem); err != cudaSuccess) return err;
  const dim3 grid = attention_grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tile choice per head-dim bucket (mma.sync family). Registers bound the tile: a warp holds
// O (kWarpRows x d) and S (kWarpRows x kBlockN) in fp32. Shared memory holds Q and two stages of
// K and V (traits.cuh).
//   d <= 128: 128 x 64 tiles, 4 warps of 32 rows; two CTAs per SM where they fit (H100: 2 x 104 KB
//             at d 128), else 128 x 32 tiles (A100: 2 x 70 KB).
//   d  > 128: 128 x 64 tiles, 8 warps of 16 rows, where a block may take 203 KB at d 256 (H100);
//             else 64 x 16 tiles, 4 warps (A100, sm86/sm89: 68 KB at d 256).
template <typename Element, int kHeadDim, typename V>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
#ifdef FLASHJIT_TILE
  // A tile chosen by the spec (JitSpec.tile, tuning sweeps).
  using Tile = FwdTraits<Element, kHeadDim, FLASHJIT_TILE_BLOCK_M, FLASHJIT_TILE_BLOCK_N,
                         FLASHJIT_TILE_WARPS, FLASHJIT_TILE_MIN_BLOCKS>;
  return launch_fwd<Tile, V>(p, stream);
#else
  const SmemLimits smem;
  if constexpr (kHeadDim <= 128) {
    using Big = FwdTraits<Element, kHeadDim, 128, 64, 4, 2>;
    using Small = FwdTraits<Element, kHeadDim, 128, 32, 4, 2>;
    if (size_t(smem.per_sm) >= 2 * (Big::kSmemBytes + 1024))
      return launch_fwd<Big, V>(p, stream);
    return launch_fwd<Small, V>(p, stream);
  } else {
    using Big = FwdTraits<Element, kHeadDim, 128, 64, 8, 1>;
    using Small = FwdTraits<Element, kHeadDim, 64, 16, 4, 1>;
    if (size_t(smem.per_block) >= Big::kSmemBytes)
      return launch_fwd<Big, V>(p, stream);
    return launch_fwd<Small, V>(p, stream);
  }
#endif
}

}  // namespace flashjit
