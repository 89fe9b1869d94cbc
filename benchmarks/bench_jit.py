"""Build-at-first-use costs: cold compile per spec, cache hit in a fresh process, import time,
parallel prebuild, wheel size.

    python benchmarks/bench_jit.py [--out DIR]

The typical training-run specs: forward + backward, bf16, d 128, causal. Every measurement runs in
a fresh Python process with its own empty cache folder (FLASHJIT_CACHE_DIR), so nothing is warm.
Writes jit.json and jit.md under benchmarks/results/<gpu>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import env_header, environment, results_dir, write_json  # noqa: E402

CHILD = Path(__file__).resolve().parent / "first_call.py"


def child(mode: str, cache: str) -> dict:
    env = dict(os.environ, FLASHJIT_CACHE_DIR=cache,
               PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(CHILD), mode], env=env, capture_output=True,
                          text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stdout}\n{proc.stderr}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = wall
    sys.stderr.write(proc.stderr[-2000:])
    return res


def import_only(extra: str) -> float:
    code = f"import time; t=time.perf_counter(); import torch{extra}; print(time.perf_counter()-t)"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    times = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, check=True).stdout) for _ in range(5)]
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="no GPU: rewrite jit.md from a saved jit.json")
    args = p.parse_args()
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        (Path(args.replot).parent / "jit.md").write_text(markdown(res))
        return
    env = environment()
    res: dict = {"environment": env}
    # Python's own bytecode cache: a pip-installed torch has its .pyc files; where the site
    # packages are read-only and have none (seen on the device image), every process would
    # compile torch's Python source again. One unmeasured run fills a writable cache first.
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "pycache"))
    with tempfile.TemporaryDirectory() as cache:
        child("fwd_bwd", cache)
    with tempfile.TemporaryDirectory() as cache:
        res["cold_fwd"] = child("fwd", cache)  # compiles the forward spec
        res["warm_fwd"] = child("fwd", cache)  # cache hit in a fresh process
    with tempfile.TemporaryDirectory() as cache:
        try:
            res["cold_fwd_bwd"] = child("fwd_bwd", cache)
            res["warm_fwd_bwd"] = child("fwd_bwd", cache)
        except RuntimeError as e:  # recorded, not hidden: the table says the backward failed
            res["cold_fwd_bwd"] = res["warm_fwd_bwd"] = {"error": str(e)[-1500:], "first_fwd_s": 0}
    res["import_torch_s"] = import_only("")
    res["import_torch_flashjit_s"] = import_only("; import flashjit")
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "flashjit.prebuild", "--kernel", "fwd", "bwd", "--dtype",
               "bf16", "fp16", "--head-dim", "64", "128", "--causal", "both", "--jobs",
               str(args.jobs)]
        envp = dict(os.environ, FLASHJIT_CACHE_DIR=cache,
                    PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=envp, capture_output=True, text=True)
        res["prebuild"] = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0,
                           "returncode": proc.returncode, "specs": 16,
                           "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    with tempfile.TemporaryDirectory() as wheel_dir:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "-q", "-w", wheel_dir, str(ROOT)],
                              capture_output=True, text=True)
        wheels = list(Path(wheel_dir).glob("*.whl"))
        res["wheel"] = ({"name": wheels[0].name, "bytes": wheels[0].stat().st_size}
                        if wheels else {"error": proc.stderr[-1000:]})
    out_dir = results_dir(args.out)
    write_json(out_dir / "jit.json", res)
    md = markdown(res)
    (out_dir / "jit.md").write_text(md)
    print(md)


def markdown(res: dict) -> str:
    cf, wf, cb, wb = res["cold_fwd"], res["warm_fwd"], res["cold_fwd_bwd"], res["warm_fwd_bwd"]
    imports = [r["import_flashjit_s"] for r in (cf, wf, cb, wb) if "import_flashjit_s" in r]
    return "\n".join([
        f"# JIT costs ({env_header(res['environment'])})", "",
        "Each row from fresh processes with their own cache folder (bench_jit.py).", "",
        "| what | seconds |", "|---|---|",
        f"| first forward call, cold cache (compiles {cf.get('fwd_spec', 'the bf16 d 128 causal forward')})"
        f" | {cf['first_fwd_s']:.2f} |",
        f"| of which the spec's compile and load | {cf['fwd_spec_load_s']:.2f} |",
        f"| first forward + backward, cold cache (compiles the fwd and bwd specs) | "
        f"{cb['first_fwd_s'] + cb.get('first_bwd_s', 0):.2f} |",
        f"| first forward call, cache hit in a fresh process | {wf['first_fwd_s']:.3f} |",
        f"| first forward + backward, cache hit in a fresh process | "
        f"{wb['first_fwd_s'] + wb.get('first_bwd_s', 0):.3f} |",
        f"| `import flashjit` after `import torch`, in one process (median of {len(imports)}) | "
        f"{statistics.median(imports):.3f} |",
        f"| `import torch` alone, separate processes (median of 5) | {res['import_torch_s']:.3f} |",
        f"| `import torch; import flashjit`, separate processes (median of 5) | "
        f"{res['import_torch_flashjit_s']:.3f} |",
        f"| prebuild of 16 specs (`{res['prebuild']['command']}`) | {res['prebuild']['seconds']:.1f} |",
        "", f"Wheel: {res['wheel']}", ""])


if __name__ == "__main__":
    main()
