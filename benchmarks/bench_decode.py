"""Decoding with a KV cache: flashjit.flash_attn_with_kvcache against the memory bandwidth and SDPA.

    python benchmarks/bench_decode.py [--out DIR] [--quick]

Decode: one query token (seqlen_q 1), d 128, bf16, GQA 32:8 and MHA 32 heads; batch 1..256 and
seqlen_k 1k..128k, the subset of the grid with batch x seqlen_k <= 1M tokens (at most 16 GiB of
MHA cache: batch 1 and 8 up to 128k, 64 up to 16k, 256 up to 4k; 13 points per head layout), each
sequence at the full length (SDPA takes a dense cache, with no per-sequence lengths). flashjit
reads a contiguous cache, then the same cache paged with pages of 16, 64 and 256 rows (a shuffled
block table over all the pages), num_splits chosen by its heuristic; no append (the timed call is
idempotent). SDPA's cuDNN and flash backends read the same contiguous cache as a dense
(batch, heads_k, seqlen_k, d) view; with GQA through enable_gqa=True where the backend takes it,
else K/V expanded to the query heads beforehand (untimed; the table says "x" for expanded).

Chunked prefill: batch 1, a chunk of seqlen_q 128 or 512 new queries against seqlen_k 4k or 32k
keys (the chunk's own keys the cache's last rows), causal aligned bottom-right; flashjit's
flash_attn_with_kvcache and flash_attn_func (the prefill kernel) against SDPA cuDNN given the
bottom-right causal mask as a boolean attn_mask (or, if this cuDNN refuses masks, unmasked: the
whole rectangle, at most seqlen_q / (2 seqlen_k) more work than causal; the table says which).

Time: every implementation is captured in a CUDA graph of back-to-back calls (20 for small
caches, fewer for large ones; the eager warm-up call before capture compiles and checks), whose
replays are timed by common.bench_ms (CUDA events, warm-up, batches, median), per call: GPU time
with no host cost, for flashjit and SDPA alike (bench_overhead.py measures host costs; an eager
flashjit call with a block table also synchronises once to check its values). Bandwidth: the
K/V bytes read, 2 x batch x seqlen_k x heads_k x d x 2 bytes, per second, and as a fraction of
the device-to-device copy bandwidth measured in the same run (eager copy_ of a 2 GiB float32
buffer: read + write bytes per second). Chunked prefill: TFLOP/s over the visible (query, key) pairs.

About 2-3 minutes on an H200 once the two specs are built:
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal both
Writes decode.json and decode.md under benchmarks/results/<gpu>/ (or <--out>/<gpu>/).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from flashjit import ops  # noqa: E402
from common import (bench_ms, env_header, environment, pairs_flops, results_dir,  # noqa: E402
                    visible_pairs, write_json)

HEADS, HEAD_DIM, DTYPE, DEVICE = 32, 128, torch.bfloat16, "cuda"
LAYOUTS = {"gqa": 8, "mha": 32}  # heads_k
BATCHES = [1, 8, 64, 256]
SEQLENS = [1024, 4096, 16384, 131072]
TOKEN_BUDGET = 2**20  # batch x seqlen_k
PAGES = [16, 64, 256]
CHUNKS = [(128, 4096), (128, 32768), (512, 4096), (512, 32768)]  # (seqlen_q, seqlen_k)
# the timed implementations of a chunk point (row keys <name>_ms, <name>_tflops)
CHUNK_TIMINGS = ("kvcache", "kvcache_paged64", "kvcache_paged64_fwd", "flash_attn_func",
                 "sdpa_cudnn")
PEERS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
GIB = 2**30


def graph_ms(fn, calls: int, repeats: int) -> float:
    """Milliseconds per fn() call: fn warmed up eagerly on a side stream (compiles, checks),
    then `calls` back-to-back calls captured in one CUDA graph whose replays bench_ms times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    try:
        return bench_ms(graph.replay, warmup=2, repeats=repeats, min_batch_ms=10.0) / calls
    finally:
        del graph


def copy_gbs(repeats: int) -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read + written: copy_ of 2 GiB of float32,
    eager (timed with CUDA events). Not in a CUDA graph: there the copy became a memcpy node that
    ran at 2.8 TB/s on the H200 against 4.3 TB/s eager (logs/profile_decode.log)."""
    src = torch.empty(2 * GIB // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=3, repeats=repeats, min_batch_ms=20.0)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged(cache: torch.Tensor, page: int, table=None):
    """cache (batch, seqlen, heads_k, d) as pages (batch * seqlen / page, page, heads_k, d) in a
    shuffled order, and the int32 block table (batch, seqlen / page) that reads it back (given
    one, that table's order)."""
    batch, seqlen = cache.shape[:2]
    blocks = seqlen // page
    if table is None:
        table = torch.randperm(batch * blocks, device=cache.device).view(batch, blocks)
    shape = (batch * blocks, page) + cache.shape[2:]
    pages = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    pages[table.flatten().long()] = cache.view(shape)
    return pages, table.to(torch.int32)


def sdpa_call(backend, q, k, v, attn_mask=None):
    """(fn, how) for SDPA on flashjit's (batch, seq, heads, d) tensors with `backend` alone:
    GQA through enable_gqa where the backend runs it ("gqa"), else K/V expanded to the query
    heads once here ("x"); (None, error text) when the backend refuses the call."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    heads, heads_k = q.shape[2], k.shape[2]
    tries = [("gqa", True), ("x", False)] if heads != heads_k else [("", False)]
    error = None
    for how, gqa in tries:
        if how == "x":
            kt, vt = (t.repeat_interleave(heads // heads_k, dim=1) for t in (kt, vt))

        def fn(kt=kt, vt=vt, gqa=gqa):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask,
                                                      enable_gqa=gqa)
        try:
            fn()
            return fn, how
        except RuntimeError as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None, error


def _timed(row: dict, key: str, fn, calls: int, repeats: int) -> None:
    try:
        row[key] = round(graph_ms(fn, calls, repeats), 4)
    except Exception as e:  # noqa: BLE001 - record why, go on
        row[key + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _time_paged(row: dict, q, k, v, page: int, calls: int, repeats: int) -> None:
    """flashjit on k, v paged with `page` rows per page (the pages die on return)."""
    k_pages, table = paged(k, page)
    v_pages, _ = paged(v, page, table)
    _timed(row, f"paged{page}_ms", lambda: flashjit.flash_attn_with_kvcache(
        q, k_pages, v_pages, block_table=table), calls, repeats)


def decode_point(layout: str, batch: int, seqlen_k: int, copy: float, num_sms: int,
                 args) -> dict:
    heads_k = LAYOUTS[layout]
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, seqlen_k, heads_k, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            for _ in range(2))
    kv_bytes = 2 * k.numel() * k.element_size()
    calls = max(1, min(20, GIB // kv_bytes))
    row = dict(layout=layout, heads=HEADS, heads_k=heads_k, batch=batch, seqlen_k=seqlen_k,
               kv_gib=round(kv_bytes / GIB, 3), graph_calls=calls,
               num_splits=ops.num_splits_heuristic(batch, heads_k, HEADS // heads_k, seqlen_k,
                                                    num_sms))
    _timed(row, "contiguous_ms", lambda: flashjit.flash_attn_with_kvcache(q, k, v), calls,
           args.repeats)
    for page in args.pages:
        _time_paged(row, q, k, v, page, calls, args.repeats)
    for name, backend in PEERS.items():
        fn, how = sdpa_call(backend, q, k, v)
        if fn is None:
            row[f"sdpa_{name}_ms_error"] = how
            continue
        row[f"sdpa_{name}_gqa"] = how
        _timed(row, f"sdpa_{name}_ms", fn, calls, args.repeats)
        del fn
    if "contiguous_ms" in row:
        gbs = kv_bytes / row["contiguous_ms"] / 1e6
        row.update(kv_gbs=round(gbs, 1), of_copy=round(gbs / copy, 3))
        for page in args.pages:
            if f"paged{page}_ms" in row:
                row[f"paged{page}_ratio"] = round(row[f"paged{page}_ms"] / row["contiguous_ms"],
                                                  3)
    return row


def chunk_point(layout: str, seqlen_q: int, seqlen_k: int, args) -> dict:
    heads_k = LAYOUTS[layout]
    q = torch.randn(1, seqlen_q, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(1, seqlen_k, heads_k, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            for _ in range(2))
    flops = pairs_flops(1, HEADS, visible_pairs(seqlen_q, seqlen_k, causal=True), HEAD_DIM)
    row = dict(layout=layout, heads=HEADS, heads_k=heads_k, seqlen_q=seqlen_q,
               seqlen_k=seqlen_k)
    _timed(row, "kvcache_ms", lambda: flashjit.flash_attn_with_kvcache(q, k, v, causal=True), 5,
           args.repeats)
    _timed(row, "flash_attn_func_ms", lambda: flashjit.flash_attn_func(q, k, v, causal=True), 5,
           args.repeats)
    k_pages, table = paged(k, 64)  # decode kernel below 256 queries, else the paged forward
    v_pages, _ = paged(v, 64, table)
    _timed(row, "kvcache_paged64_ms", lambda: flashjit.flash_attn_with_kvcache(
        q, k_pages, v_pages, block_table=table, causal=True), 5, args.repeats)
    ops = flashjit.ops
    if seqlen_q < ops.paged_prefill_min_queries(q.device, HEAD_DIM):  # the paged forward too
        threshold = ops.paged_prefill_min_queries
        ops.paged_prefill_min_queries = lambda device, head_dim: ops.PREFILL_MIN_QUERIES
        try:
            _timed(row, "kvcache_paged64_fwd_ms", lambda: flashjit.flash_attn_with_kvcache(
                q, k_pages, v_pages, block_table=table, causal=True), 5, args.repeats)
        finally:
            ops.paged_prefill_min_queries = threshold
    i = torch.arange(seqlen_q, device=DEVICE)[:, None]
    mask = torch.arange(seqlen_k, device=DEVICE)[None, :] <= i + seqlen_k - seqlen_q  # bottom-right
    fn, how = sdpa_call(PEERS["cudnn"], q, k, v, attn_mask=mask)
    row["sdpa_cudnn_mask"] = "causal mask"
    if fn is None:  # this cuDNN path takes no mask: the whole rectangle
        fn, how = sdpa_call(PEERS["cudnn"], q, k, v)
        row["sdpa_cudnn_mask"] = "none (full rectangle)"
    if fn is None:
        row["sdpa_cudnn_ms_error"] = how
    else:
        row["sdpa_cudnn_gqa"] = how
        _timed(row, "sdpa_cudnn_ms", fn, 5, args.repeats)
    for key in CHUNK_TIMINGS:
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = round(flops / row[f"{key}_ms"] / 1e9, 1)
    return row


def _cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run(args):
    env = environment()
    print(env_header(env), flush=True)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_gbs(args.repeats)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", flush=True)
    points = [(lay, b, s) for lay in args.layouts for b in args.batches for s in args.seqlens
              if b * s <= args.token_budget]
    rows, chunks = [], []
    for n, (layout, batch, seqlen_k) in enumerate(points, 1):
        try:
            row = decode_point(layout, batch, seqlen_k, copy, num_sms, args)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, go on
            row = dict(layout=layout, batch=batch, seqlen_k=seqlen_k,
                       error=f"{type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
        print(f"[{n}/{len(points)}] decode {layout} b{batch} s{seqlen_k}: "
              + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith(("_ms", "gbs",
                                                                             "error"))),
              flush=True)
        _cleanup()
    for layout in args.layouts:
        for seqlen_q, seqlen_k in args.chunks:
            try:
                row = chunk_point(layout, seqlen_q, seqlen_k, args)
            except Exception as e:  # noqa: BLE001
                row = dict(layout=layout, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                           error=f"{type(e).__name__}: {str(e)[:160]}")
            chunks.append(row)
            print(f"chunked prefill {layout} q{seqlen_q} k{seqlen_k}: "
                  + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith(("_ms", "error"))),
                  flush=True)
            _cleanup()
    return env, copy, rows, chunks


def _ms(row: dict, key: str) -> str:
    if key in row:
        return f"{row[key]:.3f}"
    return "err" if key + "_error" in row else "-"


def markdown(env, copy, rows, chunks, args) -> str:
    pages = args.pages
    lines = [
        "# Decoding with a KV cache: flashjit.flash_attn_with_kvcache", "", env_header(env), "",
        f"Device-to-device copy bandwidth in this run: **{copy:.0f} GB/s** (read + write bytes). "
        f"Decode: seqlen_q 1, {HEADS} query heads, d {HEAD_DIM}, bf16, every sequence at seqlen_k "
        "keys, no append; ms per call, GPU time (CUDA graphs of back-to-back calls). K/V GB/s: "
        "cache bytes read per second by flashjit on the contiguous cache; '% copy': that over "
        "the copy bandwidth. Paged: ms (time / contiguous time). SDPA on the dense cache; 'x': "
        "K/V expanded to the query heads (the backend took no enable_gqa). 'vs SDPA': the faster "
        "SDPA's time over flashjit's contiguous one.", "",
        "| heads:heads_k | batch | seqlen_k | splits | ms | K/V GB/s | % copy | "
        + " | ".join(f"paged {p}" for p in pages) + " | cuDNN ms | flash ms | vs SDPA |",
        "|---" * (10 + len(pages)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['batch']} | {r['seqlen_k']} | error: "
                         f"{r['error'][:80]} |" + " |" * (6 + len(pages)))
            continue
        paged_cells = [f"{_ms(r, f'paged{p}_ms')} ({r.get(f'paged{p}_ratio', '-')})"
                       for p in pages]
        sdpa = [r[k] for k in ("sdpa_cudnn_ms", "sdpa_flash_ms") if k in r]
        vs = (f"{min(sdpa) / r['contiguous_ms']:.2f}x" if sdpa and "contiguous_ms" in r
              else "-")
        mark = {name: " x" if r.get(f"sdpa_{name}_gqa") == "x" else "" for name in PEERS}
        share = f"{100 * r['of_copy']:.0f}%" if "of_copy" in r else "-"
        lines.append(
            f"| {r['heads']}:{r['heads_k']} | {r['batch']} | {r['seqlen_k']} | "
            f"{r['num_splits']} | {_ms(r, 'contiguous_ms')} | {r.get('kv_gbs', '-')} | {share} | "
            + " | ".join(paged_cells) + f" | {_ms(r, 'sdpa_cudnn_ms')}{mark['cudnn']} | "
            f"{_ms(r, 'sdpa_flash_ms')}{mark['flash']} | {vs} |")
    lines += ["", "## Chunked prefill", "",
              f"Batch 1, {HEADS} query heads, d {HEAD_DIM}, bf16, causal bottom-right (query i "
              "sees keys up to seqlen_k - seqlen_q + i). ms per call (TFLOP/s over the visible "
              "pairs). cuDNN: with the causal mask as attn_mask, or unmasked where it takes no "
              "mask (column 'cuDNN mask'). with_kvcache on the contiguous cache runs the forward "
              "(prefill) kernel (ops.PREFILL_MIN_QUERIES); on a cache paged by 64 rows, below "
              "ops.paged_prefill_min_queries() (PREFILL_MIN_QUERIES where the paged forward is "
              "sm90ws, else 256) queries the decode kernel's 64-row tiles (split-KV), from there "
              "on the forward's paged spec; 'paged 64, forward': below that threshold the "
              "forward's paged spec too (the threshold lowered for that call), to place it.", "",
              "| heads:heads_k | seqlen_q | seqlen_k | with_kvcache | with_kvcache paged 64 | "
              "paged 64, forward | flash_attn_func | cuDNN | cuDNN mask | cuDNN / with_kvcache | "
              "cuDNN / paged 64 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in chunks:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['seqlen_q']} | {r['seqlen_k']} | error: "
                         f"{r['error'][:80]} | | | | | | | |")
            continue
        cell = {k: f"{_ms(r, k + '_ms')} ({r.get(k + '_tflops', '-')})"
                for k in CHUNK_TIMINGS}
        ratio = {k: (f"{r['sdpa_cudnn_ms'] / r[k + '_ms']:.2f}x"
                     if "sdpa_cudnn_ms" in r and k + "_ms" in r else "-")
                 for k in ("kvcache", "kvcache_paged64")}
        lines.append(f"| {r['heads']}:{r['heads_k']} | {r['seqlen_q']} | {r['seqlen_k']} | "
                     f"{cell['kvcache']} | {cell['kvcache_paged64']} | "
                     f"{cell['kvcache_paged64_fwd']} | {cell['flash_attn_func']} | "
                     f"{cell['sdpa_cudnn']} | "
                     f"{r.get('sdpa_cudnn_mask', '-')} | {ratio['kvcache']} | "
                     f"{ratio['kvcache_paged64']} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--seqlens", nargs="+", type=int, default=SEQLENS,
                   help="seqlen_k values (multiples of the largest page size)")
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET,
                   help="largest batch x seqlen_k measured (default 2^20)")
    p.add_argument("--pages", nargs="+", type=int, default=PAGES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: GQA, batch 1 and 64, seqlen_k 1k and 16k, one chunk")
    p.add_argument("--chunks-only", action="store_true",
                   help="chunked prefill alone (no decode points), written as "
                        "decode_chunks.json/.md")
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    args = p.parse_args()
    if args.chunks_only:
        args.batches = []
    args.chunks = CHUNKS
    if args.quick:
        args.layouts, args.batches, args.seqlens = ["gqa"], [1, 64], [1024, 16384]
        args.chunks, args.repeats = CHUNKS[:1], 5
    if not torch.cuda.is_available():
        sys.exit(f"{Path(__file__).name}: no CUDA device (torch {torch.__version__}, CUDA "
                 f"{torch.version.cuda}): this benchmark runs on an NVIDIA GPU")
    torch.manual_seed(0)
    env, copy, rows, chunks = run(args)
    out_dir = results_dir(args.out)
    name = "decode_chunks" if args.chunks_only else "decode"
    write_json(out_dir / f"{name}.json", {"environment": env, "copy_gbs": round(copy, 1),
                                          "decode": rows, "chunked_prefill": chunks})
    md = markdown(env, copy, rows, chunks, args)
    (out_dir / f"{name}.md").write_text(md)
    print(f"wrote {out_dir / f'{name}.md'}", flush=True)
    print(md, flush=True)


if __name__ == "__main__":
    main()
