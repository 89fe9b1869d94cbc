"""The first flashjit call of a fresh process, timed step by step (used by bench_jit.py).

    python benchmarks/first_call.py fwd|fwd_bwd

Prints one line `RESULT {json}`: import times, the spec lookup/load (a compile on a cold cache),
and the first forward (and backward) call.
"""

import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
import flashjit  # noqa: E402
from flashjit import ops  # noqa: E402
from flashjit.jit import load_spec  # noqa: E402

t2 = time.perf_counter()
q, k, v = (torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
torch.cuda.synchronize()
t3 = time.perf_counter()
spec = ops.attention_spec("fwd", q, causal=True, dropout=False)
load_spec(spec)
t4 = time.perf_counter()
out = flashjit.flash_attn_func(q, k, v, causal=True)
torch.cuda.synchronize()
t5 = time.perf_counter()
res = {"import_torch_s": t1 - t0, "import_flashjit_s": t2 - t1, "fwd_spec_load_s": t4 - t3,
       "fwd_call_s": t5 - t4, "first_fwd_s": t5 - t3, "fwd_spec": spec.name}
if len(sys.argv) > 1 and sys.argv[1] == "fwd_bwd":
    out.sum().backward()
    torch.cuda.synchronize()
    res["first_bwd_s"] = time.perf_counter() - t5
print("RESULT " + json.dumps(res))
