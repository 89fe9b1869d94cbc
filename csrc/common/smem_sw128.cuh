// smem_sw128.cuh: shared-memory tiles in the 128-byte swizzled layout that wgmma reads (see
// wgmma.cuh): a tile of kRows rows x C 16-bit columns is C / 64 panels of (kRows x 128
// bytes), chunk c of row r of a panel at chunk c ^ (r % 8), which is also how TMA writes a box
// with CU_TENSOR_MAP_SWIZZLE_128B. Used by the Hopper families (sm90, sm90ws).
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "common/sequence.cuh"

namespace flashjit {

// Byte offset of element (row, col) in a swizzled tile of kRows rows (col a multiple of 8 for a
// 16-byte chunk; the offset of any col is that of its chunk + (col % 8) * 2).
template <int kRows>
__device__ __forceinline__ uint32_t sw128_offset(int row, int col) {
  return (col / 64) * kRows * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) * 16) +
         (col % 8) * 2;
}

// One warp's 16 rows [warp_row, warp_row + 16) of a swizzled shared tile of kRows rows, written to
// global memory (`dst`: the tile's row 0, row stride `row_stride` elements) with 16-byte stores,
// rows < rows_valid and columns < d only: how the Hopper kernels write a tile they staged.
template <typename Traits, int kRows, typename Element>
__device__ __forceinline__ void store_warp_rows_sw128(Element* dst, int64_t row_stride,
                                                      const unsigned char* stage, int warp_row,
                                                      int rows_valid, int d, int lane) {
  constexpr int kWarpChunks = 16 * Traits::kChunksPerRow;
  static_assert(kWarpChunks % 32 == 0, "whole warp passes");
#pragma unroll
  for (int i = 0; i < kWarpChunks / 32; ++i) {
    const int idx = i * 32 + lane;
    const int row = warp_row + idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if (row < rows_valid && col < d)
      *reinterpret_cast<uint4*>(dst + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(stage + sw128_offset<kRows>(row, col));
  }
}

// Chunk `col` of rows row0 + i * kRowStep (< kRows) of a tile, the part load_tile_sw128 gives
// one thread (kRowStep a multiple of 8: one swizzle offset of the chunk serves every such row).
template <int kRows, int kRowStep, typename Element>
__device__ __forceinline__ void load_rows_sw128(uint32_t smem, const Element* gmem,
                                                int64_t row_stride, int rows_valid, int d,
                                                int row0, int col) {
  const Element* src = gmem + row0 * row_stride + col;
  const uint32_t dst = smem + sw128_offset<kRows>(row0, col);
#pragma unroll
  for (int i = 0; i < ceil_div(kRows, kRowStep); ++i) {
    if (kRows % kRowStep == 0 || row0 + i * kRowStep < kRows) {
      const bool valid = row0 + i * kRowStep < rows_valid && col < d;
      cp_async_16(dst + i * kRowStep * 128, valid ? src + i * kRowStep * row_stride : gmem, valid);
    }
  }
}

// Copy a (kRows x kHeadDim) tile from global memory (row stride `row_stride` elements) into a
// swizzled shared tile with cp.async; rows >= rows_valid and columns >= d are zero-filled. Thread
// tid copies column chunk tid % kChunksPerRow of rows tid / kChunksPerRow + i * kRowStep (< kRows):
// since kRowStep is a multiple of 8, the swizzle of its chunk is the same in every row it copies.
// Where the threads do not split into whole rows that way (d 192: 24 chunks a row), the tile is
// copied panel by panel (64 columns, 8 chunks a row), each thread with one chunk of every
// (kNThreads / 8)-th row of each panel.
template <typename Traits, int kRows>
__device__ __forceinline__ void load_tile_sw128(uint32_t smem, const typename Traits::Element* gmem,
                                                int64_t row_stride, int rows_valid, int d, int tid) {
  if constexpr (Traits::kNThreads % Traits::kChunksPerRow == 0 &&
                (Traits::kNThreads / Traits::kChunksPerRow) % 8 == 0) {
    load_rows_sw128<kRows, Traits::kNThreads / Traits::kChunksPerRow>(
        smem, gmem, row_stride, rows_valid, d, tid / Traits::kChunksPerRow,
        (tid % Traits::kChunksPerRow) * 8);
  } else {  // panel by panel: 8 chunks a row
    constexpr int kRowStep = Traits::kNThreads / 8;
    static_assert(Traits::kNThreads % 8 == 0 && kRowStep % 8 == 0 && Traits::kChunksPerRow % 8 == 0,
                  "rows of one swizzle phase per thread, whole panels");
#pragma unroll
    for (int panel = 0; panel < Traits::kChunksPerRow / 8; ++panel)
      load_rows_sw128<kRows, kRowStep>(smem, gmem, row_stride, rows_valid, d, tid / 8,
                                       panel * 64 + (tid % 8) * 8);
  }
}

// As load_tile_sw128, each row from its own address (paged K/V: common/problem.cuh's PagedRows):
// rows.find(r) looks row r up (a read of the page table), rows.address(found) is its first
// element or nullptr for a row that reads as zeros, rows.base any valid global address (the
// source of the zero-filled chunks, which read nothing). Every lookup of this thread's rows is
// issued before the first is used, so they are in flight together; rows past rows_valid (>= 1)
// look up row rows_valid - 1 instead (inside the sequence's table) and are zero-filled.
template <typename Traits, int kRows, typename Rows>
__device__ __forceinline__ void load_rows_sw128(uint32_t smem, const Rows& rows, int rows_valid,
                                                int d, int tid) {
  constexpr int kRowStep = Traits::kNThreads / Traits::kChunksPerRow;
  constexpr int kIters = ceil_div(kRows, kRowStep);
  const int row0 = tid / Traits::kChunksPerRow, col = (tid % Traits::kChunksPerRow) * 8;
  const uint32_t dst = smem + sw128_offset<kRows>(row0, col);
  decltype(rows.find(0)) found[kIters];
#pragma unroll
  for (int i = 0; i < kIters; ++i) found[i] = rows.find(min(row0 + i * kRowStep, rows_valid - 1));
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int row = row0 + i * kRowStep;
    if (kRows % kRowStep == 0 || row < kRows) {
      const auto* src = row < rows_valid && col < d ? rows.address(found[i]) : nullptr;
      cp_async_16(dst + i * kRowStep * 128, src != nullptr ? src + col : rows.base,
                  src != nullptr);
    }
  }
}

// Copy a swizzled (kRows x kHeadDim) shared tile to global memory (row stride `row_stride`
// elements) with 16-byte stores: rows < rows_valid, columns < d.
template <typename Traits, int kRows>
__device__ __forceinline__ void store_tile_sw128(typename Traits::Element* gmem, int64_t row_stride,
                                                 const unsigned char* smem, int rows_valid, int d,
                                                 int tid) {
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
  static_assert(kChunks % Traits::kNThreads == 0, "whole passes");
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kNThreads; ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Traits::kChunksPerRow, col = (idx % Traits::kChunksPerRow) * 8;
    if (row < rows_valid && col < d) {
      *reinterpret_cast<uint4*>(gmem + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem + sw128_offset<kRows>(row, col));
    }
  }
}

}  // namespace flashjit
