// launch.cuh: host-side launch of the split-KV decode family: the append (and rotary) if any,
// the decode kernel, and the combine of the splits. Exports run_decode.
#pragma once

#include <cuda_runtime.h>

#include "common/sequence.cuh"
#include "splitkv/append_kernel.cuh"
#include "splitkv/combine_kernel.cuh"
#include "splitkv/decode_kernel.cuh"

namespace flashjit {

template <typename Traits, typename V>
cudaError_t launch_decode(const DecodeParams& dp, cudaStream_t stream) {
  constexpr auto kernel = flash_decode_kernel<Traits, V>;
  if (cudaError_t err = set_smem<kernel>(Traits::kSmemBytes); err != cudaSuccess) return err;
  const FwdParams& p = dp.fwd;
  const int m_blocks = ceil_div(p.seqlen_q * (p.heads / p.heads_k), Traits::kBlockM);
  const dim3 grid = attention_grid(m_blocks * dp.num_splits, p.heads_k, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(dp);
  return cudaGetLastError();
}

// Three K/V buffers where the device's shared memory per block allows them (d <= 128 on sm80 and
// sm90: up to 122 KB), else two (sm86/sm89: 99 KB per block; d > 128 everywhere). Configurations
// that fit neither are refused in Python before any compile (ops.decode_smem_bytes). Decoding
// tiles with three buffers load K/V rows by bulk copies where the device code is sm90+.
template <typename Element, int kHeadDim, int kWarpsM, int kWarpsN, typename V>
cudaError_t launch_stages(const DecodeParams& dp, cudaStream_t stream) {
  using Two = DecodeTraits<Element, kHeadDim, kWarpsM, kWarpsN, 2>;
  if constexpr (kHeadDim > 128) {
    return launch_decode<Two, V>(dp, stream);
  } else {
    // decoding (1 x kWarpsN warps): K/V rows by bulk copies on sm90+ (DecodeTraits::kBulk)
    using Three = DecodeTraits<Element, kHeadDim, kWarpsM, kWarpsN, 3, 64, kWarpsM == 1>;
    if (size_t(SmemLimits().per_block) >= Three::kSmemBytes)
      return launch_decode<Three, V>(dp, stream);
    return launch_decode<Two, V>(dp, stream);
  }
}

template <typename Element, int kHeadDim, typename V>
cudaError_t run_decode(const DecodeParams& dp, const AppendParams& a, cudaStream_t stream) {
  static_assert(!V::kHasDropout, "decoding has no dropout");
  const FwdParams& p = dp.fwd;
  // 1. Append (and rotate): one warp per new key vector and per query vector; 4 warps a block.
  const int64_t items = (a.k_new != nullptr ? int64_t(p.batch) * dp.cache.seqlen_new * p.heads_k : 0) +
                        (a.q_rot != nullptr ? int64_t(p.batch) * p.seqlen_q * p.heads : 0);
  if (items > 0) {
    flash_decode_append_kernel<Element><<<unsigned((items + 3) / 4), 128, 0, stream>>>(dp, a);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  if (dp.num_splits == 0) return cudaSuccess;  // the append (and rotary) only
  // 2. Attention: (packed row tiles x splits, K/V heads x batch) CTAs. Up to 16 packed rows
  // (decoding: seqlen_q x group): one 16-row tile, the warps split the keys; more (speculative
  // decoding, chunked prefill): 64-row tiles, a warp per 16 rows, one pass over K/V per 64 rows.
  const int rows = p.seqlen_q * (p.heads / p.heads_k);
#ifdef FLASHJIT_TILE  // a spec's tile (JitSpec.tile: keys per block, stages, loader 1 cp.async / 2 bulk)
  using Tiled = DecodeTraits<Element, kHeadDim, 1, 4, FLASHJIT_TILE_STAGES, FLASHJIT_TILE_BLOCK_N,
                             FLASHJIT_TILE_LOADER == 2>;
  const cudaError_t err = rows <= 16 ? launch_decode<Tiled, V>(dp, stream)
                                     : launch_stages<Element, kHeadDim, 4, 1, V>(dp, stream);
#else
  const cudaError_t err = rows <= 16 ? launch_stages<Element, kHeadDim, 1, 4, V>(dp, stream)
                                     : launch_stages<Element, kHeadDim, 4, 1, V>(dp, stream);
#endif
  if (err != cudaSuccess) return err;
  // 3. Combine the splits: one warp per (batch, head, query) row.
  if (dp.num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
    flash_decode_combine_kernel<Element, V::kHasSink>
        <<<unsigned((rows + 3) / 4), 128, 0, stream>>>(dp);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace flashjit
