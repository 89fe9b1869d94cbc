// fragment.cuh: the walk over the elements of a warp's register fragments, once per layout, with
// each element's (query, key) position. Family-agnostic: the layouts are those of the matrix
// instructions (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "wgmma .m64nNk16 D fragments").
#pragma once

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

}  // namespace flashjit
