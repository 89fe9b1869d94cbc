// decode_binding.cpp: the torch binding of one decode JIT spec (split-KV family).
//
// Registers, in the spec's op namespace, an op that fills DecodeParams and AppendParams from
// tensors and launches (splitkv/launch.cuh). Python (flashjit/ops.py: call_decode) validates
// every input and allocates the outputs and scratch first; the checks here only guard the C++
// boundary. Layouts and conventions: common/params.h (KvCacheParams, DecodeParams, AppendParams).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "flash_api.h"

namespace flashjit {
namespace {

const int* int_ptr(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kInt && t->stride(-1) == 1,
              "flashjit decode: ", name, " must be a CUDA int32 tensor, last dim contiguous");
  return t->data_ptr<int>();
}

// q, out (batch, seqlen_q, heads, d); k_cache, v_cache (batch_cache, seqlen_cache, heads_k, d)
// or paged (num_blocks, page_size, heads_k, d) with block_table (batch, max_blocks); lse float32
// (batch, heads, seqlen_q), log2 units. k_new, v_new (batch, seqlen_new, heads_k, d) are appended
// in place; with rotary_cos/sin (seqlen_ro, rotary_dim / 2), q is rotated into q_rot. With
// o_partial (num_splits, batch, heads, seqlen_q, d) and lse_partial (num_splits, batch, heads,
// seqlen_q), float32 contiguous: split-KV with num_splits = o_partial.size(0); 0 splits: the
// append and the rotary only, no attention (ops.py then attends with the forward kernel).
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& k_new,
            const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& q_rot,
            const std::optional<at::Tensor>& rotary_cos,
            const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
            const std::optional<at::Tensor>& cache_seqlens,
            const std::optional<at::Tensor>& cache_batch_idx,
            const std::optional<at::Tensor>& cache_leftpad,
            const std::optional<at::Tensor>& block_table,
            const std::optional<at::Tensor>& o_partial,
            const std::optional<at::Tensor>& lse_partial, double softmax_scale,
            int64_t window_left, int64_t window_right, double softcap,
            const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink,
            int64_t stream) {
  check_attention_tensors({&q, &k_cache, &v_cache, &out}, false);
  const bool rotary = rotary_cos.has_value();
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "flashjit decode: k_new and v_new go together");
  TORCH_CHECK(!rotary || (rotary_sin.has_value() && q_rot.has_value() && k_new.has_value()),
              "flashjit decode: rotary needs rotary_sin, q_rot and k_new");
  TORCH_CHECK(o_partial.has_value() == lse_partial.has_value(),
              "flashjit decode: o_partial and lse_partial go together");
  DecodeParams dp{};
  FwdParams& p = dp.fwd;
  const at::Tensor& q_attn = rotary ? *q_rot : q;  // the kernel attends with the rotated q
  p.q = q_attn.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(q_attn, false, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k_cache, false, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v_cache, false, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, false, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.batch = int(q.size(0));
  p.seqlen_q = int(q.size(1));
  p.heads = int(q.size(2));
  p.heads_k = int(k_cache.size(2));
  p.head_dim = int(q.size(3));
  p.softmax_scale = float(softmax_scale);
  p.scale_log2 = float(softmax_scale * kLog2e);
  p.causal_bottom_right = true;
  p.variant = make_variant_params(window_left, window_right, softcap, alibi_slopes, sink, p.heads);
  p.dropout = make_dropout_params(std::nullopt, 0.0);

  KvCacheParams& c = dp.cache;
  c.cache_seqlens = int_ptr(cache_seqlens, "cache_seqlens");
  c.cache_batch_idx = int_ptr(cache_batch_idx, "cache_batch_idx");
  c.leftpad = int_ptr(cache_leftpad, "cache_leftpad");
  int_ptr(block_table, "block_table");  // checks it
  p.pages = make_page_table(block_table, k_cache);
  c.capacity = p.pages.block_table != nullptr ? int(block_table->size(1) * k_cache.size(1))
                                              : int(k_cache.size(1));
  c.seqlen_new = k_new.has_value() ? int(k_new->size(1)) : 0;
  p.seqlen_k = c.capacity;

  dp.num_splits = o_partial.has_value() ? int(o_partial->size(0)) : 1;
  dp.o_partial = o_partial.has_value() ? o_partial->data_ptr<float>() : nullptr;
  dp.lse_partial = lse_partial.has_value() ? lse_partial->data_ptr<float>() : nullptr;

  AppendParams a{};
  if (k_new.has_value()) {
    check_attention_tensors({&*k_new, &*v_new}, false);
    a.k_new = k_new->data_ptr();
    a.v_new = v_new->data_ptr();
    set_strides(*k_new, false, a.kn_batch_stride, a.kn_row_stride, a.kn_head_stride);
    set_strides(*v_new, false, a.vn_batch_stride, a.vn_row_stride, a.vn_head_stride);
  }
  if (rotary) {
    TORCH_CHECK(rotary_cos->is_contiguous() && rotary_sin->is_contiguous() &&
                    rotary_cos->sizes() == rotary_sin->sizes() &&
                    rotary_cos->dtype() == q.dtype() && rotary_sin->dtype() == q.dtype(),
                "flashjit decode: rotary_cos/sin must be contiguous, alike, of q's dtype");
    TORCH_CHECK(q_rot->is_contiguous() && q_rot->sizes() == q.sizes(),
                "flashjit decode: q_rot must be contiguous and shaped like q");
    a.rotary_cos = rotary_cos->data_ptr();
    a.rotary_sin = rotary_sin->data_ptr();
    a.rotary_dim = int(rotary_cos->size(1) * 2);
    a.rotary_interleaved = rotary_interleaved;
    a.q_positions_step = FLASHJIT_IS_CAUSAL || window_left >= 0 || window_right >= 0;
    a.q_src = q.data_ptr();
    set_strides(q, false, a.q_batch_stride, a.q_row_stride, a.q_head_stride);
    a.q_rot = q_rot->data_ptr();
  }
  if (p.batch == 0 || p.heads == 0 || (p.seqlen_q == 0 && c.seqlen_new == 0)) return;
  const char* err = decode_run(dp, a, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "flashjit decode kernel launch failed: ", err);
}

}  // namespace

FLASHJIT_LIBRARY(FLASHJIT_OP_NAMESPACE, m) {
  m.def(
      "decode(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) out, Tensor(d!) lse, "
      "Tensor? k_new, Tensor? v_new, Tensor(e!)? q_rot, Tensor? rotary_cos, Tensor? rotary_sin, "
      "bool rotary_interleaved, Tensor? cache_seqlens, Tensor? cache_batch_idx, "
      "Tensor? cache_leftpad, Tensor? block_table, Tensor(f!)? o_partial, "
      "Tensor(g!)? lse_partial, float softmax_scale, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes, Tensor? sink, int stream) -> ()");
  m.impl("decode", c10::DispatchKey::CUDA, TORCH_FN(decode));
}

}  // namespace flashjit
