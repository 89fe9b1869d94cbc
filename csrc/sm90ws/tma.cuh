// tma.cuh: the Hopper pieces of the warp-specialised family beyond wgmma (common/wgmma.cuh):
// tensor-map (TMA) tile loads, register reallocation between warpgroups (setmaxnreg), named
// barriers, and the host-side encoding of a tensor map. PTX ISA 8.x: cp.async.bulk.tensor,
// setmaxnreg, bar.sync / bar.arrive; CUDA driver API: cuTensorMapEncodeTiled.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder is fetched at run time)
#include <cuda_runtime.h>

#include <cstdint>

#include "common/bulk_copy.cuh"

namespace flashjit {

// ---------------------------------------------------------------------------------------------
// Device
// ---------------------------------------------------------------------------------------------
// A 4-D tile of tensor map `map` at coordinates (c0 innermost .. c3) into shared memory at
// `smem`, counted off mbarrier `bar`'s transaction count (the box's bytes; out-of-bounds
// elements are zero-filled and still counted).
__device__ __forceinline__ void tma_load_4d(uint32_t smem, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Arrive on an mbarrier without a transaction count (release).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Registers per thread of the calling warpgroup: the producer gives some back (dec), the
// consumers take them (inc); kRegs a multiple of 8 in [24, 256].
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------
// A tensor map over a 16-bit tensor of `dims` (innermost first; the innermost contiguous) with
// byte strides `strides` of dims 1..3 (multiples of 16), read in boxes of `box` elements with
// the 128-byte swizzle (box[0] * 2 = 128 bytes: one swizzled panel row per box row). The driver's
// encoder is fetched once through the runtime (no link against libcuda).
inline cudaError_t encode_tensor_map_16bit(CUtensorMap* map, const void* ptr, bool bf16,
                                           const uint64_t (&dims)[4],
                                           const uint64_t (&strides)[3],
                                           const uint32_t (&box)[4]) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                     &status);
#else
    cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    return status == cudaDriverEntryPointSuccess ? reinterpret_cast<Encode>(fn) : nullptr;
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(ptr), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace flashjit
