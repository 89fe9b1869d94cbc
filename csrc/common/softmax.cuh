// softmax.cuh: the online softmax of the forward and the recomputed P of the backward, written once
// for every family. Per-row state lives in the mma C layout (see fragment.cuh): each thread holds
// rows g and g + 8 of each m16 tile.
#pragma once

#include <cmath>
#include <cstdint>

#include "ptx.cuh"

namespace flashjit {

// One block of the online softmax, per row: m' = max(m, max_j s_j); l = l alpha + sum_j p_j with
// p_j = exp2(s_j c - m' c), alpha = exp2(m c - m' c), c = scale * log2(e); the scores become P in
// place and alpha is returned for the rescale of O (O *= alpha, rescale_rows), which the caller
// may defer (the sm90 kernel does it once the previous P V has completed). Each exponent is
// rn(s c) - rn(m' c), two separately rounded products (__fmul_rn: never contracted into one fma),
// so that the row's maximum gets exactly exp2(0) = 1 however large the logits: an fma's
// s c - rn(m' c) would leave the rounding error of rn(m' c), up to ~1e-3 at |m' c| ~ 1e4, in
// every P. The backward recomputes P the same way from the lse this writes (finish_row).
// Scores and the row statistics are in the mma C layout (fragment.cuh): each thread
// holds rows g and g + 8 of each m16 tile, and l is this thread's partial sum over its columns
// (quad_sum completes it at the end). A row with no key yet keeps m' = -inf and uses 0 as its
// reference, so every exp2 argument is -inf (-> 0), never NaN.
template <int kMTiles, int kNTilesS>
__device__ __forceinline__ void softmax_update(float (&acc_s)[kMTiles][kNTilesS][4],
                                               float (&row_max)[kMTiles][2],
                                               float (&row_sum)[kMTiles][2], float scale_log2,
                                               float (&alpha)[kMTiles][2]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = row_max[mt][half];
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt)
        mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]));
      mx = quad_max(mx);
      const float ref = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2);
      alpha[mt][half] = fast_exp2(__fmul_rn(row_max[mt][half], scale_log2) - ref);
      row_max[mt][half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          acc_s[mt][nt][e] = fast_exp2(__fmul_rn(acc_s[mt][nt][e], scale_log2) - ref);  // P
          sum += acc_s[mt][nt][e];
        }
      row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
    }
}

// O *= alpha, per row (C layout: elements 0, 1 of an n8 tile are row g, elements 2, 3 row g + 8).
template <int kMTiles, int kNTilesO>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kMTiles][kNTilesO][4],
                                             const float (&alpha)[kMTiles][2]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] *= alpha[mt][e / 2];
}

// Both steps at once: S becomes P, O and the row statistics are rescaled.
template <int kMTiles, int kNTilesS, int kNTilesO>
__device__ __forceinline__ void online_softmax_step(float (&acc_s)[kMTiles][kNTilesS][4],
                                                    float (&acc_o)[kMTiles][kNTilesO][4],
                                                    float (&row_max)[kMTiles][2],
                                                    float (&row_sum)[kMTiles][2],
                                                    float scale_log2) {
  float alpha[kMTiles][2];
  softmax_update(acc_s, row_max, row_sum, scale_log2, alpha);
  rescale_rows(acc_o, alpha);
}

// The end of the online softmax for one row: l = the quad's sum of the row's partial sums;
// O is scaled by inv_l = 1 / l, and lse, in log2 units (the kernels' convention: lse_log2 =
// lse / ln(2) = log2 sum_j exp2(s_j c)), is rn(m c) + log2(l), the reference the backward
// subtracts from rn(s c) to recompute P. A row that saw no key (l = 0): inv_l = 0 (O = 0) and
// lse = -inf.
struct RowResult {
  float inv_l, lse_log2;
};
__device__ __forceinline__ RowResult finish_row(float row_max, float row_sum, float scale_log2) {
  const float l = quad_sum(row_sum);
  if (!(l > 0.f)) return {0.f, -INFINITY};
  return {1.f / l, __fmul_rn(row_max, scale_log2) + __log2f(l)};
}

// finish_row with an attention sink: the row's denominator gains 2^sink_log2 (sink_log2 = the
// sink's logit in log2 units), which has no value row: lse = log2(2^{rn(m c)} l + 2^sink_log2),
// evaluated around the larger of the two exponents, and O = O_unnormalised * 2^{rn(m c) - lse}.
// A row that saw no key: O = 0 and lse = sink_log2 (the sink alone).
__device__ __forceinline__ RowResult finish_row(float row_max, float row_sum, float scale_log2,
                                                float sink_log2) {
  const float l = quad_sum(row_sum);
  if (!(l > 0.f)) return {0.f, sink_log2};
  const float ref = __fmul_rn(row_max, scale_log2);
  const float top = fmaxf(ref, sink_log2);
  const float lse = top + __log2f(l * fast_exp2(ref - top) + fast_exp2(sink_log2 - top));
  return {fast_exp2(ref - lse), lse};
}

// Per-row softmax reference of the backward: P = exp2(rn(S scale_log2) - ref) with ref = the
// forward's lse in log2 units (finish_row), evaluated as the forward does (recompute_p), so that
// a row's maximum gets P = 1 / l exactly. A row that sees no key (lse = -inf) and a row past the
// sequence end get ref = +inf, so P = 0.
__device__ __forceinline__ float lse_reference(float lse_log2, bool row_valid) {
  return !row_valid || lse_log2 == -INFINITY ? INFINITY : lse_log2;
}
// kFma (logits in [-1, 1]: Variant::kBoundedLogits, so |s c| <= c): one fma, fma(s, c, -ref),
// within 2^-24 c (relative, in P) of the forward's two-rounding form; one instruction fewer per
// score, and fewer registers in the backward kernels (the forwards keep the two roundings: their
// register allocation came out worse with the fma, nvcc 13.0).
template <bool kFma = false>
__device__ __forceinline__ float recompute_p(float s, float scale_log2, float ref) {
  if constexpr (kFma) return fast_exp2(fmaf(s, scale_log2, -ref));
  return fast_exp2(__fmul_rn(s, scale_log2) - ref);  // two roundings, never one fma
}

// Two values of O packed as Element for the epilogue's pass `pass`: 0 gives round(O), 1 gives the
// rounding residual O - round(O) (also rounded; round(O) + residual carries O to about twice the
// Element's precision), which the backward adds back in D = rowsum(dO * O) (FwdParams::o_residual).
template <typename Element>
__device__ __forceinline__ uint32_t pack_out(float a, float b, int pass) {
  const uint32_t rounded = pack2<Element>(a, b);
  if (pass == 0) return rounded;
  const float2 r = unpack2<Element>(rounded);
  return pack2<Element>(a - r.x, b - r.y);
}

}  // namespace flashjit
