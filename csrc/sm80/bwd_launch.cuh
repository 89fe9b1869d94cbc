// bwd_launch.cuh: host-side launches of the sm80-family backward (preprocess, dK/dV, then the dQ
// postprocess or the deterministic dQ kernel) and its tiles per head-dim bucket. Exports run_bwd
// (the same entry point as every family).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "common/bwd_preprocess.cuh"
#include "common/dq_accum.cuh"
#include "sm80/bwd_dkdv_kernel.cuh"
#include "sm80/bwd_dq_kernel.cuh"
#include "sm80/traits.cuh"

namespace flashjit {

// Grid: (key blocks, heads x batch: attention_grid).
template <typename Traits, typename V>
cudaError_t launch_bwd_dk_dv(const BwdParams& p, cudaStream_t stream) {
  constexpr auto kernel = flash_bwd_dk_dv_kernel<Traits, V>;
  cudaError_t err = set_smem<kernel>(Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid = attention_grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The dK/dV kernel with tile Traits and, on the atomic path, the dQ postprocess that reads the
// accumulator in that tile's fragment order.
template <typename Traits, typename V>
cudaError_t launch_bwd_tile(const BwdParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_bwd_dk_dv<Traits, V>(p, stream);
  if (err != cudaSuccess || p.deterministic) return err;
  return launch_bwd_postprocess<typename Traits::DqLayout>(p, stream);
}

// Grid: (query blocks, heads x batch: attention_grid).
template <typename Traits, typename V>
cudaError_t launch_bwd_dq(const BwdParams& p, cudaStream_t stream) {
  constexpr auto kernel = flash_bwd_dq_kernel<Traits, V>;
  cudaError_t err = set_smem<kernel>(Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid = attention_grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Tile choice per head-dim bucket.
//
// dK/dV kernel, 8 warps: BwdTraits<.., d, kBlockM, kBlockN, 8, warps along M for S/dP, along N
// for dK/dV, along M for dQ, Q stages, dO stages>. Registers bound the tile: a thread holds dK and
// dV (2 kBlockN d / 256 floats) for the whole CTA, plus S and dP (2 kBlockM kBlockN / 256) or dQ
// (kBlockM d / 256) at a time; ptxas reports 0 to 28 spilled bytes for these choices. Shared
// memory reads (ldmatrix) bound the speed, so warp tiles are as square as the counts allow.
//   d <= 64:   128 x 128 (dK dV 32-64 floats, S dP 128): S, dP warp tiles of 32 x 64.
//   d 96, 128: 64 x 128 (dK dV 96-128 floats, S dP 64): warp tiles 32 x 32 (S, dP), 32 x 48-64
//              (dK, dV), 32 x 24-32 (dQ).
//   d  > 128:  64 x 64 (dK dV 80-128 floats, S dP 32): warp tiles 16 x 32, 32 x d/4, 32 x d/4;
//              measured on H100 (b 4, s 4096): 6-10% faster than 16 x d/2 tiles for dK, dV, dQ.
// Shared memory picks the stages (sizes with lse/D buffers, bf16): Big (H100 class, 227 KB)
// double-buffers Q and dO; Mid (A100 class, 163 KB) keeps one dO (d 224, 256: and one Q) buffer,
// loaded once the dV and dK products are done; Small (sm86/sm89 class, 99 KB) shrinks the tile.
// H100 bf16, b 4 s 4096, vs FlashAttention-2 (torch SDPA) backward: 95-101% at d 32-128,
// 106-113% at d 160 and 224, 85-91% at d 192 and 256.
// ---------------------------------------------------------------------------------------------
template <typename Element, int kHeadDim, bool kHasDropout>
struct BwdTiles;

template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 32, kHasDropout> {
  using Big = BwdTraits<Element, 32, 128, 128, 8, 4, 8, 8, 2, 2>;   // 130 KB
  using Mid = Big;
  using Small = BwdTraits<Element, 32, 64, 128, 8, 2, 8, 4, 2, 2>;  // 75 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 64, kHasDropout> {
  // With dropout, 128 x 128 spills 24-68 bytes (the keep bits): 64 x 128 (107 KB) then, 0 bytes.
  using Big = std::conditional_t<kHasDropout, BwdTraits<Element, 64, 64, 128, 8, 2, 4, 4, 2, 2>,
                                 BwdTraits<Element, 64, 128, 128, 8, 4, 4, 4, 2, 2>>;  // 178 KB
  using Mid = std::conditional_t<kHasDropout, Big,
                                 BwdTraits<Element, 64, 128, 128, 8, 4, 4, 4, 2, 1>>;  // 160 KB
  using Small = BwdTraits<Element, 64, 64, 128, 8, 2, 4, 4, 2, 1>;                      // 98 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 96, kHasDropout> {
  using Big = BwdTraits<Element, 96, 64, 128, 8, 2, 4, 2, 2, 2>;   // 139 KB
  using Mid = Big;
  using Small = BwdTraits<Element, 96, 64, 64, 8, 4, 4, 4, 2, 2>;  // 97 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 128, kHasDropout> {
  using Big = BwdTraits<Element, 128, 64, 128, 8, 2, 4, 2, 2, 2>;   // 171 KB
  using Mid = BwdTraits<Element, 128, 64, 128, 8, 2, 4, 2, 2, 1>;   // 154 KB
  using Small = BwdTraits<Element, 128, 64, 64, 8, 4, 4, 4, 1, 1>;  // 87 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 160, kHasDropout> {
  using Big = BwdTraits<Element, 160, 64, 64, 8, 4, 2, 2, 2, 2>;   // 145 KB
  using Mid = Big;
  using Small = BwdTraits<Element, 160, 64, 32, 8, 4, 2, 4, 2, 1>;  // 95 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 192, kHasDropout> {
  using Big = BwdTraits<Element, 192, 64, 64, 8, 4, 2, 2, 2, 2>;   // 169 KB
  using Mid = BwdTraits<Element, 192, 64, 64, 8, 4, 2, 2, 2, 1>;   // 144 KB
  using Small = BwdTraits<Element, 192, 64, 32, 8, 4, 2, 4, 1, 1>;  // 86 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 224, kHasDropout> {
  using Big = BwdTraits<Element, 224, 64, 64, 8, 4, 2, 2, 2, 2>;   // 193 KB
  using Mid = BwdTraits<Element, 224, 64, 64, 8, 4, 2, 2, 1, 1>;   // 135 KB
  using Small = BwdTraits<Element, 224, 64, 32, 8, 4, 2, 4, 1, 1>;  // 98 KB
};
template <typename Element, bool kHasDropout>
struct BwdTiles<Element, 256, kHasDropout> {
  using Big = BwdTraits<Element, 256, 64, 64, 8, 4, 2, 2, 2, 2>;   // 217 KB
  using Mid = BwdTraits<Element, 256, 64, 64, 8, 4, 2, 2, 1, 1>;   // 151 KB
  using Small = BwdTraits<Element, 256, 32, 32, 8, 2, 2, 2, 1, 1>;  // 71 KB
};

// dQ kernel of the deterministic path: 64 query rows, 4 warps of 16 rows, in at most 99 KB for
// every device (so one tile serves all); K and V double-buffered while two stages fit (d <= 160).
// H100: 1.2-1.45x the time of the mma.sync atomic path.
template <typename Element, int kHeadDim>
using BwdDqTile =
    BwdDqTraits<Element, kHeadDim, 64, kHeadDim <= 64 ? 128 : kHeadDim <= 96 ? 64 : 32, 4,
                kHeadDim <= 160 ? 2 : 1>;

// Which dK/dV tiles this build can need. nvcc lists the build's archs in __CUDA_ARCH_LIST__
// (e.g. 800,900) for host code too; sm_8x code also runs on later 8.x devices (99 KB for 8.6,
// 8.9), sm_90a code only on 9.0 (227 KB), later archs may be either. Tiles no target can use are
// not instantiated, which keeps a single-arch sm90a build to one dK/dV kernel.
namespace bwd_archs {
#ifdef __CUDA_ARCH_LIST__
constexpr int kList[] = {__CUDA_ARCH_LIST__};
#else
constexpr int kList[] = {800, 900, 1000};  // unknown: assume any device
#endif
constexpr bool any(int lo, int hi) {  // some arch of the build in [lo, hi)
  for (int arch : kList)
    if (arch >= lo && arch < hi) return true;
  return false;
}
constexpr bool kBig = any(900, 100000);                      // 227 KB devices
constexpr bool kMid = any(800, 860) || any(870, 880);        // 163 KB (8.0, 8.7)
constexpr bool kSmall = any(800, 900) || any(1000, 100000);  // 99 KB (8.6, 8.9, 12.x)
}  // namespace bwd_archs

// Largest dynamic shared memory a block of the current device may opt in to.
inline size_t bwd_smem_per_block() {
  return size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>());
}

// The dK/dV (and postprocess) launch for the current device: the largest tile of this build whose
// shared memory fits (Mid is skipped where it is the same tile as an instantiated Big).
template <typename Element, int kHeadDim, typename V>
cudaError_t launch_bwd_tiles_for_device(const BwdParams& p, cudaStream_t stream) {
  using Tiles = BwdTiles<Element, kHeadDim, V::kHasDropout>;
  constexpr bool kUseBig = bwd_archs::kBig;
  constexpr bool kUseMid =
      bwd_archs::kMid && !(kUseBig && std::is_same_v<typename Tiles::Mid, typename Tiles::Big>);
  const size_t smem = bwd_smem_per_block();
  if constexpr (kUseBig) {
    if (smem >= Tiles::Big::kSmemBytes)
      return launch_bwd_tile<typename Tiles::Big, V>(p, stream);
  }
  if constexpr (kUseMid) {
    if (smem >= Tiles::Mid::kSmemBytes)
      return launch_bwd_tile<typename Tiles::Mid, V>(p, stream);
  }
  if constexpr (bwd_archs::kSmall) {
    if (smem >= Tiles::Small::kSmemBytes)
      return launch_bwd_tile<typename Tiles::Small, V>(p, stream);
  }
  return cudaErrorInvalidConfiguration;  // no tile of this build fits the device
}

// The whole backward: preprocess (D, zero dq_accum); dK/dV (+ atomic dQ) and the dQ
// postprocess; or, with p.deterministic, dK/dV then the dQ kernel.
template <typename Element, int kHeadDim, typename V>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err = launch_bwd_preprocess<Element, kHeadDim>(p, stream);
  if (err != cudaSuccess) return err;
  err = launch_bwd_tiles_for_device<Element, kHeadDim, V>(p, stream);
  if (err != cudaSuccess || !p.deterministic) return err;
  return launch_bwd_dq<BwdDqTile<Element, kHeadDim>, V>(p, stream);
}

}  // namespace flashjit
