// dq_accum.cuh: the fp32 dQ accumulator of the backward's atomic path: its fragment order, the
// atomic add into it, and the postprocess kernel that turns it into dQ. Each family's dK/dV kernel
// describes the order its warps add in with a DqAccumLayout (its own choice of warp grid).
#pragma once

#include <cstdint>

#include "common/padded_tile.cuh"
#include "common/params.h"
#include "common/problem.cuh"
#include "common/ptx.cuh"
#include "common/sequence.cuh"

namespace flashjit {

// dq_accum layout. Each query block's (kBlockM x kHeadDim) tile of the fp32 dQ accumulator is
// stored contiguously in fragment order, not row-major: m16 x n8 fragment f = (warp, mt, nt) of
// the dQ product owns 128 floats, and lane L's element e (see ptx.cuh's C layout) sits at
//   sm_90+: 4 L + e  (one 16-byte red.v4 per lane: a warp covers 512 contiguous bytes)
//   sm_8x:  32 e + L (four scalar reds, each covering 128 contiguous bytes per warp)
// so that the atomics of a warp hit whole cache lines (a row-major layout spreads them over 8
// lines). The sm90 dK/dV kernel at d <= 192 stages the tile in shared memory in the sm_90+ order
// and adds it with one bulk reduction instead. The postprocess kernel, compiled for the same
// arch, reads it back in the same order.
__device__ __forceinline__ void dq_accum_add(float* frag, int lane, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  red_add_f32x4(frag + 4 * lane, v[0], v[1], v[2], v[3]);
#else
#pragma unroll
  for (int e = 0; e < 4; ++e) red_add_f32(frag + 32 * e + lane, v[e]);
#endif
}

__device__ __forceinline__ void dq_accum_load(const float* frag, int lane, float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const float4 x = *reinterpret_cast<const float4*>(frag + 4 * lane);
  v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
#else
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = frag[32 * e + lane];
#endif
}

// The fragment order of a query block's (kBlockM x kHeadDim) dq_accum tile: kWarpsM x kWarpsD
// warps (warp w at row block w / kWarpsD, column block w % kWarpsD), each adding a warp tile of
// kMTiles m16 x kNTiles n8 fragments, numbered (mt, nt) row-major. The postprocess runs kNThreads
// threads and stages the tile in padded rows of kSmemRow elements.
template <typename Element_, int kHeadDim_, int kBlockM_, int kWarpsM, int kWarpsD,
          int kNThreads_>
struct DqAccumLayout {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kNThreads = kNThreads_;
  static constexpr int kWarpsDdQ = kWarpsD;
  static constexpr int kdQWarpM = kBlockM / kWarpsM, kdQWarpD = kHeadDim / kWarpsD;
  static constexpr int kdQMTiles = kdQWarpM / 16, kdQNTiles = kdQWarpD / 8;
  static constexpr int kdQFragsPerWarp = kdQMTiles * kdQNTiles;
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemRow = kHeadDim + 8;
  static_assert(kdQWarpM % 16 == 0 && kdQWarpD % 8 == 0, "whole m16 x n8 fragments");
  static_assert(kBlockM <= kAccumPadRows, "a block stays inside its sequence's padded rows");
};

// ---------------------------------------------------------------------------------------------
// Postprocess (atomic path): dQ = softmax_scale * dq_accum, in the element type. One CTA per
// query block of the family's DqAccumLayout (whose fragment order the accumulator tile is in):
// the tile is read in that order, scattered into a row-major shared tile, then written out with
// 16-byte stores.
// ---------------------------------------------------------------------------------------------
template <typename Traits>  // a DqAccumLayout
__global__ void __launch_bounds__(Traits::kNThreads)
    flash_bwd_postprocess_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kHeadDim = Traits::kHeadDim;
  constexpr int kSmemRow = Traits::kSmemRow;
  constexpr int kFrags = kBlockM * kHeadDim / 128;  // m16 x n8 fragments of the tile
  __shared__ __align__(16) Element smem_dq[kBlockM * kSmemRow];

  const int tid = threadIdx.x;
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqInfo seq(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.seqlen_q) return;

  const float* accum = p.dq_accum + (varlen ? 0 : b * p.dq_accum_batch_stride) +
                       h * p.dq_accum_head_stride + (accum_row0(seq, b, varlen) + m0) * kHeadDim;
  Element* dq = static_cast<Element*>(p.dq) +
                seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h, varlen) +
                m0 * p.dq_row_stride;
#pragma unroll 2
  for (int idx = tid; idx < kFrags * 32; idx += Traits::kNThreads) {
    const int frag = idx / 32, lane = idx % 32;
    const int warp = frag / Traits::kdQFragsPerWarp;
    const int mt = frag % Traits::kdQFragsPerWarp / Traits::kdQNTiles;
    const int nt = frag % Traits::kdQNTiles;
    const int row = (warp / Traits::kWarpsDdQ) * Traits::kdQWarpM + mt * 16 + lane / 4;
    const int col = (warp % Traits::kWarpsDdQ) * Traits::kdQWarpD + nt * 8 + 2 * (lane % 4);
    float v[4];
    dq_accum_load(accum + frag * 128, lane, v);
    const float s = p.softmax_scale;
    *reinterpret_cast<uint32_t*>(smem_dq + row * kSmemRow + col) =
        pack2<Element>(v[0] * s, v[1] * s);
    *reinterpret_cast<uint32_t*>(smem_dq + (row + 8) * kSmemRow + col) =
        pack2<Element>(v[2] * s, v[3] * s);
  }
  __syncthreads();
  store_tile<Traits, kBlockM>(dq, p.dq_row_stride, smem_dq, seq.seqlen_q - m0, p.head_dim, tid);
}

// Grid: (query blocks of the layout, heads x batch: attention_grid).
template <typename Layout>
cudaError_t launch_bwd_postprocess(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid = attention_grid(ceil_div(p.seqlen_q, Layout::kBlockM), p.heads, p.batch);
  flash_bwd_postprocess_kernel<Layout><<<grid, Layout::kNThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashjit
