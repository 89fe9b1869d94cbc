// fragment.cuh: the walk over the elements of a warp's register fragments, once per layout, with
// each element's (query, key) position, and the packing of fp32 C fragments as 16-bit A operands.
// Family-agnostic: the layouts are those of the matrix instructions (PTX ISA, "Matrix Fragments
// for mma.m16n8k16" and "wgmma .m64nNk16 D fragments").
#pragma once

#include <cstdint>

#include "common/ptx.cuh"

namespace flashjit {

// Scores S (queries x keys) in the mma C layout, also the layout of an m64 wgmma accumulator seen
// per warp: m16 tile mt, n8 tile nt, element e of lane (g, t) = (lane / 4, lane % 4) is
//   query row0 + mt * 16 + (e / 2) * 8 + g,  key col0 + nt * 8 + 2 t + e % 2.
// f(mt, nt, e, query, key) is called for each element.
template <int kMTiles, int kNTiles, typename F>
__device__ __forceinline__ void for_each_score(int row0, int col0, int g, int t, F&& f) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        f(mt, nt, e, row0 + mt * 16 + (e / 2) * 8 + g, col0 + nt * 8 + 2 * t + (e % 2));
}

// Transposed scores S^T (keys x queries) of one m64 wgmma accumulator row block: element e of n8
// tile nt of lane (g, t) is key key0 + (e / 2) * 8 + g, query query0 + nt * 8 + 2 t + e % 2
// (key0: the first key of the thread's warp). f(nt, e, query, key) is called for each element.
template <int kNTiles, typename F>
__device__ __forceinline__ void for_each_score_transposed(int key0, int query0, int g, int t,
                                                          F&& f) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      f(nt, e, query0 + nt * 8 + 2 * t + (e % 2), key0 + (e / 2) * 8 + g);
}

// Every element of a warp's accumulator fragments (kM x kN tiles of 4) set to 0.
template <int kM, int kN>
__device__ __forceinline__ void zero_fragments(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int mt = 0; mt < kM; ++mt)
#pragma unroll
    for (int nt = 0; nt < kN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Fp32 C fragments (n8 tiles of 4, one m16 row block: P, dS) -> 16-bit A operand of the next
// product. The C layout of n8 tiles 2 ks, 2 ks + 1 is the A layout of k16 step ks (mma.m16n8k16;
// wgmma's A from registers, per warp, likewise): a[2 h] = row g, a[2 h + 1] = row g + 8, columns
// 2 t, 2 t + 1 of n8 tile 2 ks + h. Step ks into a (written out: a loop over h changes the
// decode and sm80 backward cubins):
template <typename Element, int kNTiles>
__device__ __forceinline__ void pack_c_to_a(const float (&c)[kNTiles][4], int ks,
                                            uint32_t (&a)[4]) {
  a[0] = pack2<Element>(c[2 * ks][0], c[2 * ks][1]);
  a[1] = pack2<Element>(c[2 * ks][2], c[2 * ks][3]);
  a[2] = pack2<Element>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
  a[3] = pack2<Element>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
}
// ... and every step, a[ks] for ks < kNTiles / 2.
template <typename Element, int kNTiles>
__device__ __forceinline__ void pack_c_to_a(const float (&c)[kNTiles][4],
                                            uint32_t (&a)[kNTiles / 2][4]) {
#pragma unroll
  for (int ks = 0; ks < kNTiles / 2; ++ks) pack_c_to_a<Element>(c, ks, a[ks]);
}

}  // namespace flashjit
