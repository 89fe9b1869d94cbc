// fwd_launch.cuh: host-side launch of the warp-specialised Hopper forward (fwd_kernel.cuh): the
// tensor maps of Q, K and V, the tile choice per head-dim bucket and the grid. Exports run_fwd
// (the same entry point as every family).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "sm90ws/fwd_kernel.cuh"

namespace flashjit {

// Tiles (measured on the H200, bf16: results/h200/logs/ws_sweep*.log): d 64: 128-key blocks, 3
// K/V buffers, three consumer warpgroups (kBlockM 192: one warpgroup's softmax, on a unit as fast
// as the d-64 GEMMs, hides behind two others' GEMMs); on short sequences (kShortRows: causal up
// to 1024 query and key rows, else 512) one consumer instead, two CTAs per SM (one's prologue and
// epilogue overlap the other's main loop; 172 against 145 TFLOP/s causal at 512, 250 against 222
// at 1024, 268 against 248 non-causal at 512), both compiled into the spec. d 128: two
// consumers (kBlockM 128; 32 + 6 x 32 KB = 224 KB of the 227 KB a block may take). d 192 / 256:
// two consumers, the key blocks below. Buckets 96, 160 and 224 take the tile of their padded width (128, 192, 256;
// fwd_kernel.cuh). A spec tile (FLASHJIT_FWD_TILE=block_n,stages,consumers) sweeps other
// choices and compiles only itself.
template <int kBucket, typename V>
struct WsTile {
  static constexpr int kHeadDim = (kBucket + 63) / 64 * 64;  // the padded width
#ifdef FLASHJIT_TILE  // a spec's tile (JitSpec.tile: block_n, stages, consumers), for sweeps
  static constexpr int kBlockN = FLASHJIT_TILE_BLOCK_N;
  static constexpr int kStages = FLASHJIT_TILE_STAGES;
  static constexpr int kConsumers = FLASHJIT_TILE_CONSUMERS;
  static constexpr int kShortConsumers = 0, kShortRows = 0;
#else
  // d 192: 112-key blocks, 2 stages (48 + 4 x 42 KB); d 256: 80 keys, 2 stages (64 + 4 x 40 KB).
  // Against 64-key blocks at 1k-8k (logs/ws_sweep_padded_wide.log): d 160 +11-14%, d 192 +3-12%,
  // d 224 -1 to +6%, d 256 0-10% (FlashAttention-3 publishes
  // the same widths). With dropout 64 keys, 3 / 2 stages: 112 and 80 keys are not whole m16 x
  // n32 groups of the mask (one Philox call per n8 tile instead of per 4) and spill 28-84 bytes.
  static constexpr int kBlockN =
      kHeadDim <= 128 ? 128 : V::kHasDropout ? 64 : kHeadDim <= 192 ? 112 : 80;
  static constexpr int kStages = kHeadDim <= 128 || (kHeadDim <= 192 && V::kHasDropout) ? 3 : 2;
  // d 64 with dropout: two consumers (232 registers each). Three (160 each; no spills
  // non-causal, 96 bytes causal) measured 5-29% slower with dropout at 1k-8k, bf16
  // (logs/ws_dropout_d64.log): the Philox draws then share the issue slots of three softmaxes.
  static constexpr int kConsumers = kHeadDim <= 64 && !V::kHasDropout ? 3 : 2;
  // Short sequences (seqlen_q and seqlen_k, for varlen their maxima, both <= kShortRows: the
  // lengths measured, sq = sk; with many keys the main loop outweighs what the second CTA
  // hides): this many consumers (0: the same tile at every length)
  static constexpr int kShortConsumers = kHeadDim <= 64 && !V::kHasDropout ? 1 : 0;
  static constexpr int kShortRows = V::kIsCausal ? 1024 : 512;
#endif
};

// Persistent grid (one CTA per SM slot, each looping over every gridDim.x-th tile: the producer
// loads the next tile's V, and once the last S has completed its Q and K, while the consumers
// finish the current one) where the kernel has the tile loop (fwd_kernel.cuh's ws_tile_loop:
// d <= 128) and the tiles' costs are known from their order: fixed length, no key padding
// (seqused_k); causal tiles, whose later query blocks have more keys, in grouped longest-first
// order (causal_tile_group). Elsewhere a CTA per tile, which the GPU's block scheduler hands to whichever SM is
// free first. Measured on the H200 (bf16, 16k tokens, non-causal, against a CTA per tile;
// benchmarks/NOTES.md): d 64 +10% at 512 tokens, +7% at 1k, +2% at 8k; d 128 +16%, +6%, -2%.
// With the loop at d 192/256 too they lost 1-6% (logs/ws_ab_persistent_v*.log), so not there.
template <typename Traits, typename V>
bool persistent_grid(const FwdParams& p) {
  return ws_tile_loop<Traits, V>() && p.cu_seqlens_q == nullptr && p.seqused_k == nullptr;
}

// Pairs per group of the causal tile order (FwdTileOrder::group): as many (head, batch) pairs as
// keep their K and V in half of the L2 cache (50 MB on the H100/H200: 25 MB; pairs of one GQA
// group share theirs), at least 1. Within a group the persistent CTAs take the heaviest query
// blocks of every pair first, so the last tiles, which no CTA can balance, are the lightest.
inline int causal_tile_group(const FwdParams& p) {
  const int l2 = device_attribute<cudaDevAttrL2CacheSize>();
  const int64_t kv_per_head = int64_t(p.seqlen_k) * p.head_dim * 2 * 2;  // K and V, 16-bit
  const int64_t shared = p.heads / p.heads_k;  // query heads per K/V head
  const int64_t pairs = kv_per_head > 0 ? int64_t(l2 / 2) / kv_per_head * shared : 1;
  return int(std::max<int64_t>(1, std::min<int64_t>(pairs, int64_t(p.heads) * p.batch)));
}

// A 4-D tensor map (head dim, heads, rows, batch) over q, k or v (strides in elements, the head
// dim contiguous), boxes of (64, 1, box_rows, 1): one 128-byte swizzled panel of box_rows rows.
// Varlen: one batch of `rows` = total rows.
inline cudaError_t make_qkv_map(CUtensorMap* map, const void* ptr, bool bf16, int head_dim,
                                int heads, int rows, int batch, int64_t head_stride,
                                int64_t row_stride, int64_t batch_stride, int box_rows) {
  const uint64_t dims[4] = {uint64_t(head_dim), uint64_t(heads), uint64_t(rows),
                            uint64_t(batch)};
  // TMA strides must be multiples of 16 bytes: a stride of an extent-1 dimension is unused, so
  // any valid one stands in for it (a paged cache with one K/V head is not copied to an aligned
  // layout, so its head stride may be anything).
  const int64_t hs = heads > 1 ? head_stride : (head_dim + 7) / 8 * 8;
  const int64_t bs = batch > 1 ? batch_stride : row_stride * rows;
  const uint64_t strides[3] = {uint64_t(hs) * 2, uint64_t(row_stride) * 2, uint64_t(bs) * 2};
  const uint32_t box[4] = {64, 1, uint32_t(box_rows), 1};
  return encode_tensor_map_16bit(map, ptr, bf16, dims, strides, box);
}

// Launches flash_fwd_ws_kernel<Traits, V>: tensor maps, shared memory, the grid (a CTA per tile,
// or persistent: Traits::kMinBlocks CTAs per multiprocessor at most).
template <typename Traits, typename V>
cudaError_t launch_fwd_ws(const FwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
  constexpr auto kernel = flash_fwd_ws_kernel<Traits, V>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (cudaError_t err = set_smem<kernel>(smem); err != cudaSuccess) return err;
  FwdWsParams args;
  args.p = p;
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Rows of the maps: per batch (fixed length) or the totals (varlen: the row stride times the
  // rows up to the last sequence's end is not known here, so the maps span the allocations'
  // rows the caller passes as seqlen_q/k totals; see the binding).
  // Paged K/V: maps over (d, heads_k, page_size, num_blocks) (the batch stride is the page's),
  // read in boxes of gcd(page_size, kBlockN) rows, which stay inside a page (both multiples of 16).
  const int q_rows = varlen ? p.total_q : p.seqlen_q;
  const int k_rows = V::kPagedKV ? p.pages.page_size : varlen ? p.total_k : p.seqlen_k;
  const int batches = varlen ? 1 : p.batch;
  const int k_batches = V::kPagedKV ? p.pages.num_blocks : batches;
  args.kv_box_rows = V::kPagedKV ? std::gcd(p.pages.page_size, Traits::kBlockN) : Traits::kBlockN;
  cudaError_t err = make_qkv_map(&args.tm_q, p.q, kBf16, p.head_dim, p.heads, q_rows, batches,
                                 p.q_head_stride, p.q_row_stride, p.q_batch_stride,
                                 Traits::kBlockM);
  if (err == cudaSuccess)
    err = make_qkv_map(&args.tm_k, p.k, kBf16, p.head_dim, p.heads_k, k_rows, k_batches,
                       p.k_head_stride, p.k_row_stride, p.k_batch_stride, args.kv_box_rows);
  if (err == cudaSuccess)
    err = make_qkv_map(&args.tm_v, p.v, kBf16, p.head_dim, p.heads_k, k_rows, k_batches,
                       p.v_head_stride, p.v_row_stride, p.v_batch_stride, args.kv_box_rows);
  if (err != cudaSuccess) return err;
  args.tiles.m_blocks = ceil_div(p.seqlen_q, Traits::kBlockM);
  args.tiles.heads = p.heads;
  args.tiles.pairs = p.heads * p.batch;
  const int64_t tiles = int64_t(args.tiles.m_blocks) * p.heads * p.batch;
  if constexpr (V::kIsCausal) args.tiles.group = causal_tile_group(p);
  int64_t ctas = tiles;  // a CTA per tile, or persistent (a CTA per tile where the SM count is unknown)
  if (persistent_grid<Traits, V>(p))
    if (const int sms = multiprocessors(); sms > 0)
      ctas = std::min<int64_t>(tiles, int64_t(sms) * Traits::kMinBlocks);
  // the kernel's tile numbers, and t + gridDim.x in its loop, are ints: with a CTA per tile up to
  // 2^30 tiles
  if (tiles + ctas >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  args.tiles.count = int(tiles);
  if (ctas == 0) return cudaSuccess;
  kernel<<<unsigned(ctas), Traits::kNThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim, typename V>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tile = WsTile<kHeadDim, V>;
  if constexpr (Tile::kShortConsumers > 0) {
    if (p.seqlen_q <= Tile::kShortRows && p.seqlen_k <= Tile::kShortRows)
      return launch_fwd_ws<FwdWsTraits<Element, kHeadDim, Tile::kBlockN, Tile::kStages,
                                       Tile::kShortConsumers>, V>(p, stream);
  }
  return launch_fwd_ws<FwdWsTraits<Element, kHeadDim, Tile::kBlockN, Tile::kStages,
                                   Tile::kConsumers>, V>(p, stream);
}

}  // namespace flashjit
