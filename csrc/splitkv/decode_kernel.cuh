// decode_kernel.cuh: attention of a few queries against a KV cache (decoding, speculative
// decoding, chunked prefill), split-KV family (mma.sync, ldmatrix, cp.async). Device code only;
// launch.cuh has the grid, combine_kernel.cuh the merge of the splits.
//
// Decoding reads every K/V byte once per step and does little math on it, so the kernel is
// built for bandwidth:
//   * GQA packing: the group = heads / heads_k query heads of one K/V head share the CTA, as
//     rows of one 16-row tile (packed row r = query r / group of head hk * group + r % group), so
//     each K/V byte is read once per group, not once per query head;
//   * split-KV: the key blocks of a sequence are cut into num_splits ranges, one CTA each, so
//     that small batches still fill the GPU; each writes a normalised partial O and its lse;
//   * decoding: the CTA's 4 warps share 16 rows and take a quarter of each 64-key block each,
//     with their own online softmax, merged at the end through shared memory; chunked prefill
//     (many rows): 64-row tiles, a warp per 16 rows (DecodeTraits);
//   * K/V blocks stream through kStages shared buffers, rows resolved one by one through the
//     cache's addressing (problem.cuh: CacheRows, contiguous or paged): 16-byte cp.async chunks,
//     or on sm90+ when decoding with 3 stages one bulk copy per row (DecodeTraits::kBulk).
// Online softmax as the other families (softmax.cuh): exp2 of scores pre-multiplied by
// scale * log2(e); lse in log2 units (params.h).
#pragma once

#include <cmath>

#include "common/bulk_copy.cuh"
#include "common/fragment.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/variant.cuh"

namespace flashjit {

// Warps in a kWarpsM x kWarpsN grid over (rows, keys): warp (wm, wn) owns the 16 packed rows
// [16 wm, 16 wm + 16) and the keys [kWarpN wn, kWarpN (wn + 1)) of each block. Decoding (a few
// rows): 1 x 4, the warps split the keys and merge at the end; chunked prefill (many rows): 4 x 1,
// the FlashAttention-2 split, no merge. kStages K/V buffers: 3 where shared memory allows (d <=
// 128 on sm80/sm90), else 2 (launch.cuh picks by the device's per-block limit).
template <typename Element_, int kHeadDim_, int kWarpsM_, int kWarpsN_, int kStages_,
          int kBlockN_ = 64, bool kBulk_ = false>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kNWarps = kWarpsM * kWarpsN, kNThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16 * kWarpsM;        // packed rows per CTA
  static constexpr int kBlockN = kBlockN_;            // keys per block
  static constexpr int kWarpN = kBlockN / kWarpsN;    // keys per warp per block
  static constexpr int kNTilesS = kWarpN / 8;         // n8 tiles of a warp's S
  static constexpr int kStages = kStages_;
  // K/V rows by bulk copies where the device code is for sm90+ (one cp.async.bulk per row,
  // completing on a per-stage mbarrier) instead of 16-byte cp.async chunks: on the H200 4% more
  // bandwidth with 3 stages, less with 2 (results/h200/logs/sweep_tiles_bulk.log).
  static constexpr bool kBulk = kBulk_;
  static constexpr int kMinBlocksPerSM = kHeadDim > 128 ? 1 : 2;
  static constexpr int kNTilesO = kHeadDim / 8;       // n8 tiles of O
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of a row
  static constexpr int kSmemRow = kHeadDim + 8;       // padded row (elements): see traits.cuh
  static constexpr int kSmemQ = kBlockM * kSmemRow;
  static constexpr int kSmemKV = kBlockN * kSmemRow;  // one K or V block
  static constexpr size_t kSmemBytes =
      size_t(kSmemQ + 2 * kStages * kSmemKV) * sizeof(Element);
  // The epilogue's fp32 partial outputs of the warps (kWarpsN x kBlockM x kHeadDim) reuse the
  // K/V buffers.
  static_assert(size_t(kWarpsN) * kBlockM * kHeadDim * 4 <= 2 * kStages * kSmemKV * sizeof(Element),
                "the warps' partial outputs fit in the K/V buffers");
  static_assert((kSmemRow / 8) % 2 == 1, "padded row: an odd number of 16 B chunks");
  static_assert(kBlockN * kChunksPerRow % kNThreads == 0, "whole K/V block chunks per thread");
  static_assert(kWarpN % 16 == 0 && kNWarps == 4, "whole k16 steps per warp; 4 warps");
  static_assert(kStages >= 2, "the pipeline requests a block kStages - 1 >= 1 blocks ahead");
  static_assert(!kBulk || (2 * kBlockN) % kNThreads == 0, "bulk: whole K/V rows per thread");
};

// This CTA's rows and key blocks. Grid: x = m_block * num_splits + split (m_block: kBlockM packed
// rows), y/z = (K/V head, batch) pairs (attention_grid).
struct DecodeTile {
  int b, hk, group, rows;  // rows: packed rows of (b, hk) = seqlen_q * group
  int r0, split;
  int i_first, i_rows;     // the queries of this tile's rows: [i_first, i_first + i_rows)
  int blk_begin, blk_end;  // this split's key blocks
  __device__ DecodeTile(const DecodeParams& dp, const GridHeadBatch& hb, int block_m)
      : b(hb.b), hk(hb.h) {
    const FwdParams& p = dp.fwd;
    group = p.heads / p.heads_k;
    rows = p.seqlen_q * group;
    split = blockIdx.x % dp.num_splits;
    r0 = (blockIdx.x / dp.num_splits) * block_m;
    i_first = r0 / group;
    i_rows = (min(r0 + block_m, rows) - 1) / group - i_first + 1;
  }
};

template <typename Traits, typename V>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSM)
    flash_decode_kernel(const __grid_constant__ DecodeParams dp) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim, kSmemRow = Traits::kSmemRow;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  constexpr int kWarpsN = Traits::kWarpsN, kWarpN = Traits::kWarpN;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;
  constexpr int kChunks = Traits::kChunksPerRow, kElt = sizeof(Element);
  const FwdParams& p = dp.fwd;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kBulk = Traits::kBulk;
#else
  constexpr bool kBulk = false;  // no bulk copies below sm90: the same tile with cp.async
#endif

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_q = reinterpret_cast<Element*>(smem_raw);
  Element* smem_k = smem_q + Traits::kSmemQ;             // kStages K blocks
  Element* smem_v = smem_k + kStages * Traits::kSmemKV;  // kStages V blocks
  __shared__ float red_max[kWarpsN][kBlockM], red_sum[kWarpsN][kBlockM];
  __shared__ float row_ref[kBlockM], row_scale[kBlockM];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;  // this warp's rows and keys
  const int g = lane / 4, t = lane % 4;
  const GridHeadBatch hb(p.heads_k, p.batch);
  if (!hb.valid) return;
  DecodeTile tile(dp, hb, kBlockM);
  if (tile.r0 >= tile.rows) return;
  const CacheRows cache(dp, tile.b, tile.hk);
  const SeqInfo seq(p.seqlen_q, cache.seqlen_k);
  auto query_of = [&](int r) { return r / tile.group; };
  auto head_of = [&](int r) { return tile.hk * tile.group + r % tile.group; };

  // The variant of this thread's two rows (16 wm + g and + 8: each its own query, and its own
  // head for ALiBi's slope), the warp's queries, and the CTA's key range (common/variant.cuh).
  const int last = tile.rows - 1;  // padding rows repeat the last row
  const int ra = min(tile.r0 + 16 * wm + g, last), rb = min(tile.r0 + 16 * wm + g + 8, last);
  const int qi[2] = {query_of(ra), query_of(rb)};
  const VariantScores<V> vs[2] = {VariantScores<V>(p, seq, tile.b, head_of(ra)),
                                  VariantScores<V>(p, seq, tile.b, head_of(rb))};
  const VariantScores<V>& range = vs[0];
  const int warp_i0 = query_of(min(tile.r0 + 16 * wm, last));
  const int warp_i_rows = query_of(min(tile.r0 + 16 * wm + 15, last)) - warp_i0 + 1;
  {
    const int key_begin = range.key_begin(tile.i_first);
    const int key_end = range.key_end(tile.i_first, tile.i_rows);
    const int blk_lo = key_begin / kBlockN, blk_hi = ceil_div(key_end, kBlockN);
    const int per = ceil_div(max(blk_hi - blk_lo, 0), dp.num_splits);
    tile.blk_begin = blk_lo + tile.split * per;
    tile.blk_end = min(blk_hi, tile.blk_begin + per);
  }

  // Q: kBlockM packed rows (zero past the tile's rows or the head dim), 16-byte chunks.
  for (int idx = tid; idx < kBlockM * kChunks; idx += Traits::kNThreads) {
    const int row = idx / kChunks, col = (idx % kChunks) * 8, r = tile.r0 + row;
    const bool valid = r < tile.rows && col < p.head_dim;
    const Element* src = static_cast<const Element*>(p.q) + tile.b * p.q_batch_stride +
                         query_of(r) * p.q_row_stride + head_of(r) * p.q_head_stride + col;
    cp_async_16(smem_addr(smem_q + row * kSmemRow + col), valid ? src : p.q, valid);
  }
  // K/V block n -> buffer `stage`: 16-byte chunks, each row resolved through the cache's
  // addressing (zero past the keys or the head dim). (Reading the paged rows' page numbers one
  // block ahead into registers measured slower on the H200: 1.3-1.6x the contiguous time
  // against 1.1-1.5x for this.)
  const Element* k = static_cast<const Element*>(p.k);
  const Element* v = static_cast<const Element*>(p.v);
  auto load_kv = [&](int n_block, int stage) {
#pragma unroll
    for (int i = 0; i < kBlockN * kChunks / Traits::kNThreads; ++i) {
      const int idx = i * Traits::kNThreads + tid;
      const int row = idx / kChunks, col = (idx % kChunks) * 8, j = n_block * kBlockN + row;
      int64_t k_off = 0, v_off = 0;
      const bool valid = j < cache.seqlen_k && col < p.head_dim && cache.offsets(j, k_off, v_off);
      const int dst = stage * Traits::kSmemKV + row * kSmemRow + col;
      cp_async_16(smem_addr(smem_k + dst), valid ? k + k_off + col : k, valid);
      cp_async_16(smem_addr(smem_v + dst), valid ? v + v_off + col : v, valid);
    }
  };
  // The bulk form: thread t copies whole rows (row t % kBlockN of K for t < kBlockN, else of V,
  // and so on), each one cp.async.bulk of head_dim elements completing on the stage's mbarrier
  // (kNThreads arrivals a phase: each thread arrives once, expecting its own bytes); rows past
  // the keys (or on a page outside the cache) are zeroed by plain stores instead, and the columns
  // past head_dim once at the start.
  __shared__ alignas(8) uint64_t kv_bar[kBulk ? kStages : 1];
  auto load_kv_bulk = [&](int n_block, int stage) {
    constexpr int kRows = 2 * kBlockN / Traits::kNThreads;
    const uint32_t bar = smem_addr(&kv_bar[stage]);
    const uint32_t row_bytes = p.head_dim * kElt;
    const Element* src[kRows];
    uint32_t dst[kRows], bytes = 0;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int idx = i * Traits::kNThreads + tid, is_v = idx >= kBlockN;
      const int row = idx - is_v * kBlockN, j = n_block * kBlockN + row;
      int64_t k_off = 0, v_off = 0;
      const bool valid = j < cache.seqlen_k && cache.offsets(j, k_off, v_off);
      Element* d = (is_v ? smem_v : smem_k) + stage * Traits::kSmemKV + row * kSmemRow;
      dst[i] = smem_addr(d);
      src[i] = valid ? (is_v ? v + v_off : k + k_off) : nullptr;
      if (valid) {
        bytes += row_bytes;
      } else {
#pragma unroll
        for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(d)[c] = make_uint4(0, 0, 0, 0);
      }
    }
    mbarrier_arrive_expect_tx(bar, bytes);
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (src[i] != nullptr) bulk_copy_g2s(dst[i], src[i], row_bytes, bar);
  };
  const int n_blocks = max(tile.blk_end - tile.blk_begin, 0);
  if constexpr (kBulk) {
    if (p.head_dim < kHeadDim)  // columns [head_dim, kHeadDim) of every K/V buffer row: zero
      for (int idx = tid; idx < 2 * kStages * kBlockN * kChunks; idx += Traits::kNThreads) {
        const int row = idx / kChunks, col = (idx % kChunks) * 8;
        if (col >= p.head_dim)
          *reinterpret_cast<uint4*>(smem_k + row * kSmemRow + col) = make_uint4(0, 0, 0, 0);
      }
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) mbarrier_init(smem_addr(&kv_bar[s]), Traits::kNThreads);
      fence_proxy_async_shared();  // the barriers, initialised, for the bulk copies
    }
    __syncthreads();
    cp_async_commit();  // Q
  }
  // Pipeline: block `it` is requested kStages - 1 blocks ahead, one cp.async group per block
  // (empty groups past the end keep the count uniform); Q rides in the first group.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if constexpr (kBulk) {
      if (s < n_blocks) load_kv_bulk(tile.blk_begin + s, s);
    } else {
      if (s < n_blocks) load_kv(tile.blk_begin + s, s);
      cp_async_commit();
    }
  }

  float acc_o[1][kNTilesO][4];  // O (16 x kHeadDim) of this warp's rows and keys, unnormalised
  float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.f, 0.f}};
  zero_fragments(acc_o);

  // ldmatrix lane addresses (see sm80/fwd_kernel.cuh): Q as the A operand (this warp's 16
  // rows), K as B, V as B.trans (this warp's keys of the block).
  const uint32_t q_lane =
      smem_addr(smem_q) + ((16 * wm + (lane & 15)) * kSmemRow + (lane >> 4) * 8) * kElt;
  const uint32_t k_lane0 =
      smem_addr(smem_k) +
      ((kWarpN * wn + (lane >> 4) * 8 + (lane & 7)) * kSmemRow + ((lane >> 3) & 1) * 8) * kElt;
  const uint32_t v_lane0 =
      smem_addr(smem_v) +
      ((kWarpN * wn + ((lane >> 3) & 1) * 8 + (lane & 7)) * kSmemRow + (lane >> 4) * 8) * kElt;

  for (int it = 0; it < n_blocks; ++it) {
    const int stage = it % kStages;
    if constexpr (kBulk) {
      cp_async_wait<0>();  // Q
      mbarrier_wait(smem_addr(&kv_bar[stage]), (it / kStages) & 1);  // block `it` has landed
      // (Requesting the refill below before this wait, kStages blocks in flight instead of
      // kStages - 1, measured 2% slower at large batch and 40% at one split: logs/sweep_*.log.)
      __syncthreads();  // every warp is done with block it - 1
      if (it + kStages - 1 < n_blocks) {
        fence_proxy_async_shared();  // the reads of block it - 1, before the copies over them
        load_kv_bulk(tile.blk_begin + it + kStages - 1, (it + kStages - 1) % kStages);
      }
    } else {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // block `it` is in shared memory; every warp is done with block it - 1
      if (it + kStages - 1 < n_blocks)
        load_kv(tile.blk_begin + it + kStages - 1, (it + kStages - 1) % kStages);
      cp_async_commit();
    }
    const int n0 = (tile.blk_begin + it) * kBlockN + kWarpN * wn;  // this warp's first key
    const uint32_t k_lane = k_lane0 + stage * Traits::kSmemKV * kElt;
    const uint32_t v_lane = v_lane0 + stage * Traits::kSmemKV * kElt;

    // S = Q K^T  (16 x kWarpN: this warp's rows and keys), fp32.
    float acc_s[1][kNTilesS][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, q_lane + kk * 16 * kElt);
#pragma unroll
      for (int np = 0; np < kWarpN / 16; ++np) {
        uint32_t bk[4];  // keys np*16 .. +15, d kk*16 .. +15: two n8 tiles
        ldmatrix_x4(bk, k_lane + (np * 16 * kSmemRow + kk * 16) * kElt);
        mma_16816<Element>(acc_s[0][2 * np], a, bk[0], bk[1]);
        mma_16816<Element>(acc_s[0][2 * np + 1], a, bk[2], bk[3]);
      }
    }
    // Scores -> logits, each row with its own query and head (variant.cuh's logit).
    const bool mask = range.mask_needed(warp_i0, n0, warp_i_rows, kWarpN);
#pragma unroll
    for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, i = qi[half], j = n0 + nt * 8 + 2 * t + (e & 1);
        const auto o = vs[half].origin(i, j);
        acc_s[0][nt][e] = mask ? vs[half].template logit<true>(acc_s[0][nt][e], i, j, o)
                               : vs[half].template logit<false>(acc_s[0][nt][e], i, j, o);
      }
    online_softmax_step(acc_s, acc_o, row_max, row_sum, range.scale_log2(p));
    // O += P V: P (16 x kWarpN) from registers as the A operand (the C layout of two n8 tiles
    // is the A layout of one k16 step), V (kWarpN keys x kHeadDim).
#pragma unroll
    for (int ks = 0; ks < kWarpN / 16; ++ks) {
      uint32_t a[4];
      pack_c_to_a<Element>(acc_s[0], ks, a);
#pragma unroll
      for (int np = 0; np < kHeadDim / 16; ++np) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, v_lane + (ks * 16 * kSmemRow + np * 16) * kElt);
        mma_16816<Element>(acc_o[0][2 * np], a, bv[0], bv[1]);
        mma_16816<Element>(acc_o[0][2 * np + 1], a, bv[2], bv[3]);
      }
    }
  }

  // Merge the kWarpsN warps of each row: ref_w = rn(m_w c), M = max_w ref_w,
  // L = sum_w l_w 2^(ref_w - M), O = sum_w O_w 2^(ref_w - M) / L, lse = M + log2(L)
  // (finish_row's convention; with a sink and one split, finish_row's sink form). A row with no
  // key: O = 0, lse = -inf (or the sink's logit).
  cp_async_wait<0>();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(row_sum[0][half]);
    if (t == 0) {
      const int row = 16 * wm + g + 8 * half;
      red_max[wn][row] = row_max[0][half] == -INFINITY
                             ? -INFINITY
                             : __fmul_rn(row_max[0][half], range.scale_log2(p));
      red_sum[wn][row] = l;
    }
  }
  __syncthreads();  // also: every warp is done with the K/V buffers
  const bool split_out = dp.num_splits > 1;
  for (int row = tid; row < kBlockM; row += Traits::kNThreads) {
    float ref = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) ref = fmaxf(ref, red_max[w][row]);
    float l = 0.f;
    if (ref != -INFINITY)
#pragma unroll
      for (int w = 0; w < kWarpsN; ++w) l += red_sum[w][row] * fast_exp2(red_max[w][row] - ref);
    float lse = -INFINITY, scale = 0.f;
    if (l > 0.f) {
      lse = ref + __log2f(l);
      scale = 1.f / l;
    }
    const int r = tile.r0 + row;
    if constexpr (V::kHasSink) {
      if (!split_out && r < tile.rows) {  // split partials leave the sink to the combine
        const float sink = p.variant.sink[head_of(r)] * float(M_LOG2E);
        const float top = l > 0.f ? fmaxf(ref, sink) : sink;
        if (top != -INFINITY) {  // else: no key and a sink of -inf: lse -inf, O 0, as above
          lse = top + __log2f((l > 0.f ? l * fast_exp2(ref - top) : 0.f) + fast_exp2(sink - top));
          scale = l > 0.f ? fast_exp2(ref - lse) : 0.f;
        }
      }
    }
    row_ref[row] = ref;
    row_scale[row] = scale;
    if (r < tile.rows) {
      const int i = query_of(r), h = head_of(r);
      if (split_out)
        dp.lse_partial[((int64_t(tile.split) * p.batch + tile.b) * p.heads + h) * p.seqlen_q + i] =
            lse;
      else
        p.lse[tile.b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
    }
  }
  __syncthreads();
  // Each warp's O times 2^(ref_w - M), into fp32 shared rows (kWarpsN, kBlockM, kHeadDim) in
  // the free K/V buffers.
  float* obuf = reinterpret_cast<float*>(smem_k);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = 16 * wm + g + 8 * half;
    const float own = red_max[wn][row];
    const float f = own == -INFINITY ? 0.f : fast_exp2(own - row_ref[row]);
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt)
      *reinterpret_cast<float2*>(obuf + (wn * kBlockM + row) * kHeadDim + nt * 8 + 2 * t) =
          make_float2(acc_o[0][nt][2 * half] * f, acc_o[0][nt][2 * half + 1] * f);
  }
  __syncthreads();
  // Sum over the warps and write 8 columns per step: the final O (Element) or the split's
  // partial (fp32).
  for (int idx = tid; idx < kBlockM * kChunks; idx += Traits::kNThreads) {
    const int row = idx / kChunks, col = (idx % kChunks) * 8, r = tile.r0 + row;
    if (r >= tile.rows || col >= p.head_dim) continue;
    float sum[8] = {};
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) {
      const float4* src =
          reinterpret_cast<const float4*>(obuf + (w * kBlockM + row) * kHeadDim + col);
      const float4 x = src[0], y = src[1];
      sum[0] += x.x, sum[1] += x.y, sum[2] += x.z, sum[3] += x.w;
      sum[4] += y.x, sum[5] += y.y, sum[6] += y.z, sum[7] += y.w;
    }
    const float scale = row_scale[row];
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] *= scale;
    const int i = query_of(r), h = head_of(r);
    if (split_out) {
      float4* dst = reinterpret_cast<float4*>(
          dp.o_partial +
          (((int64_t(tile.split) * p.batch + tile.b) * p.heads + h) * p.seqlen_q + i) *
              p.head_dim + col);
      dst[0] = make_float4(sum[0], sum[1], sum[2], sum[3]);
      dst[1] = make_float4(sum[4], sum[5], sum[6], sum[7]);
    } else {
      uint4 packed;
      packed.x = pack2<Element>(sum[0], sum[1]);
      packed.y = pack2<Element>(sum[2], sum[3]);
      packed.z = pack2<Element>(sum[4], sum[5]);
      packed.w = pack2<Element>(sum[6], sum[7]);
      *reinterpret_cast<uint4*>(static_cast<Element*>(p.o) + tile.b * p.o_batch_stride +
                                i * p.o_row_stride + h * p.o_head_stride + col) = packed;
    }
  }
}

}  // namespace flashjit
