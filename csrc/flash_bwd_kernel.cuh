// flash_bwd_kernel.cuh: the backward FlashAttention kernels (FlashAttention-2 algorithm), sm80
// family (mma.sync, ldmatrix, cp.async). Device code only; see flash_bwd_launch.cuh for grids and
// tile choices and flash_bwd.cu for the instantiation a JIT spec asks for.
//
// With P = exp(scale S - lse) (S = Q K^T), dropout mask Z (kept entries scaled by 1 / keep_prob,
// Z = 1 without dropout) and D_i = rowsum(dO_i * O_i) = rowsum(P_i * Z_i * dP_i):
//   dV = (P * Z)^T dO,  dP = dO V^T,  dS = P * (dP * Z - D),  dK = scale dS^T Q,  dQ = scale dS K.
// Kernels, in launch order:
//   1. preprocess: D for every query row; zeroes the fp32 dQ accumulator (atomic path).
//   2. dk_dv:      one CTA per (key block, head, batch) keeps K, V and the dK, dV accumulators,
//                  and loops over the query blocks that see its keys, recomputing P from lse. dS
//                  and P go through shared memory (the dK, dV products need them transposed).
//                  Atomic path: also dQ += dS K with fp32 atomics into the accumulator.
//   3. postprocess (atomic path): dQ = scale * accumulator, in the input dtype.
//   3'. dq (deterministic path): one CTA per query block loops over key blocks and recomputes
//                  P and dS (kept in registers, as in the forward) for dQ = scale dS K: no atomics,
//                  so gradients are bitwise reproducible.
// Rows that see no key have lse = -inf; they get P = 0 (their exp2 reference is +inf) and so
// contribute nothing and get dQ = 0.
// The sm90 family (flash_bwd_sm90_kernel.cuh) replaces kernel 2 and uses the rest of this file
// as it is: BwdKeyTile, the preprocess, the postprocess and the deterministic dQ kernel.
#pragma once

#include <cmath>
#include <cstddef>

#include "dropout.cuh"
#include "attention_common.cuh"
#include "flash_params.h"
#include "ptx.cuh"

namespace flashjit {

// Per-sequence row padding of the fp32 scratch (dq_accum, dsum): see BwdParams. Every backward
// query block (kBlockM <= kAccumPadRows) stays inside its sequence's padded rows.
constexpr int kAccumPadRows = 128;

// ---------------------------------------------------------------------------------------------
// Tile shapes
// ---------------------------------------------------------------------------------------------

// dK/dV tile: one CTA owns kBlockN keys and loops over query blocks of kBlockM rows. Its kNWarps
// warps split each product shape their own way (a warp tile: whole m16 tiles x whole n8 tiles):
//   S, dP  (kBlockM x kBlockN):  kWarpsMSdP along queries x kNWarps / kWarpsMSdP along keys
//   dK, dV (kBlockN x kHeadDim): kWarpsNdKV along keys    x kNWarps / kWarpsNdKV along d
//   dQ     (kBlockM x kHeadDim): kWarpsMdQ  along queries x kNWarps / kWarpsMdQ  along d
// Q and dO have kStagesQ, kStagesDO shared buffers: with 2, the next query block's tile loads
// during the whole iteration; with 1, it loads once the dV and dK products are done with it.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kWarpsMSdP_, int kWarpsNdKV_, int kWarpsMdQ_, int kStagesQ_, int kStagesDO_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled head-dim bucket (actual d <= this)
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStagesQ = kStagesQ_;
  static constexpr int kStagesDO = kStagesDO_;

  static constexpr int kWarpsMSdP = kWarpsMSdP_, kWarpsNSdP = kNWarps / kWarpsMSdP;
  static constexpr int kSdPWarpM = kBlockM / kWarpsMSdP, kSdPWarpN = kBlockN / kWarpsNSdP;
  static constexpr int kSdPMTiles = kSdPWarpM / 16, kSdPNTiles = kSdPWarpN / 8;

  static constexpr int kWarpsNdKV = kWarpsNdKV_, kWarpsDdKV = kNWarps / kWarpsNdKV;
  static constexpr int kdKVWarpN = kBlockN / kWarpsNdKV, kdKVWarpD = kHeadDim / kWarpsDdKV;
  static constexpr int kdKVMTiles = kdKVWarpN / 16, kdKVNTiles = kdKVWarpD / 8;

  static constexpr int kWarpsMdQ = kWarpsMdQ_, kWarpsDdQ = kNWarps / kWarpsMdQ;
  static constexpr int kdQWarpM = kBlockM / kWarpsMdQ, kdQWarpD = kHeadDim / kWarpsDdQ;
  static constexpr int kdQMTiles = kdQWarpM / 16, kdQNTiles = kdQWarpD / 8;

  static constexpr int kdQFragsPerWarp = kdQMTiles * kdQNTiles;  // m16 x n8 fragments of dQ

  // Shared memory: rows padded by 16 bytes to an odd number of 16 B chunks, so that the 8 row
  // addresses of an ldmatrix (and the 8 rows of a fragment store) hit 8 different bank groups.
  // Layout: K, V, Q x kStagesQ, dO x kStagesDO, P, dS (elements), then lse and D of the query
  // block (floats, kStagesQ buffers each, loaded with Q). dK, dV are staged in K, V at the end.
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kSmemRow = kHeadDim + 8;       // Q, dO, K, V rows (elements)
  static constexpr int kSmemRowP = kBlockN + 8;       // P, dS rows (elements)
  static constexpr int kSmemQ = kBlockM * kSmemRow;   // one Q or dO buffer
  static constexpr int kSmemK = kBlockN * kSmemRow;   // K or V
  static constexpr int kSmemP = kBlockM * kSmemRowP;  // P or dS
  static constexpr size_t kSmemElementBytes =
      size_t(2 * kSmemK + (kStagesQ + kStagesDO) * kSmemQ + 2 * kSmemP) * sizeof(Element);
  static constexpr size_t kSmemBytes = kSmemElementBytes + 2 * kStagesQ * kBlockM * sizeof(float);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket: multiple of 32, <= 256");
  static_assert(kBlockM <= kAccumPadRows && kAccumPadRows % kBlockM == 0, "kBlockM divides 128");
  static_assert(kNWarps % kWarpsMSdP == 0 && kNWarps % kWarpsNdKV == 0 && kNWarps % kWarpsMdQ == 0,
                "warp grids must use every warp");
  static_assert(kSdPWarpM % 16 == 0 && kSdPWarpN % 8 == 0 && kSdPWarpM * kWarpsMSdP == kBlockM &&
                    kSdPWarpN * kWarpsNSdP == kBlockN,
                "S/dP warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kdKVWarpN % 16 == 0 && kdKVWarpD % 8 == 0 && kdKVWarpN * kWarpsNdKV == kBlockN &&
                    kdKVWarpD * kWarpsDdKV == kHeadDim,
                "dK/dV warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kdQWarpM % 16 == 0 && kdQWarpD % 8 == 0 && kdQWarpM * kWarpsMdQ == kBlockM &&
                    kdQWarpD * kWarpsDdQ == kHeadDim,
                "dQ warp tile: whole m16 x n8 tiles covering the block");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "blocks: whole k16 steps");
  static_assert(kStagesQ >= 1 && kStagesQ <= 2 && kStagesDO >= 1 && kStagesDO <= 2,
                "1 or 2 stages");
  static_assert(2 * kBlockM <= kNThreads, "one thread per lse and per D element of a block");
  static_assert((kSmemRow / 8) % 2 == 1 && (kSmemRowP / 8) % 2 == 1,
                "padded rows must be an odd number of 16 B chunks");
};

// dQ tile of the deterministic path: one CTA owns kBlockM query rows (warp w: rows
// [w * kWarpRows, (w + 1) * kWarpRows)) and loops over key blocks of kBlockN, as the forward does.
// K and V have kStagesKV shared buffers.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kStagesKV_>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStagesKV = kStagesKV_;

  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;  // m16 tiles per warp
  static constexpr int kNTilesS = kBlockN / 8;    // n8 tiles of S, dP per m16 tile
  static constexpr int kNTilesD = kHeadDim / 8;   // n8 tiles of dQ per m16 tile

  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemRow = kHeadDim + 8;
  static constexpr int kSmemQ = kBlockM * kSmemRow;  // Q or dO
  static constexpr int kSmemK = kBlockN * kSmemRow;  // one K or V buffer
  // Layout: Q, dO, K x kStagesKV, V x kStagesKV.
  static constexpr size_t kSmemBytes =
      size_t(2 * kSmemQ + 2 * kStagesKV * kSmemK) * sizeof(Element);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket: multiple of 32, <= 256");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0, "kBlockN: whole k16 steps of dS K");
  static_assert(kStagesKV >= 1 && kStagesKV <= 2, "1 or 2 stages");
  static_assert((kSmemRow / 8) % 2 == 1, "padded row must be an odd number of 16 B chunks");
};

// ---------------------------------------------------------------------------------------------
// Warp-level products on shared-memory tiles (fragment layouts: ptx.cuh). A warp tile is
// kMTiles m16 tiles x kNTiles n8 tiles; kK is the reduction length. Addresses are per lane (bytes)
// and already point at the warp tile's first row and column, with the lane offsets below:
//   A, row-major rows = m:   row (lane & 15),                        column (lane >> 4) * 8
//   A^T (.trans), rows = k:  row (lane >> 4) * 8 + (lane & 7),       column ((lane >> 3) & 1) * 8
//   B^T, rows = n:           row (lane >> 4) * 8 + (lane & 7),       column ((lane >> 3) & 1) * 8
//   B (.trans), rows = k:    row ((lane >> 3) & 1) * 8 + (lane & 7), column (lane >> 4) * 8
// An x4 B load covers two n8 tiles (16 columns of n); an odd last n8 tile uses an x2 load, whose
// lanes 0..15 carry the same addresses as for the first tile of an x4 load.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t lane_offset_a(int lane, int row_len) {
  return uint32_t((lane & 15) * row_len + (lane >> 4) * 8);
}
__device__ __forceinline__ uint32_t lane_offset_at(int lane, int row_len) {  // also B^T
  return uint32_t(((lane >> 4) * 8 + (lane & 7)) * row_len + ((lane >> 3) & 1) * 8);
}
__device__ __forceinline__ uint32_t lane_offset_b(int lane, int row_len) {
  return uint32_t((((lane >> 3) & 1) * 8 + (lane & 7)) * row_len + (lane >> 4) * 8);
}

// acc += A B^T. A (m x k) row-major with rows of kRowA elements; B^T (n x k) with rows of kRowB.
template <typename Element, int kMTiles, int kNTiles, int kK, int kRowA, int kRowB>
__device__ __forceinline__ void mma_ABt(float (&acc)[kMTiles][kNTiles][4], uint32_t a_addr,
                                        uint32_t b_addr) {
  constexpr int kElt = sizeof(Element);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
      ldmatrix_x4(a[mt], a_addr + (mt * 16 * kRowA + kk * 16) * kElt);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];  // n8 tiles 2np, 2np + 1
      ldmatrix_x4(b, b_addr + (np * 16 * kRowB + kk * 16) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
    if constexpr (kNTiles % 2 == 1) {
      uint32_t b[2];
      ldmatrix_x2(b, b_addr + ((kNTiles - 1) * 8 * kRowB + kk * 16) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        mma_16816<Element>(acc[mt][kNTiles - 1], a[mt], b[0], b[1]);
    }
  }
}

// acc += A^T B. A (k x m) and B (k x n) both stored with rows = k (rows of kRowA, kRowB elements).
template <typename Element, int kMTiles, int kNTiles, int kK, int kRowA, int kRowB>
__device__ __forceinline__ void mma_AtB(float (&acc)[kMTiles][kNTiles][4], uint32_t a_addr,
                                        uint32_t b_addr) {
  constexpr int kElt = sizeof(Element);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
      ldmatrix_x4_trans(a[mt], a_addr + (kk * 16 * kRowA + mt * 16) * kElt);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr + (kk * 16 * kRowB + np * 16) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
    if constexpr (kNTiles % 2 == 1) {
      uint32_t b[2];
      ldmatrix_x2_trans(b, b_addr + (kk * 16 * kRowB + (kNTiles - 1) * 8) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        mma_16816<Element>(acc[mt][kNTiles - 1], a[mt], b[0], b[1]);
    }
  }
}

// acc += A B. A (m x k) row-major (rows of kRowA); B (k x n) stored with rows = k (rows of kRowB).
template <typename Element, int kMTiles, int kNTiles, int kK, int kRowA, int kRowB>
__device__ __forceinline__ void mma_AB(float (&acc)[kMTiles][kNTiles][4], uint32_t a_addr,
                                       uint32_t b_addr) {
  constexpr int kElt = sizeof(Element);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
      ldmatrix_x4(a[mt], a_addr + (mt * 16 * kRowA + kk * 16) * kElt);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr + (kk * 16 * kRowB + np * 16) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
    if constexpr (kNTiles % 2 == 1) {
      uint32_t b[2];
      ldmatrix_x2_trans(b, b_addr + (kk * 16 * kRowB + (kNTiles - 1) * 8) * kElt);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        mma_16816<Element>(acc[mt][kNTiles - 1], a[mt], b[0], b[1]);
    }
  }
}

template <int kMTiles, int kNTiles>
__device__ __forceinline__ void clear(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Write a warp's C fragments (rows row0 + mt*16 + {g, g+8}, columns col0 + nt*8 + {2t, 2t+1}) times
// `scale` into a shared tile with rows of kRow elements, in the element type.
template <typename Element, int kMTiles, int kNTiles, int kRow>
__device__ __forceinline__ void store_fragments(Element* smem,
                                                const float (&acc)[kMTiles][kNTiles][4],
                                                float scale, int row0, int col0, int g, int t) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + mt * 16 + half * 8 + g, col = col0 + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(smem + row * kRow + col) =
            pack2<Element>(acc[mt][nt][2 * half] * scale, acc[mt][nt][2 * half + 1] * scale);
      }
}

// Copy a (kRows x kHeadDim) shared tile (padded rows) to global memory with 16-byte stores: rows
// < rows_valid, columns < d.
template <typename Traits, int kRows>
__device__ __forceinline__ void store_tile(typename Traits::Element* gmem, int64_t row_stride,
                                           const typename Traits::Element* smem, int rows_valid,
                                           int d, int tid) {
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kChunks, Traits::kNThreads); ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if ((kChunks % Traits::kNThreads == 0 || idx < kChunks) && row < rows_valid && col < d) {
      *reinterpret_cast<uint4*>(gmem + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem + row * Traits::kSmemRow + col);
    }
  }
}

// Per-row softmax reference of the backward: P = exp2(rn(S scale_log2) - ref) with ref = the
// forward's lse in log2 units (finish_row), evaluated as the forward does (recompute_p), so that
// a row's maximum gets P = 1 / l exactly. A row that sees no key (lse = -inf) and a row past the
// sequence end get ref = +inf, so P = 0.
__device__ __forceinline__ float lse_reference(float lse_log2, bool row_valid) {
  return !row_valid || lse_log2 == -INFINITY ? INFINITY : lse_log2;
}
__device__ __forceinline__ float recompute_p(float s, float scale_log2, float ref) {
  return fast_exp2(__fmul_rn(s, scale_log2) - ref);  // two roundings, never one fma
}

// dq_accum layout. Each query block's (kBlockM x kHeadDim) tile of the fp32 dQ accumulator is
// stored contiguously in fragment order, not row-major: m16 x n8 fragment f = (warp, mt, nt) of
// the dQ product owns 128 floats, and lane L's element e (see ptx.cuh's C layout) sits at
//   sm_90+: 4 L + e  (one 16-byte red.v4 per lane: a warp covers 512 contiguous bytes)
//   sm_8x:  32 e + L (four scalar reds, each covering 128 contiguous bytes per warp)
// so that the atomics of a warp hit whole cache lines (a row-major layout spreads them over 8
// lines). The postprocess kernel, compiled for the same arch, reads it back in the same order.
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

// Where one (batch, head) sequence's fp32 scratch rows start (see BwdParams).
__device__ __forceinline__ int64_t accum_row0(const SeqInfo& seq, int b, bool varlen) {
  return varlen ? int64_t(seq.q_start) + int64_t(kAccumPadRows) * b : 0;
}

// What one dK/dV CTA works on: keys [n0, n0 + block_n) of sequence b (K/V head hk, query head
// h), against the query blocks [m_begin, m_blocks) of block_m rows that see them (causal masking
// starts later; a block of padding keys sees none); and where its tensors live: K, V, dK, dV at
// row n0, Q, dO, lse, D and dq_accum at row 0 of the sequence. Shared by the sm80 and sm90
// dK/dV kernels.
template <typename Element, bool kIsCausal>
struct BwdKeyTile {
  SeqInfo seq;
  int n0;
  int causal_offset;  // query i sees key j iff j <= i + causal_offset (causal only), j < seqlen_k
  int m_begin, m_blocks;
  const Element *q, *dout, *k, *v;
  Element *dk, *dv;
  const float *lse, *dsum;
  float* dq_accum;  // rows of d_bucket floats

  __device__ BwdKeyTile(const BwdParams& p, int n_block, int h, int b, int block_m, int block_n,
                        int d_bucket)
      : seq(p, b), n0(n_block * block_n) {
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int hk = h / (p.heads / p.heads_k);  // MQA/GQA: the K/V head of query head h
    q = static_cast<const Element*>(p.q) +
        seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen);
    dout = static_cast<const Element*>(p.dout) +
           seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h, varlen);
    k = static_cast<const Element*>(p.k) +
        seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen) +
        n0 * p.k_row_stride;
    v = static_cast<const Element*>(p.v) +
        seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen) +
        n0 * p.v_row_stride;
    dk = static_cast<Element*>(p.dk) +
         seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, h, varlen) +
         n0 * p.dk_row_stride;
    dv = static_cast<Element*>(p.dv) +
         seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, h, varlen) +
         n0 * p.dv_row_stride;
    lse = p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + seq.q_start;
    const int64_t row0 = accum_row0(seq, b, varlen);
    dsum = p.dsum + (varlen ? 0 : b * p.dsum_batch_stride) + h * p.dsum_head_stride + row0;
    dq_accum = p.dq_accum + (varlen ? 0 : b * p.dq_accum_batch_stride) +
               h * p.dq_accum_head_stride + row0 * d_bucket;
    // The first query block with a row that sees key n0 is the first one this block contributes to.
    causal_offset = p.causal_bottom_right ? seq.seqlen_k - seq.seqlen_q : 0;
    m_blocks = ceil_div(seq.seqlen_q, block_m);
    m_begin = kIsCausal ? max(0, n0 - causal_offset) / block_m : 0;
    if (n0 >= seq.seqlen_k) m_begin = m_blocks;  // only padding keys: dK = dV = 0
  }
  // Past the key rows this sequence owns (rows_k: padding rows included, which get dK = dV = 0).
  __device__ bool empty() const { return n0 >= seq.rows_k; }
};

// cp.async of the lse and D values of query rows [m0, m0 + block_m) into block_m floats each at
// smem_lse and smem_dsum (0 past the sequence end): threads [0, block_m) copy lse, threads
// [block_m, 2 block_m) copy D. The caller commits.
__device__ __forceinline__ void load_lse_dsum(uint32_t smem_lse, uint32_t smem_dsum,
                                              const float* lse, const float* dsum, int m0,
                                              int block_m, int seqlen_q, int tid) {
  const bool is_lse = tid < block_m;
  const int row = is_lse ? tid : tid - block_m;
  if (row < block_m) {
    const bool valid = m0 + row < seqlen_q;
    const float* src = is_lse ? lse : dsum;
    cp_async_4((is_lse ? smem_lse : smem_dsum) + 4 * row, valid ? src + m0 + row : src, valid);
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Preprocess: D_i = rowsum(dO_i * O_i) in fp32 for a block of kAccumPadRows rows (0 past the
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

// ---------------------------------------------------------------------------------------------
// 2. dK, dV (and the atomic dQ accumulation): one CTA per (key block, head, batch).
// ---------------------------------------------------------------------------------------------
template <typename Traits, bool kIsCausal, bool kHasDropout>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dk_dv_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kSmemRow = Traits::kSmemRow, kSmemRowP = Traits::kSmemRowP;
  constexpr int kStagesQ = Traits::kStagesQ, kStagesDO = Traits::kStagesDO;
  constexpr int kSdPMTiles = Traits::kSdPMTiles, kSdPNTiles = Traits::kSdPNTiles;
  constexpr int kdKVMTiles = Traits::kdKVMTiles, kdKVNTiles = Traits::kdKVNTiles;
  constexpr int kdQMTiles = Traits::kdQMTiles, kdQNTiles = Traits::kdQNTiles;
  constexpr int kElt = sizeof(Element);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_k = reinterpret_cast<Element*>(smem_raw);
  Element* smem_v = smem_k + Traits::kSmemK;
  Element* smem_q = smem_v + Traits::kSmemK;             // kStagesQ buffers
  Element* smem_do = smem_q + kStagesQ * Traits::kSmemQ;  // kStagesDO buffers
  Element* smem_p = smem_do + kStagesDO * Traits::kSmemQ;
  Element* smem_ds = smem_p + Traits::kSmemP;
  float* smem_lse = reinterpret_cast<float*>(smem_raw + Traits::kSmemElementBytes);  // kStagesQ
  float* smem_dsum = smem_lse + kStagesQ * kBlockM;                                  // kStagesQ

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  // This CTA's keys, query-block range and pointers (BwdKeyTile).
  const BwdKeyTile<Element, kIsCausal> tile(p, blockIdx.x, h, b, kBlockM, kBlockN, kHeadDim);
  if (tile.empty()) return;
  const SeqInfo& seq = tile.seq;
  const int n0 = tile.n0, causal_offset = tile.causal_offset;
  const int m_begin = tile.m_begin, m_blocks = tile.m_blocks;
  const Element *q = tile.q, *dout = tile.dout, *k = tile.k, *v = tile.v;
  const float *lse = tile.lse, *dsum = tile.dsum;
  float* dq_accum = tile.dq_accum;

  float acc_dk[kdKVMTiles][kdKVNTiles][4];  // dS^T Q (scaled at the end)
  float acc_dv[kdKVMTiles][kdKVNTiles][4];  // (P Z)^T dO
  clear(acc_dk);
  clear(acc_dv);

  // cp.async loads of query block m_block into stage `stage`: Q with its lse and D rows, and dO.
  auto load_q = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_async<Traits, kBlockM>(smem_addr(smem_q) + stage * Traits::kSmemQ * kElt,
                                     q + m0 * p.q_row_stride, p.q_row_stride, seq.seqlen_q - m0,
                                     p.head_dim, tid);
    load_lse_dsum(smem_addr(smem_lse + stage * kBlockM), smem_addr(smem_dsum + stage * kBlockM),
                  lse, dsum, m0, kBlockM, seq.seqlen_q, tid);
  };
  auto load_do = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_async<Traits, kBlockM>(smem_addr(smem_do) + stage * Traits::kSmemQ * kElt,
                                     dout + m0 * p.do_row_stride, p.do_row_stride,
                                     seq.seqlen_q - m0, p.head_dim, tid);
  };

  const int rows_kv = seq.seqlen_k - n0;  // keys of this block that exist (rest zero-filled)
  if (m_begin < m_blocks) {
    load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k, p.k_row_stride, rows_kv, p.head_dim,
                                     tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v, p.v_row_stride, rows_kv, p.head_dim,
                                     tid);
    load_q(m_begin, 0);
    load_do(m_begin, 0);
    cp_async_commit();
  }

  // Warp tiles of the three product shapes (see BwdTraits) and the per-lane ldmatrix offsets.
  const int sdp_m = (warp / Traits::kWarpsNSdP) * Traits::kSdPWarpM;  // S, dP: first query row
  const int sdp_n = (warp % Traits::kWarpsNSdP) * Traits::kSdPWarpN;  //        first key
  const int dkv_n = (warp / Traits::kWarpsDdKV) * Traits::kdKVWarpN;  // dK, dV: first key
  const int dkv_d = (warp % Traits::kWarpsDdKV) * Traits::kdKVWarpD;  //         first column
  const int dq_m = (warp / Traits::kWarpsDdQ) * Traits::kdQWarpM;     // dQ: first query row
  const int dq_d = (warp % Traits::kWarpsDdQ) * Traits::kdQWarpD;     //     first column
  // S = Q K^T, dP = dO V^T: A = Q, dO rows; B^T = K, V rows.
  const uint32_t sdp_a = (sdp_m * kSmemRow + lane_offset_a(lane, kSmemRow)) * kElt;
  const uint32_t sdp_b = (sdp_n * kSmemRow + lane_offset_at(lane, kSmemRow)) * kElt;
  // dV = (P Z)^T dO, dK = dS^T Q: A^T = P, dS (rows = queries); B = dO, Q (rows = queries).
  const uint32_t dkv_a = (dkv_n + lane_offset_at(lane, kSmemRowP)) * kElt;
  const uint32_t dkv_b = (dkv_d + lane_offset_b(lane, kSmemRow)) * kElt;
  // dQ = dS K: A = dS rows; B = K (rows = keys).
  const uint32_t dq_a = (dq_m * kSmemRowP + lane_offset_a(lane, kSmemRowP)) * kElt;
  const uint32_t dq_b = (dq_d + lane_offset_b(lane, kSmemRow)) * kElt;

  DropoutMask drop;
  if constexpr (kHasDropout) drop = DropoutMask(p.dropout, b, h, p.heads, p.seqlen_q, p.seqlen_k);

#pragma unroll 1
  for (int m_block = m_begin; m_block < m_blocks; ++m_block) {
    const int it = m_block - m_begin;
    const int m0 = m_block * kBlockM;
    const bool has_next = m_block + 1 < m_blocks;
    const int stage_q = it % kStagesQ;
    const uint32_t sq = smem_addr(smem_q) + stage_q * Traits::kSmemQ * kElt;
    const uint32_t sdo = smem_addr(smem_do) + (it % kStagesDO) * Traits::kSmemQ * kElt;

    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) have landed; every warp is done with the last block
    if (has_next) {   // prefetch the double-buffered tiles of the next query block
      if constexpr (kStagesQ == 2) load_q(m_block + 1, (it + 1) % 2);
      if constexpr (kStagesDO == 2) load_do(m_block + 1, (it + 1) % 2);
      cp_async_commit();
    }

    // lse reference and D of this thread's rows of S: sdp_m + mt * 16 + half * 8 + g.
    float ref[kSdPMTiles][2], dsum_row[kSdPMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kSdPMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = sdp_m + mt * 16 + half * 8 + g;
        const bool valid = m0 + row < seq.seqlen_q;
        ref[mt][half] = lse_reference(smem_lse[stage_q * kBlockM + row], valid);
        dsum_row[mt][half] = valid ? smem_dsum[stage_q * kBlockM + row] : 0.f;
      }

    TileKeepBits<kSdPMTiles, kSdPNTiles> keep;  // dropout, ahead of the register peak
    if constexpr (kHasDropout) keep.compute(drop, (m0 + sdp_m) / 16, (n0 + sdp_n) / 8, g, t);

    // S = Q K^T and dP = dO V^T, (kSdPWarpM x kSdPWarpN) per warp.
    float acc_s[kSdPMTiles][kSdPNTiles][4], acc_dp[kSdPMTiles][kSdPNTiles][4];
    clear(acc_s);
    clear(acc_dp);
    mma_ABt<Element, kSdPMTiles, kSdPNTiles, kHeadDim, kSmemRow, kSmemRow>(
        acc_s, sq + sdp_a, smem_addr(smem_k) + sdp_b);
    mma_ABt<Element, kSdPMTiles, kSdPNTiles, kHeadDim, kSmemRow, kSmemRow>(
        acc_dp, sdo + sdp_a, smem_addr(smem_v) + sdp_b);

    // Mask: keys past the sequence end, and (causal) keys after the query's diagonal.
    const ScoreMask<kIsCausal> mask{seq.seqlen_k, causal_offset};
    if (mask.needed(m0, n0, kBlockN)) mask.apply(acc_s, m0 + sdp_m, n0 + sdp_n, g, t);

    // P = exp2(S scale log2(e) - lse log2(e)); dS = P (dP Z - D). P Z and dS go to shared memory.
#pragma unroll
    for (int mt = 0; mt < kSdPMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kSdPNTiles; ++nt) {
        const uint32_t kept_bits = kHasDropout ? keep.get(mt, nt) : 0xfu;  // bit e: e is kept
        float pz[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = recompute_p(acc_s[mt][nt][e], p.scale_log2, ref[mt][e / 2]);
          float dpe = acc_dp[mt][nt][e];
          pz[e] = pe;
          if constexpr (kHasDropout) {
            const bool kept = (kept_bits >> e) & 1u;
            pz[e] = kept ? pe * drop.inv_keep_prob : 0.f;
            dpe = kept ? dpe * drop.inv_keep_prob : 0.f;
          }
          ds[e] = pe * (dpe - dsum_row[mt][e / 2]);
        }
        const int row = sdp_m + mt * 16 + g, col = sdp_n + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(smem_p + row * kSmemRowP + col) = pack2<Element>(pz[0], pz[1]);
        *reinterpret_cast<uint32_t*>(smem_p + (row + 8) * kSmemRowP + col) =
            pack2<Element>(pz[2], pz[3]);
        *reinterpret_cast<uint32_t*>(smem_ds + row * kSmemRowP + col) =
            pack2<Element>(ds[0], ds[1]);
        *reinterpret_cast<uint32_t*>(smem_ds + (row + 8) * kSmemRowP + col) =
            pack2<Element>(ds[2], ds[3]);
      }
    __syncthreads();  // P Z and dS of the whole block are in shared memory

    // dV += (P Z)^T dO and dK += dS^T Q, (kdKVWarpN x kdKVWarpD) per warp.
    mma_AtB<Element, kdKVMTiles, kdKVNTiles, kBlockM, kSmemRowP, kSmemRow>(
        acc_dv, smem_addr(smem_p) + dkv_a, sdo + dkv_b);
    mma_AtB<Element, kdKVMTiles, kdKVNTiles, kBlockM, kSmemRowP, kSmemRow>(
        acc_dk, smem_addr(smem_ds) + dkv_a, sq + dkv_b);

    if constexpr (kStagesQ == 1 || kStagesDO == 1) {
      if (has_next) {  // the single-buffered tiles of the next query block, now that all are done
        __syncthreads();
        if constexpr (kStagesQ == 1) load_q(m_block + 1, 0);
        if constexpr (kStagesDO == 1) load_do(m_block + 1, 0);
        cp_async_commit();
      }
    }

    // dQ += dS K (unscaled), (kdQWarpM x kdQWarpD) per warp, added to the query block's tile of
    // dq_accum (fragment order, see dq_accum_add) with fp32 atomics. Rows past the sequence end add
    // 0 to padding rows; fragments of columns >= d are skipped.
    if (!p.deterministic) {
      float acc_dq[kdQMTiles][kdQNTiles][4];
      clear(acc_dq);
      mma_AB<Element, kdQMTiles, kdQNTiles, kBlockN, kSmemRowP, kSmemRow>(
          acc_dq, smem_addr(smem_ds) + dq_a, smem_addr(smem_k) + dq_b);
      float* accum = dq_accum + int64_t(m0) * kHeadDim + warp * Traits::kdQFragsPerWarp * 128;
#pragma unroll
      for (int mt = 0; mt < kdQMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kdQNTiles; ++nt)
          if (dq_d + nt * 8 < p.head_dim)
            dq_accum_add(accum + (mt * kdQNTiles + nt) * 128, lane, acc_dq[mt][nt]);
    }
  }

  // Epilogue: dK = scale dS^T Q and dV staged in the K and V tiles (every warp is done with them),
  // then written out with 16-byte stores. Keys past seqused_k (padding) get zeros.
  cp_async_wait<0>();
  __syncthreads();
  store_fragments<Element, kdKVMTiles, kdKVNTiles, kSmemRow>(smem_k, acc_dk, p.softmax_scale, dkv_n,
                                                             dkv_d, g, t);
  store_fragments<Element, kdKVMTiles, kdKVNTiles, kSmemRow>(smem_v, acc_dv, 1.f, dkv_n, dkv_d, g,
                                                             t);
  __syncthreads();
  store_tile<Traits, kBlockN>(tile.dk, p.dk_row_stride, smem_k, seq.rows_k - n0, p.head_dim, tid);
  store_tile<Traits, kBlockN>(tile.dv, p.dv_row_stride, smem_v, seq.rows_k - n0, p.head_dim, tid);
}

// ---------------------------------------------------------------------------------------------
// 3. Postprocess (atomic path): dQ = softmax_scale * dq_accum, in the element type. One CTA per
// query block of the dK/dV kernel's Traits (whose fragment order the accumulator tile is in): the
// tile is read in that order, scattered into a row-major shared tile, then written out with
// 16-byte stores.
// ---------------------------------------------------------------------------------------------
template <typename Traits>
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

// ---------------------------------------------------------------------------------------------
// 3'. dQ (deterministic path): one CTA per (query block, head, batch); K and V stream through
// kStagesKV buffers. S, dP and dS stay in registers: the C layout of two n8 tiles of dS is the A
// layout of one k16 step of dS K (as P in the forward's P V).
// ---------------------------------------------------------------------------------------------
template <typename Traits, bool kIsCausal, bool kHasDropout>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kNWarps <= 4 ? 2 : 1)
    flash_bwd_dq_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim, kSmemRow = Traits::kSmemRow;
  constexpr int kMTiles = Traits::kMTiles, kNTilesS = Traits::kNTilesS;
  constexpr int kNTilesD = Traits::kNTilesD, kStagesKV = Traits::kStagesKV;
  constexpr int kElt = sizeof(Element);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem_q = reinterpret_cast<Element*>(smem_raw);
  Element* smem_do = smem_q + Traits::kSmemQ;
  Element* smem_k = smem_do + Traits::kSmemQ;            // kStagesKV buffers
  Element* smem_v = smem_k + kStagesKV * Traits::kSmemK;  // kStagesKV buffers

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heavier (later) query blocks first
  const GridHeadBatch hb(p.heads, p.batch);
  if (!hb.valid) return;
  const int h = hb.h, b = hb.b;
  const bool varlen = p.cu_seqlens_q != nullptr;

  SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int hk = h / (p.heads / p.heads_k);

  const Element* q = static_cast<const Element*>(p.q) +
                     seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen) +
                     m0 * p.q_row_stride;
  const Element* dout =
      static_cast<const Element*>(p.dout) +
      seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h, varlen) +
      m0 * p.do_row_stride;
  const Element* k = static_cast<const Element*>(p.k) +
                     seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen);
  const Element* v = static_cast<const Element*>(p.v) +
                     seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen);
  Element* dq = static_cast<Element*>(p.dq) +
                seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h, varlen) +
                m0 * p.dq_row_stride;
  const float* lse = p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride +
                     seq.q_start;
  const float* dsum = p.dsum + (varlen ? 0 : b * p.dsum_batch_stride) + h * p.dsum_head_stride +
                      accum_row0(seq, b, varlen);

  const int causal_offset = p.causal_bottom_right ? seq.seqlen_k - seq.seqlen_q : 0;
  int n_end = seq.seqlen_k;
  if constexpr (kIsCausal) n_end = min(n_end, max(0, m0 + kBlockM + causal_offset));
  const int n_blocks = ceil_div(n_end, kBlockN);
  const int rows_q = min(kBlockM, seq.seqlen_q - m0);

  if (n_blocks > 0) {
    load_tile_async<Traits, kBlockM>(smem_addr(smem_q), q, p.q_row_stride, rows_q, p.head_dim, tid);
    load_tile_async<Traits, kBlockM>(smem_addr(smem_do), dout, p.do_row_stride, rows_q, p.head_dim,
                                     tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k, p.k_row_stride, seq.seqlen_k,
                                     p.head_dim, tid);
    load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v, p.v_row_stride, seq.seqlen_k,
                                     p.head_dim, tid);
    cp_async_commit();
  }

  // This thread's rows: warp * kWarpRows + mt * 16 + half * 8 + g.
  const int warp_m = warp * Traits::kWarpRows;
  float ref[kMTiles][2], dsum_row[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m + mt * 16 + half * 8 + g;
      const bool valid = row < seq.seqlen_q;
      ref[mt][half] = lse_reference(valid ? lse[row] : 0.f, valid);
      dsum_row[mt][half] = valid ? dsum[row] : 0.f;
    }

  DropoutMask drop;
  if constexpr (kHasDropout) drop = DropoutMask(p.dropout, b, h, p.heads, p.seqlen_q, p.seqlen_k);

  const uint32_t a_off = (warp_m * kSmemRow + lane_offset_a(lane, kSmemRow)) * kElt;  // Q, dO
  const uint32_t bt_off = lane_offset_at(lane, kSmemRow) * kElt;  // K, V as B^T (S, dP)
  const uint32_t b_off = lane_offset_b(lane, kSmemRow) * kElt;    // K as B (dS K)

  float acc_dq[kMTiles][kNTilesD][4];  // dS K (scaled at the end)
  clear(acc_dq);

#pragma unroll 1
  for (int n_block = 0; n_block < n_blocks; ++n_block) {
    const int n0 = n_block * kBlockN;
    const uint32_t sk = smem_addr(smem_k) + (n_block % kStagesKV) * Traits::kSmemK * kElt;
    const uint32_t sv = smem_addr(smem_v) + (n_block % kStagesKV) * Traits::kSmemK * kElt;
    const bool has_next = n_block + 1 < n_blocks;
    cp_async_wait<0>();
    __syncthreads();  // K, V of this block are in shared memory; every warp is done with the last
    if constexpr (kStagesKV == 2) {
      if (has_next) {
        const int n_next = n0 + kBlockN;
        const uint32_t other = ((n_block + 1) % 2) * Traits::kSmemK * kElt;
        load_tile_async<Traits, kBlockN>(smem_addr(smem_k) + other, k + n_next * p.k_row_stride,
                                         p.k_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        load_tile_async<Traits, kBlockN>(smem_addr(smem_v) + other, v + n_next * p.v_row_stride,
                                         p.v_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        cp_async_commit();
      }
    }

    TileKeepBits<kMTiles, kNTilesS> keep;  // dropout, ahead of the register peak
    if constexpr (kHasDropout) keep.compute(drop, (m0 + warp_m) / 16, n0 / 8, g, t);

    // S = Q K^T, dP = dO V^T: (kWarpRows x kBlockN) per warp.
    float acc_s[kMTiles][kNTilesS][4], acc_dp[kMTiles][kNTilesS][4];
    clear(acc_s);
    clear(acc_dp);
    mma_ABt<Element, kMTiles, kNTilesS, kHeadDim, kSmemRow, kSmemRow>(
        acc_s, smem_addr(smem_q) + a_off, sk + bt_off);
    mma_ABt<Element, kMTiles, kNTilesS, kHeadDim, kSmemRow, kSmemRow>(
        acc_dp, smem_addr(smem_do) + a_off, sv + bt_off);

    const ScoreMask<kIsCausal> mask{seq.seqlen_k, causal_offset};
    if (mask.needed(m0, n0, kBlockN)) mask.apply(acc_s, m0 + warp_m, n0, g, t);

    // dS = P (dP Z - D), in place of dP.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        const uint32_t kept_bits = kHasDropout ? keep.get(mt, nt) : 0xfu;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = recompute_p(acc_s[mt][nt][e], p.scale_log2, ref[mt][e / 2]);
          float dpe = acc_dp[mt][nt][e];
          if constexpr (kHasDropout) dpe = (kept_bits >> e) & 1u ? dpe * drop.inv_keep_prob : 0.f;
          acc_dp[mt][nt][e] = pe * (dpe - dsum_row[mt][e / 2]);
        }
      }

    // dQ += dS K: dS from registers (A), K (rows = keys) as B via ldmatrix.trans.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2<Element>(acc_dp[mt][2 * ks][0], acc_dp[mt][2 * ks][1]);
        a[mt][1] = pack2<Element>(acc_dp[mt][2 * ks][2], acc_dp[mt][2 * ks][3]);
        a[mt][2] = pack2<Element>(acc_dp[mt][2 * ks + 1][0], acc_dp[mt][2 * ks + 1][1]);
        a[mt][3] = pack2<Element>(acc_dp[mt][2 * ks + 1][2], acc_dp[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < kNTilesD / 2; ++np) {
        uint32_t bk[4];  // keys ks*16 .. +15, d np*16 .. +15: two n8 tiles
        ldmatrix_x4_trans(bk, sk + b_off + (ks * 16 * kSmemRow + np * 16) * kElt);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_dq[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<Element>(acc_dq[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    if constexpr (kStagesKV == 1) {
      if (has_next) {
        const int n_next = n0 + kBlockN;
        __syncthreads();  // every warp is done with K and V
        load_tile_async<Traits, kBlockN>(smem_addr(smem_k), k + n_next * p.k_row_stride,
                                         p.k_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        load_tile_async<Traits, kBlockN>(smem_addr(smem_v), v + n_next * p.v_row_stride,
                                         p.v_row_stride, seq.seqlen_k - n_next, p.head_dim, tid);
        cp_async_commit();
      }
    }
  }

  // Epilogue: dQ = scale dS K. Each warp stages its own rows in its own rows of the Q tile (only it
  // ever read them), then writes them out with 16-byte stores.
  cp_async_wait<0>();
  store_fragments<Element, kMTiles, kNTilesD, kSmemRow>(smem_q, acc_dq, p.softmax_scale, warp_m, 0,
                                                        g, t);
  __syncwarp();
  constexpr int kWarpChunks = Traits::kWarpRows * Traits::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kWarpChunks, 32); ++i) {
    const int idx = i * 32 + lane;
    const int row = warp_m + idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    if ((kWarpChunks % 32 == 0 || idx < kWarpChunks) && row < rows_q && col < p.head_dim) {
      *reinterpret_cast<uint4*>(dq + row * p.dq_row_stride + col) =
          *reinterpret_cast<const uint4*>(smem_q + row * kSmemRow + col);
    }
  }
}

}  // namespace flashjit
