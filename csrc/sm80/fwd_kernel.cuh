// fwd_kernel.cuh: the forward FlashAttention kernel, sm80 family (mma.sync, ldmatrix, cp.async).
// Device code only; fwd_launch.cuh has the grid and the tile choice, fwd.cu the instantiation a
// JIT spec asks for.
//
// One CTA = one (query block of kBlockM rows, head, batch). Q stays in shared memory; K and V
// tiles of kBlockN keys stream through two shared stages, the cp.async load of block j-1
// overlapping all the work on block j (S = Q K^T, softmax, O += P V); paged K/V are loaded row
// by row through the page table (common/problem.cuh).
// Online softmax in fp32 (per row: running max m, running sum l), evaluated with exp2 on
// scores pre-multiplied by scale * log2(e); lse = (m * scale * log2(e) + log2(l)) * ln(2).
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

namespace flashjit {

template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSM)
    flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim, kSmemRow = Traits::kSmemRow;
  constexpr int kMTiles = Traits::kMTiles, kNTilesS = Traits::kNTilesS;
  constexpr int kNTilesO = Traits::kNTilesO;
  constexpr int kElt = sizeof(Element);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_q = reinterpret_cast<Element*>(smem_raw);
  Element* smem_k = smem_q + Traits::kSmemQ;
  Element* smem_v = smem_k + Traits::kStages * Traits::kSmemK;  // after both K stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
  // This CTA's query block, sequence, pointers and key-block range (common/problem.cuh).
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const FwdQueryBlock<Element, V> tile(p, hb, kBlockM, kBlockN);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int m0 = tile.m0, n_begin = tile.n_begin, n_end = tile.n_end;
  const VariantScores<V> scores(p, seq, tile.b, tile.h);  // the variant (common/variant.cuh)
  const Element *q = tile.q, *k = tile.k, *v = tile.v;

  // Per-thread accumulators. Thread (g, t) of a warp holds, for m16 tile mt, rows
  // r(mt, half) = warp * kWarpRows + mt * 16 + half * 8 + g and columns 2t, 2t+1 of each n8 tile.
  float acc_o[kMTiles][kNTilesO][4];  // O (kWarpRows x kHeadDim), unnormalised
  float row_max[kMTiles][2];          // m: running max of raw scores (-inf: nothing seen yet)
  float row_sum[kMTiles][2];          // l: this thread's partial sum of exp2(...) over its columns
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  DropoutMask dropout = V::kHasDropout
                            ? DropoutMask(p.dropout, tile.b, tile.h, p.heads, p.seqlen_q, p.seqlen_k)
                            : DropoutMask();
  const int rows_q = min(kBlockM, seq.seqlen_q - m0);
  // K/V tile n_block -> shared buffer `stage` (one cp.async group with the caller's commit).
  // Paged K/V (V::kPagedKV): each key row through the page table (FwdQueryBlock::k_rows,
  // v_rows; rows of pages outside the cache and past seqlen_k are zeros).
  auto load_kv = [&](int n_block, int stage) {
    const int n0 = n_block * kBlockN;
    if constexpr (V::kPagedKV) {
      load_rows_async<Traits, kBlockN>(smem_addr(smem_k + stage * Traits::kSmemK),
                                       tile.k_rows(p, n0), seq.seqlen_k - n0, p.head_dim, tid);
      load_rows_async<Traits, kBlockN>(smem_addr(smem_v + stage * Traits::kSmemV),
                                       tile.v_rows(p, n0), seq.seqlen_k - n0, p.head_dim, tid);
    } else {
      load_tile_async<Traits, kBlockN>(smem_addr(smem_k + stage * Traits::kSmemK),
                                       k + n0 * p.k_row_stride, p.k_row_stride, seq.seqlen_k - n0,
                                       p.head_dim, tid);
      load_tile_async<Traits, kBlockN>(smem_addr(smem_v + stage * Traits::kSmemV),
                                       v + n0 * p.v_row_stride, p.v_row_stride, seq.seqlen_k - n0,
                                       p.head_dim, tid);
    }
  };
  if (n_end > n_begin) {
    load_tile_async<Traits, kBlockM>(smem_addr(smem_q), q, p.q_row_stride, rows_q, p.head_dim, tid);
    load_kv(n_end - 1, 0);
    cp_async_commit();
  }

  // Per-lane ldmatrix addresses (bytes), see ptx.cuh for the fragment layouts.
  //   Q (A operand, row-major): lane supplies row (lane & 15), column block (lane >> 4) * 8.
  //   K (B operand, K rows are the n index): key (lane >> 4) * 8 + (lane & 7), d ((lane >> 3) & 1) * 8.
  //   V (B operand via .trans): key ((lane >> 3) & 1) * 8 + (lane & 7), d (lane >> 4) * 8.
  const uint32_t q_lane = smem_addr(smem_q) +
                          ((warp * Traits::kWarpRows + (lane & 15)) * kSmemRow + (lane >> 4) * 8) * kElt;
  const uint32_t k_lane0 = smem_addr(smem_k) +
                           (((lane >> 4) * 8 + (lane & 7)) * kSmemRow + ((lane >> 3) & 1) * 8) * kElt;
  const uint32_t v_lane0 = smem_addr(smem_v) +
                           ((((lane >> 3) & 1) * 8 + (lane & 7)) * kSmemRow + (lane >> 4) * 8) * kElt;

  // Key blocks of the band from the last to the first (the masked ones come first). Pipeline, one
  // barrier per block: K/V[n_block] were requested one block earlier; right after the barrier,
  // K/V[n_block-1] are requested into the other stage and land while this block computes.
  for (int n_block = n_end - 1, stage = 0; n_block >= n_begin; --n_block, stage ^= 1) {
    const int n0 = n_block * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K/V[n_block] (and Q) are in shared memory; every warp is done with the
                      // other stage, read during the previous block
    if (n_block > n_begin) {
      load_kv(n_block - 1, stage ^ 1);
      cp_async_commit();
    }
    const uint32_t k_lane = k_lane0 + stage * Traits::kSmemK * kElt;
    const uint32_t v_lane = v_lane0 + stage * Traits::kSmemV * kElt;

    // S = Q K^T, (kWarpRows x kBlockN) per warp, fp32.
    float acc_s[kMTiles][kNTilesS][4];
    zero_fragments(acc_s);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ldmatrix_x4(a[mt], q_lane + (mt * 16 * kSmemRow + kk * 16) * kElt);
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bk[4];  // keys np*16 .. +15, d kk*16 .. +15: two n8 tiles
        ldmatrix_x4(bk, k_lane + (np * 16 * kSmemRow + kk * 16) * kElt);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<Element>(acc_s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Scores -> logits (common/variant.cuh): softcap, ALiBi, and -inf for keys outside the band
    // or past the sequence end.
    scores.apply(acc_s, m0 + warp * Traits::kWarpRows, n0, g, t,
                 scores.mask_needed(m0, n0, kBlockM, kBlockN));

    // Online softmax (common/softmax.cuh): S becomes P, O and the row statistics are rescaled.
    online_softmax_step(acc_s, acc_o, row_max, row_sum, scores.scale_log2(p));

    // Dropout (after the row sums: l normalises the undropped P): P = P * mask / keep.
    if constexpr (V::kHasDropout) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        dropout.apply(acc_s[mt], (m0 + warp * Traits::kWarpRows + mt * 16) / 16, n0 / 8, g, t);
    }

    // O += P V: P (kWarpRows x kBlockN) from registers as the A operand, V (kBlockN x kHeadDim).
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[kMTiles][4];  // the C layout of two n8 tiles of S is the A layout of one k16 step
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) pack_c_to_a<Element>(acc_s[mt], ks, a[mt]);
#pragma unroll
      for (int np = 0; np < kHeadDim / 16; ++np) {
        uint32_t bv[4];  // keys ks*16 .. +15, d np*16 .. +15: two n8 tiles
        ldmatrix_x4_trans(bv, v_lane + (ks * 16 * kSmemRow + np * 16) * kElt);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_o[mt][2 * np], a[mt], bv[0], bv[1]);
          mma_16816<Element>(acc_o[mt][2 * np + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  Element* o = tile.out(p);  // output pointers computed only now: registers are scarce in the loop
  float* lse = tile.lse(p);

  // Epilogue: O /= l and lse (finish_row, with the sink's term where the variant has one). A row
  // that saw no key: O = 0, lse = -inf (the sink's logit with a sink).
  // Each warp stages its own rows of O in its own rows of the Q tile (only it ever read them), then
  // writes them out with 16-byte stores. With p.o_residual, the rounding residual of O (pack_out)
  // is staged at the same rows of the K/V tiles, free once every warp is past its last P V.
  const bool residual = p.o_residual != nullptr;
  static_assert(2 * Traits::kStages * Traits::kSmemK >= Traits::kSmemQ, "residual staging fits");
  Element* smem_r = smem_k;
  if (residual) __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const RowResult res =
          V::kHasSink ? finish_row(row_max[mt][half], row_sum[mt][half], scores.scale_log2(p),
                                   scores.sink_log2)
                      : finish_row(row_max[mt][half], row_sum[mt][half], scores.scale_log2(p));
      const int row = warp * Traits::kWarpRows + mt * 16 + half * 8 + g;
      // O = (P Z) V / (l keep) with dropout (common/dropout.cuh: the 1 / keep is applied here)
      const float inv_l = V::kHasDropout ? res.inv_l * p.dropout.inv_keep_prob : res.inv_l;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        const float x = acc_o[mt][nt][2 * half] * inv_l;
        const float y = acc_o[mt][nt][2 * half + 1] * inv_l;
        const int offset = row * kSmemRow + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(smem_q + offset) = pack_out<Element>(x, y, 0);
        if (residual) *reinterpret_cast<uint32_t*>(smem_r + offset) = pack_out<Element>(x, y, 1);
      }
      if (t == 0 && row < rows_q) lse[row] = res.lse_log2;
    }
  __syncwarp();
  Element* o_res = residual ? static_cast<Element*>(p.o_residual) + (o - static_cast<Element*>(p.o))
                            : nullptr;
  constexpr int kWarpChunks = Traits::kWarpRows * Traits::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kWarpChunks, 32); ++i) {
    const int idx = i * 32 + lane;
    const int row = warp * Traits::kWarpRows + idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if ((kWarpChunks % 32 == 0 || idx < kWarpChunks) && row < rows_q && col < p.head_dim) {
      *reinterpret_cast<uint4*>(o + row * p.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(smem_q + row * kSmemRow + col);
      if (residual)
        *reinterpret_cast<uint4*>(o_res + row * p.o_row_stride + col) =
            *reinterpret_cast<const uint4*>(smem_r + row * kSmemRow + col);
    }
  }
}

}  // namespace flashjit
