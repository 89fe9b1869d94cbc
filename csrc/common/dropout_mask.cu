// dropout_mask.cu: the test-only dropout-mask probe's translation unit (dropout_mask_binding.cpp):
// the keep mask of a fixed-length call, computed by the same device function as the attention
// kernels (dropout.cuh). Torch-free.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dropout.cuh"
#include "common/sequence.cuh"
#include "flash_api.h"

namespace flashjit {

// Test kernel: the dropout keep mask (uint8, 1 = kept) of a fixed-length call, (batch, heads,
// seqlen_q, seqlen_k) contiguous, element for element what the attention kernels use. One thread
// per (b, h, m16 x n8 tile, lane), in a grid-stride loop.
__global__ void dropout_mask_kernel(uint8_t* mask, DropoutParams p, int batch, int heads,
                                    int seqlen_q, int seqlen_k) {
  const int m16 = ceil_div(seqlen_q, 16), n8 = ceil_div(seqlen_k, 8);
  const int64_t lanes = int64_t(batch) * heads * m16 * n8 * 32;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < lanes;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int lane = int(idx % 32);
    const int64_t tile = idx / 32;
    const int j8 = int(tile % n8), i16 = int(tile / n8 % m16), bh = int(tile / n8 / m16);
    const int g = lane / 4, t = lane % 4;
    const DropoutMask drop(p, bh / heads, bh % heads, heads, seqlen_q, seqlen_k);
    const uint32_t keep = drop.keep_bits(i16, j8, g, t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i16 * 16 + (e / 2) * 8 + g, j = j8 * 8 + 2 * t + e % 2;
      if (i < seqlen_q && j < seqlen_k)
        mask[(int64_t(bh) * seqlen_q + i) * seqlen_k + j] = uint8_t((keep >> e) & 1u);
    }
  }
}

const char* dropout_mask_run(uint8_t* mask, const DropoutParams& dropout, int batch, int heads,
                             int seqlen_q, int seqlen_k, void* stream) {
  constexpr int kThreads = 256;
  const int64_t lanes =
      int64_t(batch) * heads * ceil_div(seqlen_q, 16) * ceil_div(seqlen_k, 8) * 32;
  const int blocks = int(lanes < int64_t(kThreads) * 65536 ? (lanes + kThreads - 1) / kThreads
                                                           : 65536);
  dropout_mask_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      mask, dropout, batch, heads, seqlen_q, seqlen_k);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashjit
