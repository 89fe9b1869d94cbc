// combine_kernel.cuh: the merge of split-KV partial results (decode_kernel.cuh) into O and lse.
//
// Split s of a row saw keys K_s and wrote O_s = sum_{j in K_s} 2^(x_j - lse_s) v_j and
// lse_s = log2 sum_{j in K_s} 2^(x_j) (log2 units; -inf and O_s = 0 for no key). Over all
// splits: lse = log2(sum_s 2^lse_s [+ 2^sink]), O = sum_s 2^(lse_s - lse) O_s, evaluated around
// the largest lse_s.
// One warp per (batch, head, query) row. Decoding at small batch is latency-bound, so every
// load is independent of the others: lane s holds split s's lse and weight (32 splits per
// pass), and for O each lane owns 4 columns and keeps kUnroll splits' partial rows in flight.
// The splits are summed in order (fixed summation order: reproducible).
#pragma once

#include <cmath>

#include "common/params.h"
#include "common/ptx.cuh"

namespace flashjit {

template <typename Element, bool kHasSink>
__global__ void __launch_bounds__(128) flash_decode_combine_kernel(const __grid_constant__ DecodeParams dp) {
  constexpr int kUnroll = 8;
  const FwdParams& p = dp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, i) row-major
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  if (row >= rows) return;
  const int i = int(row % p.seqlen_q), h = int(row / p.seqlen_q % p.heads);
  const int b = int(row / (int64_t(p.seqlen_q) * p.heads));
  const int64_t split_stride = rows;  // lse_partial (num_splits, rows); o_partial rows of d
  const int splits = dp.num_splits;   // <= 128 (ops.MAX_NUM_SPLITS): 4 passes of 32 at most

  // lse_s of splits lane, lane + 32, ..: all loads issued before any is used.
  float ls[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int s = c * 32 + lane;
    ls[c] = s < splits ? dp.lse_partial[s * split_stride + row] : -INFINITY;
  }
  float top = fmaxf(fmaxf(ls[0], ls[1]), fmaxf(ls[2], ls[3]));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
  const float sink = kHasSink ? p.variant.sink[h] * float(M_LOG2E) : -INFINITY;
  top = fmaxf(top, sink);
  float sum = 0.f;
  if (top != -INFINITY)
#pragma unroll
    for (int c = 0; c < 4; ++c) sum += fast_exp2(ls[c] - top);  // 0 for -inf
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (kHasSink && top != -INFINITY) sum += fast_exp2(sink - top);
  const float lse = sum > 0.f ? top + __log2f(sum) : -INFINITY;
  if (lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
  // Weight of split c * 32 + lane: 2^(lse_s - lse), 0 for a split that saw no key.
  float w[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) w[c] = lse == -INFINITY ? 0.f : fast_exp2(ls[c] - lse);

  // O = sum_s w_s O_s: lane owns columns [c0 + 4 lane, +4) of each 128-column pass (head_dim is
  // a multiple of 8, so a chunk is wholly in or out). The passes are uniform over the warp: every
  // lane takes part in the weight shuffles.
  Element* out = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
                 h * p.o_head_stride;
  const float* part = dp.o_partial + row * p.head_dim;
  for (int c0 = 0; c0 < p.head_dim; c0 += 128) {
    const int col = c0 + 4 * lane;
    const bool active = col < p.head_dim;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += kUnroll) {
      float4 o[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)  // kUnroll independent loads in flight
        o[u] = active && s0 + u < splits
                   ? *reinterpret_cast<const float4*>(part + (s0 + u) * split_stride * p.head_dim +
                                                      col)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = s0 + u;  // its weight: lane s % 32, register s / 32
        const float ws = __shfl_sync(
            0xffffffffu, s < 32 ? w[0] : s < 64 ? w[1] : s < 96 ? w[2] : w[3], s % 32);
        if (s < splits) {
          acc.x += ws * o[u].x;
          acc.y += ws * o[u].y;
          acc.z += ws * o[u].z;
          acc.w += ws * o[u].w;
        }
      }
    }
    if (active) {
      uint2 packed;
      packed.x = pack2<Element>(acc.x, acc.y);
      packed.y = pack2<Element>(acc.z, acc.w);
      *reinterpret_cast<uint2*>(out + col) = packed;
    }
  }
}

}  // namespace flashjit
