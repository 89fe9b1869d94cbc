"""A small run of the decode family (csrc/splitkv) for compute-sanitizer; see device_run.sh.

    compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_decode.py

Covers the append kernel (with rotary, both layouts), the decode kernel contiguous (with
cache_batch_idx and cache_leftpad) and paged (page 16, shuffled pages, the last page partly
filled), GQA packing, split-KV with the combine kernel, every variant at once, and chunked
prefill on the paged cache (64 queries: the append, then the forward's paged spec, fwd bf16
hd128 causal paged).
"""

import torch

import flashjit

torch.manual_seed(0)
dev, dtype = "cuda", torch.bfloat16
batch, heads, heads_k, d, page = 3, 8, 2, 128, 16
q = torch.randn(batch, 2, heads, d, device=dev, dtype=dtype)
k_new = torch.randn(batch, 2, heads_k, d, device=dev, dtype=dtype)
v_new = torch.randn(batch, 2, heads_k, d, device=dev, dtype=dtype)
cos = torch.randn(300, 32, device=dev, dtype=dtype)
sin = torch.randn(300, 32, device=dev, dtype=dtype)
seqlens = torch.tensor([0, 37, 250], device=dev, dtype=torch.int32)
# paged: 16 pages of 16 rows per sequence, shuffled over a pool of 60
blocks = torch.randperm(60, device=dev)[:batch * 16].view(batch, 16).int()
k_pages = torch.randn(60, page, heads_k, d, device=dev, dtype=dtype)
v_pages = torch.randn(60, page, heads_k, d, device=dev, dtype=dtype)
for splits, interleaved in ((1, True), (3, False)):
    flashjit.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, rotary_cos=cos,
                                     rotary_sin=sin, cache_seqlens=seqlens, block_table=blocks,
                                     causal=True, rotary_interleaved=interleaved,
                                     num_splits=splits)
# chunked prefill on the paged cache: 64 queries and new keys (the forward kernel, paged)
q64 = torch.randn(batch, 64, heads, d, device=dev, dtype=dtype)
k64 = torch.randn(batch, 64, heads_k, d, device=dev, dtype=dtype)
v64 = torch.randn(batch, 64, heads_k, d, device=dev, dtype=dtype)
prefill_seqlens = torch.tensor([0, 37, 190], device=dev, dtype=torch.int32)  # + 64 <= 256 rows
flashjit.flash_attn_with_kvcache(q64, k_pages, v_pages, k64, v64, cache_seqlens=prefill_seqlens,
                                 block_table=blocks, causal=True)
# contiguous, with cache_batch_idx and cache_leftpad, every variant, split-KV
k_cache = torch.randn(4, 260, heads_k, d, device=dev, dtype=dtype)
v_cache = torch.randn(4, 260, heads_k, d, device=dev, dtype=dtype)
flashjit.flash_attn_with_kvcache(
    q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens + 5,
    cache_batch_idx=torch.tensor([3, 0, 1], device=dev, dtype=torch.int32),
    cache_leftpad=torch.tensor([0, 5, 2], device=dev, dtype=torch.int32), causal=True,
    window_size=(100, 0), softcap=30.0, alibi_slopes=torch.rand(heads, device=dev),
    sink=torch.randn(heads, device=dev), num_splits=4)
torch.cuda.synchronize()
print("decode sanitize run done")
