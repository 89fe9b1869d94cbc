// binding_utils.h: helpers shared by the torch bindings (host C++, light torch headers only).
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "flash_api.h"
#include "common/params.h"

// TORCH_LIBRARY through one more macro level, so that FLASHJIT_OP_NAMESPACE (a -D define) is
// expanded before torch stringizes the namespace (some torch releases use #ns directly).
#define FLASHJIT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace flashjit {

constexpr double kLog2e = 1.4426950408889634074;

// Boundary checks (Python validated already): CUDA, last dim contiguous, expected rank.
inline void check_attention_tensors(std::initializer_list<const at::Tensor*> tensors, bool varlen) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda(), "flashjit: expected CUDA tensors");
    TORCH_CHECK(t->dim() == (varlen ? 3 : 4), "flashjit: expected rank ", varlen ? 3 : 4);
    TORCH_CHECK(t->stride(-1) == 1, "flashjit: the last dimension must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "flashjit: tensors must be 16-byte aligned");
  }
}

// (batch, seq, heads, d) or varlen (total, heads, d) -> element strides.
inline void set_strides(const at::Tensor& t, bool varlen, int64_t& batch_stride,
                        int64_t& row_stride, int64_t& head_stride) {
  batch_stride = varlen ? 0 : t.stride(0);
  row_stride = t.stride(varlen ? 0 : 1);
  head_stride = t.stride(varlen ? 1 : 2);
}

// The forward's rounding residual of out (FwdParams::o_residual), or nullptr: it is addressed
// with out's strides, so it must have out's layout.
inline void* residual_ptr(const std::optional<at::Tensor>& out_residual, const at::Tensor& out) {
  if (!out_residual.has_value()) return nullptr;
  TORCH_CHECK(out_residual->sizes() == out.sizes() && out_residual->strides() == out.strides() &&
                  out_residual->dtype() == out.dtype(),
              "flashjit: out_residual must have out's shape, strides and dtype");
  return out_residual->data_ptr();
}

// The page table (params.h: PageTable) of a cache (num_blocks, page_size, heads_k, d) read
// through block_table (batch, max_blocks), int32 with its last dim contiguous (checked by the
// caller); without block_table a contiguous cache (block_table nullptr).
inline PageTable make_page_table(const std::optional<at::Tensor>& block_table,
                                 const at::Tensor& cache) {
  PageTable t{};
  t.num_blocks = int(cache.size(0));
  t.page_shift = -1;
  if (block_table.has_value()) {
    t.block_table = block_table->data_ptr<int>();
    t.block_table_batch_stride = block_table->stride(0);
    t.page_size = int(cache.size(1));
    for (int shift = 0; shift < 31; ++shift)
      if ((1 << shift) == t.page_size) t.page_shift = shift;
  }
  return t;
}

// Zeroes the rows of a varlen output (total, heads, d), contiguous, past cu_seqlens[batch].
inline void zero_varlen_tail(const at::Tensor& x, const at::Tensor& cu_seqlens, int batch,
                             int64_t stream) {
  TORCH_CHECK(x.is_contiguous(), "flashjit: varlen outputs must be contiguous");
  const char* err = zero_rows_past_end_run(x.data_ptr(), x.stride(0) * x.element_size(),
                                           x.size(0), cu_seqlens.data_ptr<int>() + batch,
                                           reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "flashjit: zeroing varlen rows past the last sequence failed: ", err);
}

// The variant's runtime values (params.h: VariantParams). alibi_slopes: float32 contiguous (heads)
// or (batch, heads); sink: float32 contiguous (heads); both optional (Python validated them, and
// the spec compiled in exactly the parts that are given).
inline VariantParams make_variant_params(int64_t window_left, int64_t window_right, double softcap,
                                         const std::optional<at::Tensor>& alibi_slopes,
                                         const std::optional<at::Tensor>& sink, int heads) {
  TORCH_CHECK(window_left >= -1 && window_left < (int64_t(1) << 30) && window_right >= -1 &&
                  window_right < (int64_t(1) << 30),
              "flashjit: window bounds must be in [-1, 2^30)");
  VariantParams v{};
  v.window_left = int(window_left);
  v.window_right = int(window_right);
  v.softcap = float(softcap);
  v.softcap_log2 = float(softcap * kLog2e);
  v.alibi_slopes = nullptr;
  v.alibi_batch_stride = 0;
  v.sink = nullptr;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kFloat && a.is_contiguous() &&
                    a.size(-1) == heads && (a.dim() == 1 || a.dim() == 2),
                "flashjit: alibi_slopes must be contiguous CUDA float32 (heads) or (batch, heads)");
    v.alibi_slopes = a.data_ptr<float>();
    v.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }
  if (sink.has_value()) {
    TORCH_CHECK(sink->is_cuda() && sink->scalar_type() == at::kFloat && sink->is_contiguous() &&
                    sink->dim() == 1 && sink->size(0) == heads,
                "flashjit: sink must be a contiguous CUDA float32 tensor of shape (heads)");
    v.sink = sink->data_ptr<float>();
  }
  return v;
}

// Dropout parameters (common/dropout.cuh): a uniform byte keeps its element iff it is <=
// keep_threshold, so the kept fraction is keep = (keep_threshold + 1) / 256, the nearest multiple
// of 1/256 to 1 - dropout_p (at least 1/256), and kept values are scaled by 1 / keep: unbiased.
// flashjit/_philox.py (keep_threshold, keep_probability) mirrors this.
inline DropoutParams make_dropout_params(const std::optional<at::Tensor>& rng_state,
                                         double dropout_p) {
  DropoutParams d{};
  d.rng_state = nullptr;
  d.keep_prob = 1.f;
  d.inv_keep_prob = 1.f;
  d.keep_threshold = 0xffffffffu;
  if (rng_state.has_value() && dropout_p > 0.0) {
    TORCH_CHECK(rng_state->is_cuda() && rng_state->numel() >= 2,
                "flashjit: rng_state must be a CUDA int64 tensor of 2 elements");
    d.rng_state = rng_state->data_ptr<int64_t>();
    const double kept_bytes = std::fmin(std::fmax(std::nearbyint((1.0 - dropout_p) * 256.0), 1.0),
                                        256.0);  // of the 256 values of a byte
    d.keep_prob = float(kept_bytes / 256.0);
    d.inv_keep_prob = float(256.0 / kept_bytes);
    d.keep_threshold = uint32_t(kept_bytes) - 1u;
  }
  return d;
}

}  // namespace flashjit
