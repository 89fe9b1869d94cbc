// problem.cuh: what one CTA of an attention kernel works on, and where its tensors live: every
// pointer and offset, computed in one place for the forward and the backward of every family
// (contiguous K/V, paged K/V: PageRows, and the KV cache's rows, contiguous or paged:
// CacheRows). Family-agnostic: no tile code.
//   PageRows:      the page-row addressing of paged K/V, shared by the forward and CacheRows.
//   FwdTileOrder:  the forward's query blocks of every (head, batch) pair in one order.
//   FwdQueryBlock: a query block of the forward, against its range of key blocks.
//   BwdQueryBlock: a query block of the backward's dQ kernels (deterministic path).
//   BwdKeyBlock:   a key block of the backward's dK/dV kernels, against its range of query blocks.
// Block ranges come from the variant (variant.cuh): causal and sliding-window bands skip the key
// (query) blocks outside them.
#pragma once

#include <cstdint>

#include "common/params.h"
#include "common/ptx.cuh"
#include "common/sequence.cuh"
#include "common/variant.cuh"

namespace flashjit {

// Per-sequence row padding of the backward's fp32 scratch (dq_accum, dsum): see BwdParams. Every
// backward query block (kBlockM <= kAccumPadRows) stays inside its sequence's padded rows.
constexpr int kAccumPadRows = 128;

// Where one (batch, head) sequence's fp32 scratch rows start (see BwdParams).
__device__ __forceinline__ int64_t accum_row0(const SeqInfo& seq, int b, bool varlen) {
  return varlen ? int64_t(seq.q_start) + int64_t(kAccumPadRows) * b : 0;
}

// The rows of one sequence of paged K/V (params.h: PageTable): logical row r lies in page
// pages[r / page_size] at row r % page_size, i.e. at element offset
//   page * page_stride + (r % page_size) * row_stride
// from the K/V head's base (page 0, row 0, head hk). The forward's paged specs (FwdQueryBlock)
// and the KV cache (CacheRows) resolve rows here.
struct PageRows {
  // A row found in the table: the page number it holds (not yet checked) and the row in the page.
  struct Slot {
    int page, row;
  };
  const int* pages;  // this sequence's block_table row, or nullptr (contiguous K/V)
  int page_size, page_shift, num_blocks;

  PageRows() = default;
  __device__ PageRows(const PageTable& t, int b)
      : pages(t.block_table != nullptr ? t.block_table + b * t.block_table_batch_stride
                                       : nullptr),
        page_size(t.page_size), page_shift(t.page_shift), num_blocks(t.num_blocks) {}
  // Row r's slot: one read of the table. Pages of a power-of-two size (page_shift >= 0) take a
  // shift and a mask, not a division.
  __device__ __forceinline__ Slot find(int r) const {
    const int slot = page_shift >= 0 ? r >> page_shift : r / page_size;
    const int row = page_shift >= 0 ? r & (page_size - 1) : r % page_size;
    return {pages[slot], row};
  }
  // False for a page number outside [0, num_blocks): the row then reads as zeros (the Python API
  // rejects such tables outside CUDA-graph capture).
  __device__ __forceinline__ bool valid(const Slot& s) const {
    return s.page >= 0 && s.page < num_blocks;
  }
  __device__ __forceinline__ bool locate(int r, int& page, int& row) const {
    const Slot s = find(r);
    page = s.page;
    row = s.row;
    return valid(s);
  }
  // The address of a found row in a paged tensor whose head starts at `base`, or nullptr where
  // its page is outside the cache (formed either way, then selected: no branch on the page).
  template <typename Element>
  __device__ __forceinline__ const Element* address(const Element* base, int64_t page_stride,
                                                    int64_t row_stride, const Slot& s) const {
    const Element* ptr = base + int64_t(s.page) * page_stride + s.row * row_stride;
    return valid(s) ? ptr : nullptr;
  }
};

// Rows j0 + r of one paged K or V head, as the tile loaders read them (padded_tile.cuh's
// load_rows_async, common/smem_sw128.cuh's load_rows_sw128): find(r) reads the page table,
// address(slot) is the row's first element or nullptr (zeros); base is the head's base (page 0,
// row 0), a valid address for the zero-filled copies. Two steps, so that a loader issues every
// table read of its rows before it uses the first one.
template <typename Element>
struct PagedRows {
  PageRows pages;
  const Element* base;
  int64_t page_stride, row_stride;
  int j0;
  __device__ __forceinline__ PageRows::Slot find(int r) const { return pages.find(j0 + r); }
  __device__ __forceinline__ const Element* address(const PageRows::Slot& s) const {
    return pages.address(base, page_stride, row_stride, s);
  }
};

// The forward's tiles (query blocks of block_m rows of every (head, batch) pair) in one order, for
// a grid with a CTA per tile or a persistent one whose CTAs take every gridDim.x-th tile. The
// pairs (pair = h + heads * b) go in groups of `group` consecutive pairs (the last group may be
// smaller); within a group, tile t = r * group_size + (pair - first pair of the group) is query
// block m_blocks - 1 - r of its pair: the heavier (later, with causal masking) blocks of every
// pair of the group first, so that a persistent grid's CTAs take the tiles about longest first
// (LPT) while the group's K/V stay in L2. group 1: pair by pair (consecutive tiles share a head,
// so the CTAs running side by side read the same K/V), heavier blocks first.
struct FwdTileOrder {
  int m_blocks, heads;
  int count;      // m_blocks * heads * batch (< 2^31: fwd launch code)
  int group = 1;  // pairs per group (>= 1)
  int pairs = 0;  // heads * batch

  // Tile t: (its query block, its pair).
  __device__ __forceinline__ int2 decode(int t) const {
    if (group == 1) return make_int2(m_blocks - 1 - t % m_blocks, t / m_blocks);
    const int per_group = group * m_blocks;
    const int g = t / per_group;
    const int first = g * group;
    const int size = min(group, pairs - first);  // the last group may be smaller
    const int idx = t - g * per_group;
    return make_int2(m_blocks - 1 - idx / size, first + idx % size);
  }
};

// Query rows [m0, m0 + block_m) of head h of sequence b, against key blocks [n_begin, n_end) of
// block_n keys (the variant's band; none when n_end <= n_begin), and where Q (at row m0), K, V
// (at row 0), O and lse live. Paged K/V (V::kPagedKV: fixed length, p.pages): k and v are the
// K/V head's base (page 0, row 0) and key rows j0.. are read through k_rows(p, j0) / v_rows.
template <typename Element, typename V>
struct FwdQueryBlock {
  SeqInfo seq;
  bool varlen;
  int b, h, m0;
  int n_begin, n_end;  // may be n_end <= n_begin: no key block
  const Element *q, *k, *v;
  PageRows pages;  // paged only: this sequence's page table

  __device__ FwdQueryBlock(const FwdParams& p, int m_block, int h_, int b_, int block_m,
                           int block_n)
      : seq(p, b_), varlen(p.cu_seqlens_q != nullptr), b(b_), h(h_), m0(m_block * block_m) {
    const VariantScores<V> scores(p, seq, b, h);  // for the range (the kernel builds its own)
    const int hk = h / (p.heads / p.heads_k);  // MQA/GQA: the K/V head of query head h
    q = static_cast<const Element*>(p.q) +
        seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen) +
        m0 * p.q_row_stride;
    if constexpr (V::kPagedKV) {
      k = static_cast<const Element*>(p.k) + hk * p.k_head_stride;
      v = static_cast<const Element*>(p.v) + hk * p.v_head_stride;
      pages = PageRows(p.pages, b);
    } else {
      k = static_cast<const Element*>(p.k) +
          seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen);
      v = static_cast<const Element*>(p.v) +
          seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen);
    }
    n_begin = scores.key_begin(m0) / block_n;
    n_end = ceil_div(scores.key_end(m0, block_m), block_n);
  }
  // Paged: key rows j0 + r (< seq.seqlen_k) of K / of V through the page table (the batch
  // stride is the page's).
  __device__ __forceinline__ PagedRows<Element> k_rows(const FwdParams& p, int j0) const {
    return {pages, k, p.k_batch_stride, p.k_row_stride, j0};
  }
  __device__ __forceinline__ PagedRows<Element> v_rows(const FwdParams& p, int j0) const {
    return {pages, v, p.v_batch_stride, p.v_row_stride, j0};
  }
  // The CTA's own block of an attention_grid (query blocks, heads x batch), heavier (later) query
  // blocks first, since with causal masking they have the most keys.
  __device__ FwdQueryBlock(const FwdParams& p, const GridHeadBatch& hb, int block_m, int block_n)
      : FwdQueryBlock(p, gridDim.x - 1 - blockIdx.x, hb.h, hb.b, block_m, block_n) {}
  // Tile t of a FwdTileOrder.
  __device__ FwdQueryBlock(const FwdParams& p, const FwdTileOrder& order, int t, int block_m,
                           int block_n)
      : FwdQueryBlock(p, order.decode(t), order.heads, block_m, block_n) {}
  // (query block, pair) of a FwdTileOrder, pair = h + heads * b.
  __device__ FwdQueryBlock(const FwdParams& p, int2 tile, int heads, int block_m, int block_n)
      : FwdQueryBlock(p, tile.x, tile.y % heads, tile.y / heads, block_m, block_n) {}
  __device__ bool empty() const { return m0 >= seq.seqlen_q; }  // past this sequence's end
  // O at row m0, and lse at row m0 (computed late: registers are scarce in the main loop).
  __device__ Element* out(const FwdParams& p) const {
    return static_cast<Element*>(p.o) +
           seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h, varlen) +
           m0 * p.o_row_stride;
  }
  __device__ float* lse(const FwdParams& p) const {
    return p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + seq.q_start +
           m0;
  }
};

// Query rows [m0, m0 + block_m) of the backward's dQ kernels, against key blocks [n_begin, n_end):
// Q, dO, dQ at row m0; K, V at row 0; lse at row 0 and D at row 0 of the sequence's scratch rows.
template <typename Element, typename V>
struct BwdQueryBlock {
  SeqInfo seq;
  int m0;
  int n_begin, n_end;  // may be n_end <= n_begin: no key block
  const Element *q, *dout, *k, *v;
  Element* dq;
  const float *lse, *dsum;

  __device__ BwdQueryBlock(const BwdParams& p, int m_block, int h, int b, int block_m, int block_n)
      : seq(p, b), m0(m_block * block_m) {
    const VariantScores<V> scores(p, seq, b, h);  // for the range (the kernel builds its own)
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int hk = h / (p.heads / p.heads_k);
    q = static_cast<const Element*>(p.q) +
        seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen) +
        m0 * p.q_row_stride;
    dout = static_cast<const Element*>(p.dout) +
           seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h, varlen) +
           m0 * p.do_row_stride;
    k = static_cast<const Element*>(p.k) +
        seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen);
    v = static_cast<const Element*>(p.v) +
        seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen);
    dq = static_cast<Element*>(p.dq) +
         seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h, varlen) +
         m0 * p.dq_row_stride;
    lse = p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + seq.q_start;
    dsum = p.dsum + (varlen ? 0 : b * p.dsum_batch_stride) + h * p.dsum_head_stride +
           accum_row0(seq, b, varlen);
    n_begin = scores.key_begin(m0) / block_n;
    n_end = ceil_div(scores.key_end(m0, block_m), block_n);
  }
  __device__ bool empty() const { return m0 >= seq.seqlen_q; }
};

// Keys [n0, n0 + block_n) of sequence b (K/V head hk, query head h), against the query blocks
// [m_begin, m_end) of block_m rows that see them (the variant's band; none for a block of padding
// keys), and where its tensors live: K, V, dK, dV at row n0, Q, dO, lse, D and dq_accum at row 0
// of the sequence. Shared by the dK/dV kernels of every family.
template <typename Element, typename V>
struct BwdKeyBlock {
  SeqInfo seq;
  int n0;
  int m_begin, m_end;  // may be m_end <= m_begin: no query block
  const Element *q, *dout, *k, *v;
  Element *dk, *dv;
  const float *lse, *dsum;
  float* dq_accum;  // rows of d_bucket floats (the kernels' padded width, bwd_dq_accum_width)

  __device__ BwdKeyBlock(const BwdParams& p, int n_block, int h, int b, int block_m, int block_n,
                         int d_bucket)
      : seq(p, b), n0(n_block * block_n) {
    const VariantScores<V> scores(p, seq, b, h);  // for the range (the kernel builds its own)
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int hk = h / (p.heads / p.heads_k);  // MQA/GQA: the K/V head of query head h
    q = static_cast<const Element*>(p.q) +
        seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h, varlen);
    dout = static_cast<const Element*>(p.dout) +
           seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h, varlen);
    k = static_cast<const Element*>(p.k) +
        seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk, varlen) +
        n0 * p.k_row_stride;
    v = static_cast<const Element*>(p.v) +
        seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk, varlen) +
        n0 * p.v_row_stride;
    dk = static_cast<Element*>(p.dk) +
         seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, h, varlen) +
         n0 * p.dk_row_stride;
    dv = static_cast<Element*>(p.dv) +
         seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, h, varlen) +
         n0 * p.dv_row_stride;
    lse = p.lse + (varlen ? 0 : b * p.lse_batch_stride) + h * p.lse_head_stride + seq.q_start;
    const int64_t row0 = accum_row0(seq, b, varlen);
    dsum = p.dsum + (varlen ? 0 : b * p.dsum_batch_stride) + h * p.dsum_head_stride + row0;
    dq_accum = p.dq_accum + (varlen ? 0 : b * p.dq_accum_batch_stride) +
               h * p.dq_accum_head_stride + row0 * d_bucket;
    m_begin = scores.query_begin(n0) / block_m;
    m_end = ceil_div(scores.query_end(n0, block_n, seq.seqlen_q), block_m);
    if (n0 >= seq.seqlen_k) m_begin = m_end;  // only padding keys: dK = dV = 0
  }
  // Past the key rows this sequence owns (rows_k: padding rows included, which get dK = dV = 0).
  __device__ bool empty() const { return n0 >= seq.rows_k; }
};

// The key rows of one sequence of a KV cache (params.h: KvCacheParams), K/V head hk: the
// element offsets of logical key j's row in K and in V, contiguous or through the page table
// (dp.fwd.pages: PageRows). seqlen_k: this call's keys, old and appended; rows past the capacity
// are never used (clamped).
struct CacheRows {
  int64_t k_base, v_base;        // contiguous: row leftpad of the sequence's cache row; paged: head
  int64_t k_row, v_row;          // row strides
  int64_t k_page, v_page;        // page strides (paged)
  PageRows table;                // this sequence's pages (table.pages nullptr: contiguous)
  int leftpad;
  int cached;                    // rows filled before this call (cache_seqlens[b]), leftpad included
  int seqlen_k;                  // keys of this call: cached + seqlen_new - leftpad

  __device__ CacheRows(const DecodeParams& dp, int b, int hk) {
    const FwdParams& p = dp.fwd;
    const KvCacheParams& c = dp.cache;
    // clamped into the cache: the Python API checks these values, except under graph capture
    leftpad = c.leftpad != nullptr ? max(c.leftpad[b], 0) : 0;
    cached = c.cache_seqlens != nullptr ? max(c.cache_seqlens[b], 0) : c.capacity;
    seqlen_k = max(0, min(cached + c.seqlen_new, c.capacity) - leftpad);
    k_row = p.k_row_stride;
    v_row = p.v_row_stride;
    k_page = p.k_batch_stride;
    v_page = p.v_batch_stride;
    table = PageRows(p.pages, b);
    k_base = hk * p.k_head_stride;
    v_base = hk * p.v_head_stride;
    if (table.pages == nullptr) {
      const int row = c.cache_batch_idx != nullptr ? c.cache_batch_idx[b] : b;
      k_base += row * p.k_batch_stride + int64_t(leftpad) * k_row;
      v_base += row * p.v_batch_stride + int64_t(leftpad) * v_row;
    }
  }
  // Element offsets of key j's K and V rows (cache row leftpad + j); false for a page number
  // outside the cache (PageRows::valid: the row then reads as zeros).
  __device__ __forceinline__ bool offsets(int j, int64_t& k_off, int64_t& v_off) const {
    if (table.pages == nullptr) {
      k_off = k_base + j * k_row;
      v_off = v_base + j * v_row;
      return true;
    }
    int page, row;
    const bool valid = table.locate(leftpad + j, page, row);
    k_off = k_base + int64_t(page) * k_page + row * k_row;
    v_off = v_base + int64_t(page) * v_page + row * v_row;
    return valid;
  }
};

// cp.async of the lse and D values of query rows [m0, m0 + block_m) into block_m floats each at
// smem_lse and smem_dsum (0 past the sequence end): threads [0, block_m) copy lse, threads
// [block_m, 2 block_m) copy D. The caller commits.
__device__ __forceinline__ void load_lse_dsum(uint32_t smem_lse, uint32_t smem_dsum,
                                              const float* lse, const float* dsum, int m0,
                                              int block_m, int seqlen_q, int tid) {
  const bool is_lse = tid < block_m;
  const int row = is_lse ? tid : tid - block_m;
  if (row < block_m) {
    const bool valid = m0 + row < seqlen_q;
    const float* src = is_lse ? lse : dsum;
    cp_async_4((is_lse ? smem_lse : smem_dsum) + 4 * row, valid ? src + m0 + row : src, valid);
  }
}

}  // namespace flashjit
