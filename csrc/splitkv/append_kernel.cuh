// append_kernel.cuh: the KV cache append and the rotary embedding before decoding (params.h:
// AppendParams says the layouts and positions). One warp per vector of d elements: a new key
// (rotated, then written into the cache with its value vector), or a query (rotated into q_rot).
// Cache rows are resolved by the same addressing as the attention (problem.cuh: CacheRows).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"

namespace flashjit {

// One 16-bit element <-> float, explicitly (torch's build flags disable the implicit conversions).
template <typename Element>
__device__ __forceinline__ float to_f32(Element x) {
  if constexpr (std::is_same_v<Element, __half>) return __half2float(x);
  else return __bfloat162float(x);
}
template <typename Element>
__device__ __forceinline__ Element from_f32(float x) {
  if constexpr (std::is_same_v<Element, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// dst[0, d) = src[0, d) with the rotary rotation of position pos on [0, rotary_dim):
// (x, y) -> (x cos - y sin, x sin + y cos), pairs (2c, 2c + 1) interleaved, else (c, c + R / 2).
template <typename Element>
__device__ __forceinline__ void rotate_row(Element* dst, const Element* src, int d, int pos,
                                           const AppendParams& a, int lane) {
  const int half_rot = a.rotary_cos != nullptr ? a.rotary_dim / 2 : 0;
  const Element* cos = static_cast<const Element*>(a.rotary_cos) + int64_t(pos) * half_rot;
  const Element* sin = static_cast<const Element*>(a.rotary_sin) + int64_t(pos) * half_rot;
  for (int c = lane; c < half_rot; c += 32) {
    const int xi = a.rotary_interleaved ? 2 * c : c;
    const int yi = a.rotary_interleaved ? 2 * c + 1 : c + half_rot;
    const float x = to_f32(src[xi]), y = to_f32(src[yi]);
    const float co = to_f32(cos[c]), si = to_f32(sin[c]);
    dst[xi] = from_f32<Element>(x * co - y * si);
    dst[yi] = from_f32<Element>(x * si + y * co);
  }
  for (int e = 2 * half_rot + lane; e < d; e += 32) dst[e] = src[e];
}

template <typename Element>
__global__ void __launch_bounds__(128) flash_decode_append_kernel(const __grid_constant__ DecodeParams dp,
                                                                  const __grid_constant__ AppendParams a) {
  const FwdParams& p = dp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t item = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int64_t new_items = a.k_new != nullptr ? int64_t(p.batch) * dp.cache.seqlen_new * p.heads_k : 0;
  const int64_t q_items = a.q_rot != nullptr ? int64_t(p.batch) * p.seqlen_q * p.heads : 0;
  if (item < new_items) {  // new key/value vector (b, t, hk)
    const int hk = int(item % p.heads_k);
    const int t = int(item / p.heads_k % dp.cache.seqlen_new);
    const int b = int(item / (int64_t(p.heads_k) * dp.cache.seqlen_new));
    const CacheRows cache(dp, b, hk);
    const int j = cache.cached - cache.leftpad + t;  // logical key index = rotary position
    int64_t k_off, v_off;
    if (j < 0 || cache.leftpad + j >= dp.cache.capacity || !cache.offsets(j, k_off, v_off)) return;
    const Element* kn = static_cast<const Element*>(a.k_new) + b * a.kn_batch_stride +
                        t * a.kn_row_stride + hk * a.kn_head_stride;
    const Element* vn = static_cast<const Element*>(a.v_new) + b * a.vn_batch_stride +
                        t * a.vn_row_stride + hk * a.vn_head_stride;
    rotate_row(const_cast<Element*>(static_cast<const Element*>(p.k)) + k_off, kn, p.head_dim, j, a,
               lane);
    Element* vc = const_cast<Element*>(static_cast<const Element*>(p.v)) + v_off;
    for (int e = lane; e < p.head_dim; e += 32) vc[e] = vn[e];
  } else if (item < new_items + q_items) {  // query vector (b, i, h), rotated into q_rot
    const int64_t qi = item - new_items;
    const int h = int(qi % p.heads), i = int(qi / p.heads % p.seqlen_q);
    const int b = int(qi / (int64_t(p.heads) * p.seqlen_q));
    const CacheRows cache(dp, b, h / (p.heads / p.heads_k));
    const int pos = cache.cached - cache.leftpad + (a.q_positions_step ? i : 0);
    const Element* q = static_cast<const Element*>(a.q_src) + b * a.q_batch_stride +
                       i * a.q_row_stride + h * a.q_head_stride;
    Element* dst = static_cast<Element*>(a.q_rot) + ((int64_t(b) * p.seqlen_q + i) * p.heads + h) *
                                                      p.head_dim;
    rotate_row(dst, q, p.head_dim, pos, a, lane);
  }
}

}  // namespace flashjit
