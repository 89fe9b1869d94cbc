// spec_config.h: turns the JIT spec's -D defines into typed compile-time constants.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if !defined(FLASHJIT_HEAD_DIM) || !defined(FLASHJIT_IS_CAUSAL)
#error "flashjit: compile through a JIT spec (FLASHJIT_HEAD_DIM and FLASHJIT_IS_CAUSAL must be set)"
#endif

namespace flashjit::spec {

#if defined(FLASHJIT_DTYPE_BF16) && FLASHJIT_DTYPE_BF16
using Element = __nv_bfloat16;
#elif defined(FLASHJIT_DTYPE_FP16) && FLASHJIT_DTYPE_FP16
using Element = __half;
#else
#error "flashjit: define FLASHJIT_DTYPE_FP16=1 or FLASHJIT_DTYPE_BF16=1"
#endif

constexpr int kHeadDim = FLASHJIT_HEAD_DIM;
constexpr bool kIsCausal = FLASHJIT_IS_CAUSAL != 0;
#ifdef FLASHJIT_HAS_DROPOUT
constexpr bool kHasDropout = FLASHJIT_HAS_DROPOUT != 0;
#else
constexpr bool kHasDropout = false;
#endif

}  // namespace flashjit::spec
