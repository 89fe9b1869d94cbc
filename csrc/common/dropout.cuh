// dropout.cuh: the dropout keep mask, one definition for the forward, the backward and the test
// kernel (flashjit/_philox.py is its CPU reference).
//
// Randomness: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// key = (lo32(seed), hi32(seed)). Element (b, h, i, j) (b: batch index or varlen sequence, h: query
// head, i/j: query/key index inside the sequence) belongs to the m16 x n8 tile (i16, j8) =
// (i / 16, j / 8) and, in the mma C layout, to lane (g, t) = (i % 8, (j % 8) / 2), element
// e = ((i % 16) / 8) * 2 + j % 2 of that lane's fragment (see ptx.cuh). Per tile
//   subseq  = ((b * heads + h) * ceil(max_seqlen_q / 16) + i16) * ceil(max_seqlen_k / 8) + j8
//             + offset                                                             (mod 2^64)
//   counter = (g * 4 + t, 0, lo32(subseq), hi32(subseq))
// and word e of philox4x32_10(key, counter) keeps element e iff word < keep_threshold. So one
// Philox call gives one lane's 4 elements of one tile, and one attention call consumes
//   batch * heads * ceil(max_seqlen_q / 16) * ceil(max_seqlen_k / 8)
// counters (subseq values): the caller advances the generator's offset by at least that.
#pragma once

#include <cstdint>

#include "common/params.h"

namespace flashjit {

// Philox4x32 with 10 rounds. A round: (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2),
// hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key is bumped by the Weyl constants between rounds.
__device__ __forceinline__ uint4 philox4x32_10(uint2 key, uint4 counter) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key bumps
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.x += kW0;
      key.y += kW1;
    }
    const uint32_t hi0 = __umulhi(kM0, counter.x), lo0 = kM0 * counter.x;
    const uint32_t hi1 = __umulhi(kM1, counter.z), lo1 = kM1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
  }
  return counter;
}

// The keep mask of one (batch, head): built once per CTA (reads seed and offset from the device),
// then queried per m16 x n8 tile.
struct DropoutMask {
  uint2 key;            // (lo32(seed), hi32(seed))
  uint64_t tile_base;   // (b * heads + h) * ceil(max_seqlen_q / 16): the first m16 tile row
  uint64_t offset;      // generator offset, in counters
  uint32_t n8_tiles;    // ceil(max_seqlen_k / 8)
  uint32_t threshold;   // keep iff word < threshold
  float inv_keep_prob;  // kept values are scaled by 1 / (1 - p)

  DropoutMask() = default;  // unused placeholder in kernels compiled without dropout
  __device__ DropoutMask(const DropoutParams& p, int b, int h, int heads, int max_seqlen_q,
                         int max_seqlen_k) {
    const uint64_t seed = static_cast<uint64_t>(p.rng_state[0]);
    offset = static_cast<uint64_t>(p.rng_state[1]);
    key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    tile_base = (static_cast<uint64_t>(b) * heads + h) *
                static_cast<uint64_t>((max_seqlen_q + 15) / 16);
    n8_tiles = static_cast<uint32_t>((max_seqlen_k + 7) / 8);
    threshold = p.keep_threshold;
    inv_keep_prob = p.inv_keep_prob;
  }

  // Keep bits of lane (g, t)'s fragment of tile (i16, j8): bit e set iff element e is kept, with
  // e = half * 2 + (column & 1) as in the mma C layout (d0, d1 row g; d2, d3 row g + 8).
  __device__ __forceinline__ uint32_t keep_bits(int i16, int j8, int g, int t) const {
    const uint64_t subseq = (tile_base + static_cast<uint64_t>(i16)) * n8_tiles +
                            static_cast<uint64_t>(j8) + offset;
    const uint4 r = philox4x32_10(
        key, make_uint4(static_cast<uint32_t>(g * 4 + t), 0u, static_cast<uint32_t>(subseq),
                        static_cast<uint32_t>(subseq >> 32)));
    return uint32_t(r.x < threshold) | uint32_t(r.y < threshold) << 1 |
           uint32_t(r.z < threshold) << 2 | uint32_t(r.w < threshold) << 3;
  }

  // acc[e] = kept ? acc[e] / (1 - p) : 0, for lane (g, t)'s C fragment of tile (i16, j8).
  __device__ __forceinline__ void apply(float (&acc)[4], int i16, int j8, int g, int t) const {
    const uint32_t bits = keep_bits(i16, j8, g, t);
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = (bits >> e) & 1u ? acc[e] * inv_keep_prob : 0.f;
  }
};

// Keep bits of a warp tile of kMTiles x kNTiles m16 x n8 tiles (first tile (i16, j8)), packed 4
// per tile: tile (mt, nt) at bits 4 (mt kNTiles + nt) of the words. Computing them ahead, while
// few registers are live, keeps Philox's temporaries out of the register peak of the products.
template <int kMTiles, int kNTiles>
struct TileKeepBits {
  static constexpr int kWords = (kMTiles * kNTiles * 4 + 31) / 32;
  uint32_t words[kWords];

  __device__ __forceinline__ void compute(const DropoutMask& drop, int i16, int j8, int g, int t) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = 0u;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int idx = mt * kNTiles + nt;
        words[idx / 8] |= drop.keep_bits(i16 + mt, j8 + nt, g, t) << (4 * (idx % 8));
      }
  }
  // Bit e: element e of tile (mt, nt)'s C fragment is kept.
  __device__ __forceinline__ uint32_t get(int mt, int nt) const {
    const int idx = mt * kNTiles + nt;
    return (words[idx / 8] >> (4 * (idx % 8))) & 0xfu;
  }
};

}  // namespace flashjit
