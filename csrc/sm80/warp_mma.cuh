// warp_mma.cuh: warp-level matrix products of the sm80 family on padded shared-memory tiles
// (mma.sync m16n8k16 fed by ldmatrix; fragment layouts: common/ptx.cuh).
#pragma once

#include <cstdint>

#include "common/fragment.cuh"
#include "common/ptx.cuh"

namespace flashjit {

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

}  // namespace flashjit
