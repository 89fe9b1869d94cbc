// wgmma.cuh: wrappers around the Hopper (sm_90a) warpgroup instructions the Hopper families
// (sm90, sm90ws) use.
//
// Semantics from the PTX ISA, "Asynchronous warpgroup level matrix multiply-accumulate":
//   wgmma.mma_async  a warpgroup (4 consecutive warps, the first one's index divisible by 4)
//                    computes D (64 x N, fp32, in registers) (+)= A (64 x 16) * B (16 x N).
//                    B always comes from shared memory (a matrix descriptor), A from shared
//                    memory or from registers.
//   wgmma.fence / commit_group / wait_group  order register accesses around the asynchronous
//                    multiply, group the issued ones, and wait for them.
//   fence.proxy.async  makes this thread's ordinary shared-memory writes (cp.async included)
//                    visible to the async proxy that wgmma reads shared memory through.
//
// Register layouts (per warp w = warp index % 4 of the warpgroup; g = lane / 4, t = lane % 4):
//   D (64 x N), as float d[N / 8][4]: d[i][0..1] = D[16 w + g][8 i + 2 t .. +1],
//                                     d[i][2..3] = D[16 w + g + 8][8 i + 2 t .. +1];
//   A from registers (64 x 16), uint32_t a[4] of two 16-bit values each, the mma.sync m16n8k16 A
//     layout on rows 16 w ..: a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
//     a3 = A[g+8][2t+8..].
// Since the D layout of two n8 tiles equals the A layout of one k16 step, P = softmax(S) goes
// from the S accumulators to the A operand of P V without touching shared memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/bulk_copy.cuh"  // fence_proxy_async_shared

namespace flashjit {

// ---------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor (64 bits):
//   bits  0-13 start address >> 4;  bits 16-29 leading-dimension byte offset (LBO) >> 4;
//   bits 32-45 stride-dimension byte offset (SBO) >> 4;  bits 49-51 base offset (0: every
//   swizzle pattern starts 1024-byte aligned);  bits 62-63 swizzle mode (1 = 128-byte swizzle).
// With the 128-byte swizzle a matrix is stored in rows of 128 bytes (64 16-bit elements); the
// 16-byte chunk c of row r sits at chunk c ^ (r % 8), i.e. address bits [4, 7) are XORed with
// bits [7, 10). The tensor core applies the same XOR to the addresses it computes, so a k16 step
// inside a 128-byte row is addressed by adding 32 bytes to the start address.
//   K-major operand (Q and K: K = head dim contiguous): 8 rows of 128 B form a core-matrix group,
//     groups follow at SBO; LBO is unused (each k16 step stays inside one 128-byte row).
//   MN-major operand (V with its head dim, the N of P V, contiguous; transposed by the
//     instruction): 64 N-elements per 128-byte row, the next 64 N-elements at LBO; 8 K-rows
//     (keys) of 128 B form a group, groups follow at SBO. An MN-major A operand (the backward's
//     dS, stored keys x queries, as the A of dQ = dS K) is laid out the same way, M for N.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes,
                                                    uint32_t sbo_bytes) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t(lbo_bytes >> 4) << 16) |
         (uint64_t(sbo_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

// A descriptor moved by `bytes` (a multiple of 16): only the start-address field changes. Shared
// addresses stay below 2^18, so the 14-bit field never carries into the next one.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N committed wgmma groups of this warpgroup are still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keep the compiler from moving accesses of wgmma operand registers (accumulators, A fragments)
// across a wgmma fence/wait: an empty asm that "reads and writes" them.
template <typename T, int kRows>
__device__ __forceinline__ void fence_registers(T (&x)[kRows][4]) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, uint32_t>, "fp32 or packed 16-bit");
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (std::is_same_v<T, float>)
        asm volatile("" : "+f"(x[i][e])::"memory");
      else
        asm volatile("" : "+r"(x[i][e])::"memory");
    }
}

// ---------------------------------------------------------------------------------------------
// wgmma.mma_async m64nNk16, fp32 accumulate, N = 64 or 128 (wgmma_ss also 80, 112, 176).
//   wgmma_ss: D (+)= A * B, A and B in shared memory, K-major unless kTransA / kTransB (then
//             MN-major: imm-trans-a / imm-trans-b); D is overwritten when !accumulate.
//   wgmma_rs: D += A * B, A from registers, B MN-major in shared memory (transposed: imm-trans-b).
// ---------------------------------------------------------------------------------------------
#define FLASHJIT_D_N8(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define FLASHJIT_D_N64(d)                                                                      \
  FLASHJIT_D_N8(d, 0), FLASHJIT_D_N8(d, 1), FLASHJIT_D_N8(d, 2), FLASHJIT_D_N8(d, 3),          \
      FLASHJIT_D_N8(d, 4), FLASHJIT_D_N8(d, 5), FLASHJIT_D_N8(d, 6), FLASHJIT_D_N8(d, 7)
#define FLASHJIT_D_N128(d)                                                                     \
  FLASHJIT_D_N64(d), FLASHJIT_D_N8(d, 8), FLASHJIT_D_N8(d, 9), FLASHJIT_D_N8(d, 10),           \
      FLASHJIT_D_N8(d, 11), FLASHJIT_D_N8(d, 12), FLASHJIT_D_N8(d, 13), FLASHJIT_D_N8(d, 14),  \
      FLASHJIT_D_N8(d, 15)
#define FLASHJIT_REGS_0_31                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FLASHJIT_REGS_0_63                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define FLASHJIT_D_N80(d) FLASHJIT_D_N64(d), FLASHJIT_D_N8(d, 8), FLASHJIT_D_N8(d, 9)
#define FLASHJIT_D_N112(d)                                                                     \
  FLASHJIT_D_N64(d), FLASHJIT_D_N8(d, 8), FLASHJIT_D_N8(d, 9), FLASHJIT_D_N8(d, 10),           \
      FLASHJIT_D_N8(d, 11), FLASHJIT_D_N8(d, 12), FLASHJIT_D_N8(d, 13)
#define FLASHJIT_D_N176(d)                                                                     \
  FLASHJIT_D_N128(d), FLASHJIT_D_N8(d, 16), FLASHJIT_D_N8(d, 17), FLASHJIT_D_N8(d, 18),        \
      FLASHJIT_D_N8(d, 19), FLASHJIT_D_N8(d, 20), FLASHJIT_D_N8(d, 21)
#define FLASHJIT_REGS_0_39 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39}"
#define FLASHJIT_REGS_0_55 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55}"
#define FLASHJIT_REGS_0_87 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, " \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}"
// Operands after the D registers: (A descriptor, B descriptor, scale-d, imm-trans-a, imm-trans-b)
// for SS; (a0..a3, B descriptor, scale-d) for RS. imm-scale-a = imm-scale-b = 1 (no negation).
#define FLASHJIT_WGMMA_SS(N, TYPE, DREGS, A, B, SCALE, TA, TB)                                  \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" SCALE ", 0;\nwgmma.mma_async.sync.aligned.m64n" N       \
  "k16.f32." TYPE "." TYPE " " DREGS ", %" A ", %" B ", p, 1, 1, %" TA ", %" TB ";\n}\n"
#define FLASHJIT_WGMMA_RS(N, TYPE, DREGS, A0, A1, A2, A3, B, SCALE)                             \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" SCALE ", 0;\nwgmma.mma_async.sync.aligned.m64n" N       \
  "k16.f32." TYPE "." TYPE " " DREGS ", {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" B             \
  ", p, 1, 1, 1;\n}\n"

// One N of wgmma_ss: the fp16 and bf16 forms (the D registers, then operands A, B, scale-d,
// trans-a, trans-b numbered after them).
#define FLASHJIT_WGMMA_SS_CASE(NV, DREGS, DLIST, A, B, S, TA, TB)                                \
  if constexpr (N == NV && kHalf) {                                                            \
    asm volatile(FLASHJIT_WGMMA_SS(#NV, "f16", DREGS, A, B, S, TA, TB)                          \
                 : DLIST(d)                                                                    \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(int(kTransA)), "n"(int(kTransB))); \
  } else if constexpr (N == NV) {                                                              \
    asm volatile(FLASHJIT_WGMMA_SS(#NV, "bf16", DREGS, A, B, S, TA, TB)                         \
                 : DLIST(d)                                                                    \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(int(kTransA)), "n"(int(kTransB))); \
  }

// N = 80, 112, 176 (widths of key blocks for sweeps: FlashAttention-3's published Hopper tiles
// use them) besides 64 and 128.
template <typename Element, int N, bool kTransA = false, bool kTransB = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
  constexpr bool kHalf = std::is_same_v<Element, __half>;
  static_assert(kHalf || std::is_same_v<Element, __nv_bfloat16>, "wgmma: fp16 or bf16 only");
  static_assert(N == 64 || N == 80 || N == 112 || N == 128 || N == 176,
                "wgmma_ss: N = 64, 80, 112, 128 or 176");
  const int scale_d = accumulate ? 1 : 0;
  FLASHJIT_WGMMA_SS_CASE(64, FLASHJIT_REGS_0_31, FLASHJIT_D_N64, "32", "33", "34", "35", "36")
  FLASHJIT_WGMMA_SS_CASE(80, FLASHJIT_REGS_0_39, FLASHJIT_D_N80, "40", "41", "42", "43", "44")
  FLASHJIT_WGMMA_SS_CASE(112, FLASHJIT_REGS_0_55, FLASHJIT_D_N112, "56", "57", "58", "59", "60")
  FLASHJIT_WGMMA_SS_CASE(128, FLASHJIT_REGS_0_63, FLASHJIT_D_N128, "64", "65", "66", "67", "68")
  FLASHJIT_WGMMA_SS_CASE(176, FLASHJIT_REGS_0_87, FLASHJIT_D_N176, "88", "89", "90", "91", "92")
}
#undef FLASHJIT_WGMMA_SS_CASE

template <typename Element, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                         uint64_t desc_b) {
  constexpr bool kHalf = std::is_same_v<Element, __half>;
  static_assert(kHalf || std::is_same_v<Element, __nv_bfloat16>, "wgmma: fp16 or bf16 only");
  static_assert(N == 64 || N == 128, "wgmma_rs: N = 64 or 128");
  if constexpr (N == 64 && kHalf) {
    asm volatile(FLASHJIT_WGMMA_RS("64", "f16", FLASHJIT_REGS_0_31, "32", "33", "34", "35", "36", "37")
                 : FLASHJIT_D_N64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else if constexpr (N == 64) {
    asm volatile(FLASHJIT_WGMMA_RS("64", "bf16", FLASHJIT_REGS_0_31, "32", "33", "34", "35", "36", "37")
                 : FLASHJIT_D_N64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else if constexpr (kHalf) {
    asm volatile(FLASHJIT_WGMMA_RS("128", "f16", FLASHJIT_REGS_0_63, "64", "65", "66", "67", "68", "69")
                 : FLASHJIT_D_N128(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile(FLASHJIT_WGMMA_RS("128", "bf16", FLASHJIT_REGS_0_63, "64", "65", "66", "67", "68", "69")
                 : FLASHJIT_D_N128(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

// D (64 x N) += A (64 x 16, registers) * B (16 x N, MN-major in 64-column panels, panel_bytes
// apart): N > 128 as several wgmma, 128 columns (two panels) each and 64 for an odd last panel,
// each on its own columns of D. For N = 64 or 128 this is the one wgmma_rs above.
template <typename Element, int N>
__device__ __forceinline__ void wgmma_rs_panels(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                                uint64_t desc_b, uint32_t panel_bytes) {
  static_assert(N % 64 == 0, "N: whole 64-column panels");
#pragma unroll
  for (int c = 0; c < N / 128; ++c)
    wgmma_rs<Element, 128>(*reinterpret_cast<float(*)[16][4]>(&d[16 * c]), a,
                           desc_advance(desc_b, 2 * c * panel_bytes));
  if constexpr (N % 128 != 0)
    wgmma_rs<Element, 64>(*reinterpret_cast<float(*)[8][4]>(&d[N / 8 - 8]), a,
                          desc_advance(desc_b, (N / 64 - 1) * panel_bytes));
}

#undef FLASHJIT_D_N8
#undef FLASHJIT_D_N64
#undef FLASHJIT_D_N128
#undef FLASHJIT_D_N80
#undef FLASHJIT_D_N112
#undef FLASHJIT_D_N176
#undef FLASHJIT_REGS_0_31
#undef FLASHJIT_REGS_0_63
#undef FLASHJIT_REGS_0_39
#undef FLASHJIT_REGS_0_55
#undef FLASHJIT_REGS_0_87
#undef FLASHJIT_WGMMA_SS
#undef FLASHJIT_WGMMA_RS

}  // namespace flashjit
