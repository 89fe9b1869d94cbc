// bwd_binding.cpp: the torch binding of one backward JIT spec.
//
// Registers, in the spec's own op namespace (FLASHJIT_OP_NAMESPACE, e.g.
// flashjit_bwd_sm90a_bf16_hd128_causal), the backward op, which fills BwdParams from tensors and
// launches. Python (flashjit/ops.py) validates
// every input and allocates outputs and scratch first; the checks here only guard the C++
// boundary. Light headers only: torch/library.h and ATen/core/Tensor.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "flash_api.h"

#ifndef FLASHJIT_OP_NAMESPACE
#error "FLASHJIT_OP_NAMESPACE must be defined by the build (flashjit.jit.spec)"
#endif

namespace flashjit {
namespace {

// dout, q, out, dq: (batch, seqlen_q, heads, d); k, v: (batch, seqlen_k, heads_k, d); dk, dv:
// (batch, seqlen_k, heads, d); varlen: (total, heads, d) each. lse float32 (batch, heads,
// seqlen_q) or (heads, total_q). Scratch (float32, contiguous): dq_accum (batch, heads,
// round_up(seqlen_q, 128), d_pad) or (heads, total_q + 128 batch, d_pad), d_pad =
// bwd_dq_accum_width() (the bucket, or the family's padded width); dsum likewise
// without the last dim. out_residual (optional): the forward's O - round(O), with out's strides.
void bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& out, const std::optional<at::Tensor>& out_residual,
         const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
         const at::Tensor& dv, const at::Tensor& dq_accum, const at::Tensor& dsum,
         const std::optional<at::Tensor>& cu_seqlens_q,
         const std::optional<at::Tensor>& cu_seqlens_k,
         const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
         double softmax_scale, bool causal_bottom_right, int64_t window_left,
         int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
         const std::optional<at::Tensor>& sink, const std::optional<at::Tensor>& rng_state,
         double dropout_p, bool deterministic,
         int64_t stream) {
  const bool varlen = cu_seqlens_q.has_value();
  check_attention_tensors({&dout, &q, &k, &v, &out, &dq, &dk, &dv}, varlen);
  TORCH_CHECK(dq_accum.is_cuda() && dq_accum.is_contiguous() && dsum.is_cuda() &&
                  dsum.is_contiguous(),
              "flashjit: dq_accum and dsum must be contiguous CUDA tensors");
  TORCH_CHECK(dq_accum.dim() == (varlen ? 3 : 4) && dsum.dim() == (varlen ? 2 : 3),
              "flashjit: dq_accum / dsum have the wrong rank");
  TORCH_CHECK(dq_accum.size(-1) == bwd_dq_accum_width(),
              "flashjit: dq_accum's last dim must be the kernel's (padded) head dim ",
              bwd_dq_accum_width());
  TORCH_CHECK(q.size(-1) <= FLASHJIT_HEAD_DIM && q.size(-1) % 8 == 0,
              "flashjit: head_dim must be a multiple of 8 and at most ", FLASHJIT_HEAD_DIM);
  BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.o_residual = residual_ptr(out_residual, out);
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  set_strides(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  set_strides(dout, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  set_strides(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  set_strides(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  set_strides(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  const int dim_heads = varlen ? 1 : 2;
  if (varlen) {
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
    p.dq_accum_batch_stride = 0;
    p.dq_accum_head_stride = dq_accum.stride(0);
    p.dsum_batch_stride = 0;
    p.dsum_head_stride = dsum.stride(0);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.value().data_ptr<int>();
    p.batch = int(cu_seqlens_q->numel() - 1);
  } else {
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
    p.dq_accum_batch_stride = dq_accum.stride(0);
    p.dq_accum_head_stride = dq_accum.stride(1);
    p.dsum_batch_stride = dsum.stride(0);
    p.dsum_head_stride = dsum.stride(1);
    p.batch = int(q.size(0));
  }
  p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
  p.heads = int(q.size(dim_heads));
  p.heads_k = int(k.size(dim_heads));
  p.head_dim = int(q.size(-1));
  p.seqlen_q = int(max_seqlen_q);
  p.seqlen_k = int(max_seqlen_k);
  p.softmax_scale = float(softmax_scale);
  p.scale_log2 = float(softmax_scale * kLog2e);
  p.causal_bottom_right = causal_bottom_right;
  p.deterministic = deterministic;
  p.variant = make_variant_params(window_left, window_right, softcap, alibi_slopes, sink, p.heads);
  p.dropout = make_dropout_params(rng_state, dropout_p);
  if (varlen) {  // rows past the last sequence: zero, whatever the kernels below skip
    zero_varlen_tail(dq, *cu_seqlens_q, p.batch, stream);
    zero_varlen_tail(dk, *cu_seqlens_k, p.batch, stream);
    zero_varlen_tail(dv, *cu_seqlens_k, p.batch, stream);
  }
  if (p.batch == 0 || p.heads == 0) return;
  if (p.seqlen_q == 0 || p.seqlen_k == 0) {  // nothing attends: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  const char* err = bwd_run(p, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "flashjit backward kernel launch failed: ", err);
}

}  // namespace

FLASHJIT_LIBRARY(FLASHJIT_OP_NAMESPACE, m) {
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor? out_residual, "
      "Tensor lse, Tensor(a!) dq, "
      "Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) dq_accum, Tensor(e!) dsum, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal_bottom_right, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes, Tensor? sink, Tensor? rng_state, float dropout_p, "
      "bool deterministic, int stream) -> ()");
  m.impl("bwd", c10::DispatchKey::CUDA, TORCH_FN(bwd));
}

}  // namespace flashjit
