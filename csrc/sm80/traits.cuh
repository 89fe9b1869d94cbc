// traits.cuh: tile shapes of the sm80-family (mma.sync) attention kernels.
//
// One traits struct per tile configuration; everything else (thread counts, fragment counts,
// shared-memory size) is derived here and checked with static_assert.
#pragma once

#include <cstddef>

#include "common/dq_accum.cuh"
#include "common/problem.cuh"

namespace flashjit {

// Forward tile: one CTA computes kBlockM query rows against all keys, kBlockN keys at a time.
// Warp w owns query rows [w * kWarpRows, (w + 1) * kWarpRows) of the tile.
// kMinBlocksPerSM: CTAs that must fit on one SM (caps registers at 64K / (threads * this)).
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kMinBlocksPerSM_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSM = kMinBlocksPerSM_;

  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;  // m16 tiles per warp
  static constexpr int kNTilesS = kBlockN / 8;    // n8 tiles of S = Q K^T per m16 tile
  static constexpr int kNTilesO = kHeadDim / 8;   // n8 tiles of O per m16 tile

  // Shared memory: rows of kHeadDim elements padded by 16 bytes, so that the 8 row addresses of an
  // ldmatrix land in 8 different 16-byte bank groups (row stride is an odd number of 16 B chunks).
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kSmemRow = kHeadDim + 8;       // elements
  static constexpr int kSmemQ = kBlockM * kSmemRow;
  static constexpr int kSmemK = kBlockN * kSmemRow;  // one stage
  static constexpr int kSmemV = kBlockN * kSmemRow;
  static constexpr int kStages = 2;  // K/V double buffering
  static constexpr size_t kSmemBytes =
      size_t(kSmemQ + kStages * (kSmemK + kSmemV)) * sizeof(Element);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket: multiple of 32, <= 256");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0, "kBlockN: whole k16 steps of P V");
  static_assert((kSmemRow / 8) % 2 == 1, "padded row must be an odd number of 16 B chunks");
};

// ---------------------------------------------------------------------------------------------
// Tile shapes
// ---------------------------------------------------------------------------------------------

// dK/dV tile: one CTA owns kBlockN keys and loops over query blocks of kBlockM rows. Its kNWarps
// warps split each product shape their own way (a warp tile: whole m16 tiles x whole n8 tiles):
//   S, dP  (kBlockM x kBlockN):  kWarpsMSdP along queries x kNWarps / kWarpsMSdP along keys
//   dK, dV (kBlockN x kHeadDim): kWarpsNdKV along keys    x kNWarps / kWarpsNdKV along d
//   dQ     (kBlockM x kHeadDim): kWarpsMdQ  along queries x kNWarps / kWarpsMdQ  along d
// Q and dO have kStagesQ, kStagesDO shared buffers: with 2, the next query block's tile loads
// during the whole iteration; with 1, it loads once the dV and dK products are done with it.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kWarpsMSdP_, int kWarpsNdKV_, int kWarpsMdQ_, int kStagesQ_, int kStagesDO_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStagesQ = kStagesQ_;
  static constexpr int kStagesDO = kStagesDO_;

  static constexpr int kWarpsMSdP = kWarpsMSdP_, kWarpsNSdP = kNWarps / kWarpsMSdP;
  static constexpr int kSdPWarpM = kBlockM / kWarpsMSdP, kSdPWarpN = kBlockN / kWarpsNSdP;
  static constexpr int kSdPMTiles = kSdPWarpM / 16, kSdPNTiles = kSdPWarpN / 8;

  static constexpr int kWarpsNdKV = kWarpsNdKV_, kWarpsDdKV = kNWarps / kWarpsNdKV;
  static constexpr int kdKVWarpN = kBlockN / kWarpsNdKV, kdKVWarpD = kHeadDim / kWarpsDdKV;
  static constexpr int kdKVMTiles = kdKVWarpN / 16, kdKVNTiles = kdKVWarpD / 8;

  static constexpr int kWarpsMdQ = kWarpsMdQ_, kWarpsDdQ = kNWarps / kWarpsMdQ;
  static constexpr int kdQWarpM = kBlockM / kWarpsMdQ, kdQWarpD = kHeadDim / kWarpsDdQ;
  static constexpr int kdQMTiles = kdQWarpM / 16, kdQNTiles = kdQWarpD / 8;

  static constexpr int kdQFragsPerWarp = kdQMTiles * kdQNTiles;  // m16 x n8 fragments of dQ

  // Shared memory: rows padded by 16 bytes to an odd number of 16 B chunks, so that the 8 row
  // addresses of an ldmatrix (and the 8 rows of a fragment store) hit 8 different bank groups.
  // Layout: K, V, Q x kStagesQ, dO x kStagesDO, P, dS (elements), then lse and D of the query
  // block (floats, kStagesQ buffers each, loaded with Q). dK, dV are staged in K, V at the end.
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kSmemRow = kHeadDim + 8;       // Q, dO, K, V rows (elements)
  static constexpr int kSmemRowP = kBlockN + 8;       // P, dS rows (elements)
  static constexpr int kSmemQ = kBlockM * kSmemRow;   // one Q or dO buffer
  static constexpr int kSmemK = kBlockN * kSmemRow;   // K or V
  static constexpr int kSmemP = kBlockM * kSmemRowP;  // P or dS
  static constexpr size_t kSmemElementBytes =
      size_t(2 * kSmemK + (kStagesQ + kStagesDO) * kSmemQ + 2 * kSmemP) * sizeof(Element);
  static constexpr size_t kSmemBytes = kSmemElementBytes + 2 * kStagesQ * kBlockM * sizeof(float);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket: multiple of 32, <= 256");
  static_assert(kBlockM <= kAccumPadRows && kAccumPadRows % kBlockM == 0, "kBlockM divides 128");
  static_assert(kNWarps % kWarpsMSdP == 0 && kNWarps % kWarpsNdKV == 0 && kNWarps % kWarpsMdQ == 0,
                "warp grids must use every warp");
  static_assert(kSdPWarpM % 16 == 0 && kSdPWarpN % 8 == 0 && kSdPWarpM * kWarpsMSdP == kBlockM &&
                    kSdPWarpN * kWarpsNSdP == kBlockN,
                "S/dP warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kdKVWarpN % 16 == 0 && kdKVWarpD % 8 == 0 && kdKVWarpN * kWarpsNdKV == kBlockN &&
                    kdKVWarpD * kWarpsDdKV == kHeadDim,
                "dK/dV warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kdQWarpM % 16 == 0 && kdQWarpD % 8 == 0 && kdQWarpM * kWarpsMdQ == kBlockM &&
                    kdQWarpD * kWarpsDdQ == kHeadDim,
                "dQ warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "blocks: whole k16 steps");
  static_assert(kStagesQ >= 1 && kStagesQ <= 2 && kStagesDO >= 1 && kStagesDO <= 2,
                "1 or 2 stages");
  static_assert(2 * kBlockM <= kNThreads, "one thread per lse and per D element of a block");
  static_assert((kSmemRow / 8) % 2 == 1 && (kSmemRowP / 8) % 2 == 1,
                "padded rows must be an odd number of 16 B chunks");

  // The order in which the dQ warps add into dq_accum (the postprocess reads it back).
  using DqLayout = DqAccumLayout<Element, kHeadDim, kBlockM, kWarpsMdQ, kWarpsDdQ, kNThreads>;
};

// dQ tile of the deterministic path: one CTA owns kBlockM query rows (warp w: rows
// [w * kWarpRows, (w + 1) * kWarpRows)) and loops over key blocks of kBlockN, as the forward does.
// K and V have kStagesKV shared buffers.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kStagesKV_>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStagesKV = kStagesKV_;

  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;  // m16 tiles per warp
  static constexpr int kNTilesS = kBlockN / 8;    // n8 tiles of S, dP per m16 tile
  static constexpr int kNTilesD = kHeadDim / 8;   // n8 tiles of dQ per m16 tile

  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemRow = kHeadDim + 8;
  static constexpr int kSmemQ = kBlockM * kSmemRow;  // Q or dO
  static constexpr int kSmemK = kBlockN * kSmemRow;  // one K or V buffer
  // Layout: Q, dO, K x kStagesKV, V x kStagesKV.
  static constexpr size_t kSmemBytes =
      size_t(2 * kSmemQ + 2 * kStagesKV * kSmemK) * sizeof(Element);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket: multiple of 32, <= 256");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0, "kBlockN: whole k16 steps of dS K");
  static_assert(kStagesKV >= 1 && kStagesKV <= 2, "1 or 2 stages");
  static_assert((kSmemRow / 8) % 2 == 1, "padded row must be an odd number of 16 B chunks");
};

}  // namespace flashjit
