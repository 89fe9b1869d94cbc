// attention_common.cuh: device helpers shared by the forward and backward kernels (sm80 family):
// where a sequence lives (fixed length or varlen), the cp.async tile loader, and the score mask.
#pragma once

#include <cmath>
#include <cstdint>

#include "ptx.cuh"

namespace flashjit {

constexpr float kLn2 = 0.69314718055994530942f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Where one (batch, head) sequence lives, for fixed-length and varlen inputs alike.
struct SeqInfo {
  int q_start, k_start;    // first row of the sequence in a varlen tensor (0 for fixed length)
  int seqlen_q, seqlen_k;  // this sequence's lengths

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
};

}  // namespace flashjit
