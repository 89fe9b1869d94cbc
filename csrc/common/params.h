// params.h: the plain parameter structs of the attention kernels, one per direction.
//
// Shared by the torch binding (which fills them from tensors) and the kernels (which get them by
// value as a __grid_constant__ argument). No torch and no CUDA headers here.
//
// Layouts (elements; the last dim, head_dim, is always contiguous):
//   fixed length: q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k, heads_k, d)
//   varlen:       q (total_q, heads, d), k/v (total_k, heads_k, d); sequence b occupies rows
//                 cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 (int32 offsets, batch+1 of them)
//   paged K/V:    k/v (num_blocks, page_size, heads_k, d) through a page table (PageTable)
//   lse:          float32, fixed (batch, heads, seqlen_q), varlen (heads, total_q), in log2 units:
//                 log2 sum_j exp2(S_ij scale log2(e)) = the natural-log lse / ln(2)
//                 (flashjit/interface.py's _result converts for the caller; softmax.cuh's
//                 finish_row says why)
#pragma once

#include <cstdint>

namespace flashjit {

// Dropout randomness: Philox4x32-10 keyed by `seed`, counters offset by `offset`.
// Both are read from device memory (rng_state = {seed, offset}) so that a CUDA graph replays with
// the values current at replay time. rng_state == nullptr means no dropout.
struct DropoutParams {
  const int64_t* rng_state;  // device pointer: [0] = seed, [1] = offset (in Philox counters)
  float keep_prob;           // (keep_threshold + 1) / 256: 1 - dropout_p to 1/256 (dropout.cuh)
  float inv_keep_prob;       // 1 / keep_prob: kept values are scaled by it
  uint32_t keep_threshold;   // a uniform byte u keeps its element iff u <= keep_threshold
};

// The runtime values of a spec's attention variant (variant.cuh applies them; only the parts a
// spec compiles in are read). Conventions as flash-attn 2.x (window, softcap, ALiBi) and gpt-oss
// (sinks); offset = seqlen_k - seqlen_q of the sequence with causal_bottom_right, else 0:
//   window: query i sees key j iff i + offset - window_left <= j <= i + offset + window_right,
//           -1 = that side unbounded (a causal spec has its right edge at offset whatever this says);
//   softcap: logit z = softmax_scale q.k becomes softcap * tanh(z / softcap) (softcap > 0);
//   alibi:  z += -slope * |i + offset - j|, slope = alibi_slopes[b * alibi_batch_stride + h]
//           (float32; alibi_batch_stride 0 for one slope per head);
//   sink:   a logit sink[h] (float32, natural-log units like z) in every row's softmax
//           denominator, with no value row: lse = log(sum_j exp(z_ij) + exp(sink[h])).
struct VariantParams {
  int window_left, window_right;
  float softcap;
  float softcap_log2;  // softcap * log2(e): the exp2 scale of softcapped logits (variant.cuh)
  const float* alibi_slopes;
  int64_t alibi_batch_stride;
  const float* sink;
};

// Paged K/V: k and v are (num_blocks, page_size, heads_k, d) (their batch stride is the page's)
// and key row j of sequence b lies in page block_table[b][j / page_size], row j % page_size.
// A page number outside [0, num_blocks) reads as zeros. problem.cuh's PageRows resolves rows.
struct PageTable {
  const int* block_table;  // (batch, max_blocks) int32 page numbers, or nullptr: contiguous K/V
  int64_t block_table_batch_stride;
  int page_size;   // rows per page, a multiple of 16
  int page_shift;  // log2(page_size) for a power of two (a shift and a mask), else -1
  int num_blocks;  // pages in the cache
};

// Forward: O = softmax(scale * Q K^T + mask) V, and lse = logsumexp of each row of the scores
// (log2 units, see above).
struct FwdParams {
  const void* q;  // (.., seqlen_q, heads, d)
  const void* k;  // (.., seqlen_k, heads_k, d)
  const void* v;  // (.., seqlen_k, heads_k, d)
  void* o;        // like q
  float* lse;     // (batch, heads, seqlen_q) or (heads, total_q)
  // Optional (nullptr: not written), with o's strides: the rounding residual O - round(O) of the
  // output, for the backward's D = rowsum(dO * O). D from round(O) alone is off by dO . (O -
  // round(O)), which is the whole of dS = P (dP - D) where a row's softmax is one-hot.
  void* o_residual;

  // Strides in elements. batch strides are unused for varlen.
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // lse rows are contiguous

  const int* cu_seqlens_q;  // (batch + 1) int32 offsets, or nullptr for fixed length
  const int* cu_seqlens_k;
  const int* seqused_k;     // (batch) int32: only keys j < seqused_k[b] exist (key padding), or nullptr

  int batch;
  int heads;       // query heads
  int heads_k;     // key/value heads; heads % heads_k == 0 (MQA/GQA)
  int head_dim;    // actual d (<= the compiled bucket, a multiple of 8)
  int seqlen_q;    // fixed length, or the maximum over the batch for varlen
  int seqlen_k;
  int total_q, total_k;  // varlen: the rows of q and of k/v (TMA maps span them); else 0

  float softmax_scale;  // scale applied to Q K^T (> 0)
  float scale_log2;     // softmax_scale * log2(e): softmax is evaluated with exp2
  // Alignment of causal masks, windows and ALiBi: query i sees key j iff j <= i + offset (causal),
  // offset = causal_bottom_right ? seqlen_k - seqlen_q : 0, per sequence.
  bool causal_bottom_right;

  VariantParams variant;
  DropoutParams dropout;
  // K/V through a page table (chunked prefill on a paged KV cache; the decode family's paged
  // caches): a spec compiled with FLASHJIT_HAS_PAGED reads k/v through it, with k/v_batch_stride
  // the page stride and seqlen_k the table's capacity (max_blocks * page_size), fixed length
  // only (no cu_seqlens). block_table nullptr: contiguous K/V (every other spec).
  PageTable pages;
};

// Backward: dQ, dK, dV from dO, O, lse (and the same inputs as the forward).
//
// dk and dv are per QUERY head, (.., seqlen_k, heads, d): for MQA/GQA the caller sums them over
// each group of heads / heads_k query heads. The fp32 scratch (contiguous, allocated uninitialised:
// the kernels zero what they accumulate into) has rows padded per sequence:
//   fixed length: dq_accum (batch, heads, round_up(seqlen_q, 128), d_pad), dsum (batch, heads,
//                 round_up(seqlen_q, 128));
//   varlen:       dq_accum (heads, total_q + 128 * batch, d_pad), dsum (heads, total_q + 128 *
//                 batch), sequence b's rows starting at cu_seqlens_q[b] + 128 * b;
// so that a block of up to 128 query rows never reaches into the next sequence's rows. d_pad: the
// width the family's kernels run the head-dim bucket at (flash_api.h, bwd_dq_accum_width).
struct BwdParams {
  const void* q;     // (.., seqlen_q, heads, d)
  const void* k;     // (.., seqlen_k, heads_k, d)
  const void* v;     // (.., seqlen_k, heads_k, d)
  const void* o;     // like q: the forward's output
  const void* o_residual;  // with o's strides: the forward's O - round(O), or nullptr
  const void* dout;  // like q
  const float* lse;  // (batch, heads, seqlen_q) or (heads, total_q), as written by the forward
  void* dq;          // like q
  void* dk;          // (.., seqlen_k, heads, d): per query head
  void* dv;          // (.., seqlen_k, heads, d): per query head
  float* dq_accum;   // fp32 scratch: dQ / softmax_scale summed over key blocks (atomic path);
                     // each query block's tile is in the kernels' own fragment order
  float* dsum;       // fp32 scratch: D = rowsum(dO * O) per query row

  // Strides in elements. batch strides are unused for varlen.
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // lse rows are contiguous
  int64_t dq_accum_batch_stride, dq_accum_head_stride;  // rows: d_pad contiguous floats
  int64_t dsum_batch_stride, dsum_head_stride;  // dsum rows are contiguous

  const int* cu_seqlens_q;  // (batch + 1) int32 offsets, or nullptr for fixed length
  const int* cu_seqlens_k;
  const int* seqused_k;     // (batch) int32: only keys j < seqused_k[b] exist, or nullptr

  int batch;
  int heads;     // query heads
  int heads_k;   // key/value heads; heads % heads_k == 0 (MQA/GQA)
  int head_dim;  // actual d (<= the compiled bucket, a multiple of 8)
  int seqlen_q;  // fixed length, or the maximum over the batch for varlen
  int seqlen_k;

  float softmax_scale;       // as in the forward
  float scale_log2;          // softmax_scale * log2(e)
  bool causal_bottom_right;  // as in the forward
  bool deterministic;        // no float atomics: bitwise reproducible gradients

  VariantParams variant;     // as in the forward (the sink's gradient is computed by the caller)
  DropoutParams dropout;
};

// KV cache of the decode family (splitkv/). The cache holds key rows; logical key j of sequence b
// (0 <= j < seqlen_k(b)) is cache row r = leftpad[b] + j of
//   contiguous: k + cache_batch_idx[b] * batch_stride + r * row_stride (cache (batch_cache,
//               capacity, heads_k, d)),
//   paged:      k + block_table[b][r / page_size] * batch_stride + (r % page_size) * row_stride
//               (cache (num_blocks, page_size, heads_k, d): the batch stride is the page's; the
//               table is DecodeParams::fwd.pages, PageTable),
// with seqlen_k(b) = cache_seqlens[b] + seqlen_new - leftpad[b] (cache_seqlens: rows filled before
// this call's seqlen_new new keys, which are appended at rows cache_seqlens[b] ..). Queries are
// the last seqlen_q positions (bottom-right alignment). problem.cuh's CacheRows resolves rows.
struct KvCacheParams {
  const int* cache_seqlens;    // (batch) or nullptr: every cache full (capacity rows)
  const int* cache_batch_idx;  // (batch) cache row of each sequence, or nullptr: b (contiguous)
  const int* leftpad;          // (batch) first row of each sequence's keys, or nullptr: 0
  int capacity;                // rows a sequence can hold: seqlen_cache, or max_blocks * page_size
  int seqlen_new;              // rows appended by this call (0: none)
};

// Decoding (splitkv/): attention of seqlen_q queries per sequence against a KV cache, the query
// heads of each K/V head packed into the rows of one tile (GQA packing: packed row r is query
// r / group of head hk * group + r % group, group = heads / heads_k) and the keys split into
// num_splits ranges. fwd.k/v are the caches (strides as KvCacheParams says, fwd.pages their page
// table: block_table nullptr for a contiguous cache); fwd.seqlen_k is the capacity. With
// num_splits > 1 each split writes its normalised partial output and lse (log2 units) to
// o_partial (num_splits, batch, heads, seqlen_q, head_dim) and lse_partial (num_splits, batch,
// heads, seqlen_q), float32 contiguous, and a second kernel combines them (lse = log2 sum_s
// 2^lse_s, O = sum_s 2^(lse_s - lse) O_s, then the sink). num_splits 0: the append and rotary
// only (AppendParams), no attention.
struct DecodeParams {
  FwdParams fwd;  // q, o, lse (batch, heads, seqlen_q), strides, heads, variant (no dropout),
                  // the caches' page table (pages)
  KvCacheParams cache;
  int num_splits;
  float* o_partial;
  float* lse_partial;
};

// The append before decoding (splitkv/append_kernel.cuh): k_new/v_new (batch, seqlen_new,
// heads_k, d) are written into the cache at rows cache_seqlens[b] + t, k_new rotated first; q is
// rotated into q_rot (contiguous, like q) when rotary is on. Rotary (RoPE) on the first
// rotary_dim dims, angle c of position pos: cos/sin[pos][c], tables (seqlen_ro, rotary_dim / 2):
//   interleaved (GPT-J): pairs (2c, 2c + 1); else (GPT-NeoX): pairs (c, c + rotary_dim / 2);
//   (x, y) -> (x cos - y sin, x sin + y cos).
// Positions: new key t at cache_seqlens[b] - leftpad[b] + t; query i at the same + i when
// q_positions_step (causal or windowed), else every query at cache_seqlens[b] - leftpad[b].
struct AppendParams {
  const void *k_new, *v_new;  // (batch, seqlen_new, heads_k, d), or nullptr: no append
  int64_t kn_batch_stride, kn_row_stride, kn_head_stride;
  int64_t vn_batch_stride, vn_row_stride, vn_head_stride;
  const void *rotary_cos, *rotary_sin;  // (seqlen_ro, rotary_dim / 2) contiguous, or nullptr
  int rotary_dim;
  bool rotary_interleaved;
  bool q_positions_step;
  const void* q_src;  // the caller's q (batch, seqlen_q, heads, d), rotated into q_rot
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  void* q_rot;  // (batch, seqlen_q, heads, d) contiguous: the rotated q (rotary only), or nullptr
};

}  // namespace flashjit
