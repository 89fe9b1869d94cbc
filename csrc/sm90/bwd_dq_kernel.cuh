// bwd_dq_kernel.cuh: the dQ kernel of the backward's deterministic path, sm90 family (Hopper:
// wgmma): dQ = scale dS K without atomics, so that gradients are bitwise reproducible. The math is
// the dK/dV kernel's (sm80/bwd_dkdv_kernel.cuh); the loop is the forward's (fwd_kernel.cuh).
//
// One CTA = one (query block of kBlockM = 64 * kNWarpGroups rows, head, batch); warpgroup w owns
// query rows [64 w, 64 w + 64). Q and dO stay in shared memory; K and V stream through two stages,
// filled by cp.async one key block ahead, or at d 256 (where two stages do not fit) through one,
// refilled once every warpgroup is done with it. Per key block of the band, per warpgroup:
//   S = Q K^T, dP = dO V^T            (64 x kBlockN) wgmma, both operands from shared memory
//   P = exp2(x scale log2(e) - lse),  dS = P (dP Z - D) dx/ds      registers, fp32 (x: the logit
//                                      of the variant, common/variant.cuh)
//   dQ += dS K                        (64 x d) wgmma, dS from registers (its D layout is the A
//                                      layout), K as an MN-major B from the same shared tile
//                                      (d 192, 256: wgmma of 128 and 64 or 128 columns)
// All tiles are 128-byte swizzled (smem_sw128.cuh).
#pragma once

#include <cmath>

#include "common/dropout.cuh"
#include "common/fragment.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/variant.cuh"
#include "common/wgmma.cuh"
#include "common/smem_sw128.cuh"

namespace flashjit {

template <typename Element_, int kHeadDim_, int kBlockN_, int kNWarpGroups_, int kKVStages_ = 2>
struct BwdDqSm90Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockN = kBlockN_;    // keys per block: the N of S, dP
  static constexpr int kNWarpGroups = kNWarpGroups_;
  static constexpr int kBlockM = 64 * kNWarpGroups;
  static constexpr int kNThreads = 128 * kNWarpGroups;
  static constexpr int kNTilesS = kBlockN / 8;   // n8 tiles of S, dP per thread's rows
  static constexpr int kNTilesD = kHeadDim / 8;  // n8 tiles of dQ
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kKVStages = kKVStages_;

  // Shared memory (bytes), each tile 1024-byte aligned: Q, dO (kBlockM x d), then kKVStages stages
  // of K and kKVStages of V (kBlockN x d).
  static constexpr int kSmemQ = kBlockM * kHeadDim * 2;
  static constexpr int kSmemKV = kBlockN * kHeadDim * 2;
  static constexpr int kSmemAlign = 1024;
  static constexpr size_t kSmemBytes = size_t(2 * kSmemQ + 2 * kKVStages * kSmemKV + kSmemAlign);

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 192 || kHeadDim == 256,
                "wgmma N of dS K: head-dim bucket 64, 128, 192 or 256 (wgmma_rs_panels)");
  static_assert(kKVStages == 1 || kKVStages == 2, "K/V stages");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory: the sm_90 opt-in limit");
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma N of S: kBlockN 64 or 128");
};

template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dq_sm90_kernel(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesD = Traits::kNTilesD;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem_raw_addr = smem_addr(smem_raw);
  const uint32_t smem_q =
      (smem_raw_addr + Traits::kSmemAlign - 1) & ~uint32_t(Traits::kSmemAlign - 1);
  const uint32_t smem_do = smem_q + Traits::kSmemQ;
  constexpr int kKVStages = Traits::kKVStages;
  const uint32_t smem_k = smem_do + Traits::kSmemQ;               // kKVStages stages
  const uint32_t smem_v = smem_k + kKVStages * Traits::kSmemKV;   // kKVStages stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4;
  const int g = lane / 4, t = lane % 4;
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  // This CTA's query block, pointers and key-block range (common/problem.cuh), heavier (later)
  // query blocks first.
  const BwdQueryBlock<Element, V> tile(p, gridDim.x - 1 - blockIdx.x, hb.h, hb.b, kBlockM,
                                       kBlockN);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int m0 = tile.m0, n_begin = tile.n_begin, n_blocks = tile.n_end - tile.n_begin;
  const VariantScores<V> scores(p, seq, hb.b, hb.h);  // the variant (common/variant.cuh)
  const int rows_q = min(kBlockM, seq.seqlen_q - m0);
  const int warp_row = wg * 64 + (warp % 4) * 16;  // first row of this warp in the block

  // K, V of iteration `it` (key block n_begin + it) into stage it % kKVStages; the caller commits.
  auto load_kv = [&](int it) {
    const int n0 = (n_begin + it) * kBlockN;
    const uint32_t off = (it % kKVStages) * Traits::kSmemKV;
    load_tile_sw128<Traits, kBlockN>(smem_k + off, tile.k + n0 * p.k_row_stride, p.k_row_stride,
                                     seq.seqlen_k - n0, p.head_dim, tid);
    load_tile_sw128<Traits, kBlockN>(smem_v + off, tile.v + n0 * p.v_row_stride, p.v_row_stride,
                                     seq.seqlen_k - n0, p.head_dim, tid);
  };
  if (n_blocks > 0) {
    load_tile_sw128<Traits, kBlockM>(smem_q, tile.q, p.q_row_stride, rows_q, p.head_dim, tid);
    load_tile_sw128<Traits, kBlockM>(smem_do, tile.dout, p.do_row_stride, rows_q, p.head_dim, tid);
    load_kv(0);
    cp_async_commit();
  }

  // lse reference and D of this thread's rows warp_row + g, + 8 (softmax.cuh: lse_reference).
  float ref[2], dsum_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = m0 + warp_row + half * 8 + g;
    const bool valid = row < seq.seqlen_q;
    ref[half] = lse_reference(valid ? tile.lse[row] : 0.f, valid);
    dsum_row[half] = valid ? tile.dsum[row] : 0.f;
  }
  DropoutMask drop;
  if constexpr (V::kHasDropout)
    drop = DropoutMask(p.dropout, hb.b, hb.h, p.heads, p.seqlen_q, p.seqlen_k);

  // Descriptors (common/wgmma.cuh); k16 step kk of the head dim: panel kk / 4, 32 bytes per step in it.
  //   Q, dO: this warpgroup's 64 rows, the A operand of S, dP (K-major).
  //   K, V (stage 0): the B operand of S, dP (K-major, N = keys); K also the B operand of dS K
  //     (MN-major: K = keys, 16 per 2048 bytes; N = head dim, the next 64 columns one panel on).
  const uint64_t desc_q = smem_desc_sw128(smem_q + wg * 64 * 128, 16, 1024);
  const uint64_t desc_do = smem_desc_sw128(smem_do + wg * 64 * 128, 16, 1024);
  const uint64_t desc_k = smem_desc_sw128(smem_k, 16, 1024);
  const uint64_t desc_v = smem_desc_sw128(smem_v, 16, 1024);
  const uint64_t desc_k_mn = smem_desc_sw128(smem_k, kBlockN * 128, 1024);
  auto kstep_offset = [](int kk, int rows) { return (kk / 4) * rows * 128 + (kk % 4) * 32; };

  float acc_dq[kNTilesD][4];  // dS K (scaled at the end)
#pragma unroll
  for (int nt = 0; nt < kNTilesD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[nt][e] = 0.f;

#pragma unroll 1
  for (int it = 0; it < n_blocks; ++it) {
    const int n0 = (n_begin + it) * kBlockN;
    const uint32_t stage_off = (it % kKVStages) * Traits::kSmemKV;
    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's cp.async writes -> visible to wgmma
    __syncthreads();  // K, V of this block (and Q, dO) have landed; every warpgroup's wgmmas of
                      // the previous block (on the other stage) have completed
    if (kKVStages == 2 && it + 1 < n_blocks) {
      load_kv(it + 1);
      cp_async_commit();
    }

    TileKeepBits<1, kNTilesS> keep;  // dropout, ahead of the register peak
    if constexpr (V::kHasDropout) keep.compute(drop, (m0 + warp_row) / 16, n0 / 8, g, t);

    // S = Q K^T and dP = dO V^T: (64 x kBlockN) per warpgroup, fp32.
    float acc_s[1][kNTilesS][4], acc_dp[1][kNTilesS][4];
    fence_registers(acc_dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockN>(acc_s[0], desc_advance(desc_q, kstep_offset(kk, kBlockM)),
                                 desc_advance(desc_k, stage_off + kstep_offset(kk, kBlockN)),
                                 kk > 0);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockN>(acc_dp[0], desc_advance(desc_do, kstep_offset(kk, kBlockM)),
                                 desc_advance(desc_v, stage_off + kstep_offset(kk, kBlockN)),
                                 kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(acc_s[0]);
    fence_registers(acc_dp[0]);

    // Scores -> logits (softcap, ALiBi, -inf outside the band), then dS = P (dP Z - D) dx/ds,
    // packed as the A operand of dS K: the D layout of n8 tiles 2 ks, 2 ks + 1 is the A layout of
    // k16 step ks.
    scores.apply(acc_s, m0 + warp_row, n0, g, t, scores.mask_needed(m0, n0, kBlockM, kBlockN));
    for_each_score<1, kNTilesS>(m0 + warp_row, n0, g, t, [&](int, int nt, int e, int i, int j) {
      const float x = acc_s[0][nt][e];
      const float pe = recompute_p<V::kBoundedLogits>(x, scores.scale_log2(p), ref[e / 2]);
      float dpe = acc_dp[0][nt][e];
      if constexpr (V::kHasDropout)
        dpe = (keep.get(0, nt) >> e) & 1u ? dpe * p.dropout.inv_keep_prob : 0.f;
      float ds = pe * (dpe - dsum_row[e / 2]);
      if constexpr (V::kLogitGrad) ds *= scores.dlogit(x, i, j);
      acc_dp[0][nt][e] = ds;
    });
    uint32_t ds_frag[kBlockN / 16][4];
    pack_c_to_a<Element>(acc_dp[0], ds_frag);

    // dQ += dS K: one wgmma per k16 step of keys (16 keys = 2048 bytes of the K stage).
    fence_registers(ds_frag);
    fence_registers(acc_dq);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
      wgmma_rs_panels<Element, kHeadDim>(acc_dq, ds_frag[ks],
                                         desc_advance(desc_k_mn, stage_off + ks * 16 * 128),
                                         kBlockN * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(acc_dq);
    fence_registers(ds_frag);
    if (kKVStages == 1 && it + 1 < n_blocks) {  // one stage: refill it once both are done with it
      __syncthreads();
      load_kv(it + 1);
      cp_async_commit();
    }
  }

  // Epilogue: dQ = scale dS K. Each warp stages its own 16 rows in its rows of the Q tile (only
  // its warpgroup's wgmma read them, and those have completed), then writes them out with 16-byte
  // stores.
  unsigned char* smem_q_ptr = smem_raw + (smem_q - smem_raw_addr);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = warp_row + half * 8 + g;
#pragma unroll
    for (int nt = 0; nt < kNTilesD; ++nt)
      *reinterpret_cast<uint32_t*>(smem_q_ptr + sw128_offset<kBlockM>(row, nt * 8 + 2 * t)) =
          pack2<Element>(acc_dq[nt][2 * half] * p.softmax_scale,
                         acc_dq[nt][2 * half + 1] * p.softmax_scale);
  }
  __syncwarp();
  store_warp_rows_sw128<Traits, kBlockM>(tile.dq, p.dq_row_stride, smem_q_ptr, warp_row, rows_q,
                                         p.head_dim, lane);
#else
  __trap();  // compiled for an arch without wgmma: the launcher never selects this kernel there
#endif
}

}  // namespace flashjit
