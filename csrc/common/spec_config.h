// spec_config.h: turns the JIT spec's -D defines into typed compile-time constants.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/variant.cuh"

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
// Variant flags: each define is optional (absent = 0), so a spec names only what it compiles in.
#ifndef FLASHJIT_HAS_DROPOUT
#define FLASHJIT_HAS_DROPOUT 0
#endif
#ifndef FLASHJIT_HAS_WINDOW
#define FLASHJIT_HAS_WINDOW 0
#endif
#ifndef FLASHJIT_HAS_SOFTCAP
#define FLASHJIT_HAS_SOFTCAP 0
#endif
#ifndef FLASHJIT_HAS_ALIBI
#define FLASHJIT_HAS_ALIBI 0
#endif
#ifndef FLASHJIT_HAS_SINK
#define FLASHJIT_HAS_SINK 0
#endif
#ifndef FLASHJIT_HAS_PAGED  // K/V through a page table (forward specs only: JitSpec.paged)
#define FLASHJIT_HAS_PAGED 0
#endif
constexpr bool kHasDropout = FLASHJIT_HAS_DROPOUT != 0;
constexpr bool kPagedKV = FLASHJIT_HAS_PAGED != 0;
// The spec's attention variant (common/variant.cuh), the one template parameter kernels take.
using Variant = flashjit::Variant<kIsCausal, FLASHJIT_HAS_WINDOW != 0, FLASHJIT_HAS_SOFTCAP != 0,
                                  FLASHJIT_HAS_ALIBI != 0, FLASHJIT_HAS_SINK != 0, kHasDropout,
                                  kPagedKV>;

}  // namespace flashjit::spec
