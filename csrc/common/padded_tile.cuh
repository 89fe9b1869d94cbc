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

// As load_tile_async, each row from its own address (paged K/V: common/problem.cuh's
// PagedRows): rows.find(r) looks row r up (a read of the page table), rows.address(found) is its
// first element or nullptr for a row that reads as zeros, rows.base any valid global address
// (the source of the zero-filled chunks, which read nothing). One lookup per 16-byte chunk a
// thread copies, all issued before the first is used, so they are in flight together; rows past
// rows_valid (>= 1) look up row rows_valid - 1 instead (inside the sequence's table) and are
// zero-filled.
template <typename Traits, int kRows, typename Rows>
__device__ __forceinline__ void load_rows_async(uint32_t smem, const Rows& rows, int rows_valid,
                                                int d, int tid) {
  using Element = typename Traits::Element;
  constexpr int kChunksPerRow = Traits::kChunksPerRow, kNThreads = Traits::kNThreads;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kIters = ceil_div(kChunks, kNThreads);
  // Chunk i of thread tid is idx = i * kNThreads + tid: row idx / kChunksPerRow, column chunk
  // idx % kChunksPerRow (with kNThreads % kChunksPerRow == 0: always column chunk
  // tid % kChunksPerRow, rows kNThreads / kChunksPerRow apart, as load_tile_async's fast path).
  constexpr bool kFixedColumn = kNThreads % kChunksPerRow == 0;
  auto row_of = [&](int i) {
    return kFixedColumn ? tid / kChunksPerRow + i * (kNThreads / kChunksPerRow)
                        : (i * kNThreads + tid) / kChunksPerRow;
  };
  auto col_of = [&](int i) {
    return (kFixedColumn ? tid : i * kNThreads + tid) % kChunksPerRow * 8;
  };
  decltype(rows.find(0)) found[kIters];
#pragma unroll
  for (int i = 0; i < kIters; ++i) found[i] = rows.find(min(row_of(i), rows_valid - 1));
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    if (kChunks % kNThreads == 0 || i * kNThreads + tid < kChunks) {
      const Element* src =
          row_of(i) < rows_valid && col_of(i) < d ? rows.address(found[i]) : nullptr;
      cp_async_16(smem + (row_of(i) * Traits::kSmemRow + col_of(i)) * sizeof(Element),
                  src != nullptr ? src + col_of(i) : rows.base, src != nullptr);
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
