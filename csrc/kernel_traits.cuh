// kernel_traits.cuh: tile shapes of the sm80-family (mma.sync) attention kernels.
//
// One traits struct per tile configuration; everything else (thread counts, fragment counts,
// shared-memory size) is derived here and checked with static_assert.
#pragma once

#include <cstddef>

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

}  // namespace flashjit
