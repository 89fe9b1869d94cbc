"""A/B of two flashjit trees on the same GPU, in one run: bit-identical outputs and per-kernel times.

    python benchmarks/ab_trees.py --baseline .baseline --out /tmp/out/results

The baseline is a whole older checkout (its flashjit/ and csrc/ side by side, e.g. from
``git archive <commit> flashjit csrc | tar -x -C .baseline``); the other side is this tree. Each
side runs in its own processes (PYTHONPATH = that tree, its own binary cache), once with the
default kernel families and once with FLASHJIT_KERNEL_FAMILY=sm80, through the public API only
(flash_attn_func / flash_attn_varlen_func, which both trees share):

1. outputs: out, lse, dq, dk, dv of fixed inputs (seeded; dropout drawn under torch.manual_seed),
   for plain, causal, dropout, deterministic, GQA, seqlen_q != seqlen_k and varlen calls at head
   dims 64, 128 (both families on Hopper) and 96, 256 (sm80 family), compared bit for bit (dQ of
   the default, atomic path within rounding: its fp32 atomics add in a run-dependent order);
2. per-kernel GPU times (torch.profiler, median of repeats) of forward + backward at 16k tokens,
   bf16, d 64 and 128, causal and not, matched by kernel role (forward, preprocess, dK/dV,
   postprocess, dQ) and reported as new / baseline.

Writes ab_trees.md and ab_trees.json under --out/<gpu>/. Exit status 1 if any output differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# Child: run in a tree, write a .pt of outputs and a JSON of kernel times
# ------------------------------------------------------------------------------------------------
OUTPUT_CASES = [
    # name, dtype, d, (b, sq, sk, h, hk), causal, dropout_p, deterministic, varlen
    ("plain", "bf16", 64, (2, 1000, 1000, 4, 4), False, 0.0, False, False),
    ("causal", "bf16", 64, (2, 1000, 1000, 4, 4), True, 0.0, False, False),
    ("plain", "bf16", 128, (2, 1000, 1000, 4, 4), False, 0.0, False, False),
    ("causal", "fp16", 128, (2, 1000, 1000, 4, 4), True, 0.0, False, False),
    ("causal_sq_lt_sk_gqa", "bf16", 128, (2, 300, 1000, 8, 2), True, 0.0, False, False),
    ("sq_gt_sk", "bf16", 64, (1, 700, 260, 4, 4), True, 0.0, False, False),
    ("dropout", "bf16", 128, (2, 600, 600, 4, 4), False, 0.1, False, False),
    ("dropout_causal", "fp16", 64, (2, 600, 600, 4, 4), True, 0.1, False, False),
    ("deterministic", "bf16", 128, (2, 1000, 1000, 4, 4), True, 0.0, True, False),
    ("deterministic", "bf16", 64, (2, 1000, 1000, 4, 4), False, 0.0, True, False),
    ("varlen_causal", "bf16", 128, (3, 0, 0, 4, 2), True, 0.0, False, True),
    ("plain", "fp16", 96, (2, 700, 700, 4, 4), False, 0.0, False, False),
    ("causal", "bf16", 256, (2, 500, 500, 2, 2), True, 0.0, False, False),
    ("deterministic", "bf16", 96, (2, 500, 700, 2, 2), True, 0.0, True, False),
]

TIMING_CASES = [(64, False), (64, True), (128, False), (128, True)]  # (d, causal), bf16, 16k tokens

CHILD = r"""
import json, statistics, sys
import torch
from torch.profiler import ProfilerActivity, profile
import flashjit

cases, timing, out_pt, out_json = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
dt = {"bf16": torch.bfloat16, "fp16": torch.float16}
results = {}
for name, dtype, d, (b, sq, sk, h, hk), causal, p, det, varlen in cases:
    key = f"{name}_{dtype}_d{d}"
    gen = torch.Generator(device="cuda").manual_seed(1234 + d)
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt[dtype], generator=gen).requires_grad_()
    torch.manual_seed(99)
    if varlen:
        lens_q, lens_k = [300, 1, 517][:b], [300, 900, 64][:b]
        cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32, device="cuda")
        q, k, v = rnd(sum(lens_q), h, d), rnd(sum(lens_k), hk, d), rnd(sum(lens_k), hk, d)
        out, lse, _ = flashjit.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q),
                                                       max(lens_k), dropout_p=p, causal=causal,
                                                       deterministic=det, return_attn_probs=True)
    else:
        q, k, v = rnd(b, sq, h, d), rnd(b, sk, hk, d), rnd(b, sk, hk, d)
        out, lse, _ = flashjit.flash_attn_func(q, k, v, dropout_p=p, causal=causal,
                                               deterministic=det, return_attn_probs=True)
    dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for n, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        results[f"{key}.{n}"] = t.detach().cpu()
torch.save(results, out_pt)

def role(name):
    for pat, r in (("preprocess", "preprocess"), ("postprocess", "postprocess"),
                   ("dk_dv", "dk_dv"), ("bwd_dq", "dq"), ("fwd", "forward"), ("zero_rows", "tail")):
        if pat in name:
            return r
    return "torch ops"

times = {}
for d, causal in timing:
    seqlen = 4096
    b, h = 16384 // seqlen, 2048 // d
    q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    def step():
        out = flashjit.flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    reps = []
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        per = {}
        for e in prof.key_averages():
            if e.device_time_total > 0:
                r = role(e.key)
                per[r] = per.get(r, 0.0) + e.device_time_total / 10
        reps.append(per)
    roles = sorted(set().union(*reps))
    times[f"d{d}_causal{int(causal)}"] = {r: statistics.median(x.get(r, 0.0) for x in reps) for r in roles}
json.dump(times, open(out_json, "w"), indent=1)
print("child done", flush=True)
"""


def run_side(tree: Path, cache: Path, family: str | None, tmp: Path, tag: str):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["FLASHJIT_CACHE_DIR"] = str(cache)
    env.pop("FLASHJIT_CSRC_DIR", None)
    if family:
        env["FLASHJIT_KERNEL_FAMILY"] = family
    else:
        env.pop("FLASHJIT_KERNEL_FAMILY", None)
    pt, js = tmp / f"{tag}.pt", tmp / f"{tag}.json"
    timing = TIMING_CASES if family is None else []
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(OUTPUT_CASES), json.dumps(timing),
                           str(pt), str(js)], env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return pt, json.loads(js.read_text())


def prebuild(tree: Path, cache: Path, family: str | None):
    """Builds the specs the cases need into `cache` with the tree's own prebuild, in parallel."""
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if family:
        env["FLASHJIT_KERNEL_FAMILY"] = family
    base = [sys.executable, "-m", "flashjit.prebuild", "--kernel", "fwd", "bwd", "--causal", "both",
            "--jobs", "16"]
    subprocess.run(base + ["--dtype", "bf16", "fp16", "--head-dim", "64", "128", "--dropout", "both"],
                   env=env, capture_output=True)
    if family is None:
        subprocess.run(base + ["--dtype", "bf16", "fp16", "--head-dim", "96", "256", "--dropout", "no"],
                       env=env, capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="folder holding the baseline's flashjit/ and csrc/")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from common import environment, env_header, results_dir, write_json

    baseline = (ROOT / args.baseline).resolve()
    main_cache = Path(os.environ.get("FLASHJIT_CACHE_DIR", "/tmp/flashjit-cache"))
    sides = {"baseline": (baseline, Path("/tmp/flashjit-cache-baseline")), "new": (ROOT, main_cache)}
    diffs, expected, atomic, times, lines = [], [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        outputs = {}
        for family in (None, "sm80"):
            for side, (tree, cache) in sides.items():
                prebuild(tree, cache, family)
                tag = f"{side}_{family or 'default'}"
                pt, t = run_side(tree, cache, family, tmp, tag)
                outputs[(side, family)] = torch.load(pt)
                if t:
                    times[side] = t
                print(f"{tag}: done", flush=True)
            a, b = outputs[("baseline", family)], outputs[("new", family)]
            for key in sorted(a):
                x, y = a[key], b.get(key)
                same = y is not None and x.shape == y.shape and torch.equal(x.view(torch.uint8) if x.dtype != torch.float32 else x.view(torch.int32), y.view(torch.uint8) if y.dtype != torch.float32 else y.view(torch.int32))
                if not same:
                    err = (x.float() - y.float()).abs().max().item() if y is not None and x.shape == y.shape else float("nan")
                    # The deterministic dQ of the sm90 family (d 64, 128 on Hopper) is a new wgmma
                    # kernel (it used to borrow the sm80 one): a different summation order.
                    new_kernel = (family is None and key.startswith("deterministic")
                                  and key.split(".")[0].endswith(("_d64", "_d128")) and key.endswith(".dq"))
                    # Outside deterministic mode dQ is summed with fp32 atomics, in an order that
                    # varies from run to run: it is compared within rounding, not bit for bit.
                    atomic_dq = key.endswith(".dq") and not key.startswith("deterministic")
                    close = y is not None and x.shape == y.shape and torch.allclose(
                        x.float(), y.float(), rtol=1e-2, atol=1e-3 * x.float().abs().max().item())
                    label = f"{family or 'default'} {key}: max |diff| {err:.3g}"
                    if atomic_dq and close:
                        atomic.append(label)
                    else:
                        (expected if new_kernel else diffs).append(label)
            lines.append(f"- families {family or 'default'}: {len(a)} tensors compared, "
                         f"{sum(1 for d in diffs if d.startswith(family or 'default'))} differ "
                         "unexpectedly")
    env = environment()
    md = [env_header(env), "", "# Restructure A/B: baseline tree vs this tree, same GPU, same run", "",
          f"Baseline: {args.baseline}", "", "## Outputs (bit for bit)", ""] + lines
    md += [""] + [f"  - {d}" for d in diffs]
    if atomic:
        md += ["", "dQ of the atomic (default) path, equal within rounding (fp32 atomics add in an "
               "order that varies run to run, so it is never bitwise reproducible, not even "
               "between two runs of one tree):", ""]
        md += [f"  - {d}" for d in atomic]
    if expected:
        md += ["", "Expected differences (a new kernel: the sm90 family's deterministic dQ, formerly "
               "the sm80 kernel; checked against the float32 reference by the GPU tests):", ""]
        md += [f"  - {d}" for d in expected]
    md += ["", "## Per-kernel GPU time, us per forward + backward (bf16, 16k tokens, hidden 2048)", "",
           "| config | kernel | baseline | new | new / baseline |", "|---|---|---|---|---|"]
    for cfg in times.get("baseline", {}):
        tb, tn = times["baseline"][cfg], times["new"].get(cfg, {})
        for r in sorted(set(tb) | set(tn)):
            b_, n_ = tb.get(r, 0.0), tn.get(r, 0.0)
            ratio = f"{n_ / b_:.3f}" if b_ > 0 else "-"
            md.append(f"| {cfg} | {r} | {b_:.1f} | {n_:.1f} | {ratio} |")
    out_dir = results_dir(args.out)
    (out_dir / "ab_trees.md").write_text("\n".join(md) + "\n")
    write_json(out_dir / "ab_trees.json", {"env": env, "diffs": diffs, "expected": expected, "atomic": atomic,
                                           "times": times})
    print("\n".join(md))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
