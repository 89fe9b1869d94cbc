"""Dropout gradient errors over many mask draws: how often, and where, flashjit's error exceeds
2x PyTorch's own (the GPU tests' criterion), for the code in this tree.

For each shape and seed it runs flash_attn_func with dropout (the mask predicted by
flashjit.testing.next_dropout_mask), a float32 reference and PyTorch in the input dtype with that
mask (tests/reference.py), and prints per tensor (out, dq, dk, dv) the ratio of flashjit's max
error to PyTorch's, plus, for the worst dq, the row, how many keys that row sees and keeps, and
whether the same row is the worst for PyTorch. Run it on two trees (e.g. main and a branch that
changes the mask) to tell a criterion that fails on some draws anyway from a regression.

    python3 benchmarks/dropout_errors.py [--seeds 12] [--p 0.17] [--tree .baseline]
                                         [--shapes 190,190,1 ...] [--sdpa]

--tree: import flashjit from another checkout (its flashjit/ and csrc/, as ab_trees.py's
baseline) instead of this one; give it its own FLASHJIT_CACHE_DIR. --shapes: seqlen_q,seqlen_k,
causal triples (default SHAPES). --sdpa: call through F.scaled_dot_product_attention with flashjit
as torch's flash provider, (batch, heads, seq, d) inputs and top-left causal, as
tests/gpu/test_sdpa_provider.py does (square shapes only).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--tree" in sys.argv:  # before flashjit is imported: that tree's package (tests/ stay ours)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))
import flashjit  # noqa: E402
from flashjit import _philox, testing  # noqa: E402

if not hasattr(_philox, "keep_probability"):  # a tree from before the byte threshold (philox16):
    _philox.keep_probability = lambda p: 1.0 - p  # its kernels scale kept weights by 1 / (1 - p)
from tests.reference import attention_ref, leaf, max_error, visible_mask  # noqa: E402

SHAPES = [(190, 190, True), (256, 100, True), (190, 250, True), (190, 250, False), (130, 130, True)]


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def sdpa(q, k, v, p, causal):
    """F.scaled_dot_product_attention on (batch, seq, heads, d) views of (batch, heads, seq, d)
    leaves, flash backend (flashjit, once activated)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), dropout_p=p, is_causal=causal)
    return out.transpose(1, 2)


def one(sq, sk, causal, dtype, seed, p, deterministic, use_sdpa=False):
    b, h, d = 2, 3, 64
    torch.manual_seed(seed)
    if use_sdpa:  # leaves (b, h, s, d) as the SDPA test, seen as (b, s, h, d)
        q, k, v = (leaf(b, h, n, d, dtype=dtype).transpose(1, 2) for n in (sq, sk, sk))
    else:
        q, k, v = leaf(b, sq, h, d, dtype=dtype), leaf(b, sk, h, d, dtype=dtype), \
            leaf(b, sk, h, d, dtype=dtype)
    mask = testing.next_dropout_mask(b, h, sq, sk, p, device=q.device)
    if use_sdpa:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = sdpa(q, k, v, p, causal)
    else:
        out = flashjit.flash_attn_func(q, k, v, dropout_p=p, causal=causal,
                                       deterministic=deterministic)
    dout = torch.randn_like(out)
    got = (out,) + grads(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(q32, k32, v32, causal, None, True, None, mask, p)
    ref = (ref,) + grads(ref, (q32, k32, v32), dout.float())
    pt, _ = attention_ref(q, k, v, causal, None, True, None, mask, p)
    pt = (pt,) + grads(pt, (q, k, v), dout)
    errors = [(max_error(x, r), max_error(y, r)) for x, r, y in zip(got, ref, pt)]
    ratios = [err / max(err_pt, 1e-12) for err, err_pt in errors]
    over = [err > 2 * err_pt + 1e-4 for err, err_pt in errors]  # the tests' criterion
    # the worst dq element: its row, the keys the row sees and keeps
    diff = (got[1].double() - ref[1].double()).abs()  # (b, sq, h, d)
    bi, i, hi, _ = [int(x) for x in torch.unravel_index(diff.argmax(), diff.shape)]
    seen = visible_mask(sq, sk, causal, True, None, q.device)[0, 0, i] if causal else \
        torch.ones(sk, dtype=torch.bool, device=q.device)
    kept = int((mask[bi, hi, i] & seen).sum())
    diff_pt = (pt[1].double() - ref[1].double()).abs()
    i_pt = int(torch.unravel_index(diff_pt.argmax(), diff_pt.shape)[1])
    return ratios, over, (i, int(seen.sum()), kept, i_pt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--p", type=float, default=0.17)
    ap.add_argument("--tree", default=None, help="a checkout whose flashjit to test")
    ap.add_argument("--shapes", nargs="+", default=None, help="seqlen_q,seqlen_k,causal ...")
    ap.add_argument("--sdpa", action="store_true", help="through SDPA's flash provider")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [
        tuple(int(x) for x in s.split(",")[:2]) + (s.split(",")[2] == "1",) for s in args.shapes]
    if args.sdpa:
        from torch.nn.attention import activate_flash_attention_impl

        if any(sq != sk for sq, sk, _ in shapes):
            raise SystemExit("--sdpa: square shapes only (SDPA's causal is top-left)")
        activate_flash_attention_impl("flashjit")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, p {args.p}, "
          f"{'through SDPA, ' if args.sdpa else ''}flashjit "
          f"from {os.path.dirname(os.path.dirname(os.path.abspath(flashjit.__file__)))}")
    for sq, sk, causal in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for deterministic in (False,) if args.sdpa else (False, True):
                fails, worst = 0, 0.0
                for seed in range(args.seeds):
                    ratios, over, (i, seen, kept, i_pt) = one(sq, sk, causal, dtype, seed,
                                                              args.p, deterministic, args.sdpa)
                    fails += any(over)
                    worst = max(worst, ratios[1])
                    if any(over):
                        print(f"  ({sq}, {sk}) causal={int(causal)} {str(dtype)[6:]} det="
                              f"{int(deterministic)} seed {seed}: out/dq/dk/dv ratios "
                              + " ".join(f"{r:.2f}" for r in ratios)
                              + f"; worst dq row {i} sees {seen} keys, keeps {kept}; "
                              f"PyTorch's worst row {i_pt}")
                print(f"({sq}, {sk}) causal={int(causal)} {str(dtype)[6:]} det={int(deterministic)}"
                      f": {fails}/{args.seeds} draws fail the criterion (2x + 1e-4), worst dq "
                      f"ratio {worst:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
