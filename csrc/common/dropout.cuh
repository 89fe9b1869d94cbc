// dropout.cuh: the dropout keep mask, one definition for the forward, the backward and the test
// kernel (flashjit/_philox.py is its CPU reference).
//
// Randomness: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// key = (lo32(seed), hi32(seed)), one call per lane and m16 x n32 group of four m16 x n8 tiles:
// 16 elements, 8 random bits each. Element (b, h, i, j) (b: batch index or varlen sequence, h:
// query head, i/j: query/key index inside the sequence) is in group (i16, j32) = (i / 16, j / 32),
// n8 tile w = (j % 32) / 8 of it and, in the mma C layout, lane (g, t) = (i % 8, (j % 8) / 2),
// element e = ((i % 16) / 8) * 2 + j % 2 of that lane's fragment (see ptx.cuh). Per group
//   subseq  = ((b * heads + h) * ceil(max_seqlen_q / 16) + i16) * ceil(max_seqlen_k / 32) + j32
//             + offset                                                             (mod 2^64)
//   counter = (g * 4 + t, 0, lo32(subseq), hi32(subseq))
// and byte e of word w of philox4x32_10(key, counter) keeps the element iff byte <= threshold,
// threshold = round(256 (1 - p)) - 1 clamped to [0, 255]: the kept fraction is
// keep = (threshold + 1) / 256, dropout_p at a resolution of 1/256, and kept values are scaled by
// 1 / keep, so that the output stays unbiased (binding_utils.h). The forward applies the scale
// after P V, not to P: P Z (Z the 0/1 mask) goes into P V and the epilogue multiplies O by
// 1 / (l keep). So a P of 1 (a row that sees one key) stays exact in 16 bits, and the backward's
// D = rowsum(dO O) differs from its dP Z / keep by the rounding of O alone (rounding P / keep to
// 16 bits added up to 0.5 ulp of 1 / keep: dq's error on short rows). The backward's dV product
// takes P Z / keep (moving that scale too costs the sm90 backward registers). One attention call
// consumes
//   batch * heads * ceil(max_seqlen_q / 16) * ceil(max_seqlen_k / 32)
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

// Bits 0-3 of the result: bytes 0-3 of `word` are <= threshold (each byte repeated in `thr4`).
__device__ __forceinline__ uint32_t keep_nibble(uint32_t word, uint32_t thr4) {
  // 0xff per byte kept, then one bit per byte (byte b -> bit b), summed into the top byte
  const uint32_t kept = __vcmpleu4(word, thr4) & 0x08040201u;
  return (kept * 0x01010101u) >> 24;
}

// The keep mask of one (batch, head): built once per CTA (reads seed and offset from the device),
// then queried per m16 x n32 group (or per m16 x n8 tile, one group's call for a quarter of it).
struct DropoutMask {
  uint2 key;            // (lo32(seed), hi32(seed))
  uint64_t tile_base;   // (b * heads + h) * ceil(max_seqlen_q / 16): the first m16 tile row
  uint64_t offset;      // generator offset, in counters
  uint32_t n32_groups;  // ceil(max_seqlen_k / 32)
  uint32_t thr4;        // the keep threshold (a byte <= it is kept) in each of the 4 bytes

  DropoutMask() = default;  // unused placeholder in kernels compiled without dropout
  __device__ DropoutMask(const DropoutParams& p, int b, int h, int heads, int max_seqlen_q,
                         int max_seqlen_k) {
    const uint64_t seed = static_cast<uint64_t>(p.rng_state[0]);
    offset = static_cast<uint64_t>(p.rng_state[1]);
    key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    tile_base = (static_cast<uint64_t>(b) * heads + h) *
                static_cast<uint64_t>((max_seqlen_q + 15) / 16);
    n32_groups = static_cast<uint32_t>((max_seqlen_k + 31) / 32);
    thr4 = (p.keep_threshold & 0xffu) * 0x01010101u;
  }

  // Keep bits of lane (g, t) in group (i16, j32): bit 4 w + e set iff element e of n8 tile w of
  // the group (tile j8 = 4 j32 + w) is kept, e = half * 2 + (column & 1) as in the mma C layout
  // (d0, d1 row g; d2, d3 row g + 8).
  __device__ __forceinline__ uint32_t group_bits(int i16, int j32, int g, int t) const {
    const uint64_t subseq = (tile_base + static_cast<uint64_t>(i16)) * n32_groups +
                            static_cast<uint64_t>(j32) + offset;
    const uint4 r = philox4x32_10(
        key, make_uint4(static_cast<uint32_t>(g * 4 + t), 0u, static_cast<uint32_t>(subseq),
                        static_cast<uint32_t>(subseq >> 32)));
    return keep_nibble(r.x, thr4) | keep_nibble(r.y, thr4) << 4 | keep_nibble(r.z, thr4) << 8 |
           keep_nibble(r.w, thr4) << 12;
  }

  // Keep bits of lane (g, t)'s fragment of the one n8 tile (i16, j8) (bit e: element e). A whole
  // call for a quarter of it: for probes; kernels take groups (apply, TileKeepBits).
  __device__ __forceinline__ uint32_t keep_bits(int i16, int j8, int g, int t) const {
    return (group_bits(i16, j8 / 4, g, t) >> (4 * (j8 % 4))) & 0xfu;
  }

  // acc[e] = kept ? acc[e] : 0 for the 4 bits of `bits` (bit e: element e): the forward's P Z;
  // its 1 / keep comes after P V (see the top of this file).
  __device__ __forceinline__ void apply_bits(float (&acc)[4], uint32_t bits) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = (bits >> e) & 1u ? acc[e] : 0.f;
  }

  // Dropout on kNTiles consecutive n8 tiles (j8 .. j8 + kNTiles - 1) of m16 row tile i16, lane
  // (g, t)'s C fragments: one Philox call per 4 tiles (j8 a multiple of 4 when kNTiles is one of
  // 4, of 2 when kNTiles is 2).
  template <int kNTiles>
  __device__ __forceinline__ void apply(float (&acc)[kNTiles][4], int i16, int j8, int g,
                                        int t) const {
    if constexpr (kNTiles % 4 == 0) {
#pragma unroll
      for (int q = 0; q < kNTiles / 4; ++q) {
        const uint32_t bits = group_bits(i16, j8 / 4 + q, g, t);
#pragma unroll
        for (int w = 0; w < 4; ++w) apply_bits(acc[4 * q + w], bits >> (4 * w));
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) apply_bits(acc[nt], keep_bits(i16, j8 + nt, g, t));
    }
  }
};

// Keep bits of a warp tile of kMTiles x kNTiles m16 x n8 tiles (first tile (i16, j8); j8 a
// multiple of 4 when kNTiles is one of 4, of 2 when kNTiles is 2), packed 4 per tile: tile
// (mt, nt) at bits 4 (mt kNTiles + nt) of the words. Computing them ahead, while few registers
// are live, keeps Philox's temporaries out of the register peak of the products.
template <int kMTiles, int kNTiles>
struct TileKeepBits {
  static constexpr int kWords = (kMTiles * kNTiles * 4 + 31) / 32;
  uint32_t words[kWords];

  __device__ __forceinline__ void compute(const DropoutMask& drop, int i16, int j8, int g, int t) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = 0u;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      if constexpr (kNTiles % 4 == 0) {  // one call per 4 tiles, 16 bits at once
#pragma unroll
        for (int q = 0; q < kNTiles / 4; ++q) {
          const int idx = mt * kNTiles + 4 * q;  // a multiple of 4: 16 bits within one word
          words[idx / 8] |= drop.group_bits(i16 + mt, j8 / 4 + q, g, t) << (4 * (idx % 8));
        }
      } else if constexpr (kNTiles == 2) {  // half of one call: tiles j8 % 4, j8 % 4 + 1
        const int idx = mt * 2;
        const uint32_t bits = drop.group_bits(i16 + mt, j8 / 4, g, t) >> (4 * (j8 % 4));
        words[idx / 8] |= (bits & 0xffu) << (4 * (idx % 8));
      } else {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int idx = mt * kNTiles + nt;
          words[idx / 8] |= drop.keep_bits(i16 + mt, j8 + nt, g, t) << (4 * (idx % 8));
        }
      }
    }
  }
  // Bit e: element e of tile (mt, nt)'s C fragment is kept.
  __device__ __forceinline__ uint32_t get(int mt, int nt) const {
    const int idx = mt * kNTiles + nt;
    return (words[idx / 8] >> (4 * (idx % 8))) & 0xfu;
  }
};

}  // namespace flashjit
