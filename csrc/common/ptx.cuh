// ptx.cuh: thin, documented wrappers around the PTX instructions the kernels use.
//
// Every wrapper is one instruction (or a tiny fixed sequence). Semantics are from the PTX ISA:
//   ldmatrix  (warp-level 8x8 b16 matrix loads from shared memory, optional transpose)
//   mma.sync  (m16n8k16, fp16/bf16 inputs, fp32 accumulate)
//   cp.async  (16-byte global->shared copies that bypass registers, with zero fill)
//   red       (fp32 atomic adds to global memory without a return value)
//   bar       (named barriers: sync and arrive over a subset of the CTA's warps)
// Torch-free: included by kernel translation units only.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flashjit {

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads: sync waits for all of
// them, arrive counts this thread's warp and goes on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory address of a generic pointer, as the 32-bit value PTX .shared instructions take.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 matrices of 16-bit elements. Lanes 8i..8i+7 give the row addresses of
// matrix i (16 contiguous bytes each). Afterwards lane L holds, in r[i], elements
// (row L/4, cols 2*(L%4), 2*(L%4)+1) of matrix i; with .trans, elements
// (rows 2*(L%4), 2*(L%4)+1, col L/4), i.e. the transposed matrix.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Two 8x8 matrices: lanes 0..15 give the row addresses (lanes 8i..8i+7: matrix i; the addresses
// of lanes 16..31 are not read); the fragments are those of ldmatrix_x4's r[0], r[1].
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// ---------------------------------------------------------------------------------------------
// mma.sync.m16n8k16.row.col, fp32 accumulate: D (16x8) += A (16x16) * B (16x8).
// With g = lane / 4 and t = lane % 4 (PTX "groupID" and "threadID_in_group"):
//   A regs: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B regs: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   D:      d0, d1 = D[g][2t], D[g][2t+1];  d2, d3 = D[g+8][2t], D[g+8][2t+1]
// ---------------------------------------------------------------------------------------------
template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<Element, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<Element, __nv_bfloat16>, "mma_16816: fp16 or bf16 only");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---------------------------------------------------------------------------------------------
// cp.async: 16 bytes global -> shared, cached in L2 only (.cg). When !valid, src-size is 0 and
// the 16 destination bytes are zero-filled (the source is not read).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_size));
}

// cp.async of 4 bytes (cached in L1 and L2: .ca, the only form for sizes under 16); zero-filled
// when !valid.
__device__ __forceinline__ void cp_async_4(uint32_t smem, const void* gmem, bool valid) {
  const int src_size = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_size));
}

// Close the group of cp.async issued so far by this thread.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// red.global.add.f32: fp32 atomic add to global memory that returns nothing (fire and forget;
// relaxed, gpu scope). The x4 form adds to four consecutive floats (16-byte aligned address): one
// vector red.global.add.v4.f32 on sm_90 and newer, four scalar reds before.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void red_add_f32(float* gmem, float x) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(gmem), "f"(x) : "memory");
}

__device__ __forceinline__ void red_add_f32x4(float* gmem, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(gmem), "f"(x), "f"(y),
               "f"(z), "f"(w)
               : "memory");
#else
  red_add_f32(gmem, x);
  red_add_f32(gmem + 1, y);
  red_add_f32(gmem + 2, z);
  red_add_f32(gmem + 3, w);
#endif
}

// ---------------------------------------------------------------------------------------------
// Conversions: two floats -> one 32-bit register of two 16-bit elements (lo = a, hi = b).
// ---------------------------------------------------------------------------------------------
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<Element, __half>) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// Two 16-bit elements of one register -> two floats.
template <typename Element>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  if constexpr (std::is_same_v<Element, __half>) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  } else {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
}

// exp2 of an fp32 value: ex2.approx.ftz.f32 (one MUFU op; exp2(-inf) = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh of an fp32 value: tanh.approx.f32 (one MUFU op, sm_75+; max relative error about 2^-11,
// PTX ISA; tanh(+-inf) = +-1).
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Butterfly reductions over the 4 lanes of a quad (lanes 4g..4g+3 hold one row's columns).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace flashjit
