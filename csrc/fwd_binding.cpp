// fwd_binding.cpp: the torch binding of one forward JIT spec.
//
// Registers, in the spec's own op namespace (FLASHJIT_OP_NAMESPACE, e.g.
// flashjit_fwd_sm90a_bf16_hd128_causal), an op that fills FwdParams from tensors and launches.
// Python (flashjit/ops.py) validates every input and allocates the outputs first; the checks here
// only guard the C++ boundary. Light headers only: torch/library.h and ATen/core/Tensor.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "flash_api.h"

namespace flashjit {
namespace {

// A paged spec (JitSpec.paged, FLASHJIT_HAS_PAGED) reads K/V through a block_table, and only it.
#if defined(FLASHJIT_HAS_PAGED) && FLASHJIT_HAS_PAGED
constexpr bool kPagedSpec = true;
#else
constexpr bool kPagedSpec = false;
#endif

// block_table (batch, max_blocks) of a paged spec: int32 on q's device, last dim contiguous,
// against k/v (num_blocks, page_size, heads_k, d) with page_size a multiple of 16 and
// max_seqlen_k within its max_blocks * page_size rows; fixed-length q only.
void check_block_table(const at::Tensor& table, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, bool varlen, int64_t max_seqlen_k) {
  TORCH_CHECK(!varlen, "flashjit: block_table (paged K/V) takes fixed-length q, no cu_seqlens");
  TORCH_CHECK(table.is_cuda() && table.device() == q.device(),
              "flashjit: block_table must be on q's device");
  TORCH_CHECK(table.scalar_type() == at::kInt, "flashjit: block_table must be int32");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == q.size(0) && table.stride(-1) == 1,
              "flashjit: block_table must be (batch, max_blocks) with its last dim contiguous");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1),
              "flashjit: paged k and v must have the same (num_blocks, page_size)");
  TORCH_CHECK(k.size(1) > 0 && k.size(1) % 16 == 0,
              "flashjit: the page size (k's dim 1) must be a positive multiple of 16");
  TORCH_CHECK(max_seqlen_k <= table.size(1) * k.size(1),
              "flashjit: max_seqlen_k exceeds the block_table's max_blocks * page_size rows");
}

// q, k, v, out: (batch, seqlen, heads, d) or varlen (total, heads, d); lse float32.
// out_residual (optional, like out with out's strides): O - round(O), for the backward.
// block_table (paged specs only): k/v are (num_blocks, page_size, heads_k, d) and key j of
// sequence b is row j % page_size of page block_table[b][j / page_size] (params.h: PageTable).
// window_left/right, softcap, alibi_slopes, sink: the variant's values (params.h: VariantParams).
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
         const at::Tensor& lse, const std::optional<at::Tensor>& out_residual,
         const std::optional<at::Tensor>& cu_seqlens_q,
         const std::optional<at::Tensor>& cu_seqlens_k,
         const std::optional<at::Tensor>& seqused_k,
         const std::optional<at::Tensor>& block_table, int64_t max_seqlen_q,
         int64_t max_seqlen_k, double softmax_scale, bool causal_bottom_right,
         int64_t window_left, int64_t window_right, double softcap,
         const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink,
         const std::optional<at::Tensor>& rng_state, double dropout_p, int64_t stream) {
  const bool varlen = cu_seqlens_q.has_value();
  check_attention_tensors({&q, &k, &v, &out}, varlen);
  TORCH_CHECK(block_table.has_value() == kPagedSpec, "flashjit: ",
              kPagedSpec ? "this paged forward spec needs a block_table"
                         : "this forward spec takes no block_table (its _paged spec does)");
  if (block_table.has_value()) check_block_table(*block_table, q, k, v, varlen, max_seqlen_k);
  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_residual = residual_ptr(out_residual, out);
  set_strides(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  const int dim_heads = varlen ? 1 : 2;
  if (varlen) {
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.value().data_ptr<int>();
    p.batch = int(cu_seqlens_q->numel() - 1);
    p.total_q = int(q.size(0));
    p.total_k = int(k.size(0));
  } else {
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
    p.batch = int(q.size(0));
  }
  p.heads = int(q.size(dim_heads));
  p.heads_k = int(k.size(dim_heads));
  p.head_dim = int(q.size(-1));
  p.seqlen_q = int(max_seqlen_q);
  p.seqlen_k = int(max_seqlen_k);
  p.softmax_scale = float(softmax_scale);
  p.scale_log2 = float(softmax_scale * kLog2e);
  p.causal_bottom_right = causal_bottom_right;
  p.variant = make_variant_params(window_left, window_right, softcap, alibi_slopes, sink, p.heads);
  p.dropout = make_dropout_params(rng_state, dropout_p);
  p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
  p.pages = make_page_table(block_table, k);  // block_table nullptr without one
  if (varlen) zero_varlen_tail(out, *cu_seqlens_q, p.batch, stream);
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return;
  const char* err = fwd_run(p, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "flashjit forward kernel launch failed: ", err);
}

}  // namespace

FLASHJIT_LIBRARY(FLASHJIT_OP_NAMESPACE, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? out_residual, "
      "Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, Tensor? block_table, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, "
      "bool causal_bottom_right, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, Tensor? sink, Tensor? rng_state, float dropout_p, int stream) -> ()");
  m.impl("fwd", c10::DispatchKey::CUDA, TORCH_FN(fwd));
}

}  // namespace flashjit
