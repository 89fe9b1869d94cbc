"""A ~1B-parameter Llama in Hugging Face transformers: flashjit against SDPA and flash-attn 2.

    python benchmarks/bench_transformers.py [--out DIR] [--seqlens 4096 8192 16384] [--quick]

Model: a random-weight Llama from a config (hidden 2048, 16 layers, 32 query heads and 8
key/value heads of head dim 64 (GQA), intermediate 8192, vocabulary 32000, untied embeddings;
about 1.1e9 parameters), bf16, on one GPU, batch 1. attn_implementation: "fjit"
(flashjit.integrations.transformers), "sdpa" (torch's scaled_dot_product_attention: causal with
no mask, so its flash or cuDNN backend) and "flash_attention_2" where the flash_attn package is
installed ("not installed" otherwise). The same weights serve every implementation
(model.set_attn_implementation).

Measured per sequence length and implementation:
  * train: one training step without optimizer: forward with labels (causal-LM loss) and
    backward of the loss into fresh parameter gradients (zero_grad(set_to_none=True) first).
  * prefill: forward under torch.no_grad with a KV cache (use_cache=True) and the logits of the
    last position only (logits_to_keep=1), as generate() prefills a prompt.
Time: common.bench_ms (median of CUDA-event-timed calls after warm-up; the first call, untimed,
loads flashjit's kernels); tokens/s = seqlen / time. Memory: torch.cuda.max_memory_allocated over
one more call after resetting the peak: the whole process's peak, weights (about 2 GiB) and
gradients included. A configuration that runs out of memory (or fails otherwise) is recorded as
such. Expected runtime on an H200: 1-2 minutes for the three lengths (not measured yet).

Kernels flashjit needs (prebuilt by device_run.sh's build step): bf16, head dim 64, causal,
forward and backward.

Writes transformers.json and transformers.md under benchmarks/results/<gpu>/ (or <--out>/<gpu>/).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, env_header, environment, results_dir, write_json  # noqa: E402

DTYPE = torch.bfloat16
SEQLENS = [4096, 8192, 16384]
IMPLS = ["fjit", "sdpa", "flash_attention_2"]
MODES = ("train", "prefill")
GIB = 2**30
MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=32000,
             max_position_embeddings=32768, attention_dropout=0.0)


def describe(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


def package_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_model():
    import transformers

    config = transformers.LlamaConfig(**MODEL)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE,
                                                              attn_implementation="sdpa")
    return model


def step_fns(model, seqlen):
    ids = torch.randint(0, MODEL["vocab_size"], (1, seqlen), device="cuda")

    def train():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)

    return {"train": train, "prefill": prefill}


def measure(fn, warmup, repeats):
    """(ms, peak GiB) or (None, None, error)."""
    error = None
    try:
        fn()  # untimed: kernel loads, allocator warm-up
        torch.cuda.synchronize()
        ms = bench_ms(fn, warmup, repeats, min_batch_ms=0.0)
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return ms, torch.cuda.max_memory_allocated() / GIB, None
    except torch.OutOfMemoryError:
        error = "out of memory"
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result
        error = describe(e)
    gc.collect()  # outside the except block: its traceback no longer holds the tensors
    torch.cuda.empty_cache()
    return None, None, error


def run(args):
    import transformers

    from flashjit.integrations import transformers as flashjit_hf

    env = environment()
    env.update(transformers=transformers.__version__, flash_attn=package_version("flash-attn"),
               flashjit=package_version("flashjit"))
    print(env_header(env), f"transformers {env['transformers']}", flush=True)
    flashjit_hf.register()
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f}e9 parameters, {DTYPE}", flush=True)
    available = {"fjit": None, "sdpa": None,
                 "flash_attention_2": None if importlib.util.find_spec("flash_attn")
                 else "not installed"}
    rows, start = [], time.monotonic()
    for seqlen in args.seqlens:
        for impl in args.impls:
            row = dict(seqlen=seqlen, impl=impl, batch=1)
            rows.append(row)
            if available.get(impl):
                row["error"] = available[impl]
                print(f"s{seqlen} {impl}: {row['error']}", flush=True)
                continue
            try:
                model.set_attn_implementation(impl)
            except Exception as e:  # noqa: BLE001
                row["error"] = describe(e)
                print(f"s{seqlen} {impl}: {row['error']}", flush=True)
                continue
            fns = step_fns(model, seqlen)
            for mode in MODES:
                ms, peak, error = measure(fns[mode], args.warmup, args.repeats)
                if error:
                    row[f"{mode}_error"] = error
                else:
                    row.update({f"{mode}_ms": round(ms, 2),
                                f"{mode}_tokens_per_s": round(seqlen / ms * 1e3),
                                f"{mode}_peak_gib": round(peak, 2)})
            model.zero_grad(set_to_none=True)
            del fns
            gc.collect()
            torch.cuda.empty_cache()
            print(f"s{seqlen} {impl}: " + "  ".join(
                f"{mode} {row.get(f'{mode}_ms', row.get(f'{mode}_error'))} ms, peak "
                f"{row.get(f'{mode}_peak_gib', '-')} GiB" for mode in MODES)
                + f"  [{time.monotonic() - start:.0f} s]", flush=True)
    for row in rows:  # speed over SDPA's at the same length
        base = next((r for r in rows if r["seqlen"] == row["seqlen"] and r["impl"] == "sdpa"),
                    {})
        for mode in MODES:
            if row.get(f"{mode}_ms") and base.get(f"{mode}_ms"):
                row[f"{mode}_vs_sdpa"] = round(base[f"{mode}_ms"] / row[f"{mode}_ms"], 3)
    settings = dict(model=MODEL, parameters=params, dtype="bf16", warmup=args.warmup,
                    repeats=args.repeats, seqlens=args.seqlens, impls=args.impls)
    return env, settings, rows


def cell(row, key, fmt="{}"):
    if key in row:
        return fmt.format(row[key])
    mode = key.split("_")[0]
    return row.get(f"{mode}_error") or row.get("error") or "-"


def markdown(env, settings, rows) -> str:
    lines = ["# A 1B Llama in transformers: flashjit vs SDPA vs flash-attn 2", "",
             env_header(env) + f", transformers {env['transformers']}, flash-attn "
             f"{env['flash_attn'] or 'not installed'}", "",
             f"Random-weight Llama, {settings['parameters'] / 1e9:.2f}e9 parameters (hidden 2048, "
             "16 layers, 32 heads / 8 KV heads, head dim 64, intermediate 8192, vocab 32000, "
             "untied), "
             "bf16, batch 1. train: forward with the LM loss + backward (no optimizer); "
             "prefill: no_grad forward with a KV cache, last position's logits. Median of "
             f"{settings['repeats']} CUDA-event timings after {settings['warmup']} warm-up "
             "calls; peak: torch.cuda.max_memory_allocated of one call (weights and gradients "
             "included). x SDPA: SDPA's time over this one's.", "",
             "| seqlen | attn_implementation | train ms | train tokens/s | train x SDPA | "
             "train peak GiB | prefill ms | prefill tokens/s | prefill x SDPA | "
             "prefill peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r["seqlen"]), r["impl"]]
        for mode in MODES:
            cells += [cell(r, f"{mode}_ms", "{:.1f}"), cell(r, f"{mode}_tokens_per_s"),
                      cell(r, f"{mode}_vs_sdpa", "{:.2f}x"), cell(r, f"{mode}_peak_gib",
                                                                   "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", nargs="+", type=int, default=SEQLENS)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true",
                   help="seqlen 4096 only (unless --seqlens is given), 1 warm-up, 3 repeats")
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    args = p.parse_args()
    if args.quick:
        if args.seqlens == SEQLENS:
            args.seqlens = [4096]
        args.warmup, args.repeats = 1, 3
    if not torch.cuda.is_available():
        sys.exit("bench_transformers.py needs a CUDA GPU")
    env, settings, rows = run(args)
    out = results_dir(args.out)
    write_json(out / "transformers.json", dict(environment=env, settings=settings, rows=rows))
    (out / "transformers.md").write_text(markdown(env, settings, rows))
    print(f"wrote {out / 'transformers.md'}", flush=True)
    print(markdown(env, settings, rows), flush=True)


if __name__ == "__main__":
    main()
