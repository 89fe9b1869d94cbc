// fwd_epilogue_sw128.cuh: the end of a Hopper forward (sm90, sm90ws) for one warp's 16 query rows
// of a wgmma accumulator (C layout, fragment.cuh: rows g and g + 8 of the warp's m16 slice):
// fwd_epilogue_sw128 staged through a 128-byte swizzled shared tile (smem_sw128.cuh) for 16-byte
// global stores (sm90), fwd_epilogue_regs stored from registers, 4 bytes a thread, which needs no
// shared memory (sm90ws: its Q tile is reloaded for the next tile meanwhile).
#pragma once

#include <cstdint>

#include "common/params.h"
#include "common/smem_sw128.cuh"
#include "common/softmax.cuh"

namespace flashjit {

// O /= l and lse (finish_row, with the sink's term where the variant has one; a row that saw no
// key: O = 0, lse = -inf, or the sink's logit with a sink). The warp stages its rows [warp_row,
// warp_row + 16) of O in `stage`, a swizzled tile of kBlockM rows that no other warp writes and
// nothing reads any more (the kernels pass their Q tile, whose wgmma reads have completed), then
// writes rows < rows_q and columns < p.head_dim to `o` (row stride p.o_row_stride); with
// p.o_residual a second pass does the same for the rounding residual of O (pack_out). lse: this
// block's first row, written for rows < rows_q, in log2 units.
// The passes over O: pass 0 writes the rounded O to `o`, pass 1 (with p.o_residual) its rounding
// residual to the same rows of p.o_residual (pack_out); store(dst, pass) writes one.
template <typename Element, typename Store>
__device__ __forceinline__ void for_each_out_pass(const FwdParams& p, Element* o, Store&& store) {
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1 && p.o_residual == nullptr) break;
    store(pass == 0 ? o : static_cast<Element*>(p.o_residual) + (o - static_cast<Element*>(p.o)),
          pass);
  }
}

// A warp's rows' 1 / l (with dropout's 1 / keep) and lse, written for rows < rows_q (finish_row).
template <typename V, typename Scores>
__device__ __forceinline__ void fwd_epilogue_rows(const FwdParams& p, const Scores& scores,
                                                  const float (&row_max)[2],
                                                  const float (&row_sum)[2], float* lse,
                                                  int rows_q, int warp_row, int lane,
                                                  float (&inv_l)[2]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const RowResult res = V::kHasSink
                              ? finish_row(row_max[half], row_sum[half], scores.scale_log2(p),
                                           scores.sink_log2)
                              : finish_row(row_max[half], row_sum[half], scores.scale_log2(p));
    const int row = warp_row + half * 8 + g;
    // O = (P Z) V / (l keep) with dropout (common/dropout.cuh: the 1 / keep is applied here)
    inv_l[half] = V::kHasDropout ? res.inv_l * p.dropout.inv_keep_prob : res.inv_l;
    if (t == 0 && row < rows_q) lse[row] = res.lse_log2;
  }
}

// As fwd_epilogue_sw128, but each thread stores its own two columns of each n8 tile of its rows
// g and g + 8 (4 bytes; a quad writes 16 contiguous bytes of a row) straight from registers.
template <typename Traits, typename V, int kNTilesO, typename Scores>
__device__ __forceinline__ void fwd_epilogue_regs(
    const FwdParams& p, const Scores& scores, const float (&acc_o)[kNTilesO][4],
    const float (&row_max)[2], const float (&row_sum)[2], typename Traits::Element* o, float* lse,
    int rows_q, int warp_row, int lane) {
  using Element = typename Traits::Element;
  const int g = lane / 4, t = lane % 4;
  float inv_l[2];
  fwd_epilogue_rows<V>(p, scores, row_max, row_sum, lse, rows_q, warp_row, lane, inv_l);
  for_each_out_pass(p, o, [&](Element* dst, int pass) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row + half * 8 + g;
      if (row >= rows_q) continue;
      Element* dst_row = dst + row * p.o_row_stride + 2 * t;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt)
        if (nt * 8 < p.head_dim)  // whole n8 tiles: head_dim is a multiple of 8
          *reinterpret_cast<uint32_t*>(dst_row + nt * 8) = pack_out<Element>(
              acc_o[nt][2 * half] * inv_l[half], acc_o[nt][2 * half + 1] * inv_l[half], pass);
    }
  });
}

template <typename Traits, typename V, int kBlockM, int kNTilesO, typename Scores>
__device__ __forceinline__ void fwd_epilogue_sw128(
    const FwdParams& p, const Scores& scores, const float (&acc_o)[kNTilesO][4],
    const float (&row_max)[2], const float (&row_sum)[2], typename Traits::Element* o, float* lse,
    int rows_q, unsigned char* stage, int warp_row, int lane) {
  using Element = typename Traits::Element;
  const int g = lane / 4, t = lane % 4;
  float inv_l[2];
  fwd_epilogue_rows<V>(p, scores, row_max, row_sum, lse, rows_q, warp_row, lane, inv_l);
  for_each_out_pass(p, o, [&](Element* dst, int pass) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row + half * 8 + g;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        const uint32_t packed = pack_out<Element>(acc_o[nt][2 * half] * inv_l[half],
                                                  acc_o[nt][2 * half + 1] * inv_l[half], pass);
        // chunk nt of the row (a compile-time column: its panel and chunk fold), byte 4 t of it
        *reinterpret_cast<uint32_t*>(stage + sw128_offset<kBlockM>(row, nt * 8) + 4 * t) = packed;
      }
    }
    __syncwarp();
    store_warp_rows_sw128<Traits, kBlockM>(dst, p.o_row_stride, stage, warp_row, rows_q,
                                           p.head_dim, lane);
    __syncwarp();  // the staging rows are rewritten by the next pass
  });
}

}  // namespace flashjit
