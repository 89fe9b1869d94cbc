// bwd_launch.cuh: host-side launches of the sm90-family (wgmma) backward and its tile choice per
// head-dim bucket: the common preprocess, the wgmma dK/dV kernel, then the common dQ postprocess
// (atomic path) or the wgmma dQ kernel (deterministic path). Exports run_bwd (the same entry point
// as every family).
#pragma once

#include <cuda_runtime.h>

#include "common/bwd_preprocess.cuh"
#include "common/dq_accum.cuh"
#include "sm90/bwd_dq_kernel.cuh"
#include "sm90/bwd_kernel.cuh"

namespace flashjit {

// Query-block rows per iteration. Registers per thread: dK, dV (2 x 64 x d / 128 threads) for the
// whole CTA, plus S^T and dP^T (2 x 64 x kBlockM / 128) at a time:
//   d  64: kBlockM 128 (64 + 128 floats; dQ split by rows);
//   d 128: kBlockM 64 (128 + 64 floats; dQ split by columns);
//   d 192 (buckets 160, 192), d 256 (buckets 224, 256): kBlockM 64, 64 keys per CTA, dK, dV, dQ
//   split by columns (the same registers as d 128: bwd_kernel.cuh, kSplitCols; at d 192 128 + 64
//   columns of dK, dV and 1 + 2 panels of dQ).
// A spec's tile (JitSpec.tile: FLASHJIT_TILE_BLOCK_M) overrides both (tile sweeps).
template <int kHeadDim>
struct BwdSm90Tile {
#ifdef FLASHJIT_TILE
  static constexpr int kBlockM = FLASHJIT_TILE_BLOCK_M;
#else
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;
#endif
};

// The whole backward: preprocess (D, zero dq_accum); the wgmma dK/dV kernel (+ dQ into
// dq_accum) and the dQ postprocess; or, with p.deterministic, the dK/dV kernel then the wgmma dQ
// kernel.
// The head dim the kernels are compiled at: the bucket, in whole 64-column panels (bucket 96 runs
// the 128-column kernels: every load zero-fills the columns past p.head_dim and every store
// skips them, so the padding only costs the work on zeros; dq_accum rows are this wide).
template <int kBucket>
inline constexpr int kPaddedHeadDim = (kBucket + 63) / 64 * 64;

template <typename Element, int kBucket, typename V>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  constexpr int kHeadDim = kPaddedHeadDim<kBucket>;
  using Traits = BwdSm90Traits<Element, kHeadDim, BwdSm90Tile<kHeadDim>::kBlockM>;
  cudaError_t err = launch_bwd_preprocess<Element, kHeadDim>(p, stream);
  if (err != cudaSuccess) return err;
  constexpr auto kernel = flash_bwd_dk_dv_sm90_kernel<Traits, V>;
  err = set_smem<kernel>(Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Grid: (key blocks, heads x batch: attention_grid); with causal masking the first key blocks
  // see the most queries and start first.
  const dim3 grid = attention_grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.deterministic) {
    // Grid: (query blocks, heads x batch: attention_grid), heavier query blocks first.
    // (d 256: one K/V stage, as two do not fit beside Q and dO of 128 rows.)
    using DqTraits = BwdDqSm90Traits<Element, kHeadDim, 64, 2, kHeadDim <= 192 ? 2 : 1>;
    constexpr auto dq_kernel = flash_bwd_dq_sm90_kernel<DqTraits, V>;
    err = set_smem<dq_kernel>(DqTraits::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 dq_grid =
        attention_grid(ceil_div(p.seqlen_q, DqTraits::kBlockM), p.heads, p.batch);
    dq_kernel<<<dq_grid, DqTraits::kNThreads, DqTraits::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  }
  return launch_bwd_postprocess<typename Traits::DqLayout>(p, stream);
}

}  // namespace flashjit
