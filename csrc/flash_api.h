// flash_api.h: the entry points a kernel translation unit exports to the torch binding.
// Plain C++ (no torch, no CUDA headers): streams travel as void*, errors as a message string.
#pragma once

#include <cstdint>

#include "common/params.h"

namespace flashjit {

// Each returns nullptr on success, else a static error string (from cudaGetErrorString).
const char* fwd_run(const FwdParams& params, void* stream);
const char* bwd_run(const BwdParams& params, void* stream);
// The row width (floats) of the backward's fp32 dQ scratch (dq_accum): the head-dim bucket, or
// the width of the family's padded tiles (sm90: whole 64-column panels). The binding checks the
// caller's dq_accum against it (flashjit/ops.py allocates it from the registry's head_dim_panel).
int bwd_dq_accum_width();
// Decoding against a KV cache (splitkv/): the append (and rotary) if any, then attention.
const char* decode_run(const DecodeParams& params, const AppendParams& append, void* stream);

// Zeroes rows [*end_row, rows) of `rows` contiguous rows of `row_bytes` bytes (a multiple of 16):
// the rows of a varlen output past cu_seqlens[batch] (varlen_tail.cuh; end_row is a device pointer).
const char* zero_rows_past_end_run(void* x, int64_t row_bytes, int64_t rows, const int* end_row,
                                   void* stream);

// Test helper: the dropout keep mask (uint8, 1 = kept) of a fixed-length call into `mask`,
// (batch, heads, seqlen_q, seqlen_k) contiguous. Defined in common/dropout_mask.cu (the
// "dropout_mask" spec, test-only).
const char* dropout_mask_run(uint8_t* mask, const DropoutParams& dropout, int batch, int heads,
                             int seqlen_q, int seqlen_k, void* stream);

}  // namespace flashjit
