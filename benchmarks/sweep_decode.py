"""Decode tuning sweeps (numbers for benchmarks/NOTES.md and ops.num_splits_heuristic, not the
README): bf16, d 128, 32 query heads, seqlen_q 1, as bench_decode.py.

    python benchmarks/sweep_decode.py splits            # num_splits 1..128 per shape, default tile
    python benchmarks/sweep_decode.py tiles 64,3,1 64,3,2   # tiles (block_n, stages, loader)

`splits` times flash_attn_with_kvcache with each num_splits on small-batch shapes, next to the
heuristic's choice (num_splits=0) and SDPA cuDNN. `tiles` times each tile (JitSpec.tile through
FLASHJIT_DECODE_TILE, one child process per tile, so no process loads two builds of one spec)
on large-batch shapes, where decoding is bound by memory bandwidth. GPU time per call from CUDA
graphs of back-to-back calls (bench_decode.graph_ms).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SHAPES = [("gqa", 1, 1024), ("gqa", 1, 4096), ("gqa", 1, 16384), ("gqa", 1, 131072),
                ("mha", 1, 1024), ("mha", 1, 4096), ("mha", 1, 16384), ("gqa", 8, 1024),
                ("gqa", 8, 4096), ("mha", 8, 1024), ("gqa", 32, 1024), ("gqa", 16, 8192)]
TILE_SHAPES = [("gqa", 64, 4096), ("mha", 8, 4096), ("gqa", 8, 16384), ("mha", 64, 1024),
               ("gqa", 256, 1024), ("gqa", 1, 131072)]


def _setup():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_decode import LAYOUTS, PEERS, graph_ms, sdpa_call, GIB
    from profile_decode import tensors
    return torch, LAYOUTS, PEERS, graph_ms, sdpa_call, GIB, tensors


def splits() -> None:
    torch, LAYOUTS, PEERS, graph_ms, sdpa_call, GIB, tensors = _setup()
    import flashjit
    from flashjit import ops
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for layout, batch, seqlen_k in SPLIT_SHAPES:
        q, k, v = tensors(layout, batch, seqlen_k)
        kv = 2 * k.numel() * k.element_size()
        calls = max(1, min(20, GIB // kv))
        auto = ops.num_splits_heuristic(batch, LAYOUTS[layout], 32 // LAYOUTS[layout], seqlen_k,
                                        num_sms)
        times = {}
        for s in (1, 2, 4, 8, 16, 32, 64, 128):
            if s > max(1, seqlen_k // 64):
                break
            times[s] = graph_ms(lambda s=s: flashjit.flash_attn_with_kvcache(q, k, v, num_splits=s),
                                calls, 5) * 1e3
        t_auto = graph_ms(lambda: flashjit.flash_attn_with_kvcache(q, k, v), calls, 5) * 1e3
        fn, _ = sdpa_call(PEERS["cudnn"], q, k, v)
        t_cudnn = graph_ms(fn, calls, 5) * 1e3 if fn is not None else float("nan")
        best = min(times, key=times.get)
        print(f"{layout} b{batch} k{seqlen_k}: auto {auto} -> {t_auto:.1f} us; best {best} -> "
              f"{times[best]:.1f} us; cuDNN {t_cudnn:.1f} us; "
              + " ".join(f"{s}:{t:.1f}" for s, t in times.items()), flush=True)


def tile_child() -> None:
    torch, LAYOUTS, PEERS, graph_ms, sdpa_call, GIB, tensors = _setup()
    import flashjit
    for layout, batch, seqlen_k in TILE_SHAPES:
        q, k, v = tensors(layout, batch, seqlen_k)
        kv = 2 * k.numel() * k.element_size()
        calls = max(1, min(20, GIB // kv))
        ms = graph_ms(lambda: flashjit.flash_attn_with_kvcache(q, k, v), calls, 7)
        out = flashjit.flash_attn_with_kvcache(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            enable_gqa=True).transpose(1, 2)
        err = (out.float() - ref.float()).abs().max().item()
        print(f"  {layout} b{batch} k{seqlen_k}: {ms * 1e3:.1f} us, {kv / ms / 1e6:.0f} GB/s "
              f"(max |diff| from SDPA {err:.2g})", flush=True)
        q = k = v = out = ref = None  # free before the next shape
        torch.cuda.empty_cache()


def tiles(tile_list) -> None:
    for tile in tile_list:
        print(f"tile {tile}:", flush=True)
        env = dict(os.environ, FLASHJIT_DECODE_TILE=tile)
        subprocess.run([sys.executable, __file__, "_tile_child"], env=env, check=False)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "splits"
    if mode == "splits":
        splits()
    elif mode == "tiles":
        tiles(sys.argv[2:] or ["64,3,2"])
    elif mode == "_tile_child":
        tile_child()
    else:
        raise SystemExit(__doc__)
