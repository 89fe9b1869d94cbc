// fwd_kernel.cuh: the forward FlashAttention kernel, sm90 family (Hopper: wgmma). Device code
// only; fwd_launch.cuh has the grid and the tile choice, fwd.cu the instantiation of a spec.
//
// One CTA = one (query block of kBlockM = 64 * kNWarpGroups rows, head, batch). Warpgroup w owns
// query rows [64 w, 64 w + 64): it computes S = Q K^T (64 x kBlockN) with wgmma from shared
// memory, the online softmax in registers (fp32, exp2, as the sm80 family), and O += P V with P
// from registers as wgmma's A operand and V from shared memory. Within a warpgroup the softmax of
// key block j runs while the tensor cores do P V of block j-1 (issued right behind S of block j);
// K and V stream through two shared stages each, filled by cp.async one block ahead (paged K/V:
// row by row through the page table, common/problem.cuh).
// All tiles live in shared memory in the 128-byte swizzled layout wgmma reads (common/wgmma.cuh):
// a tile of R rows x kHeadDim is kHeadDim / 64 panels of (R rows x 128 bytes).
#pragma once

#include <cmath>

#include "common/dropout.cuh"
#include "common/fragment.cuh"
#include "common/fwd_epilogue_sw128.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/variant.cuh"
#include "common/wgmma.cuh"
#include "common/smem_sw128.cuh"

namespace flashjit {

// Tile shape of the sm90 forward. kMinBlocksPerSM caps registers at 64K / (threads * it).
template <typename Element_, int kHeadDim_, int kBlockN_, int kNWarpGroups_, int kMinBlocksPerSM_>
struct FwdSm90Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarpGroups = kNWarpGroups_;
  static constexpr int kBlockM = 64 * kNWarpGroups;  // each warpgroup: one m64 wgmma row block
  static constexpr int kNThreads = 128 * kNWarpGroups;
  static constexpr int kMinBlocksPerSM = kMinBlocksPerSM_;

  static constexpr int kNTilesS = kBlockN / 8;   // n8 tiles of S per thread's rows
  static constexpr int kNTilesO = kHeadDim / 8;  // n8 tiles of O
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row

  // Shared memory (bytes): Q, then kStages K tiles, then kStages V tiles; every tile starts
  // 1024-byte aligned (the swizzle pattern repeats every 8 rows of 128 bytes).
  static constexpr int kStages = 2;
  static constexpr int kPanelRowBytes = 128;  // 64 16-bit elements
  static constexpr int kSmemQ = kBlockM * kHeadDim * 2;
  static constexpr int kSmemKV = kBlockN * kHeadDim * 2;  // one K or V stage
  static constexpr int kSmemAlign = 1024;                 // slack to align the dynamic base
  static constexpr size_t kSmemBytes = size_t(kSmemQ + 2 * kStages * kSmemKV + kSmemAlign);

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of P V: head-dim bucket 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma N of Q K^T: kBlockN 64 or 128");
  static_assert(kNThreads % kChunksPerRow == 0 && (kNThreads / kChunksPerRow) % 8 == 0,
                "tile loader: each thread keeps one column chunk and one row % 8");
};

template <typename Traits, typename V>  // V: the Variant (common/variant.cuh)
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSM)
    flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem_raw_addr = smem_addr(smem_raw);
  const uint32_t smem_q = (smem_raw_addr + Traits::kSmemAlign - 1) & ~uint32_t(Traits::kSmemAlign - 1);
  const uint32_t smem_k = smem_q + Traits::kSmemQ;                     // kStages K tiles
  const uint32_t smem_v = smem_k + Traits::kStages * Traits::kSmemKV;  // kStages V tiles

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4;                // warpgroup: query rows [64 wg, 64 wg + 64) of the tile
  const int g = lane / 4, t = lane % 4;  // accumulator row group and column pair
  // This CTA's query block, sequence, pointers and key-block range (common/problem.cuh).
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const FwdQueryBlock<Element, V> tile(p, hb, kBlockM, kBlockN);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int m0 = tile.m0;
  const int n_last = tile.n_end - 1, n_blocks = tile.n_end - tile.n_begin;  // blocks of the band
  const VariantScores<V> scores(p, seq, tile.b, tile.h);  // the variant (common/variant.cuh)
  const Element *q = tile.q, *k = tile.k, *v = tile.v;
  // First query row of this thread's warp (16 rows per warp, as in the wgmma D layout).
  const int warp_row0 = m0 + wg * 64 + (warp % 4) * 16;

  // Per-thread state: rows g and g + 8 of the warp's 16 (the "m16 tile" of the shared softmax).
  float acc_o[1][kNTilesO][4];  // O (64 x kHeadDim per warpgroup), unnormalised
  float acc_s[1][kNTilesS][4];  // S, then P (64 x kBlockN per warpgroup)
  float row_max[1][2] = {{-INFINITY, -INFINITY}};
  float row_sum[1][2] = {{0.f, 0.f}};
  zero_fragments(acc_o);
  zero_fragments(acc_s);

  DropoutMask dropout = V::kHasDropout
                            ? DropoutMask(p.dropout, tile.b, tile.h, p.heads, p.seqlen_q, p.seqlen_k)
                            : DropoutMask();
  const int rows_q = min(kBlockM, seq.seqlen_q - m0);
  // Key blocks of the band are processed from the last to the first (the masked ones come first):
  // iteration `it` works on block n_last - it. Its K tile goes to K stage it % 2, its V tile to V
  // stage it % 2; one cp.async group (the caller commits) per call.
  auto load_kv = [&](uint32_t smem, const Element* gmem, int64_t row_stride, int it) {
    const int n0 = (n_last - it) * kBlockN;
    load_tile_sw128<Traits, kBlockN>(smem + (it % 2) * Traits::kSmemKV, gmem + n0 * row_stride,
                                     row_stride, seq.seqlen_k - n0, p.head_dim, tid);
  };
  // Paged K/V (V::kPagedKV): the same tiles, each key row through the page table
  // (FwdQueryBlock::k_rows, v_rows; rows of pages outside the cache and past seqlen_k are zeros).
  auto load_paged = [&](uint32_t smem, bool is_v, int it) {
    const int n0 = (n_last - it) * kBlockN;
    load_rows_sw128<Traits, kBlockN>(smem + (it % 2) * Traits::kSmemKV,
                                     is_v ? tile.v_rows(p, n0) : tile.k_rows(p, n0),
                                     seq.seqlen_k - n0, p.head_dim, tid);
  };
  auto load_k = [&](int it) {
    if constexpr (V::kPagedKV) load_paged(smem_k, false, it);
    else load_kv(smem_k, k, p.k_row_stride, it);
  };
  auto load_v = [&](int it) {
    if constexpr (V::kPagedKV) load_paged(smem_v, true, it);
    else load_kv(smem_v, v, p.v_row_stride, it);
  };
  if (n_blocks > 0) {
    load_tile_sw128<Traits, kBlockM>(smem_q, q, p.q_row_stride, rows_q, p.head_dim, tid);
    load_k(0);
    cp_async_commit();
  }

  // Descriptors (common/wgmma.cuh). k16 step kk of the head dim lies in panel kk / 4, 32 bytes
  // further per step inside it.
  //   Q: this warpgroup's 64 rows, K-major, 8-row groups 1024 bytes apart.
  //   K: kBlockN keys (the N of S), K-major, likewise.
  //   V: the B operand of P V, keys x head dim with the head dim contiguous (MN-major): 8 keys per
  //      1024-byte group (SBO), the next 64 head-dim columns one panel further (LBO).
  const uint64_t desc_q = smem_desc_sw128(smem_q + wg * 64 * 128, 16, 1024);
  const uint64_t desc_k0 = smem_desc_sw128(smem_k, 16, 1024);
  const uint64_t desc_v0 = smem_desc_sw128(smem_v, kBlockN * 128, 1024);
  auto kstep_offset = [](int kk, int rows) { return (kk / 4) * rows * 128 + (kk % 4) * 32; };
  // O += P V for the block of iteration `it` (V stage it % 2), P from registers as the A operand:
  // one wgmma per k16 step of keys (16 keys = 2048 bytes of the V stage). Issued, not waited for.
  uint32_t p_frag[kBlockN / 16][4];  // P of the previous block, packed (wgmma A layout)
  auto issue_pv = [&](int it) {
    const uint64_t desc_v = desc_advance(desc_v0, (it % 2) * Traits::kSmemKV);
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
      wgmma_rs<Element, kHeadDim>(acc_o[0], p_frag[ks], desc_advance(desc_v, ks * 16 * 128));
    wgmma_commit();
  };

  // Pipeline, one barrier per key block. Iteration `it` computes S = Q K[it]^T and, behind it on
  // the tensor cores, O += P[it-1] V[it-1]; the softmax of S[it] runs while that P V is in flight
  // (only the rescale of O waits for it). Right after the barrier it requests K[it+1] and V[it]
  // into the stages that iteration it-1 finished reading; each tile thus lands during one whole
  // iteration (V one block behind K).
  for (int it = 0; it < n_blocks; ++it) {
    const int n0 = (n_last - it) * kBlockN;
    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's cp.async writes -> visible to wgmma
    __syncthreads();  // K[it], V[it-1] (and Q) are in shared memory; every warpgroup's wgmma of
                      // iteration it-1 (S[it-1] on K stage (it+1) % 2, P V on V stage it % 2) is done
    if (it + 1 < n_blocks) load_k(it + 1);
    load_v(it);
    cp_async_commit();

    // S = Q K^T: (64 x kBlockN) per warpgroup, fp32, kHeadDim / 16 wgmma k-steps.
    const uint64_t desc_k = desc_advance(desc_k0, (it % 2) * Traits::kSmemKV);
    fence_registers(acc_o[0]);  // the rescale of O and the packing of P stay above the fence
    fence_registers(p_frag);
    wgmma_fence();  // orders this thread's earlier writes of acc_o and p_frag before the wgmmas
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockN>(acc_s[0], desc_advance(desc_q, kstep_offset(kk, kBlockM)),
                                 desc_advance(desc_k, kstep_offset(kk, kBlockN)), kk > 0);
    wgmma_commit();
    if (it > 0) {
      issue_pv(it - 1);
      wgmma_wait<1>();  // S is done; P V may still run
    } else {
      wgmma_wait<0>();
    }
    fence_registers(acc_s[0]);

    // Scores -> logits (common/variant.cuh): softcap, ALiBi, -inf outside the band.
    scores.apply(acc_s, warp_row0, n0, g, t, scores.mask_needed(m0, n0, kBlockM, kBlockN));

    // Online softmax (common/softmax.cuh): S becomes P; alpha rescales O below.
    float alpha[1][2];
    softmax_update(acc_s, row_max, row_sum, scores.scale_log2(p), alpha);

    // Dropout (after the row sums: l normalises the undropped P): P = P * mask / keep.
    if constexpr (V::kHasDropout) dropout.apply(acc_s[0], warp_row0 / 16, n0 / 8, g, t);

    // The previous P V is done: now O may be rescaled and p_frag overwritten. (The register
    // fences keep the compiler from moving either above the wait.)
    wgmma_wait<0>();
    fence_registers(acc_o[0]);
    fence_registers(acc_s[0]);
    rescale_rows(acc_o, alpha);
    pack_c_to_a<Element>(acc_s[0], p_frag);  // D layout of two n8 tiles = A layout of a k16 step
  }
  // The last block's O += P V, once its V tile has landed.
  if (n_blocks > 0) {
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();
    wgmma_fence();
    issue_pv(n_blocks - 1);
    wgmma_wait<0>();
    fence_registers(acc_o[0]);
  }

  // Epilogue (common/fwd_epilogue_sw128.cuh): O /= l and lse, O staged in this warp's rows of
  // the Q tile (only its warpgroup's wgmma read them, and those have completed); the output
  // pointers computed only now: registers are scarce in the loop.
  fwd_epilogue_sw128<Traits, V, kBlockM>(p, scores, acc_o[0], row_max[0], row_sum[0],
                                         tile.out(p), tile.lse(p), rows_q,
                                         smem_raw + (smem_q - smem_raw_addr),
                                         wg * 64 + (warp % 4) * 16, lane);
#else
  __trap();  // compiled for an arch without wgmma: the launcher never selects this kernel there
#endif
}

}  // namespace flashjit
