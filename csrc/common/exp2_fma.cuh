// exp2_fma.cuh: 2^x on the FMA pipe (no MUFU op), for kernels whose exponentials share the MUFU
// unit with another transcendental (softcap's tanh): the softmax then computes part of its
// exponentials here, so that both pipes are busy. Host and device (tests/cpu/test_exp2_fma.py
// checks it on the host against exp2 in double precision).
//
// Method (Cody-Waite style range reduction, our own coefficients: the Taylor series of 2^f):
//   x' = max(x, -127);  j = round(x') (the 1.5 * 2^23 shifter: one FADD, round to
//   nearest even);  f = x' - j in [-1/2, 1/2];
//   2^f = sum_k (f ln 2)^k / k!, k <= 6 (Horner, 6 FMAs; truncation error (ln2 / 2)^7 / 7! =
//   1.2e-7 relative, about 1 ulp; with rounding about 2 ulp, as ex2.approx's 2^-22.);
//   2^x = 2^f with j added to its exponent field (integer add of j << 23, which the shifter's
//   low bits already hold).
// At x' = -127: j = -127, f = 0, 2^f = 1 exactly, and 1.0's exponent field (127) minus 127 is
// 0: the result is +0, so -inf (a masked score) gives 0 as ex2 does. Between -127 and -125.5 the
// results are subnormal or tiny (their neighbours in a softmax row are >= 2^0 = 1). Inputs are
// at most ~1 in the softmax (scores minus the row maximum); x > 127 overflows the exponent field
// and is not supported. NaN in, NaN out.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace flashjit {

__host__ __device__ __forceinline__ uint32_t exp2_fma_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

__host__ __device__ __forceinline__ float exp2_fma_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

__host__ __device__ __forceinline__ float exp2_fma(float x) {
  const float xc = fmaxf(x, -127.f);  // (a NaN becomes -127 here; the last line keeps it)
  // j = round(x'): adding 1.5 * 2^23 leaves j in the low mantissa bits (|j| <= 2^22)
  constexpr float kShifter = 12582912.f;
  const float shifted = xc + kShifter;
  const float f = xc - (shifted - kShifter);  // in [-1/2, 1/2]
  // 2^f: Horner over the Taylor coefficients (ln 2)^k / k!
  float p = 1.5403530393381608e-4f;            // (ln 2)^6 / 720
  p = p * f + 1.3333558146428443e-3f;          // (ln 2)^5 / 120
  p = p * f + 9.6181291076284772e-3f;          // (ln 2)^4 / 24
  p = p * f + 5.5504108664821580e-2f;          // (ln 2)^3 / 6
  p = p * f + 2.4022650695910071e-1f;          // (ln 2)^2 / 2
  p = p * f + 6.9314718055994531e-1f;          // ln 2
  p = p * f + 1.f;
  // j << 23 into the exponent field: the shifter's low 9 bits are j (two's complement)
  const float r = exp2_fma_float(exp2_fma_bits(p) + (exp2_fma_bits(shifted) << 23));
  return x != x ? x : r;  // a NaN's shifter bits would land in the exponent: keep the NaN
}

}  // namespace flashjit
