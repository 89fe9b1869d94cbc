"""csrc/common/exp2_fma.cuh (2^x on the FMA pipe, the softcapped forward's second exponential) on
the host: the header is host and device code, so g++ compiles it into a small program that compares
it with exp2 in double precision."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flashjit.jit import csrc_dir

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found (the host compiler)")

PROGRAM = r"""
#define __host__
#define __device__
#define __forceinline__ inline
#include "common/exp2_fma.cuh"
#include <cmath>
#include <cstdio>
#include <limits>
int main() {
  // about 4.2 million inputs spread over [-125, 1] (the softmax's range: scores minus the row
  // maximum), plus every power of two there
  double max_ulp = 0, worst = 0;
  for (long i = 0; i <= (1L << 22); ++i) {
    const float x = -125.f + 126.f * float(double(i) / double(1L << 22));
    const double ref = std::exp2(double(x));
    const double ulp = std::ldexp(1.0, std::ilogb(ref) - 23);
    const double err = std::fabs(double(flashjit::exp2_fma(x)) - ref) / ulp;
    if (err > max_ulp) { max_ulp = err; worst = x; }
  }
  int inexact_powers = 0;
  for (int k = -125; k <= 1; ++k)
    inexact_powers += flashjit::exp2_fma(float(k)) != float(std::ldexp(1.0, k));
  printf("max_ulp %.4f %.9g\n", max_ulp, worst);
  printf("inexact_powers %d\n", inexact_powers);
  printf("neg_inf %a\n", flashjit::exp2_fma(-INFINITY));
  printf("m127 %a\n", flashjit::exp2_fma(-127.f));
  printf("m300 %a\n", flashjit::exp2_fma(-300.f));
  printf("nan %d\n", int(std::isnan(flashjit::exp2_fma(std::numeric_limits<float>::quiet_NaN()))));
  printf("m126 %a\n", flashjit::exp2_fma(-126.3f));
}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp2_fma")
    (tmp / "t.cpp").write_text(PROGRAM)
    subprocess.run([GXX, "-O2", "-std=c++17", f"-I{csrc_dir()}", str(tmp / "t.cpp"), "-o",
                    str(tmp / "t")], check=True)
    out = subprocess.run([str(tmp / "t")], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


def test_accuracy_over_the_softmax_range(results):
    # ex2.approx.f32 (the MUFU op it stands in for) is within 2 ulp (PTX ISA); the degree-6
    # Taylor polynomial's truncation adds about one more near |f| = 1/2
    assert float(results["max_ulp"][0]) <= 3.0, results["max_ulp"]


def test_powers_of_two_are_exact(results):
    # f = 0: the polynomial is exactly 1 and only the exponent field changes
    assert results["inexact_powers"] == ["0"]


def test_masked_scores_give_zero_and_nan_stays(results):
    assert results["neg_inf"] == ["0x0p+0"]  # a masked score (-inf): P = 0, as ex2 gives
    assert results["m127"] == ["0x0p+0"] and results["m300"] == ["0x0p+0"]
    assert results["nan"] == ["1"]
    # between -127 and -126: at most 2^-126 (the smallest normal), never garbage
    assert 0.0 <= float.fromhex(results["m126"][0]) <= 2.0 ** -126
