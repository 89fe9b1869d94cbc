// sequence.cuh: the grid of every attention kernel, the device's shared-memory limits and opt-in
// and its multiprocessor count, and where one (batch, head) sequence lives, for fixed-length and
// varlen inputs alike. Family-agnostic: no tile code.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

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

// Shared memory of the current device: per block (opt-in maximum) and per multiprocessor.
struct SmemLimits {
  int per_block = 0, per_sm = 0;
  SmemLimits() {
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  }
};

// Multiprocessors of the current device; 0 where the runtime does not say.
inline int multiprocessors() {
  int device = 0, n = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  return n;
}

// Dynamic shared memory above the 48 KB default needs an explicit opt-in per kernel.
template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

// Where one (batch, head) sequence lives, for fixed-length and varlen inputs alike.
struct SeqInfo {
  int q_start, k_start;    // first row of the sequence in a varlen tensor (0 for fixed length)
  int seqlen_q, seqlen_k;  // this sequence's lengths (seqlen_k: keys that exist, after padding)
  int rows_k;              // key rows the sequence occupies in k/v (>= seqlen_k with padding)

  // One sequence of these lengths at row 0 (the decode family's, whose key count is per batch).
  __device__ SeqInfo(int seqlen_q_, int seqlen_k_)
      : q_start(0), k_start(0), seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), rows_k(seqlen_k_) {}

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

}  // namespace flashjit
