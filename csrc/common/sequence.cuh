// sequence.cuh: the grid of every attention kernel, the device's shared-memory limits and opt-in
// and its multiprocessor count, and where one (batch, head) sequence lives, for fixed-length and
// varlen inputs alike. Family-agnostic: no tile code.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
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

// Host-side per-device caches: device indices 0 .. kCachedDevices - 1 are remembered, any other
// is queried on every call. Each runtime call they save costs microseconds of host time, which
// short calls (decoding, short sequences) notice.
constexpr int kCachedDevices = 64;

// Attribute kAttr of the current device (cudaDeviceGetAttribute, asked once per device: device
// attributes do not change); 0 where the runtime does not say.
template <cudaDeviceAttr kAttr>
int device_attribute() {
  static std::atomic<int> cached[kCachedDevices];  // 0: not asked yet (zero-initialised)
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable && (value = cached[device].load(std::memory_order_relaxed)) > 0) return value;
  if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) return 0;
  if (cacheable && value > 0) cached[device].store(value, std::memory_order_relaxed);
  return value;
}

// Shared memory of the current device: per block (opt-in maximum) and per multiprocessor.
struct SmemLimits {
  int per_block = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  int per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>();
};

// Multiprocessors of the current device; 0 where the runtime does not say.
inline int multiprocessors() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Dynamic shared memory above the 48 KB default needs an explicit opt-in per kernel and device
// (cudaFuncSetAttribute). kKernel's opt-in is made once per device, for the largest size asked
// so far, and remembered: the attribute stays set for the life of the device's primary context,
// which torch does not reset while the process runs. (kKernel: a __global__ function, one
// instantiation of this template and its cache per kernel.)
template <auto kKernel>
cudaError_t set_smem(size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static std::atomic<size_t> opted_in[kCachedDevices];  // bytes opted in per device, 0: none
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable && opted_in[device].load(std::memory_order_relaxed) >= smem) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  // (Two threads may both get here: both set the attribute, and the larger size is kept.)
  if (err == cudaSuccess && cacheable) {
    size_t seen = opted_in[device].load(std::memory_order_relaxed);
    while (seen < smem && !opted_in[device].compare_exchange_weak(seen, smem)) {
    }
  }
  return err;
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
