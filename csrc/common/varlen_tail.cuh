// varlen_tail.cuh: zeroes the rows of a varlen output that no sequence owns.
//
// A packed (total, heads, d) tensor may hold rows after the last sequence's end, cu_seqlens[batch]
// (buffers sized for the largest batch). The attention kernels never touch them, so without this
// an output would hand uninitialised memory to the caller there. The end row is read on the
// device: no synchronisation, and CUDA-graph replays see the current cu_seqlens.
//
// Defines the exported zero_rows_past_end_run (flash_api.h): include it in exactly one
// translation unit of a binary (each family's fwd.cu and bwd.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_api.h"

namespace flashjit {

// x: `rows` contiguous rows of `row_chunks` 16-byte chunks; zeroes rows [*end_row, rows).
__global__ void zero_rows_past_end_kernel(uint4* x, int64_t row_chunks, int64_t rows,
                                          const int* end_row) {
  const int64_t end = rows * row_chunks;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(*end_row) * row_chunks + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       i < end; i += step)
    x[i] = make_uint4(0u, 0u, 0u, 0u);
}

const char* zero_rows_past_end_run(void* x, int64_t row_bytes, int64_t rows, const int* end_row,
                                   void* stream) {
  if (rows == 0) return nullptr;
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return "zero_rows_past_end: rows must be whole 16-byte chunks, 16-byte aligned";
  constexpr int kThreads = 256, kMaxBlocks = 264;  // a grid-stride loop; the tail is usually empty
  const int64_t chunks = rows * (row_bytes / 16);
  const int blocks = int(chunks / kThreads + 1 < kMaxBlocks ? chunks / kThreads + 1 : kMaxBlocks);
  zero_rows_past_end_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<uint4*>(x), row_bytes / 16, rows, end_row);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
