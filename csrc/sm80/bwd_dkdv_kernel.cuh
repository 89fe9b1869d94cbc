// bwd_dkdv_kernel.cuh: the dK/dV kernel of the backward (FlashAttention-2 algorithm), sm80 family
// (mma.sync, ldmatrix, cp.async). Device code only; bwd_launch.cuh has the grids, the tile choice
// and the other kernels of the backward around it.
//
// With P = exp(scale S - lse) (S = Q K^T as logits of the variant, common/variant.cuh), dropout
// mask Z (kept entries scaled by 1 / keep_prob, Z = 1 without dropout) and
// D_i = rowsum(dO_i * O_i) = rowsum(P_i * Z_i * dP_i):
//   dV = (P * Z)^T dO,  dP = dO V^T,  dS = P * (dP * Z - D) * dx/ds,  dK = scale dS^T Q,
//   dQ = scale dS K    (dx/ds: the softcap's derivative, 1 without one).
// One CTA per (key block, head, batch) keeps K, V and the dK, dV accumulators, and loops over the
// query blocks that see its keys, recomputing P from lse. dS and P go through shared memory (the
// dK, dV products need them transposed). Atomic path: also dQ += dS K with fp32 atomics into the
// accumulator (common/dq_accum.cuh), turned into dQ by the postprocess.
// Rows that see no key have lse = -inf; they get P = 0 (their exp2 reference is +inf) and so
// contribute nothing.
#pragma once

#include <cmath>
#include <cstddef>

#include "common/dq_accum.cuh"
#include "common/dropout.cuh"
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
// dK, dV (and the atomic dQ accumulation): one CTA per (key block, head, batch).
// ---------------------------------------------------------------------------------------------
template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dk_dv_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kSmemRow = Traits::kSmemRow, kSmemRowP = Traits::kSmemRowP;
  constexpr int kStagesQ = Traits::kStagesQ, kStagesDO = Traits::kStagesDO;
  constexpr int kSdPMTiles = Traits::kSdPMTiles, kSdPNTiles = Traits::kSdPNTiles;
  constexpr int kdKVMTiles = Traits::kdKVMTiles, kdKVNTiles = Traits::kdKVNTiles;
  constexpr int kdQMTiles = Traits::kdQMTiles, kdQNTiles = Traits::kdQNTiles;
  constexpr int kElt = sizeof(Element);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_k = reinterpret_cast<Element*>(smem_raw);
  Element* smem_v = smem_k + Traits::kSmemK;
  Element* smem_q = smem_v + Traits::kSmemK;             // kStagesQ buffers
  Element* smem_do = smem_q + kStagesQ * Traits::kSmemQ;  // kStagesDO buffers
  Element* smem_p = smem_do + kStagesDO * Traits::kSmemQ;
  Element* smem_ds = smem_p + Traits::kSmemP;
  float* smem_lse = reinterpret_cast<float*>(smem_raw + Traits::kSmemElementBytes);  // kStagesQ
  float* smem_dsum = smem_lse + kStagesQ * kBlockM;                                  // kStagesQ

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  // This CTA's keys, query-block range and pointers (common/problem.cuh).
  const BwdKeyBlock<Element, V> tile(p, blockIdx.x, h, b, kBlockM, kBlockN, kHeadDim);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int n0 = tile.n0;
  const int m_begin = tile.m_begin, m_blocks = tile.m_end;
  const VariantScores<V> scores(p, seq, b, h);  // the variant (common/variant.cuh)
  const Element *q = tile.q, *dout = tile.dout, *k = tile.k, *v = tile.v;
  const float *lse = tile.lse, *dsum = tile.dsum;
  float* dq_accum = tile.dq_accum;

  float acc_dk[kdKVMTiles][kdKVNTiles][4];  // dS^T Q (scaled at the end)
  float acc_dv[kdKVMTiles][kdKVNTiles][4];  // (P Z)^T dO
  zero_fragments(acc_dk);
  zero_fragments(acc_dv);

  // cp.async loads of query block m_block into stage `stage`: Q with its lse and D rows, and dO.
  auto load_q = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_async<Traits, kBlockM>(smem_addr(smem_q) + stage * Traits::kSmemQ * kElt,
                                     q + m0 * p.q_row_stride, p.q_row_stride, seq.seqlen_q - m0,
                                     p.head_dim, tid);
    load_lse_dsum(smem_addr(smem_lse + stage * kBlockM), smem_addr(smem_dsum + stage * kBlockM),
                  lse, dsum, m0, kBlockM, seq.seqlen_q, tid);
  };
  auto load_do = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_async<Traits, kBlockM>(smem_addr(smem_do) + stage * Traits::kSmemQ * kElt,
                                     dout + m0 * p.do_row_stride, p.do_row_stride,
                                     seq.seqlen_q - m0, p.head_dim, tid);
  };

  const int rows_kv = seq.seqlen_k - n0;  // keys of this block that exist (rest zero-filled)
  if (m_begin < m_blocks) {
    load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k, p.k_row_stride, rows_kv, p.head_dim,
                                     tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v, p.v_row_stride, rows_kv, p.head_dim,
                                     tid);
    load_q(m_begin, 0);
    load_do(m_begin, 0);
    cp_async_commit();
  }

  // Warp tiles of the three product shapes (see BwdTraits) and the per-lane ldmatrix offsets.
  const int sdp_m = (warp / Traits::kWarpsNSdP) * Traits::kSdPWarpM;  // S, dP: first query row
  const int sdp_n = (warp % Traits::kWarpsNSdP) * Traits::kSdPWarpN;  //        first key
  const int dkv_n = (warp / Traits::kWarpsDdKV) * Traits::kdKVWarpN;  // dK, dV: first key
  const int dkv_d = (warp % Traits::kWarpsDdKV) * Traits::kdKVWarpD;  //         first column
  const int dq_m = (warp / Traits::kWarpsDdQ) * Traits::kdQWarpM;     // dQ: first query row
  const int dq_d = (warp % Traits::kWarpsDdQ) * Traits::kdQWarpD;     //     first column
  // S = Q K^T, dP = dO V^T: A = Q, dO rows; B^T = K, V rows.
  const uint32_t sdp_a = (sdp_m * kSmemRow + lane_offset_a(lane, kSmemRow)) * kElt;
  const uint32_t sdp_b = (sdp_n * kSmemRow + lane_offset_at(lane, kSmemRow)) * kElt;
  // dV = (P Z)^T dO, dK = dS^T Q: A^T = P, dS (rows = queries); B = dO, Q (rows = queries).
  const uint32_t dkv_a = (dkv_n + lane_offset_at(lane, kSmemRowP)) * kElt;
  const uint32_t dkv_b = (dkv_d + lane_offset_b(lane, kSmemRow)) * kElt;
  // dQ = dS K: A = dS rows; B = K (rows = keys).
  const uint32_t dq_a = (dq_m * kSmemRowP + lane_offset_a(lane, kSmemRowP)) * kElt;
  const uint32_t dq_b = (dq_d + lane_offset_b(lane, kSmemRow)) * kElt;

  DropoutMask drop;
  if constexpr (V::kHasDropout) drop = DropoutMask(p.dropout, b, h, p.heads, p.seqlen_q, p.seqlen_k);

#pragma unroll 1
  for (int m_block = m_begin; m_block < m_blocks; ++m_block) {
    const int it = m_block - m_begin;
    const int m0 = m_block * kBlockM;
    const bool has_next = m_block + 1 < m_blocks;
    const int stage_q = it % kStagesQ;
    const uint32_t sq = smem_addr(smem_q) + stage_q * Traits::kSmemQ * kElt;
    const uint32_t sdo = smem_addr(smem_do) + (it % kStagesDO) * Traits::kSmemQ * kElt;

    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) have landed; every warp is done with the last block
    if (has_next) {   // prefetch the double-buffered tiles of the next query block
      if constexpr (kStagesQ == 2) load_q(m_block + 1, (it + 1) % 2);
      if constexpr (kStagesDO == 2) load_do(m_block + 1, (it + 1) % 2);
      cp_async_commit();
    }

    // lse reference and D of this thread's rows of S: sdp_m + mt * 16 + half * 8 + g.
    float ref[kSdPMTiles][2], dsum_row[kSdPMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kSdPMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = sdp_m + mt * 16 + half * 8 + g;
        const bool valid = m0 + row < seq.seqlen_q;
        ref[mt][half] = lse_reference(smem_lse[stage_q * kBlockM + row], valid);
        dsum_row[mt][half] = valid ? smem_dsum[stage_q * kBlockM + row] : 0.f;
      }

    TileKeepBits<kSdPMTiles, kSdPNTiles> keep;  // dropout, ahead of the register peak
    if constexpr (V::kHasDropout) keep.compute(drop, (m0 + sdp_m) / 16, (n0 + sdp_n) / 8, g, t);

    // S = Q K^T and dP = dO V^T, (kSdPWarpM x kSdPWarpN) per warp.
    float acc_s[kSdPMTiles][kSdPNTiles][4], acc_dp[kSdPMTiles][kSdPNTiles][4];
    zero_fragments(acc_s);
    zero_fragments(acc_dp);
    mma_ABt<Element, kSdPMTiles, kSdPNTiles, kHeadDim, kSmemRow, kSmemRow>(
        acc_s, sq + sdp_a, smem_addr(smem_k) + sdp_b);
    mma_ABt<Element, kSdPMTiles, kSdPNTiles, kHeadDim, kSmemRow, kSmemRow>(
        acc_dp, sdo + sdp_a, smem_addr(smem_v) + sdp_b);

    // Scores -> logits (common/variant.cuh): softcap, ALiBi, -inf outside the band.
    scores.apply(acc_s, m0 + sdp_m, n0 + sdp_n, g, t,
                 scores.mask_needed(m0, n0, kBlockM, kBlockN));

    // P = exp2(S scale log2(e) - lse log2(e)); dS = P (dP Z - D). P Z and dS go to shared memory.
#pragma unroll
    for (int mt = 0; mt < kSdPMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kSdPNTiles; ++nt) {
        const uint32_t kept_bits = V::kHasDropout ? keep.get(mt, nt) : 0xfu;  // bit e: e is kept
        float pz[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = recompute_p<V::kBoundedLogits>(acc_s[mt][nt][e], scores.scale_log2(p),
                                                           ref[mt][e / 2]);
          float dpe = acc_dp[mt][nt][e];
          pz[e] = pe;
          if constexpr (V::kHasDropout) {
            const bool kept = (kept_bits >> e) & 1u;
            pz[e] = kept ? pe * p.dropout.inv_keep_prob : 0.f;
            dpe = kept ? dpe * p.dropout.inv_keep_prob : 0.f;
          }
          ds[e] = pe * (dpe - dsum_row[mt][e / 2]);
          if constexpr (V::kLogitGrad)  // dS with respect to the raw score: times dx/ds
            ds[e] *= scores.dlogit(acc_s[mt][nt][e], m0 + sdp_m + mt * 16 + (e / 2) * 8 + g,
                                   n0 + sdp_n + nt * 8 + 2 * t + (e % 2));
        }
        const int row = sdp_m + mt * 16 + g, col = sdp_n + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(smem_p + row * kSmemRowP + col) = pack2<Element>(pz[0], pz[1]);
        *reinterpret_cast<uint32_t*>(smem_p + (row + 8) * kSmemRowP + col) =
            pack2<Element>(pz[2], pz[3]);
        *reinterpret_cast<uint32_t*>(smem_ds + row * kSmemRowP + col) =
            pack2<Element>(ds[0], ds[1]);
        *reinterpret_cast<uint32_t*>(smem_ds + (row + 8) * kSmemRowP + col) =
            pack2<Element>(ds[2], ds[3]);
      }
    __syncthreads();  // P Z and dS of the whole block are in shared memory

    // dV += (P Z)^T dO and dK += dS^T Q, (kdKVWarpN x kdKVWarpD) per warp.
    mma_AtB<Element, kdKVMTiles, kdKVNTiles, kBlockM, kSmemRowP, kSmemRow>(
        acc_dv, smem_addr(smem_p) + dkv_a, sdo + dkv_b);
    mma_AtB<Element, kdKVMTiles, kdKVNTiles, kBlockM, kSmemRowP, kSmemRow>(
        acc_dk, smem_addr(smem_ds) + dkv_a, sq + dkv_b);

    if constexpr (kStagesQ == 1 || kStagesDO == 1) {
      if (has_next) {  // the single-buffered tiles of the next query block, now that all are done
        __syncthreads();
        if constexpr (kStagesQ == 1) load_q(m_block + 1, 0);
        if constexpr (kStagesDO == 1) load_do(m_block + 1, 0);
        cp_async_commit();
      }
    }

    // dQ += dS K (unscaled), (kdQWarpM x kdQWarpD) per warp, added to the query block's tile of
    // dq_accum (fragment order, see dq_accum_add) with fp32 atomics. Rows past the sequence end add
    // 0 to padding rows; fragments of columns >= d are skipped.
    if (!p.deterministic) {
      float acc_dq[kdQMTiles][kdQNTiles][4];
      zero_fragments(acc_dq);
      mma_AB<Element, kdQMTiles, kdQNTiles, kBlockN, kSmemRowP, kSmemRow>(
          acc_dq, smem_addr(smem_ds) + dq_a, smem_addr(smem_k) + dq_b);
      float* accum = dq_accum + int64_t(m0) * kHeadDim + warp * Traits::kdQFragsPerWarp * 128;
#pragma unroll
      for (int mt = 0; mt < kdQMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kdQNTiles; ++nt)
          if (dq_d + nt * 8 < p.head_dim)
            dq_accum_add(accum + (mt * kdQNTiles + nt) * 128, lane, acc_dq[mt][nt]);
    }
  }

  // Epilogue: dK = scale dS^T Q and dV staged in the K and V tiles (every warp is done with them),
  // then written out with 16-byte stores. Keys past seqused_k (padding) get zeros.
  cp_async_wait<0>();
  __syncthreads();
  store_fragments<Element, kdKVMTiles, kdKVNTiles, kSmemRow>(smem_k, acc_dk, p.softmax_scale, dkv_n,
                                                             dkv_d, g, t);
  store_fragments<Element, kdKVMTiles, kdKVNTiles, kSmemRow>(smem_v, acc_dv, 1.f, dkv_n, dkv_d, g,
                                                             t);
  __syncthreads();
  store_tile<Traits, kBlockN>(tile.dk, p.dk_row_stride, smem_k, seq.rows_k - n0, p.head_dim, tid);
  store_tile<Traits, kBlockN>(tile.dv, p.dv_row_stride, smem_v, seq.rows_k - n0, p.head_dim, tid);
}

}  // namespace flashjit
