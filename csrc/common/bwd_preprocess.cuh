// bwd_preprocess.cuh: the first kernel of every family's backward: D = rowsum(dO * O) per query
// row, and the zeroing of the fp32 dQ accumulator (atomic path). Row-wise: no tile code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/sequence.cuh"

namespace flashjit {

// ---------------------------------------------------------------------------------------------
// Preprocess: D_i = rowsum(dO_i * O_i) in fp32 for a block of kAccumPadRows rows (0 past the
// sequence end), with O = round(O) + its rounding residual where the forward wrote one, and, on
// the atomic path, zero the same rows of dq_accum (every column of the bucket: the
// fragment-ordered tiles use them all).
// ---------------------------------------------------------------------------------------------
constexpr int kPreprocessThreads = 128;

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kPreprocessThreads)
    flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  // Lanes per row: one 16-byte chunk each, rounded up to a power of two so that a row's lanes are
  // a shuffle-reducible group of a warp.
  constexpr int kGroup = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  constexpr int kRowsPerPass = kPreprocessThreads / kGroup;
  static_assert(kAccumPadRows % kRowsPerPass == 0, "whole passes");

  const int tid = threadIdx.x;
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqInfo seq(p, b);
  const int m0 = blockIdx.x * kAccumPadRows;
  if (m0 >= seq.seqlen_q) return;

  const Element* o = static_cast<const Element*>(p.o) +
                     seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h, varlen);
  const Element* dout =
      static_cast<const Element*>(p.dout) +
      seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h, varlen);
  const int64_t row0 = accum_row0(seq, b, varlen);
  float* dsum = p.dsum + (varlen ? 0 : b * p.dsum_batch_stride) + h * p.dsum_head_stride + row0;

  // The residual, at o's offsets (same strides), or nullptr.
  const Element* o_res = p.o_residual == nullptr
                             ? nullptr
                             : static_cast<const Element*>(p.o_residual) +
                                   (o - static_cast<const Element*>(p.o));

  const int col = (tid % kGroup) * 8;  // this lane's 8 columns of its row
#pragma unroll 1
  for (int row = m0 + tid / kGroup; row < m0 + kAccumPadRows; row += kRowsPerPass) {
    float sum = 0.f;
    if (row < seq.seqlen_q && col < p.head_dim) {
      const uint4 x = *reinterpret_cast<const uint4*>(dout + row * p.do_row_stride + col);
      const uint4 y = *reinterpret_cast<const uint4*>(o + row * p.o_row_stride + col);
      const uint4 r = o_res == nullptr
                          ? make_uint4(0u, 0u, 0u, 0u)
                          : *reinterpret_cast<const uint4*>(o_res + row * p.o_row_stride + col);
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
      const uint32_t rs[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = unpack2<Element>(xs[i]), c = unpack2<Element>(ys[i]);
        const float2 e = unpack2<Element>(rs[i]);
        sum = fmaf(a.x, c.x + e.x, fmaf(a.y, c.y + e.y, sum));
      }
    }
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2)
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (col == 0) dsum[row] = sum;
  }

  if (!p.deterministic) {  // kAccumPadRows contiguous rows of kHeadDim floats
    float4* accum =
        reinterpret_cast<float4*>(p.dq_accum + (varlen ? 0 : b * p.dq_accum_batch_stride) +
                                  h * p.dq_accum_head_stride + (row0 + m0) * kHeadDim);
#pragma unroll 4
    for (int idx = tid; idx < kAccumPadRows * kHeadDim / 4; idx += kPreprocessThreads)
      accum[idx] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// Grid: (query blocks of kAccumPadRows rows, heads x batch: attention_grid).
template <typename Element, int kHeadDim>
cudaError_t launch_bwd_preprocess(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid = attention_grid(ceil_div(p.seqlen_q, kAccumPadRows), p.heads, p.batch);
  flash_bwd_preprocess_kernel<Element, kHeadDim><<<grid, kPreprocessThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashjit
