// bwd_kernel.cuh: the dK/dV kernel of the backward, sm90 family (Hopper: wgmma). Device code
// only; bwd_launch.cuh has the grid and the tile choice, and launches the common preprocess and
// postprocess (common/bwd_preprocess.cuh, common/dq_accum.cuh) around this one.
//
// The FlashAttention-2 backward (the math: sm80/bwd_dkdv_kernel.cuh): one CTA per (key
// block of kBlockN = 128 keys, head, batch) keeps K, V and the dK, dV accumulators and loops over
// the query blocks of kBlockM rows that see its keys. Two warpgroups; warpgroup w owns keys
// [64 w, 64 w + 64) of the block. The scores are computed transposed (keys x queries), so that
// P^T and dS^T come out of the wgmma accumulators already in the A layout of the dV and dK
// products. Per query block, per warpgroup:
//   S^T = K Q^T, dP^T = V dO^T       (64 x kBlockM) wgmma, K/V and Q/dO from shared memory
//   P^T = exp2(S^T scale log2(e) - lse log2(e)),  dS^T = P^T (dP^T - D)     registers, fp32
//   dV += P^T dO, dK += dS^T Q       (64 x d) wgmma, A from registers, dO/Q MN-major in smem
//   dQ = dS K                        dS^T stored to shared memory and read back as an MN-major A,
//                                    K as an MN-major B; staged in shared memory and added to
//                                    dq_accum by one bulk reduction (below).
// dQ (kBlockM x d) needs the dS of all 128 keys, so both warpgroups meet at a barrier first and
// then split it: by query rows (64 each) when kBlockM = 128, by head-dim columns (64 each) when
// kBlockM = 64. All tiles but dQ's are 128-byte swizzled (smem_sw128.cuh).
// Head dims above 128 (buckets 160 and 192 run at 192 columns, 224 and 256 at 256): dK and dV of
// 128 keys would not fit two warpgroups' registers, so a CTA takes kBlockN = 64 keys and both
// warpgroups compute the same S^T and dP^T of them (the duplicated GEMMs are 2 of the 7 per
// block), and each keeps dK, dV and computes dQ for its part of the head-dim columns (kSplitCols
// below): at 256 128 columns each; at 192 warpgroup 0 has dK, dV of columns [0, 128) and dQ of
// [0, 64), warpgroup 1 dK, dV of [128, 192) and dQ of [64, 192), whole 64-column panels (an
// MN-major operand starts at a panel), with the GEMM work of the two within 10%.
// dQ goes to dq_accum through shared memory where the tile fits (Traits::kDqBulk: d 64-192):
// each thread stores its fragments there in dq_accum's own order (common/dq_accum.cuh), and
// after the next barrier thread 0 adds the whole (kBlockM x d) tile to dq_accum with one bulk
// reduction (cp.reduce.async.bulk .add.f32), which runs on the TMA engine while the CTA goes on;
// thread 0 waits for it to have read the tile before the barrier that precedes the next block's
// dQ stores (with two tiles, Traits::kDqDouble, block j stores into tile j % 2, and the wait for
// the reduction of block j - 2's dQ, the same tile, is at the top of block j). (Per-thread red.global.add of the fragments, as before, stalled the warps on the
// load/store queue: ~8% of the ncu warp samples at d 64 and 128.) Where the tile does not fit
// (d 256, with two Q/dO stages), the fragments are added with red.global.add as before.
// Dropout: the keep mask is the one of dropout.cuh, defined on the mma C layout of the untransposed
// scores (one Philox call per lane and m16 x n32 group of four n8 tiles). Each lane computes, for
// every tile its warp covers (kBlockM / 16 query tiles x 2 key tiles, half of a group), the call
// of the lane with its own index, and then fetches the bits of its transposed elements from the
// two lanes that hold them (two shuffles per word): twice the Philox cost per element of the
// untransposed kernels, whose warps use all four tiles of a call.
#pragma once

#include <type_traits>

#include "common/bulk_copy.cuh"
#include "common/dq_accum.cuh"
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

template <typename Element_, int kHeadDim_, int kBlockM_>
struct BwdSm90Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockM = kBlockM_;    // queries per block: the N of S^T and dP^T
  // d > 128: both warpgroups on the same 64 keys, dK, dV, dQ split by columns; else 128 keys per
  // CTA, 64 per warpgroup (wgmma M), each with dK, dV of all d columns.
  static constexpr bool kSplitCols = kHeadDim > 128;
  static constexpr int kBlockN = kSplitCols ? 64 : 128;  // keys per CTA
  static constexpr int kNThreads = 256;       // two warpgroups
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of a Q, K, V, dO row

  static constexpr int kNTilesS = kBlockM / 8;   // n8 tiles of S^T, dP^T (columns = queries)
  // dK, dV columns of warpgroup 0 (kDkvN) and 1 (kDkvN1): kSplitCols, columns [0, 128) and
  // [128, d) (at d 192 the halves are uneven: 128 and 64 columns; whole 64-column panels keep
  // every MN-major operand starting at a panel); else all d columns each.
  static constexpr int kDkvN = kSplitCols ? 128 : kHeadDim;
  static constexpr int kDkvN1 = kSplitCols ? kHeadDim - 128 : kHeadDim;
  static constexpr bool kUnevenCols = kDkvN1 != kDkvN;
  static constexpr int kNTilesD = kDkvN / 8;     // n8 tiles of dK, dV (warpgroup 0's, the most)
  // dQ split between the warpgroups: by rows (each 64 queries x d) or by columns, in 64-column
  // panels: kDqPanels0 to warpgroup 0, the rest to warpgroup 1 (d 192: 1 and 2, which evens out
  // the work of the uneven dK, dV halves); kDqN the most columns of one warpgroup.
  static constexpr bool kDqSplitRows = kBlockM == 128 && !kSplitCols;
  static constexpr int kDqPanels = kHeadDim / 64;
  static constexpr int kDqPanels0 = kDqSplitRows ? kDqPanels : kDqPanels / 2;
  static constexpr int kDqPanels1 = kDqSplitRows ? kDqPanels : kDqPanels - kDqPanels0;
  static constexpr int kDqN = 64 * (kDqPanels0 > kDqPanels1 ? kDqPanels0 : kDqPanels1);
  static constexpr int kNTilesDq = kDqN / 8;

  // Shared memory (bytes), each tile 1024-byte aligned: K, V (kBlockN x d), kStages x Q, kStages x
  // dO (kBlockM x d), dS^T (kBlockN x kBlockM), dQ (kBlockM x d fp32, dq_accum's fragment order),
  // then lse and D (kStages x kBlockM floats each).
  static constexpr int kStages = 2;
  static constexpr int kSmemKV = kBlockN * kHeadDim * 2;
  static constexpr int kSmemQ = kBlockM * kHeadDim * 2;
  static constexpr int kSmemDS = kBlockN * kBlockM * 2;
  static constexpr int kSmemAlign = 1024;  // slack to align the dynamic base
  static constexpr int kSmemLseDsum = 2 * kStages * kBlockM * sizeof(float);
  static constexpr int kSmemNoDq = 2 * kSmemKV + 2 * kStages * kSmemQ + kSmemDS + kSmemLseDsum;
  // The dQ tile where the opt-in limit (227 KB on sm_90) leaves room for it: d 64, 128 and 192.
  static constexpr bool kDqBulk = kSmemNoDq + kBlockM * kHeadDim * 4 + kSmemAlign <= 227 * 1024;
  static constexpr int kDqTile = kBlockM * kHeadDim * 4;  // bytes of one dQ tile
  // Two dQ tiles where they fit (d 64 and 128): block j stores into tile j % 2, so the bulk
  // reduction of block j - 1's tile has a whole block to read it, and thread 0 waits for that at
  // the top of the block, where it waits for its cp.async anyway (a .read wait elsewhere may also
  // wait for the thread's cp.async in flight: they share a scoreboard in SASS).
  static constexpr bool kDqDouble = kDqBulk && kSmemNoDq + 2 * kDqTile + kSmemAlign <= 227 * 1024;
  static constexpr int kSmemDq = kDqBulk ? (kDqDouble ? 2 : 1) * kDqTile : 0;
  static constexpr size_t kSmemBytes = size_t(kSmemNoDq + kSmemDq + kSmemAlign);

  // The dq_accum fragment order (common/dq_accum.cuh) of this kernel's dQ tile (or atomics),
  // which the postprocess reads back: warp tiles of 16 dQ rows x kDqWarpN columns, numbered along
  // the columns first (a warp's tile: the kDqN columns it computes, or at d 192 one 64-column
  // panel of them).
  static constexpr int kDqWarpN = kUnevenCols ? 64 : kDqN;
  using DqLayout = DqAccumLayout<Element, kHeadDim, kBlockM, kBlockM / 16, kHeadDim / kDqWarpN,
                                 kNThreads>;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 192 || kHeadDim == 256,
                "wgmma N of dK, dV: head-dim bucket 64 or 128, or 192, 256 split by columns");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory: the sm_90 opt-in limit");
  static_assert(kBlockM == 64 || kBlockM == 128, "wgmma N of S^T: kBlockM 64 or 128");
  static_assert(kDqN == 64 || kDqN == 128, "dQ columns per warpgroup: one or two 64-column panels");
  static_assert(kDqPanels0 > 0, "each warpgroup computes part of dQ");
  static_assert(!kSplitCols || kBlockM == 64, "dQ split by columns: 64 rows, one per warp tile");
  static_assert(DqLayout::kdQFragsPerWarp == kDqWarpN / 8 && DqLayout::kdQWarpD == kDqWarpN,
                "dq_accum fragment order of the postprocess");
};

// Keep bits of the dropout mask for a warp's transposed scores (keys x queries): after compute(),
// get(nt, e) is 1 iff element e of n8 tile nt of the thread's S^T accumulator is kept.
template <int kBlockM>
struct TransposedKeepBits {
  static constexpr int kTilesQ = kBlockM / 16;        // m16 tiles of queries
  using Bits = TileKeepBits<kTilesQ, 2>;              // x 2 n8 tiles of the warp's 16 keys
  uint32_t words[2][Bits::kWords];                    // the tiles' bits of lane 4 (2t + c) + g / 2

  // Queries from m0, the warp's keys from key0 (a multiple of 16), both within the sequence.
  __device__ __forceinline__ void compute(const DropoutMask& drop, int m0, int key0, int lane) {
    Bits own;  // this lane's Philox calls for every tile of the warp, as lane (lane / 4, lane % 4)
    own.compute(drop, m0 / 16, key0 / 8, lane / 4, lane % 4);
    // Element (query 8 nt + 2 t + c, key g + 8 h) of S^T is, untransposed, element
    // 2 (nt % 2) + g % 2 of lane (2 t + c, g / 2) of tile (nt / 2, h).
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int w = 0; w < Bits::kWords; ++w)
        words[c][w] = __shfl_sync(0xffffffffu, own.words[w], 4 * (2 * t + c) + g / 2);
    g_odd = g % 2;
  }
  __device__ __forceinline__ uint32_t get(int nt, int e) const {
    const int idx = (nt / 2) * 2 + e / 2;  // tile (query tile nt / 2, key tile h = e / 2)
    const int bit = 4 * (idx % 8) + 2 * (nt % 2) + g_odd;
    return (words[e % 2][idx / 8] >> bit) & 1u;
  }
  int g_odd;
};

template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dk_dv_sm90_kernel(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim, kStages = Traits::kStages;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesD = Traits::kNTilesD;
  constexpr int kNTilesDq = Traits::kNTilesDq;
  constexpr int kSmemQ = Traits::kSmemQ;

  // (The base is aligned up to 1024 bytes by hand.)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t smem_raw_addr = smem_addr(smem_raw);
  const uint32_t smem_k =
      (smem_raw_addr + Traits::kSmemAlign - 1) & ~uint32_t(Traits::kSmemAlign - 1);
  const uint32_t smem_v = smem_k + Traits::kSmemKV;
  const uint32_t smem_q = smem_v + Traits::kSmemKV;       // kStages buffers
  const uint32_t smem_do = smem_q + kStages * kSmemQ;     // kStages buffers
  const uint32_t smem_ds = smem_do + kStages * kSmemQ;    // dS^T
  const uint32_t smem_dq = smem_ds + Traits::kSmemDS;     // dQ, fp32
  const uint32_t smem_lse = smem_dq + Traits::kSmemDq;    // kStages x kBlockM floats
  const uint32_t smem_dsum = smem_lse + kStages * kBlockM * sizeof(float);
  auto generic = [&](uint32_t addr) { return smem_raw + (addr - smem_raw_addr); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Warpgroup: keys [64 wg, 64 wg + 64) of the block, or (kSplitCols) columns [128 wg, ...) of
  // dK, dV and its panels of dQ. Uneven halves branch on it around wgmma: read from lane 0, it is
  // warp-uniform to ptxas too, which otherwise serialises every wgmma of the kernel (C7520).
  const int wg = Traits::kUnevenCols ? __shfl_sync(0xffffffffu, warp / 4, 0) : warp / 4;
  const int g = lane / 4, t = lane % 4;  // accumulator row group and column pair
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  // This CTA's keys, query-block range and pointers (common/problem.cuh).
  const BwdKeyBlock<Element, V> tile(p, blockIdx.x, h, b, kBlockM, kBlockN, kHeadDim);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int n0 = tile.n0;
  const VariantScores<V> scores(p, seq, b, h);  // the variant (common/variant.cuh)
  constexpr bool kSplitCols = Traits::kSplitCols;
  // First key (row of S^T, dK, dV) of the warp.
  const int warp_row = (kSplitCols ? 0 : wg * 64) + (warp % 4) * 16;
  DropoutMask drop;
  if constexpr (V::kHasDropout) drop = DropoutMask(p.dropout, b, h, p.heads, p.seqlen_q, p.seqlen_k);

  float acc_dk[kNTilesD][4], acc_dv[kNTilesD][4];  // dS^T Q (scaled at the end), P^T dO
#pragma unroll
  for (int nt = 0; nt < kNTilesD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[nt][e] = acc_dv[nt][e] = 0.f;

  // cp.async of query block m_block (Q, dO, lse, D) into stage `stage`; the caller commits.
  auto load_query_block = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_sw128<Traits, kBlockM>(smem_q + stage * kSmemQ, tile.q + m0 * p.q_row_stride,
                                     p.q_row_stride, seq.seqlen_q - m0, p.head_dim, tid);
    load_tile_sw128<Traits, kBlockM>(smem_do + stage * kSmemQ, tile.dout + m0 * p.do_row_stride,
                                     p.do_row_stride, seq.seqlen_q - m0, p.head_dim, tid);
    load_lse_dsum(smem_lse + stage * kBlockM * 4, smem_dsum + stage * kBlockM * 4, tile.lse,
                  tile.dsum, m0, kBlockM, seq.seqlen_q, tid);
  };
  if (tile.m_begin < tile.m_end) {
    load_tile_sw128<Traits, kBlockN>(smem_k, tile.k, p.k_row_stride, seq.seqlen_k - n0,
                                     p.head_dim, tid);
    load_tile_sw128<Traits, kBlockN>(smem_v, tile.v, p.v_row_stride, seq.seqlen_k - n0,
                                     p.head_dim, tid);
    load_query_block(tile.m_begin, 0);
    cp_async_commit();
  }

  // Descriptors (common/wgmma.cuh); k16 step kk of the head dim: panel kk / 4, 32 bytes per step in it.
  //   K, V: this warpgroup's 64 keys, the A operand of S^T, dP^T (K-major).
  //   Q, dO (stage 0): the B operand of S^T, dP^T (K-major, N = queries), and of dK, dV (MN-major:
  //     K = queries, 16 per 2048 bytes; N = head dim, the next 64 columns one panel further).
  //   dQ: A = dS (M = queries, K = keys) from the dS^T tile (MN-major, 16 keys per 2048 bytes):
  //     this warpgroup's 64 queries (one panel) or all 64; B = K (K = keys, N = head dim, MN-major):
  //     all columns or this warpgroup's 64-column panel.
  //   kSplitCols: K, V all 64 keys for both; dK, dV's B (dO, Q) and dQ's B (K) start at the
  //     warpgroup's first column panel.
  const uint32_t key_off = kSplitCols ? 0 : wg * 64 * 128;
  const uint64_t desc_k = smem_desc_sw128(smem_k + key_off, 16, 1024);
  const uint64_t desc_v = smem_desc_sw128(smem_v + key_off, 16, 1024);
  const uint64_t desc_q_kmajor = smem_desc_sw128(smem_q, 16, 1024);
  const uint64_t desc_do_kmajor = smem_desc_sw128(smem_do, 16, 1024);
  const uint32_t dkv_col_off = kSplitCols ? wg * (Traits::kDkvN / 64) * kBlockM * 128 : 0;
  const uint64_t desc_q_mnmajor = smem_desc_sw128(smem_q + dkv_col_off, kBlockM * 128, 1024);
  const uint64_t desc_do_mnmajor = smem_desc_sw128(smem_do + dkv_col_off, kBlockM * 128, 1024);
  constexpr bool kDqSplitRows = Traits::kDqSplitRows;
  const uint64_t desc_ds =
      smem_desc_sw128(smem_ds + (kDqSplitRows ? wg * kBlockN * 128 : 0), kBlockN * 128, 1024);
  // (warpgroup 1's first dQ column panel: kDqPanels0)
  const uint64_t desc_k_dq = smem_desc_sw128(
      smem_k + (kDqSplitRows ? 0 : wg * (Traits::kDqPanels0 * kBlockN * 128)), kBlockN * 128, 1024);
  auto kstep_offset = [](int kk, int rows) { return (kk / 4) * rows * 128 + (kk % 4) * 32; };

  // This warp's first dQ fragment in dq_accum's order (Traits::DqLayout) and in the dQ tile, its
  // first dQ column and its dQ passes (64 columns each). Uneven (d 192): warp tiles of one panel,
  // numbered (row tile, panel) row-major; else of all the warpgroup's dQ columns.
  const int dq_frag0 =
      kDqSplitRows            ? warp * kNTilesDq
      : Traits::kUnevenCols   ? ((warp % 4) * Traits::kDqPanels + wg * Traits::kDqPanels0) * 8
                              : (2 * (warp % 4) + wg) * kNTilesDq;
  const int dq_col0 = kDqSplitRows ? 0 : wg * (Traits::kDqPanels0 * 64);
  const int dq_passes = wg == 0 ? Traits::kDqPanels0 : Traits::kDqPanels1;

  uint32_t p_frag[kBlockM / 16][4], ds_frag[kBlockM / 16][4];  // P^T, dS^T packed (A layout)
  // The dQ tile of the tile's block it (two: alternating).
  auto dq_tile_of = [&](int it) {
    return smem_dq + (Traits::kDqDouble ? (it % 2) * Traits::kDqTile : 0);
  };
#pragma unroll 1
  for (int m_block = tile.m_begin; m_block < tile.m_end; ++m_block) {
    const int it = m_block - tile.m_begin, stage = it % kStages;
    const int m0 = m_block * kBlockM;
    const uint32_t stage_off = stage * kSmemQ;  // descriptor advance to this block's Q, dO
    const bool dq_reducer = Traits::kDqBulk && !p.deterministic && tid == 0;
    const uint32_t dq_tile_addr = dq_tile_of(it);
    cp_async_wait<0>();
    // Two tiles: the reduction of this block's tile (block it - 2's dQ, issued at the top of the
    // previous block, the only one in flight) has read it; the barrier below orders that before
    // this block's dQ stores.
    if (Traits::kDqDouble && dq_reducer && it >= 2) bulk_wait_group_read<0>();
    fence_proxy_async_shared();  // this thread's cp.async writes -> visible to wgmma
    __syncthreads();  // the block's Q, dO, lse, D (and K, V) have landed; every warpgroup's wgmmas
                      // of the previous block (reading the other stage and dS^T) have completed
    if (m_block + 1 < tile.m_end) {
      load_query_block(m_block + 1, stage ^ 1);
      cp_async_commit();
    }
    // The previous block's dQ, stored before the barrier above, to dq_accum.
    if (dq_reducer && it > 0) {
      bulk_reduce_add_f32_s2g(tile.dq_accum + int64_t(m0 - kBlockM) * kHeadDim,
                              dq_tile_of(it - 1), Traits::kDqTile);
      bulk_commit_group();
    }

    TransposedKeepBits<kBlockM> keep;  // dropout, ahead of the register peak
    if constexpr (V::kHasDropout) keep.compute(drop, m0, n0 + warp_row, lane);

    // S^T = K Q^T and dP^T = V dO^T: (64 keys x kBlockM queries) per warpgroup, fp32, one
    // commit group each (A: K or V, B: Q or dO of this stage).
    float acc_s[kNTilesS][4], acc_dp[kNTilesS][4];
    auto issue_scores_t = [&](float(&acc)[kNTilesS][4], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        wgmma_ss<Element, kBlockM>(acc, desc_advance(desc_a, kstep_offset(kk, kBlockN)),
                                   desc_advance(desc_b, stage_off + kstep_offset(kk, kBlockM)),
                                   kk > 0);
      wgmma_commit();
    };
    wgmma_fence();
    issue_scores_t(acc_s, desc_k, desc_q_kmajor);
    issue_scores_t(acc_dp, desc_v, desc_do_kmajor);
    wgmma_wait<1>();  // S^T is done; dP^T may still run
    fence_registers(acc_s);

    // Scores -> logits (common/variant.cuh: softcap, ALiBi, -inf outside the band), then
    // P^T = exp2(S^T scale log2(e) - ref) with ref = lse log2(e) of the column's query (+inf for
    // a query past the sequence end or one that sees no key: P = 0).
    scores.apply_transposed(acc_s, n0 + warp_row, m0, g, t,
                            scores.mask_needed(m0, n0, kBlockM, kBlockN));
    const float* lse_s = reinterpret_cast<const float*>(generic(smem_lse)) + stage * kBlockM;
    const float* dsum_s = reinterpret_cast<const float*>(generic(smem_dsum)) + stage * kBlockM;
    auto column_refs = [&](int nt, float (&ref)[2]) {  // this thread's two queries: col, col + 1
      const int col = nt * 8 + 2 * t;
      const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + col);
      ref[0] = lse_reference(lse2.x, m0 + col < seq.seqlen_q);
      ref[1] = lse_reference(lse2.y, m0 + col + 1 < seq.seqlen_q);
    };
    // dS^T = P^T (dP^T Z - D) dx/ds, D per query column (0 past the sequence end), dx/ds the
    // softcap's derivative (1 without); with dropout mask Z (kept entries scaled by 1 / keep_prob),
    // P^T becomes P^T Z for dV.
    auto column_dsum = [&](int nt) {
      return *reinterpret_cast<const float2*>(dsum_s + nt * 8 + 2 * t);
    };
    auto ds_element = [&](int nt, int e, float pe, float dx, float2 dsum2) {
      const float dsum = e % 2 ? dsum2.y : dsum2.x;
      float dpe = acc_dp[nt][e];
      if constexpr (V::kHasDropout) {
        const bool kept = keep.get(nt, e);
        dpe = kept ? dpe * p.dropout.inv_keep_prob : 0.f;
        acc_s[nt][e] = kept ? pe * p.dropout.inv_keep_prob : 0.f;
      }
      acc_dp[nt][e] = V::kLogitGrad ? pe * (dpe - dsum) * dx : pe * (dpe - dsum);
    };
    if constexpr (!V::kLogitGrad) {  // P^T while dP^T may still run
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        float ref[2];
        column_refs(nt, ref);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc_s[nt][e] = recompute_p<V::kBoundedLogits>(acc_s[nt][e], scores.scale_log2(p),
                                                        ref[e % 2]);
      }
      wgmma_wait<0>();  // dP^T is done
      fence_registers(acc_dp);
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        const float2 dsum2 = column_dsum(nt);
#pragma unroll
        for (int e = 0; e < 4; ++e) ds_element(nt, e, acc_s[nt][e], 1.f, dsum2);
      }
    } else {  // dx/ds needs the logit, which P^T replaces: P^T and dS^T in one pass, after dP^T
      wgmma_wait<0>();
      fence_registers(acc_dp);
      for_each_score_transposed<kNTilesS>(
          n0 + warp_row, m0, g, t, [&](int nt, int e, int query, int key) {
            float ref[2];
            column_refs(nt, ref);
            const float x = acc_s[nt][e];
            acc_s[nt][e] = recompute_p<V::kBoundedLogits>(x, scores.scale_log2(p), ref[e % 2]);
            ds_element(nt, e, acc_s[nt][e], scores.dlogit(x, query, key), column_dsum(nt));
          });
    }
    // Pack P^T and dS^T: the D layout of n8 tiles 2 ks, 2 ks + 1 is the A layout of k16 step ks
    // (16 queries).
    pack_c_to_a<Element>(acc_s, p_frag);
    pack_c_to_a<Element>(acc_dp, ds_frag);

    // dV += P^T dO and dK += dS^T Q: A from registers, one wgmma per k16 step of queries.
    fence_registers(p_frag);
    fence_registers(ds_frag);
    fence_registers(acc_dv);
    fence_registers(acc_dk);
    // (d 192: warpgroup 1 has 64 columns, the first 8 n8 tiles of its accumulators; fence and
    // commit inside each branch, else ptxas injects a warpgroup.arrive, C7519.)
    auto issue_dkv = [&](auto& dv, auto& dk) {
      constexpr int kN = sizeof(dv) / sizeof(dv[0]) * 8;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBlockM / 16; ++ks)
        wgmma_rs<Element, kN>(dv, p_frag[ks],
                              desc_advance(desc_do_mnmajor, stage_off + ks * 16 * 128));
#pragma unroll
      for (int ks = 0; ks < kBlockM / 16; ++ks)
        wgmma_rs<Element, kN>(dk, ds_frag[ks],
                              desc_advance(desc_q_mnmajor, stage_off + ks * 16 * 128));
      wgmma_commit();
    };
    if (!Traits::kUnevenCols || wg == 0) {
      issue_dkv(acc_dv, acc_dk);
    } else {
      using Half = float[Traits::kDkvN1 / 8][4];
      issue_dkv(*reinterpret_cast<Half*>(&acc_dv[0]), *reinterpret_cast<Half*>(&acc_dk[0]));
    }

    if (!p.deterministic) {
      // dS^T to shared memory (keys x queries, swizzled) while dV, dK run: rows g, g + 8 of the
      // warp, columns 16 ks + 8 half + 2 t, straight from the packed A fragments (kSplitCols:
      // both warpgroups hold the same dS^T and each stores every other k16 step of it).
      unsigned char* ds_tile = generic(smem_ds);
#pragma unroll
      for (int ks = 0; ks < kBlockM / 16; ++ks)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (kSplitCols && ks % 2 != wg) continue;
          const int row = warp_row + (e % 2) * 8 + g, col = ks * 16 + (e / 2) * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(ds_tile + sw128_offset<kBlockN>(row, col)) = ds_frag[ks][e];
        }
      fence_proxy_async_shared();  // this thread's dS^T writes -> visible to wgmma
      // one tile: the previous dQ has left shared memory
      if (!Traits::kDqDouble && dq_reducer) bulk_wait_group_read<0>();
      __syncthreads();             // dS^T of all 128 keys is in shared memory; this block's dQ
                                   // tile is free

      // dQ = dS K over the block's 128 keys (unscaled; the postprocess scales), this warpgroup's
      // part, stored to the dQ tile for the bulk reduction into the query block's tile of
      // dq_accum. Rows past the sequence end add 0 to padding rows, and so do the columns >= d
      // (K's are zero-filled).
      // In passes of 64 columns (this warpgroup's dQ panels), each waited for and stored before
      // the next, so that only 64 columns of dQ are live next to dK and dV.
      constexpr int kDqPassN = 64;
      constexpr int kNTilesPass = kDqPassN / 8;
#pragma unroll
      for (int pass = 0; pass < Traits::kDqN / kDqPassN; ++pass) {
        if (Traits::kUnevenCols && pass >= dq_passes) break;
        float acc_dq[kNTilesPass][4];
        const uint64_t desc_k_pass = desc_advance(desc_k_dq, pass * kBlockN * 128);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks)
          wgmma_ss<Element, kDqPassN, true, true>(acc_dq, desc_advance(desc_ds, ks * 16 * 128),
                                                  desc_advance(desc_k_pass, ks * 16 * 128),
                                                  ks > 0);
        wgmma_commit();
        wgmma_wait<0>();  // dV, dK and this pass of dQ are done
        fence_registers(acc_dq);
        const int frag0 = dq_frag0 + pass * kNTilesPass;  // in dq_accum's order
        if constexpr (Traits::kDqBulk) {
          float* dq_tile = reinterpret_cast<float*>(generic(dq_tile_addr)) + frag0 * 128;
#pragma unroll
          for (int nt = 0; nt < kNTilesPass; ++nt)  // fragment nt: 128 floats, 4 per lane
            *reinterpret_cast<float4*>(dq_tile + nt * 128 + 4 * lane) =
                make_float4(acc_dq[nt][0], acc_dq[nt][1], acc_dq[nt][2], acc_dq[nt][3]);
        } else {  // straight to dq_accum (fp32 atomics), skipping the fragments of columns >= d
          float* accum = tile.dq_accum + int64_t(m0) * kHeadDim + frag0 * 128;
#pragma unroll
          for (int nt = 0; nt < kNTilesPass; ++nt)
            if (dq_col0 + (pass * kNTilesPass + nt) * 8 < p.head_dim)
              dq_accum_add(accum + nt * 128, lane, acc_dq[nt]);
        }
      }
    } else {
      wgmma_wait<0>();  // dV, dK are done (dQ: the deterministic dQ kernel)
    }
    fence_registers(acc_dv);
    fence_registers(acc_dk);
    fence_registers(p_frag);
    fence_registers(ds_frag);
  }

  // Epilogue: dK = scale dS^T Q and dV staged in the K and V tiles (every warpgroup is done with
  // them), then written out with 16-byte stores. Key rows past seqused_k (padding) get zeros.
  // The last block's dQ goes to dq_accum meanwhile (its stores made visible to the bulk
  // reduction by the fence and the barrier).
  fence_proxy_async_shared();
  __syncthreads();
  const bool dq_reducer =
      Traits::kDqBulk && !p.deterministic && tid == 0 && tile.m_begin < tile.m_end;
  if (dq_reducer) {
    bulk_reduce_add_f32_s2g(tile.dq_accum + int64_t(tile.m_end - 1) * kBlockM * kHeadDim,
                            dq_tile_of(tile.m_end - 1 - tile.m_begin), Traits::kDqTile);
    bulk_commit_group();
  }
  unsigned char* dk_tile = generic(smem_k);
  unsigned char* dv_tile = generic(smem_v);
#pragma unroll
  for (int nt = 0; nt < kNTilesD; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (Traits::kUnevenCols && wg == 1 && nt >= Traits::kDkvN1 / 8) continue;
      const int col = (kSplitCols ? wg * Traits::kDkvN : 0) + nt * 8 + 2 * t;
      const uint32_t off = sw128_offset<kBlockN>(warp_row + half * 8 + g, col);
      *reinterpret_cast<uint32_t*>(dk_tile + off) =
          pack2<Element>(acc_dk[nt][2 * half] * p.softmax_scale,
                         acc_dk[nt][2 * half + 1] * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(dv_tile + off) =
          pack2<Element>(acc_dv[nt][2 * half], acc_dv[nt][2 * half + 1]);
    }
  __syncthreads();
  store_tile_sw128<Traits, kBlockN>(tile.dk, p.dk_row_stride, dk_tile, seq.rows_k - n0,
                                    p.head_dim, tid);
  store_tile_sw128<Traits, kBlockN>(tile.dv, p.dv_row_stride, dv_tile, seq.rows_k - n0,
                                    p.head_dim, tid);
  if (dq_reducer) bulk_wait_group<0>();  // done before the CTA's shared memory goes
#else
  __trap();  // compiled for an arch without wgmma: the launcher never selects this kernel there
#endif
}

}  // namespace flashjit
