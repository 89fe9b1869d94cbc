// combine_kernel.cuh: the merge of split-KV partial results (decode_kernel.cuh) into O and lse.
//
// Split s of a row saw keys K_s and wrote O_s = sum_{j in K_s} 2^(x_j - lse_s) v_j and
// lse_s = log2 sum_{j in K_s} 2^(x_j) (log2 units; -inf and O_s = 0 for no key). Over all
// splits: lse = log2(sum_s 2^lse_s [+ 2^sink]), O = sum_s 2^(lse_s - lse) O_s, evaluated around
// the largest lse_s. One warp per (batch, head, query) row; lanes over the splits, then over d.
#pragma once

#include <cmath>

#include "common/params.h"
#include "common/ptx.cuh"

namespace flashjit {

template <typename Element, bool kHasSink>
__global__ void __launch_bounds__(128) flash_decode_combine_kernel(const __grid_constant__ DecodeParams dp) {
  const FwdParams& p = dp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, i) row-major
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  if (row >= rows) return;
  const int i = int(row % p.seqlen_q), h = int(row / p.seqlen_q % p.heads);
  const int b = int(row / (int64_t(p.seqlen_q) * p.heads));
  const int64_t split_stride = rows;  // lse_partial (num_splits, rows); o_partial rows of d

  float top = -INFINITY;
  for (int s = lane; s < dp.num_splits; s += 32) top = fmaxf(top, dp.lse_partial[s * split_stride + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
  const float sink = kHasSink ? p.variant.sink[h] * float(M_LOG2E) : -INFINITY;
  top = fmaxf(top, sink);
  float sum = 0.f;
  if (top != -INFINITY)
    for (int s = lane; s < dp.num_splits; s += 32)
      sum += fast_exp2(dp.lse_partial[s * split_stride + row] - top);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (kHasSink && top != -INFINITY) sum += fast_exp2(sink - top);
  const float lse = sum > 0.f ? top + __log2f(sum) : -INFINITY;
  if (lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;

  // O: lanes over d in pairs of columns; splits in order (fixed summation order).
  Element* out = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
                 h * p.o_head_stride;
  for (int col = 2 * lane; col < p.head_dim; col += 64) {
    float x = 0.f, y = 0.f;
    if (lse != -INFINITY)
      for (int s = 0; s < dp.num_splits; ++s) {
        const float ls = dp.lse_partial[s * split_stride + row];
        if (ls == -INFINITY) continue;
        const float w = fast_exp2(ls - lse);
        const float2 o = *reinterpret_cast<const float2*>(dp.o_partial +
                                                          (s * split_stride + row) * p.head_dim + col);
        x += w * o.x;
        y += w * o.y;
      }
    *reinterpret_cast<uint32_t*>(out + col) = pack2<Element>(x, y);
  }
}

}  // namespace flashjit
