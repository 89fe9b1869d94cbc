"""flashjit as a Hugging Face transformers attention implementation, on the GPU, with its real
kernels (flashjit/integrations/transformers.py).

Tiny random-weight models built from configs (2 layers, hidden 256, 4 query heads and 2 key/value
heads of head dim 64, bf16): Llama (GQA), Qwen2, Mistral (sliding window), Gemma 2 (softcap and
sliding window), gpt-oss (sinks and sliding window) where transformers has it.

Criterion (the house one: errors within 2x PyTorch's own error in the same dtype): the reference
is the same model in float32 with attn_implementation="eager"; flashjit's bf16 model must be within
2x (+ a small epsilon) of the yardstick's error against it, the yardstick being the bf16 model with
"sdpa" where SDPA serves the variant (Llama, Qwen2, Mistral: causal, GQA, windows as masks) and
with "eager" in bf16 where it does not (Gemma 2: SDPA ignores softcap; gpt-oss: no SDPA). Compared:
logits (max abs error), loss, and every parameter gradient (max abs error over the largest
reference value, per parameter, the maximum over parameters).

Generation: greedy decoding in bf16 may legitimately pick another token where the reference's
top-2 logits are within the dtype's error, after which the sequences diverge; comparing tokens
with eager would be flaky for that reason alone. So the test checks what greedy decoding promises:
the logits flashjit's model computed step by step with its KV cache, against the float32 model run
on the same generated sequence without a cache, are within 2x the bf16 yardstick's error on that
sequence; hence every token it chose is a reference argmax up to that error.

Flashjit specs these tests need (bf16, head dim 64; on an H200 the sm90a wgmma family):
fwd/bwd x {causal, causal_window, causal_softcap, causal_window_softcap, causal_sink,
causal_window_sink}:
    python -m flashjit.prebuild --kernel fwd bwd --dtype bf16 --head-dim 64 --causal yes \
        --window both --softcap both
    python -m flashjit.prebuild --kernel fwd bwd --dtype bf16 --head-dim 64 --causal yes \
        --window both --sink yes
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed (optional: pip install "
                           "'flashjit[transformers]'); the integration tests need it")

from flashjit.integrations import transformers as fjt  # noqa: E402
from tests.reference import max_error  # noqa: E402
# flashjit's kernel names and the profiler helpers that look for them
from tests.gpu.test_sdpa_provider import (BWD_KERNELS, FWD_KERNELS, _kernel_names,  # noqa: E402
                                          _ran)

DTYPE = torch.bfloat16
VOCAB, WINDOW, SEQLEN = 512, 32, 128
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, initializer_range=0.1,
              attention_dropout=0.0, max_position_embeddings=1024)
# initializer_range 0.1: scores of a few units, softmax far from uniform (masks, windows, softcap
# and sinks change the result).


def _configs():
    t = transformers
    configs = {  # kind: (config factory, yardstick implementation in bf16)
        "llama": (lambda: t.LlamaConfig(**COMMON), "sdpa"),
        "qwen2": (lambda: t.Qwen2Config(**COMMON), "sdpa"),
        "mistral": (lambda: t.MistralConfig(**COMMON, sliding_window=WINDOW), "sdpa"),
        "gemma2": (lambda: t.Gemma2Config(**COMMON, sliding_window=WINDOW,
                                          attn_logit_softcapping=5.0, query_pre_attn_scalar=64),
                   "eager"),
    }
    if hasattr(t, "GptOssConfig"):
        configs["gpt_oss"] = (lambda: t.GptOssConfig(**COMMON, sliding_window=WINDOW,
                                                     num_local_experts=4, num_experts_per_tok=2),
                              "eager")
    return configs


CONFIGS = _configs()
KINDS = ["llama", "qwen2", "mistral", "gemma2",
         pytest.param("gpt_oss", marks=pytest.mark.skipif(
             "gpt_oss" not in CONFIGS,
             reason=f"transformers {transformers.__version__} has no gpt-oss"))]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fjt.register()


class Models:
    """One set of random weights as: ref (float32, eager), yard (bf16, the yardstick's
    implementation), ours (bf16, flashjit); all in eval mode on the GPU."""

    def __init__(self, kind: str, seed: int = 0):
        factory, self.yard_impl = CONFIGS[kind]
        torch.manual_seed(seed)
        ref = transformers.AutoModelForCausalLM.from_config(factory(),
                                                            attn_implementation="eager")
        if kind == "gpt_oss":  # sinks of a few units, so that they matter
            for layer in ref.model.layers:
                layer.self_attn.sinks.data = torch.randn_like(layer.self_attn.sinks) * 2
        self.ref = ref.cuda().eval()
        self.yard = copy.deepcopy(self.ref).to(DTYPE)
        self.yard.set_attn_implementation(self.yard_impl)
        self.ours = copy.deepcopy(self.ref).to(DTYPE)
        self.ours.set_attn_implementation(fjt.NAME)


_cache: dict = {}


def _models(kind) -> Models:
    if kind not in _cache:
        _cache.clear()  # one kind at a time on the GPU
        _cache[kind] = Models(kind)
    return _cache[kind]


def _ids(batch, seqlen, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g).cuda()


def _run(model, ids, **kwargs):
    """(logits float32, loss float32, {name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def _errors(run, ref) -> dict:
    logits, loss, grads = run
    logits_r, loss_r, grads_r = ref
    assert grads.keys() == grads_r.keys()
    grad = max(max_error(grads[n], grads_r[n]) / max(float(grads_r[n].abs().max()), 1e-12)
               for n in grads_r)
    return dict(logits=max_error(logits, logits_r), loss=max_error(loss, loss_r), grads=grad)


def _within(ours: dict, yard: dict, what: str, eps: float = 1e-3):
    """Every key checked (all failures reported together)."""
    failures = [f"flashjit's {key} error {ours[key]:.3g} > 2 x the yardstick's {yard[key]:.3g} "
                f"+ {eps}" for key in ours if not ours[key] <= 2 * yard[key] + eps]
    assert not failures, f"{what}: " + "; ".join(failures)


# ------------------------------------------------------------------------------------------------
# Forward, loss and gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_matches_reference(kind):
    m = _models(kind)
    # The loss is one number whose rounding errors may cancel by chance in one run (seen: the
    # bf16 yardstick's 0.0012 against flashjit's 0.0045 on Gemma 2, whose logits passed): its
    # error is the root mean square over a few batches, for flashjit and the yardstick alike.
    # Logits and gradients (maxima over many elements) come from the first batch.
    per_batch = []
    for seed in range(1, 5):
        ids = _ids(2, SEQLEN, seed=seed)  # 128 tokens: the window of 32 excludes keys
        ref = _run(m.ref, ids)
        per_batch.append((_errors(_run(m.ours, ids), ref), _errors(_run(m.yard, ids), ref)))
    errors, yard = dict(per_batch[0][0]), dict(per_batch[0][1])
    for i, e in enumerate((errors, yard)):
        e["loss"] = math.sqrt(sum(b[i]["loss"] ** 2 for b in per_batch) / len(per_batch))
    _within(errors, yard, f"{kind} vs float32 eager ({m.yard_impl} bf16 as yardstick)")


# ------------------------------------------------------------------------------------------------
# Padding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_padded_batch_equals_each_sequence_alone(kind):
    """A right-padded batch (lengths 128, 77, 40) through the varlen kernel: each sequence's
    logits against the float32 model on that sequence alone, within 2x the yardstick's error
    on the same padded batch."""
    m = _models(kind)
    lengths = [SEQLEN, 77, 40]
    ids = _ids(len(lengths), SEQLEN, seed=2)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    with torch.no_grad():
        ours = m.ours(ids, attention_mask=mask).logits.float()
        yard = m.yard(ids, attention_mask=mask).logits.float()
        errors, yard_errors = {}, {}
        for b, n in enumerate(lengths):
            alone = m.ref(ids[b:b + 1, :n]).logits[0].float()
            errors[f"sequence {b}"] = max_error(ours[b, :n], alone)
            yard_errors[f"sequence {b}"] = max_error(yard[b, :n], alone)
    _within(errors, yard_errors, f"{kind} padded")


def test_packed_sequences_equal_each_sequence_alone():
    m = _models("mistral")
    lengths = [70, 40, 18]
    ids = _ids(1, sum(lengths), seed=3)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    with torch.no_grad():
        ours = m.ours(ids, position_ids=position_ids, use_cache=False).logits[0].float()
        errors, yard_errors, start = {}, {}, 0
        for n in lengths:
            piece = ids[:, start:start + n]
            alone = m.ref(piece).logits[0].float()
            errors[f"at {start}"] = max_error(ours[start:start + n], alone)
            yard_errors[f"at {start}"] = max_error(m.yard(piece).logits[0].float(), alone)
            start += n
    _within(errors, yard_errors, "mistral packed")


# ------------------------------------------------------------------------------------------------
# Generation with the KV cache
# ------------------------------------------------------------------------------------------------
def _check_generation(m: Models, ids, mask=None, new_tokens=16):
    out = m.ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                          eos_token_id=None)  # no end of sequence: every step is a greedy pick
    seq = out.sequences
    steps = torch.stack(out.logits, 1).float()  # (batch, new_tokens, vocab), with the cache
    assert steps.shape[1] == new_tokens
    full_mask = None if mask is None else torch.cat(
        (mask, torch.ones_like(seq[:, ids.shape[1]:])), 1)
    at = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # positions whose logits chose the tokens
    with torch.no_grad():
        ref = m.ref(seq, attention_mask=full_mask).logits[:, at].float()
        yard = m.yard(seq, attention_mask=full_mask).logits[:, at].float()
    err, err_yard = max_error(steps, ref), max_error(yard, ref)
    assert err <= 2 * err_yard + 1e-3, \
        f"cached decoding logits error {err:.3g} > 2 x the yardstick's {err_yard:.3g}"
    chosen = ref.gather(-1, seq[:, ids.shape[1]:, None])[..., 0]
    assert bool((ref.amax(-1) - chosen <= 2 * err + 1e-3).all()), \
        "a greedy token is not a reference argmax within the logits' error"


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation(kind):
    _check_generation(_models(kind), _ids(1, 24, seed=4))  # 24 + 16 tokens: past the window


def test_left_padded_greedy_generation():
    ids = _ids(2, 24, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    _check_generation(_models("llama"), ids, mask)


# ------------------------------------------------------------------------------------------------
# flashjit's kernels ran
# ------------------------------------------------------------------------------------------------
def test_flashjit_kernels_run():
    m = _models("llama")
    ids = _ids(2, SEQLEN)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    for kwargs in ({}, {"attention_mask": mask}):  # dense and varlen
        names = _kernel_names(lambda: m.ours(ids, labels=ids, use_cache=False,
                                             **kwargs).loss.backward())
        assert _ran(names, FWD_KERNELS), names
        assert _ran(names, BWD_KERNELS), names
    m.ours.zero_grad(set_to_none=True)


def test_float32_model_is_refused():
    m = _models("llama")
    model = copy.deepcopy(m.ref)
    model.set_attn_implementation(fjt.NAME)
    with pytest.raises(TypeError, match="sdpa"):
        model(_ids(1, 16))
