// bwd_dq_kernel.cuh: the dQ kernel of the backward's deterministic path, sm80 family (mma.sync):
// dQ = scale dS K without atomics, so that gradients are bitwise reproducible. The math is the
// dK/dV kernel's (bwd_dkdv_kernel.cuh); one CTA per query block loops over the key blocks of its
// band, recomputing P and dS in registers, as the forward does.
#pragma once

#include <cmath>

#include "common/dropout.cuh"
#include "common/fragment.cuh"
#include "common/padded_tile.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/variant.cuh"
#include "sm80/traits.cuh"
#include "sm80/warp_mma.cuh"

namespace flashjit {

// ---------------------------------------------------------------------------------------------
// dQ (deterministic path): one CTA per (query block, head, batch); K and V stream through
// kStagesKV buffers. S, dP and dS stay in registers: the C layout of two n8 tiles of dS is the A
// layout of one k16 step of dS K (as P in the forward's P V).
// ---------------------------------------------------------------------------------------------
template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kNWarps <= 4 ? 2 : 1)
    flash_bwd_dq_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim, kSmemRow = Traits::kSmemRow;
  constexpr int kMTiles = Traits::kMTiles, kNTilesS = Traits::kNTilesS;
  constexpr int kNTilesD = Traits::kNTilesD, kStagesKV = Traits::kStagesKV;
  constexpr int kElt = sizeof(Element);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_q = reinterpret_cast<Element*>(smem_raw);
  Element* smem_do = smem_q + Traits::kSmemQ;
  Element* smem_k = smem_do + Traits::kSmemQ;            // kStagesKV buffers
  Element* smem_v = smem_k + kStagesKV * Traits::kSmemK;  // kStagesKV buffers

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heavier (later) query blocks first
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  // This CTA's query block, pointers and key-block range (common/problem.cuh).
  const BwdQueryBlock<Element, V> tile(p, m_block, h, b, kBlockM, kBlockN);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int m0 = tile.m0, n_begin = tile.n_begin, n_end = tile.n_end;
  const VariantScores<V> scores(p, seq, b, h);  // the variant (common/variant.cuh)
  const Element *q = tile.q, *dout = tile.dout, *k = tile.k, *v = tile.v;
  Element* dq = tile.dq;
  const float *lse = tile.lse, *dsum = tile.dsum;
  const int rows_q = min(kBlockM, seq.seqlen_q - m0);

  if (n_end > n_begin) {
    const int n0 = n_begin * kBlockN;
    load_tile_async<Traits, kBlockM>(smem_addr(smem_q), q, p.q_row_stride, rows_q, p.head_dim, tid);
    load_tile_async<Traits, kBlockM>(smem_addr(smem_do), dout, p.do_row_stride, rows_q, p.head_dim,
                                     tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k + n0 * p.k_row_stride, p.k_row_stride,
                                     seq.seqlen_k - n0, p.head_dim, tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v + n0 * p.v_row_stride, p.v_row_stride,
                                     seq.seqlen_k - n0, p.head_dim, tid);
    cp_async_commit();
  }

  // This thread's rows: warp * kWarpRows + mt * 16 + half * 8 + g.
  const int warp_m = warp * Traits::kWarpRows;
  float ref[kMTiles][2], dsum_row[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m + mt * 16 + half * 8 + g;
      const bool valid = row < seq.seqlen_q;
      ref[mt][half] = lse_reference(valid ? lse[row] : 0.f, valid);
      dsum_row[mt][half] = valid ? dsum[row] : 0.f;
    }

  DropoutMask drop;
  if constexpr (V::kHasDropout) drop = DropoutMask(p.dropout, b, h, p.heads, p.seqlen_q, p.seqlen_k);

  const uint32_t a_off = (warp_m * kSmemRow + lane_offset_a(lane, kSmemRow)) * kElt;  // Q, dO
  const uint32_t bt_off = lane_offset_at(lane, kSmemRow) * kElt;  // K, V as B^T (S, dP)
  const uint32_t b_off = lane_offset_b(lane, kSmemRow) * kElt;    // K as B (dS K)

  float acc_dq[kMTiles][kNTilesD][4];  // dS K (scaled at the end)
  zero_fragments(acc_dq);

#pragma unroll 1
  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int n0 = n_block * kBlockN, it = n_block - n_begin;
    const uint32_t sk = smem_addr(smem_k) + (it % kStagesKV) * Traits::kSmemK * kElt;
    const uint32_t sv = smem_addr(smem_v) + (it % kStagesKV) * Traits::kSmemK * kElt;
    const bool has_next = n_block + 1 < n_end;
    cp_async_wait<0>();
    __syncthreads();  // K, V of this block are in shared memory; every warp is done with the last
    if constexpr (kStagesKV == 2) {
      if (has_next) {
        const int n_next = n0 + kBlockN;
        const uint32_t other = ((it + 1) % 2) * Traits::kSmemK * kElt;
        load_tile_async<Traits, kBlockN>(smem_addr(smem_k) + other, k + n_next * p.k_row_stride,
                                         p.k_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        load_tile_async<Traits, kBlockN>(smem_addr(smem_v) + other, v + n_next * p.v_row_stride,
                                         p.v_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        cp_async_commit();
      }
    }

    TileKeepBits<kMTiles, kNTilesS> keep;  // dropout, ahead of the register peak
    if constexpr (V::kHasDropout) keep.compute(drop, (m0 + warp_m) / 16, n0 / 8, g, t);

    // S = Q K^T, dP = dO V^T: (kWarpRows x kBlockN) per warp.
    float acc_s[kMTiles][kNTilesS][4], acc_dp[kMTiles][kNTilesS][4];
    zero_fragments(acc_s);
    zero_fragments(acc_dp);
    mma_ABt<Element, kMTiles, kNTilesS, kHeadDim, kSmemRow, kSmemRow>(
        acc_s, smem_addr(smem_q) + a_off, sk + bt_off);
    mma_ABt<Element, kMTiles, kNTilesS, kHeadDim, kSmemRow, kSmemRow>(
        acc_dp, smem_addr(smem_do) + a_off, sv + bt_off);

    // Scores -> logits (common/variant.cuh): softcap, ALiBi, -inf outside the band.
    scores.apply(acc_s, m0 + warp_m, n0, g, t, scores.mask_needed(m0, n0, kBlockM, kBlockN));

    // dS = P (dP Z - D), in place of dP.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        const uint32_t kept_bits = V::kHasDropout ? keep.get(mt, nt) : 0xfu;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = recompute_p<V::kBoundedLogits>(acc_s[mt][nt][e], scores.scale_log2(p),
                                                           ref[mt][e / 2]);
          float dpe = acc_dp[mt][nt][e];
          if constexpr (V::kHasDropout) dpe = (kept_bits >> e) & 1u ? dpe * p.dropout.inv_keep_prob : 0.f;
          acc_dp[mt][nt][e] = pe * (dpe - dsum_row[mt][e / 2]);
          if constexpr (V::kLogitGrad)  // with respect to the raw score: times dx/ds
            acc_dp[mt][nt][e] *= scores.dlogit(acc_s[mt][nt][e],
                                               m0 + warp_m + mt * 16 + (e / 2) * 8 + g,
                                               n0 + nt * 8 + 2 * t + (e % 2));
        }
      }

    // dQ += dS K: dS from registers (A), K (rows = keys) as B via ldmatrix.trans.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) pack_c_to_a<Element>(acc_dp[mt], ks, a[mt]);
#pragma unroll
      for (int np = 0; np < kNTilesD / 2; ++np) {
        uint32_t bk[4];  // keys ks*16 .. +15, d np*16 .. +15: two n8 tiles
        ldmatrix_x4_trans(bk, sk + b_off + (ks * 16 * kSmemRow + np * 16) * kElt);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_dq[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<Element>(acc_dq[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    if constexpr (kStagesKV == 1) {
      if (has_next) {
        const int n_next = n0 + kBlockN;
        __syncthreads();  // every warp is done with K and V
        load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k + n_next * p.k_row_stride,
                                         p.k_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v + n_next * p.v_row_stride,
                                         p.v_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        cp_async_commit();
      }
    }
  }

  // Epilogue: dQ = scale dS K. Each warp stages its own rows in its own rows of the Q tile (only it
  // ever read them), then writes them out with 16-byte stores.
  cp_async_wait<0>();
  store_fragments<Element, kMTiles, kNTilesD, kSmemRow>(smem_q, acc_dq, p.softmax_scale, warp_m, 0,
                                                        g, t);
  __syncwarp();
  constexpr int kWarpChunks = Traits::kWarpRows * Traits::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kWarpChunks, 32); ++i) {
    const int idx = i * 32 + lane;
    const int row = warp_m + idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if ((kWarpChunks % 32 == 0 || idx < kWarpChunks) && row < rows_q && col < p.head_dim) {
      *reinterpret_cast<uint4*>(dq + row * p.dq_row_stride + col) =
          *reinterpret_cast<const uint4*>(smem_q + row * kSmemRow + col);
    }
  }
}

}  // namespace flashjit
