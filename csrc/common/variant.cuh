// variant.cuh: the attention variants, in one place for every kernel of every family.
//
// A spec compiles one Variant (spec_config.h: its flags from the -D defines); kernels take it as
// one template parameter and ask it, per CTA (VariantScores, built from VariantParams, params.h):
//   - which key blocks a query block needs, and which query blocks a key block needs (both ends:
//     blocks outside a causal or sliding-window band are skipped, never masked one by one);
//   - whether a (query block, key block) pair holds any masked score;
//   - the logit of each score: masks, softcap and ALiBi, and its derivative for the backward;
//   - the sink's logit for the end of each row's softmax.
// Scores stay in raw units s = q.k inside the kernels (the scale is applied in the exp2 of the
// softmax): the logit z = scale * s becomes z' = u * x, with x in units u (VariantScores::
// scale_log2 = u log2(e)):
//   x = s,  u = scale                          no softcap       dx/ds = 1
//   x = tanh(s scale / c),  u = c              softcap c        z' = c tanh(z / c), and
//                                                               u dx/ds = scale (1 - tanh^2)
//   x += -(slope / u) |i + offset - j|         ALiBi            dx/ds unchanged
//   x = -inf                                   masked           (P = 0)
// so that P = exp2(rn(x u log2(e)) - lse) is formed as without a variant; under softcap the c of
// c tanh is folded into that product (one multiply fewer per score, both directions).
// Softcap alone bounds the logits (kBoundedLogits: |x| <= 1), so the backward's recomputed P
// takes one fma (softmax.cuh: recompute_p).
// Query i sees key j iff j < seqlen_k, j <= i + hi (causal or window right edge) and
// j >= i + lo (window left edge), where hi = offset (causal) or offset + window_right, lo =
// offset - window_left and offset = seqlen_k - seqlen_q (bottom-right alignment) or 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "common/ptx.cuh"
#include "common/fragment.cuh"
#include "common/sequence.cuh"

namespace flashjit {

// kPagedKV (the forward only, last and false by default, so no other instantiation changes):
// K/V are read through a page table (params.h: PageTable; problem.cuh: FwdQueryBlock) rather
// than contiguously. It changes where key rows are, not the scores.
template <bool kIsCausal_, bool kHasWindow_, bool kHasSoftcap_, bool kHasAlibi_, bool kHasSink_,
          bool kHasDropout_, bool kPagedKV_ = false>
struct Variant {
  static constexpr bool kIsCausal = kIsCausal_;      // right edge at the diagonal
  static constexpr bool kHasWindow = kHasWindow_;    // sliding window (left edge, right edge)
  static constexpr bool kHasSoftcap = kHasSoftcap_;  // z -> c tanh(z / c)
  static constexpr bool kHasAlibi = kHasAlibi_;      // z -> z - slope |i + offset - j|
  static constexpr bool kHasSink = kHasSink_;        // a per-head logit in every denominator
  static constexpr bool kHasDropout = kHasDropout_;  // dropout on P (dropout.cuh)
  static constexpr bool kPagedKV = kPagedKV_;        // K/V through a page table
  static constexpr bool kMaskRight = kIsCausal || kHasWindow;  // a right edge per row
  static constexpr bool kMaskLeft = kHasWindow;                // a left edge per row
  static constexpr bool kScoreMod = kHasSoftcap || kHasAlibi;  // every score is transformed
  // dx/ds is not 1 (VariantScores::dlogit): the backward multiplies dS by it. A new score
  // transform with a derivative joins here and in logit/dlogit, and no kernel changes.
  static constexpr bool kLogitGrad = kHasSoftcap;
  // Every logit x is -inf or in [-1, 1] (tanh units): recompute_p takes one fma.
  static constexpr bool kBoundedLogits = kHasSoftcap && !kHasAlibi;
};

// The variant of one (sequence, head): ranges, masks, logits. Built once per CTA.
template <typename V>
struct VariantScores {
  static constexpr int kUnbounded = 1 << 30;  // an absent edge (ranges stay far from overflow)
  int seqlen_k;
  int offset;    // seqlen_k - seqlen_q (bottom-right alignment) or 0
  int lo, hi;    // key j is visible from query i iff i + lo <= j <= i + hi
  float softcap_in;   // softmax_scale / softcap: x = tanh(softcap_in s)
  float alibi_slope;  // slope / u: the logits' units
  float sink_log2;                // the sink's logit in log2 units

  template <typename Params>
  __device__ VariantScores(const Params& p, const SeqInfo& seq, int b, int h)
      : seqlen_k(seq.seqlen_k),
        offset(p.causal_bottom_right ? seq.seqlen_k - seq.seqlen_q : 0) {
    const VariantParams& vp = p.variant;
    hi = kUnbounded;
    lo = -kUnbounded;
    if constexpr (V::kIsCausal) hi = offset;
    if constexpr (V::kHasWindow && !V::kIsCausal)
      if (vp.window_right >= 0) hi = offset + vp.window_right;
    if constexpr (V::kHasWindow)
      if (vp.window_left >= 0) lo = offset - vp.window_left;
    if constexpr (V::kHasSoftcap) softcap_in = p.softmax_scale / vp.softcap;  // per raw-score unit
    if constexpr (V::kHasAlibi)
      alibi_slope = vp.alibi_slopes[b * vp.alibi_batch_stride + h] /
                    (V::kHasSoftcap ? vp.softcap : p.softmax_scale);
    if constexpr (V::kHasSink) sink_log2 = vp.sink[h] * float(M_LOG2E);
  }

  // u log2(e), the exp2 scale of the logits x: softmax_scale log2(e), or softcap log2(e) (z' =
  // softcap x) under softcap. Read from the kernel parameters at each use (no register held).
  template <typename Params>
  __device__ __forceinline__ static float scale_log2(const Params& p) {
    if constexpr (V::kHasSoftcap) return p.variant.softcap_log2;
    return p.scale_log2;
  }

  // Keys [key_begin, key_end) are those some query of [m0, m0 + block_m) sees (key_end may be
  // <= key_begin: none).
  __device__ int key_begin(int m0) const { return V::kMaskLeft ? max(0, m0 + lo) : 0; }
  __device__ int key_end(int m0, int block_m) const {
    return V::kMaskRight ? min(seqlen_k, max(0, m0 + block_m + hi)) : seqlen_k;
  }
  // Queries [query_begin, query_end) are those that see some key of [n0, n0 + block_n).
  __device__ int query_begin(int n0) const { return V::kMaskRight ? max(0, n0 - hi) : 0; }
  __device__ int query_end(int n0, int block_n, int seqlen_q) const {
    return V::kMaskLeft ? min(seqlen_q, max(0, n0 + block_n - lo)) : seqlen_q;
  }

  // Does the (block_m x block_n) block at (m0, n0) hold any score that is not visible?
  __device__ __forceinline__ bool mask_needed(int m0, int n0, int block_m, int block_n) const {
    return n0 + block_n > seqlen_k || (V::kMaskRight && n0 + block_n - 1 > m0 + hi) ||
           (V::kMaskLeft && n0 < m0 + block_m - 1 + lo);
  }
  __device__ __forceinline__ bool visible(int i, int j) const {
    return j < seqlen_k && (!V::kMaskRight || j <= i + hi) && (!V::kMaskLeft || j >= i + lo);
  }

  // The walks (fragment.cuh) give each lane's (i, j) as a lane origin (i0, j0) plus
  // compile-time steps: with dist0 = float(i0 + offset - j0) once per walk, ALiBi's distance
  // dist0 + float((i - i0) - (j - j0)) folds to one FADD per score, not an int-to-float
  // conversion (which shares the MUFU pipe with the softmax's exp2). Exact below 2^24.
  struct LaneOrigin {
    int i0, j0;
    float dist0;
  };
  __device__ __forceinline__ LaneOrigin origin(int i0, int j0) const {
    return {i0, j0, V::kHasAlibi ? float(i0 + offset - j0) : 0.f};
  }
  __device__ __forceinline__ float alibi_bias(int i, int j, const LaneOrigin& o) const {
    return -alibi_slope * fabsf(o.dist0 + float((i - o.i0) - (j - o.j0)));  // logit units
  }
  __device__ __forceinline__ float alibi_bias(int i, int j) const {
    return alibi_bias(i, j, origin(i, j));
  }
  // tanh(z / c) (the logit in softcap units): one MUFU op (tanh.approx.f32, relative error
  // ~2^-11), beside the softmax's exp2: 2 MUFU ops per score, not the 3 of
  // 1 - 2 / (exp2(2 y log2 e) + 1). The error test (2x PyTorch's same-dtype error) covers it:
  // tests/gpu/test_variants.py.
  __device__ __forceinline__ float softcapped(float s) const { return fast_tanh(s * softcap_in); }

  // The logit x of raw score s at (query i, key j) in the logits' units (scale_log2); -inf where
  // masked (kMask: this block may hold masked scores).
  template <bool kMask>
  __device__ __forceinline__ float logit(float s, int i, int j, const LaneOrigin& o) const {
    float x = s;
    if constexpr (V::kHasSoftcap) x = softcapped(x);
    if constexpr (V::kHasAlibi) x += alibi_bias(i, j, o);
    if constexpr (kMask) x = visible(i, j) ? x : -INFINITY;
    return x;
  }
  // The derivative of the logit z' = u x(s) over softmax_scale s, from x = logit(s, i, j): 1
  // without softcap, 1 - tanh^2 with it (0 where masked); the kernels call it where kLogitGrad
  // and apply softmax_scale as without a variant.
  __device__ __forceinline__ float dlogit(float x, int i, int j) const {
    if constexpr (V::kHasSoftcap) {
      if constexpr (V::kHasAlibi) x -= alibi_bias(i, j);
      const float th = fminf(fmaxf(x, -1.f), 1.f);  // -inf -> -1 -> 0
      return 1.f - th * th;
    } else {
      return 1.f;
    }
  }

  // Scores (C layout, fragment.cuh) -> logits, in place: every score when the variant transforms
  // them, else only in blocks with a masked score (mask_block).
  template <int kMTiles, int kNTiles>
  __device__ __forceinline__ void apply(float (&acc)[kMTiles][kNTiles][4], int row0, int col0,
                                        int g, int t, bool mask_block) const {
    if constexpr (V::kScoreMod) {
      const LaneOrigin o = origin(row0 + g, col0 + 2 * t);
      if (mask_block)
        for_each_score<kMTiles, kNTiles>(row0, col0, g, t, [&](int mt, int nt, int e, int i, int j) {
          acc[mt][nt][e] = logit<true>(acc[mt][nt][e], i, j, o);
        });
      else
        for_each_score<kMTiles, kNTiles>(row0, col0, g, t, [&](int mt, int nt, int e, int i, int j) {
          acc[mt][nt][e] = logit<false>(acc[mt][nt][e], i, j, o);
        });
    } else if (mask_block) {
      for_each_score<kMTiles, kNTiles>(row0, col0, g, t, [&](int mt, int nt, int e, int i, int j) {
        if (!visible(i, j)) acc[mt][nt][e] = -INFINITY;
      });
    }
  }
  // The same for transposed scores S^T of one m64 wgmma row block (keys x queries).
  template <int kNTiles>
  __device__ __forceinline__ void apply_transposed(float (&acc)[kNTiles][4], int key0, int query0,
                                                   int g, int t, bool mask_block) const {
    if constexpr (V::kScoreMod) {
      const LaneOrigin o = origin(query0 + 2 * t, key0 + g);
      if (mask_block)
        for_each_score_transposed<kNTiles>(key0, query0, g, t, [&](int nt, int e, int i, int j) {
          acc[nt][e] = logit<true>(acc[nt][e], i, j, o);
        });
      else
        for_each_score_transposed<kNTiles>(key0, query0, g, t, [&](int nt, int e, int i, int j) {
          acc[nt][e] = logit<false>(acc[nt][e], i, j, o);
        });
    } else if (mask_block) {
      for_each_score_transposed<kNTiles>(key0, query0, g, t, [&](int nt, int e, int i, int j) {
        if (!visible(i, j)) acc[nt][e] = -INFINITY;
      });
    }
  }
};

}  // namespace flashjit
