// padded_tile.cuh: tiles of kRows x kHeadDim 16-bit elements in shared memory with padded rows
// (Traits::kSmemRow elements per row, an odd number of 16-byte chunks, so that the 8 rows of an
// ldmatrix or of a fragment store hit 8 different bank groups): the cp.async load from global
// memory and the 16-byte store back. Traits gives Element, kNThreads, kChunksPerRow, kSmemRow.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "common/sequence.cuh"

namespace flashjit {

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

// Copy a (kRows x kHeadDim) shared tile (padded rows) to global memory with 16-byte stores: rows
// < rows_valid, columns < d.
template <typename Traits, int kRows>
__device__ __forceinline__ void store_tile(typename Traits::Element* gmem, int64_t row_stride,
                                           const typename Traits::Element* smem, int rows_valid,
                                           int d, int tid) {
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kChunks, Traits::kNThreads); ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if ((kChunks % Traits::kNThreads == 0 || idx < kChunks) && row < rows_valid && col < d) {
      *reinterpret_cast<uint4*>(gmem + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem + row * Traits::kSmemRow + col);
    }
  }
}

}  // namespace flashjit
