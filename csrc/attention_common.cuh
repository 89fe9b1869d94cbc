// attention_common.cuh: device helpers shared by the forward and backward kernels of both families:
// where a sequence lives (fixed length or varlen), the cp.async tile loader (padded tiles, sm80
// family), the score mask, a forward CTA's tile and the online softmax.
#pragma once

#include <cmath>
#include <cstdint>

#include "flash_params.h"
#include "ptx.cuh"

namespace flashjit {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The grid of every attention kernel: x = the blocks of one (head, batch) pair, and the
// heads * batch pairs numbered hb = h + heads * b over y and z, since CUDA caps gridDim.y and
// gridDim.z at 65535 (x at 2^31 - 1). With heads * batch <= 65535 this is the (blocks, heads,
// batch) grid it replaces, launched in the same order.
constexpr int kMaxGridYZ = 65535;
inline dim3 attention_grid(int blocks, int heads, int batch) {
  const int64_t pairs = int64_t(heads) * batch;
  const int64_t y = pairs < kMaxGridYZ ? pairs : kMaxGridYZ;
  return dim3(unsigned(blocks), unsigned(y), unsigned((pairs + y - 1) / y));
}

// This CTA's (head, batch) pair of an attention_grid; `valid` is false for the few CTAs past the
// last pair (y * z rounds heads * batch up), which must return at once.
struct GridHeadBatch {
  int h, b;
  bool valid;
  __device__ GridHeadBatch(int heads, int batch) {
    const int64_t hb = blockIdx.y + int64_t(gridDim.y) * blockIdx.z;
    valid = hb < int64_t(heads) * batch;
    h = int(hb % heads);
    b = int(hb / heads);
  }
};

// Where one (batch, head) sequence lives, for fixed-length and varlen inputs alike.
struct SeqInfo {
  int q_start, k_start;    // first row of the sequence in a varlen tensor (0 for fixed length)
  int seqlen_q, seqlen_k;  // this sequence's lengths (seqlen_k: keys that exist, after padding)
  int rows_k;              // key rows the sequence occupies in k/v (>= seqlen_k with padding)

  template <typename Params>
  __device__ SeqInfo(const Params& p, int b) {
    if (p.cu_seqlens_q != nullptr) {
      q_start = p.cu_seqlens_q[b];
      k_start = p.cu_seqlens_k[b];
      seqlen_q = p.cu_seqlens_q[b + 1] - q_start;
      seqlen_k = p.cu_seqlens_k[b + 1] - k_start;
    } else {
      q_start = k_start = 0;
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
    }
    // Key padding (SDPA-style masks): only keys j < seqused_k[b] exist.
    rows_k = seqlen_k;
    if (p.seqused_k != nullptr) seqlen_k = min(seqlen_k, p.seqused_k[b]);
  }
  // Offset, in elements, of row 0 of head h of sequence b.
  __device__ int64_t q_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                              int h, bool varlen) const {
    return (varlen ? 0 : b * batch_stride) + q_start * row_stride + h * head_stride;
  }
  __device__ int64_t k_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                              int h, bool varlen) const {
    return (varlen ? 0 : b * batch_stride) + k_start * row_stride + h * head_stride;
  }
};

// Copy a (kRows x kHeadDim) tile from global memory (row stride `row_stride` elements) into
// padded shared memory with cp.async. Rows >= rows_valid and columns >= d are zero-filled, so that
// padding contributes 0 to every product (and never NaN).
template <typename Traits, int kRows>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const typename Traits::Element* gmem,
                                                int64_t row_stride, int rows_valid, int d,
                                                int tid) {
  using Element = typename Traits::Element;
  constexpr int kChunksPerRow = Traits::kChunksPerRow, kNThreads = Traits::kNThreads;
  constexpr int kChunks = kRows * kChunksPerRow;
  if constexpr (kNThreads % kChunksPerRow == 0 && kChunks % kNThreads == 0) {
    // Each thread copies one fixed column chunk of every (kNThreads / kChunksPerRow)-th row:
    // one base pointer and one stride live in registers, not an address per chunk.
    constexpr int kRowStep = kNThreads / kChunksPerRow;
    const int row0 = tid / kChunksPerRow, col = (tid % kChunksPerRow) * 8;
    const Element* src = gmem + row0 * row_stride + col;
    const uint32_t dst = smem + (row0 * Traits::kSmemRow + col) * sizeof(Element);
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const bool valid = row0 + i * kRowStep < rows_valid && col < d;
      cp_async_16(dst + i * kRowStep * Traits::kSmemRow * sizeof(Element),
                  valid ? src + i * kRowStep * row_stride : gmem, valid);
    }
  } else {
#pragma unroll
    for (int i = 0; i < ceil_div(kChunks, kNThreads); ++i) {
      const int idx = i * kNThreads + tid;
      if (kChunks % kNThreads == 0 || idx < kChunks) {
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * 8;
        const bool valid = row < rows_valid && col < d;
        const Element* src = valid ? gmem + row * row_stride + col : gmem;
        cp_async_16(smem + (row * Traits::kSmemRow + col) * sizeof(Element), src, valid);
      }
    }
  }
}

// Which scores a query may not see: keys past its sequence's end and, for causal attention, keys
// after its diagonal (query i sees key j iff j <= i + causal_offset).
template <bool kIsCausal>
struct ScoreMask {
  int seqlen_k;
  int causal_offset;

  // Does the (kBlockM x kBlockN) block at (m0, n0) hold any masked score?
  __device__ __forceinline__ bool needed(int m0, int n0, int block_n) const {
    return n0 + block_n > seqlen_k || (kIsCausal && n0 + block_n - 1 > m0 + causal_offset);
  }

  // Sets masked scores to -inf in a warp's scores in the mma C layout: m16 tile mt, n8 tile nt,
  // element e of lane (g, t) is (row0 + mt * 16 + (e / 2) * 8 + g, col0 + nt * 8 + 2 t + e % 2).
  template <int kMTiles, int kNTiles>
  __device__ __forceinline__ void apply(float (&acc)[kMTiles][kNTiles][4], int row0, int col0,
                                        int g, int t) const {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row0 + mt * 16 + (e / 2) * 8 + g;
          const int col = col0 + nt * 8 + 2 * t + (e % 2);
          if (col >= seqlen_k || (kIsCausal && col > row + causal_offset)) acc[mt][nt][e] = -INFINITY;
        }
  }

  // The same for transposed scores S^T (rows = keys, columns = queries) of one m64 wgmma
  // accumulator row block: element e of n8 tile nt of lane (g, t) is key key0 + (e / 2) * 8 + g,
  // query query0 + nt * 8 + 2 t + e % 2 (key0: the first key of the thread's warp).
  template <int kNTiles>
  __device__ __forceinline__ void apply_transposed(float (&acc)[kNTiles][4], int key0, int query0,
                                                   int g, int t) const {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + (e / 2) * 8 + g;
        const int query = query0 + nt * 8 + 2 * t + (e % 2);
        if (key >= seqlen_k || (kIsCausal && key > query + causal_offset)) acc[nt][e] = -INFINITY;
      }
  }
};

// What one forward CTA works on: query rows [m0, m0 + block_m) of head h of sequence b, against
// key blocks [0, n_blocks) of block_n keys (fewer with causal masking), and where Q (at row m0),
// K, V (at row 0), O and lse live. Shared by the sm80 and sm90 forward kernels.
template <typename Element, bool kIsCausal>
struct FwdTile {
  SeqInfo seq;
  bool varlen;
  int b, h, m0;
  int n_blocks;
  ScoreMask<kIsCausal> mask;
  const Element *q, *k, *v;

  __device__ FwdTile(const FwdParams& p, int m_block, int h_, int b_, int block_m, int block_n)
      : seq(p, b_), varlen(p.cu_seqlens_q != nullptr), b(b_), h(h_), m0(m_block * block_m) {
    const int hk = h / (p.heads / p.heads_k);  // MQA/GQA: the K/V head of query head h
    q = static_cast<const Element*>(p.q) +
        seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen) +
        m0 * p.q_row_stride;
    k = static_cast<const Element*>(p.k) +
        seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen);
    v = static_cast<const Element*>(p.v) +
        seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen);
    // Query i sees key j iff j <= i + causal_offset (causal only), and j < seqlen_k.
    const int causal_offset = p.causal_bottom_right ? seq.seqlen_k - seq.seqlen_q : 0;
    mask = ScoreMask<kIsCausal>{seq.seqlen_k, causal_offset};
    int n_end = seq.seqlen_k;
    if constexpr (kIsCausal) n_end = min(n_end, max(0, m0 + block_m + causal_offset));
    n_blocks = ceil_div(n_end, block_n);
  }
  // The CTA's own tile of an attention_grid (query blocks, heads x batch), heavier (later) query
  // blocks first, since with causal masking they have the most keys.
  __device__ FwdTile(const FwdParams& p, const GridHeadBatch& hb, int block_m, int block_n)
      : FwdTile(p, gridDim.x - 1 - blockIdx.x, hb.h, hb.b, block_m, block_n) {}
  __device__ bool empty() const { return m0 >= seq.seqlen_q; }  // past this sequence's end
  // O at row m0, and lse at row m0 (computed late: registers are scarce in the main loop).
  __device__ Element* out(const FwdParams& p) const {
    return static_cast<Element*>(p.o) +
           seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h, varlen) +
           m0 * p.o_row_stride;
  }
  __device__ float* lse(const FwdParams& p) const {
    return p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + seq.q_start +
           m0;
  }
};

// One block of the online softmax, per row: m' = max(m, max_j s_j); l = l alpha + sum_j p_j with
// p_j = exp2(s_j c - m' c), alpha = exp2(m c - m' c), c = scale * log2(e); the scores become P in
// place and alpha is returned for the rescale of O (O *= alpha, rescale_rows), which the caller
// may defer (the sm90 kernel does it once the previous P V has completed). Each exponent is
// rn(s c) - rn(m' c), two separately rounded products (__fmul_rn: never contracted into one fma),
// so that the row's maximum gets exactly exp2(0) = 1 however large the logits: an fma's
// s c - rn(m' c) would leave the rounding error of rn(m' c), up to ~1e-3 at |m' c| ~ 1e4, in
// every P. The backward recomputes P the same way from the lse this writes (finish_row).
// Scores and the row statistics are in the mma C layout (see ScoreMask::apply): each thread
// holds rows g and g + 8 of each m16 tile, and l is this thread's partial sum over its columns
// (quad_sum completes it at the end). A row with no key yet keeps m' = -inf and uses 0 as its
// reference, so every exp2 argument is -inf (-> 0), never NaN.
template <int kMTiles, int kNTilesS>
__device__ __forceinline__ void softmax_update(float (&acc_s)[kMTiles][kNTilesS][4],
                                               float (&row_max)[kMTiles][2],
                                               float (&row_sum)[kMTiles][2], float scale_log2,
                                               float (&alpha)[kMTiles][2]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = row_max[mt][half];
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt)
        mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]));
      mx = quad_max(mx);
      const float ref = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2);
      alpha[mt][half] = fast_exp2(__fmul_rn(row_max[mt][half], scale_log2) - ref);
      row_max[mt][half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          acc_s[mt][nt][e] = fast_exp2(__fmul_rn(acc_s[mt][nt][e], scale_log2) - ref);  // P
          sum += acc_s[mt][nt][e];
        }
      row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
    }
}

// O *= alpha, per row (C layout: elements 0, 1 of an n8 tile are row g, elements 2, 3 row g + 8).
template <int kMTiles, int kNTilesO>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kMTiles][kNTilesO][4],
                                             const float (&alpha)[kMTiles][2]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] *= alpha[mt][e / 2];
}

// Both steps at once: S becomes P, O and the row statistics are rescaled.
template <int kMTiles, int kNTilesS, int kNTilesO>
__device__ __forceinline__ void online_softmax_step(float (&acc_s)[kMTiles][kNTilesS][4],
                                                    float (&acc_o)[kMTiles][kNTilesO][4],
                                                    float (&row_max)[kMTiles][2],
                                                    float (&row_sum)[kMTiles][2],
                                                    float scale_log2) {
  float alpha[kMTiles][2];
  softmax_update(acc_s, row_max, row_sum, scale_log2, alpha);
  rescale_rows(acc_o, alpha);
}

// The end of the online softmax for one row: l = the quad's sum of the row's partial sums;
// O is scaled by inv_l = 1 / l, and lse, in log2 units (the kernels' convention: lse_log2 =
// lse / ln(2) = log2 sum_j exp2(s_j c)), is rn(m c) + log2(l), the reference the backward
// subtracts from rn(s c) to recompute P. A row that saw no key (l = 0): inv_l = 0 (O = 0) and
// lse = -inf.
struct RowResult {
  float inv_l, lse_log2;
};
__device__ __forceinline__ RowResult finish_row(float row_max, float row_sum, float scale_log2) {
  const float l = quad_sum(row_sum);
  if (!(l > 0.f)) return {0.f, -INFINITY};
  return {1.f / l, __fmul_rn(row_max, scale_log2) + __log2f(l)};
}

// Two values of O packed as Element for the epilogue's pass `pass`: 0 gives round(O), 1 gives the
// rounding residual O - round(O) (also rounded; round(O) + residual carries O to about twice the
// Element's precision), which the backward adds back in D = rowsum(dO * O) (FwdParams::o_residual).
template <typename Element>
__device__ __forceinline__ uint32_t pack_out(float a, float b, int pass) {
  const uint32_t rounded = pack2<Element>(a, b);
  if (pass == 0) return rounded;
  const float2 r = unpack2<Element>(rounded);
  return pack2<Element>(a - r.x, b - r.y);
}

}  // namespace flashjit
