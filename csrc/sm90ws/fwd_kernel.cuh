// fwd_kernel.cuh: the forward FlashAttention kernel, warp-specialised Hopper family (sm90a:
// TMA, mbarrier pipelines, setmaxnreg, wgmma, ping-pong). Device code only; fwd_launch.cuh has
// the tensor maps, the grid and the tile choice, fwd.cu the instantiation of a spec.
//
// A tile = one (query block of kBlockM = 64 kConsumers rows, head, batch). A CTA takes tiles t =
// blockIdx.x, + gridDim.x, ... of FwdTileOrder (common/problem.cuh): one each when the grid has a
// CTA per tile, several when it is persistent (fwd_launch.cuh). Across a CTA's tiles the K/V
// buffers, their barriers and the consumers' ping-pong turn continue, so the producer loads the
// next tile's V, and once the tile's last S = Q K^T has completed its Q and K, while the consumers
// finish the current one (the K thread waits for the Q tile first: a third producer thread for Q
// would let K run ahead too; not tried). 1 + kConsumers warpgroups:
//   * warpgroup 0, the producer (setmaxnreg.dec): one thread issues the TMA loads of Q (once
//     per tile, after the previous tile's last S has released the Q tile) and of K, another those
//     of V (kStages buffers each, from the last key block of the band to the first, as the
//     consumers take them), each completing on its "full" mbarrier; each waits on its buffer's
//     "empty" mbarrier before it refills it. K and V have their own empty
//     barriers: a K buffer comes back as soon as S = Q K^T of its block has completed, a V buffer
//     only after P V (issued one block later), so K runs up to kStages blocks ahead of the
//     consumers whatever V's wait;
//   * warpgroups 1 .. kConsumers, the consumers (setmaxnreg.inc): warpgroup 1 + c owns query rows
//     [64 c, 64 c + 64). Per key block: S = Q K^T (wgmma, both operands in shared memory), the
//     variant's logits and the online softmax in registers (common/variant.cuh, softmax.cuh),
//     O += P V (wgmma, P from registers). Within a warpgroup the softmax of block j runs while
//     P V of block j - 1 is on the tensor cores (issued right behind S of block j), and O's
//     rescale for block j - 1 while S of block j is (between the two issues); across the
//     consumers, named barriers take turns for the GEMM issue (ping-pong, round robin), so one
//     warpgroup's softmax overlaps the others' GEMMs. A consumer releases a K buffer (arrives on
//     its empty barrier) once its S has completed, a V buffer once its P V has.
// Tiles in shared memory are in the 128-byte swizzled layout wgmma reads (common/wgmma.cuh), which
// is the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B: a tile of R rows x kHeadDimPad is
// kHeadDimPad / 64 panels of (R rows x 128 bytes), one TMA box each. Buckets that are not whole
// panels (96, 160, 224) are padded: TMA zero-fills the columns past the tensor's head dim, S =
// Q K^T reads only the bucket's columns (k-steps of 16), P V writes the padded width of O (its
// padded columns are 0 and not stored).
// TMA reads whole boxes: key rows past a sequence's keys (seqused_k, varlen) are real memory, so
// their scores are masked (variant.cuh) and the V rows of the one partial block are zeroed
// before P V reads them (a masked P of 0 times a NaN would still be NaN).
// Paged K/V (V::kPagedKV: k, v of (num_blocks, page_size, heads_k, d), fixed-length queries):
// the K and V maps are 4-D over (d, heads_k, page_size, num_blocks), and a key block is loaded
// in boxes of kv_box_rows = gcd(page_size, kBlockN) rows (fwd_launch.cuh), each inside one page:
// block rows n0 + r, r a multiple of kv_box_rows, are page block_table[b][(n0 + r) / page_size]
// at row (n0 + r) % page_size (problem.cuh's PageRows). A box past the sequence's keys, or whose
// page number is outside [0, num_blocks), lies outside the map: TMA zero-fills it (and counts
// its bytes), so no table entry past the sequence is read and a bad page reads as zeros, as in
// the other families.
// The epilogue of a tile that the CTA follows with another stores O from registers
// (common/fwd_epilogue_sw128.cuh: fwd_epilogue_regs), so the Q tile is free for the next tile's Q
// as soon as the last S has completed; after the CTA's last tile (with a CTA per tile: its only
// one) O is staged in the Q tile for 16-byte stores.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/dropout.cuh"
#include "common/fragment.cuh"
#include "common/fwd_epilogue_sw128.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/variant.cuh"
#include "common/smem_sw128.cuh"
#include "common/wgmma.cuh"
#include "sm90ws/tma.cuh"

namespace flashjit {

template <typename Element_, int kHeadDim_, int kBlockN_, int kStages_, int kConsumers_>
struct FwdWsTraits {
  using Element = Element_;
  // The head-dim bucket (S = Q K^T runs over its columns) and its width in whole 64-column
  // panels (the tiles, P V and O): buckets 96, 160 and 224 are padded to 128, 192 and 256, the
  // columns past the tensor's head dim zero-filled by TMA (out-of-bounds box elements).
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimPad = (kHeadDim_ + 63) / 64 * 64;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumers = kConsumers_;  // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kNThreads = 128 * (1 + kConsumers);
  // One consumer: two CTAs per SM, which take turns on the tensor cores by themselves and
  // overlap one's prologue and epilogue with the other's main loop (short sequences).
  static constexpr int kMinBlocks = kConsumers == 1 ? 2 : 1;
  // Peel the main loop's first key block (the kernel's `step`): measured at d 128 only.
  static constexpr bool kPeel = kHeadDimPad >= 128;

  // Registers (65536 per SM over kMinBlocks CTAs): the producer keeps 32 (1 or 2 consumers: 40),
  // the consumers take the rest in multiples of 8: 2 x 128 x 232 + 128 x 40 = 64512, 3 x 128 x
  // 160 + 128 x 32 = 65536, one consumer 128 x 216 + 128 x 40 = 32768 per CTA. (With 24 the
  // paged producer's page lookups spilled 28 bytes; the consumers keep 160 either way.)
  static constexpr int kProducerRegs = kConsumers <= 2 ? 40 : 32;
  static constexpr int kConsumerRegs =
      (65536 / kMinBlocks - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8;
  static constexpr int kNTilesS = kBlockN / 8, kNTilesO = kHeadDimPad / 8;
  // 16-byte chunks of a row that hold the bucket's columns (the epilogue's stores, the V tail)
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kPanels = kHeadDimPad / 64;
  static constexpr int kSmemQ = kBlockM * kHeadDimPad * 2;
  static constexpr int kSmemKV = kBlockN * kHeadDimPad * 2;  // one K or V buffer
  static constexpr int kSmemAlign = 1024;
  static constexpr size_t kSmemBytes = size_t(kSmemQ + 2 * kStages * kSmemKV + kSmemAlign);
  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim: a multiple of 32, <= 256");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory: at most 227 KB per block");
  static_assert(kBlockN == 64 || kBlockN == 80 || kBlockN == 112 || kBlockN == 128 ||
                    kBlockN == 176,
                "wgmma N of Q K^T: 64, 80, 112, 128 or 176 (wgmma_ss)");
  static_assert(kConsumers >= 1 && kConsumers <= 3, "1 to 3 consumer warpgroups");
  // two CTAs per SM: each at most 113 KB, counting the 1 KB of static shared memory (the
  // barriers, aligned as the dynamic tile) that ptxas reports next to kSmemBytes
  static_assert(kMinBlocks == 1 || kSmemBytes + 1024 <= 113 * 1024,
                "two CTAs per SM: <= 113 KB each");
};

// The kernel's parameters: the tensor maps of Q, K and V (4-D: head dim, heads, rows, batch;
// varlen: batch 1, rows = total), the tiles (FwdTileOrder over query blocks of kBlockM rows) and
// the common forward parameters.
struct FwdWsParams {  // CUtensorMap: 64-byte aligned itself
  CUtensorMap tm_q, tm_k, tm_v;
  FwdTileOrder tiles;
  FwdParams p;
  int kv_box_rows;  // rows of one K/V box: kBlockN, or for paged K/V gcd(page_size, kBlockN)
};

// Whether the kernel loops over tiles (a persistent grid may launch it: fwd_launch.cuh's
// persistent_grid) or runs one tile per CTA, compiled without the loop: the loop at d <= 128,
// where the persistent grid gains (with the loop compiled in, d 256 non-causal lost 4-6% even
// with a CTA per tile: benchmarks/NOTES.md). Causal too, with the tiles in grouped
// longest-first order (FwdTileOrder::group): on the H200 5-20% faster at 512-1k tokens than a CTA
// per tile, within 3% at 8k (benchmarks/NOTES.md, backward section item 19).
template <typename Traits, typename V>
constexpr bool ws_tile_loop() {
  return Traits::kHeadDimPad <= 128;
}

template <typename Traits, typename V>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks)
    flash_fwd_ws_kernel(const __grid_constant__ FwdWsParams args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim, kStages = Traits::kStages;
  constexpr int kHeadDimPad = Traits::kHeadDimPad;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;
  const FwdParams& p = args.p;
  const FwdTileOrder& tiles = args.tiles;
  // Without the loop (ws_tile_loop) every path out of a tile's body leaves the for loop, so the
  // compiler sees one pass (the counters below stay 0).
  constexpr bool kLoop = ws_tile_loop<Traits, V>();

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem_raw_addr = smem_addr(smem_raw);
  const uint32_t smem_q = (smem_raw_addr + Traits::kSmemAlign - 1) & ~uint32_t(Traits::kSmemAlign - 1);
  const uint32_t smem_k = smem_q + Traits::kSmemQ;              // kStages K buffers
  const uint32_t smem_v = smem_k + kStages * Traits::kSmemKV;   // kStages V buffers
  __shared__ alignas(8) uint64_t bar_q, bar_q_empty, bar_k_full[kStages], bar_v_full[kStages],
      bar_k_empty[kStages], bar_v_empty[kStages];

  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    mbarrier_init(smem_addr(&bar_q), 1);
    mbarrier_init(smem_addr(&bar_q_empty), 128 * Traits::kConsumers);  // every consumer thread
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(smem_addr(&bar_k_full[s]), 1);
      mbarrier_init(smem_addr(&bar_v_full[s]), 1);
      mbarrier_init(smem_addr(&bar_k_empty[s]), 128 * Traits::kConsumers);  // every consumer
      mbarrier_init(smem_addr(&bar_v_empty[s]), 128 * Traits::kConsumers);  // thread
    }
    fence_proxy_async_shared();  // the initialised barriers, for the TMA unit
  }
  __syncthreads();

  // Producer and consumers walk the same tiles: both skip a tile past a sequence's end, and for a
  // tile without a key block the producer loads nothing and the consumers only write its
  // epilogue (O = 0, lse -inf or the sink's), so they agree on every barrier phase: kv counts the
  // K/V blocks of the CTA's tiles so far (buffer kv % kStages, phase kv / kStages), q_tiles the
  // Q tiles loaded.
  if (wg == 0) {
    // ------------------------------ producer ------------------------------
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (tid == 0 || tid == 32) {  // lane 0 of warps 0 (Q, K) and 1 (V)
      const bool loads_v = tid == 32;
      const CUtensorMap* map = loads_v ? &args.tm_v : &args.tm_k;
      const uint32_t base = loads_v ? smem_v : smem_k;
      uint64_t* full = loads_v ? bar_v_full : bar_k_full;
      uint64_t* empty = loads_v ? bar_v_empty : bar_k_empty;
      const bool varlen = p.cu_seqlens_q != nullptr;
      int kv = 0, q_tiles = 0;
      for (int t = blockIdx.x; t < tiles.count; t += gridDim.x) {
        const FwdQueryBlock<Element, V> tile(p, tiles, t, kBlockM, kBlockN);
        const int n_last = tile.n_end - 1, n_blocks = max(tile.n_end - tile.n_begin, 0);
        if (tile.empty() || n_blocks == 0) {
          if constexpr (kLoop) continue; else break;
        }
        const int hk = tile.h / (p.heads / p.heads_k);
        const int bq = varlen ? 0 : tile.b;                            // the maps' batch coordinate
        const int k_row0 = varlen ? tile.seq.k_start : 0;             // their row coordinate
        if (!loads_v) {
          // the previous Q tile's last S = Q K^T completed in every consumer
          if (q_tiles > 0) mbarrier_wait(smem_addr(&bar_q_empty), (q_tiles - 1) & 1);
          const int q_row = (varlen ? tile.seq.q_start : 0) + tile.m0;
          mbarrier_arrive_expect_tx(smem_addr(&bar_q), Traits::kSmemQ);
#pragma unroll
          for (int c = 0; c < Traits::kPanels; ++c)
            tma_load_4d(smem_q + c * kBlockM * 128, &args.tm_q, smem_addr(&bar_q), 64 * c, tile.h,
                        q_row, bq);
          ++q_tiles;
        }
        for (int it = 0; it < n_blocks; ++it, ++kv) {
          const int s = kv % kStages, n0 = (n_last - it) * kBlockN;
          // the buffer's previous use (block kv - kStages) released by every consumer; the first
          // round waits on the phase before the first, which counts as completed
          mbarrier_wait(smem_addr(&empty[s]), ((kv / kStages) & 1) ^ 1);
          mbarrier_arrive_expect_tx(smem_addr(&full[s]), Traits::kSmemKV);
          const uint32_t dst = base + s * Traits::kSmemKV;
          if constexpr (V::kPagedKV) {
            // boxes of kv_box_rows rows (a multiple of 16: 2 KB steps of a 128-byte panel row,
            // keeping the swizzle's 1024-byte phase), each from its page (see the top)
            for (int r = 0; r < kBlockN; r += args.kv_box_rows) {
              int page = -1, row = 0;  // past the keys: outside the map, zero-filled
              if (n0 + r < tile.seq.seqlen_k) {
                const PageRows::Slot slot = tile.pages.find(n0 + r);
                page = slot.page;
                row = slot.row;
              }
#pragma unroll
              for (int c = 0; c < Traits::kPanels; ++c)
                tma_load_4d(dst + c * kBlockN * 128 + r * 128, map, smem_addr(&full[s]), 64 * c,
                            hk, row, page);
            }
          } else {
#pragma unroll
            for (int c = 0; c < Traits::kPanels; ++c)
              tma_load_4d(dst + c * kBlockN * 128, map, smem_addr(&full[s]), 64 * c, hk,
                          k_row0 + n0, bq);
          }
        }
        if constexpr (!kLoop) break;
      }
    }
    return;
  }

  // ------------------------------ consumers ------------------------------
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int cwg = wg - 1;  // query rows [64 cwg, 64 cwg + 64) of the tile
  const int ctid = tid - 128, warp = ctid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  // Ping-pong (round robin over the consumers): consumer c issues its GEMMs after waiting on
  // barrier 1 + c and then lets the next one go (barrier 1 + (c + 1) % kConsumers); 256 threads
  // each: one warpgroup syncs, the one before it arrives. The turn goes on from tile to tile:
  // consumer 0 takes the first (the last consumer's arrive below) and consumes the last consumer's
  // final pass after the CTA's last tile. Barrier kTailBarrier: the V tail.
  constexpr int kConsumers = Traits::kConsumers, kTurnThreads = 256;
  constexpr int kTailBarrier = 1 + kConsumers;
  const int my_turn = 1 + cwg, other_turn = 1 + (cwg + 1) % kConsumers;
  auto turn_wait = [&] {  // one consumer: no turns to take
    if constexpr (kConsumers > 1) named_barrier_sync(my_turn, kTurnThreads);
  };
  auto turn_pass = [&] {
    if constexpr (kConsumers > 1) named_barrier_arrive(other_turn, kTurnThreads);
  };
  if (kConsumers > 1 && cwg == kConsumers - 1)
    named_barrier_arrive(1, kTurnThreads);  // consumer 0 goes first

  // Descriptors as in sm90/fwd_kernel.cuh: Q (this warpgroup's 64 rows) and K K-major, V
  // MN-major (8 keys per 1024-byte group, the next 64 head-dim columns one panel further).
  const uint64_t desc_q = smem_desc_sw128(smem_q + cwg * 64 * 128, 16, 1024);
  const uint64_t desc_k0 = smem_desc_sw128(smem_k, 16, 1024);
  const uint64_t desc_v0 = smem_desc_sw128(smem_v, kBlockN * 128, 1024);
  auto kstep_offset = [](int kk, int rows) { return (kk / 4) * rows * 128 + (kk % 4) * 32; };

  float acc_o[1][kNTilesO][4];
  float acc_s[1][kNTilesS][4];
  uint32_t p_frag[kBlockN / 16][4];  // P of the previous block (wgmma A layout)
  float row_max[1][2], row_sum[1][2];
  // O's rescale for the block whose softmax ran last (O *= alpha), deferred to the next GEMM
  // issue: applied while that block's successor's S = Q K^T runs, before P V reads O.
  float alpha[1][2];
  int kv = 0, q_tiles = 0, last_t = -1;
  for (int t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    const FwdQueryBlock<Element, V> tile(p, tiles, t, kBlockM, kBlockN);
    if (tile.empty()) {
      if constexpr (kLoop) continue; else break;
    }
    const SeqInfo& seq = tile.seq;
    const int m0 = tile.m0;
    const int n_last = tile.n_end - 1, n_blocks = max(tile.n_end - tile.n_begin, 0);
    const VariantScores<V> scores(p, seq, tile.b, tile.h);
    const int warp_row0 = m0 + cwg * 64 + (warp % 4) * 16;  // first query row of this warp
    row_max[0][0] = row_max[0][1] = -INFINITY;
    row_sum[0][0] = row_sum[0][1] = 0.f;
    alpha[0][0] = alpha[0][1] = 1.f;
    zero_fragments(acc_o);
    zero_fragments(acc_s);
    DropoutMask dropout = V::kHasDropout ? DropoutMask(p.dropout, tile.b, tile.h, p.heads,
                                                       p.seqlen_q, p.seqlen_k)
                                         : DropoutMask();

    // Block it of the tile is the CTA's block kv + it: buffer (kv + it) % kStages.
    auto stage_of = [&](int it) { return (kv + it) % kStages; };
    auto phase_of = [&](int it) { return ((kv + it) / kStages) & 1; };
    auto issue_pv = [&](int it) {
      const uint64_t desc_v = desc_advance(desc_v0, stage_of(it) * Traits::kSmemKV);
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks)
        wgmma_rs_panels<Element, kHeadDimPad>(acc_o[0], p_frag[ks],
                                              desc_advance(desc_v, ks * 16 * 128), kBlockN * 128);
      wgmma_commit();
    };
    // V rows past the sequence's keys in the band's last block (the tile's first one taken): zero,
    // by consumer 0 (its 128 threads), before any consumer's P V of it (named barrier
    // kTailBarrier).
    const int tail = seq.seqlen_k - n_last * kBlockN;  // keys of the last block that exist
    auto zero_v_tail = [&] {
      if (tail < kBlockN) {
        mbarrier_wait(smem_addr(&bar_v_full[stage_of(0)]), phase_of(0));
        if (cwg == 0) {
          unsigned char* v0 =
              smem_raw + (smem_v - smem_raw_addr) + stage_of(0) * Traits::kSmemKV;
          for (int idx = ctid; idx < (kBlockN - max(tail, 0)) * Traits::kChunksPerRow;
               idx += 128) {
            const int row = max(tail, 0) + idx / Traits::kChunksPerRow;
            const int col = (idx % Traits::kChunksPerRow) * 8;
            *reinterpret_cast<uint4*>(v0 + sw128_offset<kBlockN>(row, col)) =
                make_uint4(0, 0, 0, 0);
          }
          fence_proxy_async_shared();  // these writes, before the wgmma reads of the buffer
        }
        named_barrier_sync(kTailBarrier, 128 * kConsumers);
      }
    };

    if (n_blocks > 0) mbarrier_wait(smem_addr(&bar_q), q_tiles & 1);
    // Block it: S = Q K^T (64 x kBlockN), then behind it (pv: every block but the first)
    // O += P[it-1] V[it-1]; the softmax of S; P[it] packed for the next block. pv is a bool, or
    // with Traits::kPeel a compile-time constant (std::true_type / std::false_type: the first
    // block peeled): measured faster at d 128, slower at d 64 (benchmarks/NOTES.md), when the
    // runtime branch on the P V wgmma also made ptxas inject a warpgroup.arrive (C7519), which
    // the wgmma fence after O's rescale inside that branch now makes unnecessary.
    // (With a runtime pv the fence on p_frag and the wait for P V stay unconditional, as a branch
    // around them makes ptxas serialise the wgmmas, C7515.)
    auto step = [&](int it, auto pv) {
      constexpr bool kStatic = !std::is_same_v<decltype(pv), bool>;
      const int s = stage_of(it), n0 = (n_last - it) * kBlockN;
      if (it == 1) zero_v_tail();  // before P V of block 0
      mbarrier_wait(smem_addr(&bar_k_full[s]), phase_of(it));
      if (pv) mbarrier_wait(smem_addr(&bar_v_full[stage_of(it - 1)]), phase_of(it - 1));
      turn_wait();
      const uint64_t desc_k = desc_advance(desc_k0, s * Traits::kSmemKV);
      fence_registers(acc_o[0]);
      if (!kStatic || pv) fence_registers(p_frag);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)  // the bucket's columns, not the padding
        wgmma_ss<Element, kBlockN>(acc_s[0], desc_advance(desc_q, kstep_offset(kk, kBlockM)),
                                   desc_advance(desc_k, kstep_offset(kk, kBlockN)), kk > 0);
      wgmma_commit();
      if (pv) {
        // O *= alpha of block it - 1 (its P V completed in the previous step) while S runs on
        // the tensor cores, off the path from the softmax to the next GEMM issue; then P V.
        // At d 64 skipped where no row of the warp got a new maximum (every alpha exactly
        // exp2(0) = 1: the multiply is the identity, outputs unchanged), a warp-uniform branch:
        // +1.3% there (geometric mean, 1k-16k, bf16), d 128 -0.3% (within the run's spread), so
        // not there (results/h200/logs/ws_ab_rescale_skip.log).
        if (kHeadDimPad > 64 ||
            __any_sync(0xffffffffu, alpha[0][0] != 1.f || alpha[0][1] != 1.f))
          rescale_rows(acc_o, alpha);
        fence_registers(acc_o[0]);
        wgmma_fence();
        issue_pv(it - 1);
        turn_pass();
        wgmma_wait<1>();  // S is done; P V may still run
      } else {
        turn_pass();
        wgmma_wait<0>();
      }
      mbarrier_arrive(smem_addr(&bar_k_empty[s]));  // S read its K buffer: back to the producer
      // the tile's last S read Q: the Q tile goes back to the producer (the next tile's Q)
      if (it == n_blocks - 1) mbarrier_arrive(smem_addr(&bar_q_empty));
      fence_registers(acc_s[0]);

      scores.apply(acc_s, warp_row0, n0, g, t4, scores.mask_needed(m0, n0, kBlockM, kBlockN));
      softmax_update(acc_s, row_max, row_sum, scores.scale_log2(p), alpha);
      if constexpr (V::kHasDropout) dropout.apply(acc_s[0], warp_row0 / 16, n0 / 8, g, t4);
      if (!kStatic || pv) wgmma_wait<0>();  // P V of block it - 1 is done: its V buffer goes
      if (pv) mbarrier_arrive(smem_addr(&bar_v_empty[stage_of(it - 1)]));  // back to the producer
      fence_registers(acc_o[0]);
      fence_registers(acc_s[0]);
      pack_c_to_a<Element>(acc_s[0], p_frag);
    };
    if constexpr (Traits::kPeel) {
      if (n_blocks > 0) step(0, std::false_type{});
      for (int it = 1; it < n_blocks; ++it) step(it, std::true_type{});
    } else {
      for (int it = 0; it < n_blocks; ++it) step(it, it > 0);
    }
    if (n_blocks > 0) {
      if (n_blocks == 1) zero_v_tail();
      const int last = n_blocks - 1;
      mbarrier_wait(smem_addr(&bar_v_full[stage_of(last)]), phase_of(last));
      rescale_rows(acc_o, alpha);  // the last block's (no S left to hide it behind)
      fence_registers(acc_o[0]);
      turn_wait();
      wgmma_fence();
      issue_pv(last);
      turn_pass();
      wgmma_wait<0>();
      mbarrier_arrive(smem_addr(&bar_v_empty[stage_of(last)]));  // the V buffer of the last P V
      fence_registers(acc_o[0]);
      ++q_tiles;
    }
    kv += n_blocks;

    // Epilogue (common/fwd_epilogue_sw128.cuh): O /= l and lse. Where the CTA has a next tile
    // (persistent grid), whose Q is being loaded into the Q tile, O is stored from registers;
    // the CTA's last tile leaves the loop for the staged epilogue below.
    if (!kLoop || t + int(gridDim.x) >= tiles.count) {
      last_t = t;
      break;
    }
    fwd_epilogue_regs<Traits, V>(p, scores, acc_o[0], row_max[0], row_sum[0], tile.out(p),
                                 tile.lse(p), min(kBlockM, seq.seqlen_q - m0),
                                 cwg * 64 + (warp % 4) * 16, lane);
  }
  if (last_t >= 0) {
    // The CTA's last tile: O staged in this warp's rows of the Q tile (only its own warpgroup's
    // wgmma read them, all completed) for 16-byte stores. (Inside the tile loop this epilogue's
    // swizzled offsets made ptxas spill.)
    const FwdQueryBlock<Element, V> tile(p, tiles, last_t, kBlockM, kBlockN);
    const VariantScores<V> scores(p, tile.seq, tile.b, tile.h);
    fwd_epilogue_sw128<Traits, V, kBlockM>(p, scores, acc_o[0], row_max[0], row_sum[0],
                                           tile.out(p), tile.lse(p),
                                           min(kBlockM, tile.seq.seqlen_q - tile.m0),
                                           smem_raw + (smem_q - smem_raw_addr),
                                           cwg * 64 + (warp % 4) * 16, lane);
  }
  if (kConsumers > 1 && cwg == 0) turn_wait();  // the last consumer's final pass
#else
  __trap();  // sm90a only: the registry never serves this family elsewhere
#endif
}

}  // namespace flashjit
