"""flashjit as a Hugging Face transformers attention implementation, on the CPU
(flashjit/integrations/transformers.py).

flashjit's kernels need a GPU, so the two entry points the integration calls
(flashjit.interface.flash_attn_func / flash_attn_varlen_func) are replaced by float32 CPU
stand-ins with the same semantics (flashjit.testing.attention_reference per sequence), which first
run flashjit's own argument checks (flashjit._validate) where they need no GPU and record every
call. Everything else is real: transformers' models, caches, mask creation and generate(), and the
integration's masks, unpadding, packing, window/softcap/sink translation and refusals. Tiny
random-weight models (2 layers, hidden 64, 4 query heads, 2 key/value heads, head dim 16, float32)
are compared with attn_implementation="eager": logits, loss and every parameter gradient; padded
batches and packed rows against each sequence alone; greedy generation token by token.
Skipped where transformers is not installed.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed (optional: pip install "
                           "'flashjit[transformers]'); the integration tests need it")

from flashjit import _validate, interface  # noqa: E402
from flashjit.integrations import transformers as fjt  # noqa: E402
from flashjit.testing import attention_reference  # noqa: E402

VOCAB = 100
WINDOW = 8
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, initializer_range=0.2,
              attention_dropout=0.0)
# initializer_range 0.2 (not 0.02): scores of a few units, so that softmax is far from uniform
# and a wrong mask, window or softcap shows in the outputs.


def _configs():
    t = transformers
    configs = {
        "llama": lambda: t.LlamaConfig(**COMMON),
        "mistral": lambda: t.MistralConfig(**COMMON, sliding_window=WINDOW),
        "qwen2": lambda: t.Qwen2Config(**COMMON),
        "gemma2": lambda: t.Gemma2Config(**COMMON, sliding_window=WINDOW,
                                         attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
        "gemma3_bidirectional": lambda: t.Gemma3TextConfig(
            **COMMON, sliding_window=WINDOW, query_pre_attn_scalar=16,
            use_bidirectional_attention=True),
    }
    if hasattr(t, "GptOssConfig"):
        configs["gpt_oss"] = lambda: t.GptOssConfig(**COMMON, sliding_window=WINDOW,
                                                    num_local_experts=4, num_experts_per_tok=2)
    return configs


CONFIGS = _configs()
CAUSAL_KINDS = [k for k in CONFIGS if k != "gemma3_bidirectional"]


# ------------------------------------------------------------------------------------------------
# CPU stand-ins for flashjit's kernels
# ------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v, rank):
    """flashjit._validate.check_qkv without its CUDA/dtype requirement (the stand-ins run on the
    CPU in float32): one dtype, ranks, one head dim, GQA divisibility."""
    assert q.dim() == k.dim() == v.dim() == rank
    assert q.dtype == k.dtype == v.dtype
    assert q.shape[-1] == k.shape[-1] == v.shape[-1]
    assert k.shape == v.shape
    heads_dim = rank - 2
    assert q.shape[heads_dim] % k.shape[heads_dim] == 0
    if rank == 4:
        assert q.shape[0] == k.shape[0]


def _reference(q, k, v, scale, causal, window_size, softcap, sink):
    out, _ = attention_reference(q.float(), k.float(), v.float(), causal=causal,
                                 window_size=window_size, softcap=softcap, sink=sink,
                                 softmax_scale=scale)
    return out.to(q.dtype)


class Kernels:
    """Recording float32 stand-ins for flash_attn_func / flash_attn_varlen_func."""

    def __init__(self):
        self.calls = []

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
              window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
              return_attn_probs=False, *, sink=None):
        _check_qkv(q, k, v, 4)
        scale, softcap, _, _ = _validate.check_options(dropout_p, softmax_scale, softcap,
                                                       deterministic, return_attn_probs,
                                                       q.shape[-1])
        _validate.resolve_window(window_size, causal, q.shape[1], k.shape[1])
        _, sink = _validate.check_variant_tensors(alibi_slopes, sink, q.device, q.shape[0],
                                                  q.shape[2], "q")
        self.calls.append(dict(kind="dense", q=q, dropout_p=dropout_p, scale=scale,
                               causal=causal, window_size=tuple(window_size), softcap=softcap,
                               sink=sink, deterministic=deterministic))
        return _reference(q, k, v, scale, causal, window_size, softcap, sink)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
               block_table=None, *, sink=None):
        _check_qkv(q, k, v, 3)
        max_q = _validate.check_int("max_seqlen_q", max_seqlen_q)
        max_k = _validate.check_int("max_seqlen_k", max_seqlen_k)
        assert type(max_seqlen_q) is int and type(max_seqlen_k) is int  # not tensors
        _validate.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0], max_q,
                                   "max_seqlen_q")
        _validate.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0], max_k,
                                   "max_seqlen_k")
        assert cu_seqlens_q.numel() == cu_seqlens_k.numel()
        scale, softcap, _, _ = _validate.check_options(dropout_p, softmax_scale, softcap,
                                                       deterministic, return_attn_probs,
                                                       q.shape[-1])
        _validate.resolve_window(window_size, causal, max_q, max_k)
        _, sink = _validate.check_variant_tensors(alibi_slopes, sink, q.device,
                                                  cu_seqlens_q.numel() - 1, q.shape[1], "q")
        self.calls.append(dict(kind="varlen", q=q, dropout_p=dropout_p, scale=scale,
                               causal=causal, window_size=tuple(window_size), softcap=softcap,
                               sink=sink, cu_seqlens_q=cu_seqlens_q.tolist(),
                               cu_seqlens_k=cu_seqlens_k.tolist(), max_seqlen_q=max_q,
                               max_seqlen_k=max_k, deterministic=deterministic))
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        rows = []
        for b in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            rows.append(_reference(q[None, qs], k[None, ks], v[None, ks], scale, causal,
                                   window_size, softcap, sink)[0])
        rows.append(q.new_zeros((q.shape[0] - cu_q[-1],) + q.shape[1:]))  # past the sequences
        return torch.cat(rows)

    def kinds(self):
        return {c["kind"] for c in self.calls}


@pytest.fixture
def kernels(monkeypatch):
    """flashjit's entry points replaced by the float32 stand-ins (float32 then counts as a kernel
    dtype), and the integration registered."""
    stub = Kernels()
    monkeypatch.setattr(interface, "flash_attn_func", stub.dense)
    monkeypatch.setattr(interface, "flash_attn_varlen_func", stub.varlen)
    monkeypatch.setattr(fjt, "KERNEL_DTYPES", fjt.KERNEL_DTYPES + (torch.float32,))
    monkeypatch.setattr(fjt, "DEVICE_TYPES", ("cuda", "cpu"))
    fjt.register()
    return stub


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def _pair(kind, seed=0):
    """(eager model, flashjit model) with the same random weights, float32, eval mode."""
    torch.manual_seed(seed)
    eager = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](),
                                                          attn_implementation="eager")
    if kind == "gpt_oss":  # sinks of a few units, so that they matter
        for layer in eager.model.layers:
            layer.self_attn.sinks.data = torch.randn_like(layer.self_attn.sinks) * 2
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(fjt.NAME)
    assert ours.config._attn_implementation == fjt.NAME
    return eager.eval(), ours.eval()


def _ids(batch, seqlen, seed=1):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _close(a, b, what, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _forward_backward(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _compare_training(eager, ours, ids, **kwargs):
    logits_e, loss_e, grads_e = _forward_backward(eager, ids, **kwargs)
    logits_o, loss_o, grads_o = _forward_backward(ours, ids, **kwargs)
    _close(logits_o, logits_e, "logits")
    _close(loss_o, loss_e, "loss")
    assert grads_o.keys() == grads_e.keys()
    for name in grads_e:
        _close(grads_o[name], grads_e[name], f"grad of {name}", atol=5e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_import_flashjit_imports_no_transformers():
    code = ("import sys, flashjit; import flashjit.integrations; "
            "print('transformers' in sys.modules, "
            "'flashjit.integrations.transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_register_is_idempotent_and_names_the_implementation():
    assert fjt.register() == fjt.NAME == fjt.register()
    assert transformers.AttentionInterface._global_mapping[fjt.NAME] is fjt.attention_forward
    assert transformers.AttentionMaskInterface._global_mapping[fjt.NAME] is fjt.attention_mask
    assert fjt.NAME in transformers.AttentionInterface().valid_keys()


@pytest.mark.parametrize("name", ["flashjit", "FlashJIT", "my_flash"])
def test_register_refuses_names_transformers_takes_for_flash_attn(name):
    with pytest.raises(ValueError, match="contains 'flash'"):
        fjt.register(name)
    assert name not in transformers.AttentionInterface._global_mapping


@pytest.mark.parametrize("name,match", [("sdpa", "own attention"), ("eager", "own attention"),
                                        ("flex_attention", "own attention"),
                                        ("org/repo", "identifier"), ("", "identifier"),
                                        ("paged|x", "identifier")])
def test_register_refuses_names_that_would_replace_or_confuse_transformers(name, match):
    sdpa_before = transformers.AttentionInterface._global_mapping["sdpa"]
    with pytest.raises(ValueError, match=match):
        fjt.register(name)
    assert transformers.AttentionInterface._global_mapping["sdpa"] is sdpa_before


def test_name_with_flash_really_fails_in_transformers():
    """Why register() refuses such names: transformers tries to load a flash-attn package or Hub
    kernel for any attn_implementation containing 'flash' (checked on a throwaway name)."""
    name = "flash_fjit_probe"
    transformers.AttentionInterface.register(name, fjt.attention_forward)
    transformers.AttentionMaskInterface.register(name, fjt.attention_mask)
    try:
        with pytest.raises((ValueError, ImportError)):
            transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](),
                                                          attn_implementation=name)
    finally:
        transformers.AttentionInterface._global_mapping.pop(name, None)
        transformers.AttentionMaskInterface._global_mapping.pop(name, None)


def test_from_config_with_the_name(kernels):
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](),
                                                          attn_implementation=fjt.NAME)
    assert model.config._attn_implementation == fjt.NAME
    model(_ids(1, 8))
    assert kernels.kinds() == {"dense"}


# ------------------------------------------------------------------------------------------------
# The mask function
# ------------------------------------------------------------------------------------------------
def test_mask_function():
    full = torch.ones(2, 10, dtype=torch.bool)
    assert fjt.attention_mask(2, 10, 10, attention_mask=None) is None
    assert fjt.attention_mask(2, 10, 10, attention_mask=full) is None  # pads nothing
    left = full.clone()
    left[0, :3] = False  # left padding of sequence 0
    assert torch.equal(fjt.attention_mask(2, 10, 10, attention_mask=left), left)
    # a sliding-window cache holds the last 6 positions: the mask covers those, and the left
    # padding has slid out of them
    assert fjt.attention_mask(2, 1, 6, kv_offset=4, attention_mask=left) is None
    right = full.clone()
    right[1, -2:] = False
    assert torch.equal(fjt.attention_mask(2, 1, 6, kv_offset=4, attention_mask=right),
                       right[:, -6:])
    # a static cache: kv_length is the cache size, larger than the mask: the mask is kept whole
    assert torch.equal(fjt.attention_mask(2, 10, 32, attention_mask=full), full)
    # an integer mask comes back boolean
    assert fjt.attention_mask(2, 10, 10, attention_mask=left.long()).dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# Model equivalence with eager: forward, loss, gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_training_step_matches_eager(kernels, kind):
    eager, ours = _pair(kind)
    ids = _ids(2, 4 * WINDOW)  # 32 tokens: the window of 8 excludes keys
    _compare_training(eager, ours, ids)
    config = ours.config
    calls = kernels.calls
    assert calls and kernels.kinds() == {"dense"}
    assert all(c["q"].shape == (2, 4 * WINDOW, 4, 16) for c in calls)  # GQA: k has 2 heads
    assert all(c["scale"] == pytest.approx(ours.model.layers[0].self_attn.scaling)
               for c in calls)
    causal = kind != "gemma3_bidirectional"
    assert all(c["causal"] == causal for c in calls)
    windows = {c["window_size"] for c in calls}
    w = config.sliding_window if kind not in ("llama", "qwen2") else None
    if w is None:
        assert windows == {(-1, -1)}
    elif kind == "mistral":
        assert windows == {(w - 1, 0)}  # every layer
    elif causal:
        assert windows == {(w - 1, 0), (-1, -1)}  # sliding and full layers
    else:  # Gemma 3 bidirectional: |i - j| < w (its config stores w = window // 2 + 1)
        assert windows == {(w - 1, w - 1)}
    softcaps = {c["softcap"] for c in calls}
    assert softcaps == ({2.0} if kind == "gemma2" else {0.0})
    sinks = [c["sink"] for c in calls]
    if kind == "gpt_oss":
        assert all(s is not None and s.dtype == torch.float32 and s.requires_grad for s in sinks)
    else:
        assert all(s is None for s in sinks)


@pytest.mark.parametrize("delta", [-1, 1])
def test_other_window_conventions_differ_from_eager(kernels, monkeypatch, delta):
    """The sliding-window comparison is sensitive: w keys, (w - 1, 0), matches eager (above); a
    window one key narrower or wider does not."""
    monkeypatch.setattr(fjt, "_window",
                        lambda w, causal: (w - 1 + delta, 0) if w else (-1, -1))
    eager, ours = _pair("mistral")
    ids = _ids(1, 4 * WINDOW)
    with torch.no_grad():
        assert not torch.allclose(ours(ids).logits, eager(ids).logits, atol=1e-3)


def test_training_dropout_and_deterministic_are_passed(kernels):
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.25
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=fjt.NAME)
    model.train()
    model(_ids(1, 8))
    assert {c["dropout_p"] for c in kernels.calls} == {0.25}
    assert {c["deterministic"] for c in kernels.calls} == {False}
    kernels.calls.clear()
    model.eval()
    torch.use_deterministic_algorithms(True)
    try:
        model(_ids(1, 8))
    finally:
        torch.use_deterministic_algorithms(False)
    assert {c["dropout_p"] for c in kernels.calls} == {0.0}
    assert {c["deterministic"] for c in kernels.calls} == {True}


# ------------------------------------------------------------------------------------------------
# Padding
# ------------------------------------------------------------------------------------------------
def _padded_batch(lengths, total, side):
    ids = _ids(len(lengths), total, seed=3)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(kernels, kind, side):
    if kind not in CONFIGS:
        pytest.skip(f"transformers {transformers.__version__} has no {kind}")
    eager, ours = _pair(kind)
    lengths, total = [30, 17, 9], 30
    ids, mask = _padded_batch(lengths, total, side)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        eager_batched = eager(ids, attention_mask=mask).logits
    assert kernels.kinds() == {"varlen"}  # padding goes through the varlen kernel only
    for call in kernels.calls:
        assert call["cu_seqlens_q"] == [0, 30, 47, 56]
    for b in range(len(lengths)):
        real = mask[b].bool()
        with torch.no_grad():
            alone = eager(ids[b:b + 1, real]).logits[0]
        _close(batched[b, real], alone, f"sequence {b} padded vs alone")
        _close(batched[b, real], eager_batched[b, real], f"sequence {b} vs eager padded")


def test_padded_training_matches_eager(kernels):
    eager, ours = _pair("gemma2")
    ids, mask = _padded_batch([24, 13], 24, "right")
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (eager, ours):
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (le, loss_e, ge), (lo, loss_o, go) = results
    real = mask.bool()
    _close(lo[real], le[real], "logits")
    _close(loss_o, loss_e, "loss")
    for name in ge:
        _close(go[name], ge[name], f"grad of {name}", atol=5e-5, rtol=1e-3)


def test_all_ones_mask_uses_the_dense_kernel(kernels):
    eager, ours = _pair("llama")
    ids = _ids(2, 12)
    with torch.no_grad():
        ours(ids, attention_mask=torch.ones(2, 12, dtype=torch.long))
    assert kernels.kinds() == {"dense"}  # an all-ones mask pads nothing


# ------------------------------------------------------------------------------------------------
# Packed sequences
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_packed_rows_equal_separate_sequences(kernels, kind):
    eager, ours = _pair(kind)
    lengths = [12, 20, 7]  # the 20 exceeds the window of 8
    ids = _ids(1, sum(lengths), seed=5)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids, use_cache=False).logits[0]
    assert kernels.kinds() == {"varlen"}
    assert kernels.calls[0]["cu_seqlens_q"] == [0, 12, 32, 39]
    assert kernels.calls[0]["max_seqlen_q"] == 20
    start = 0
    for n in lengths:
        with torch.no_grad():
            alone = eager(ids[:, start:start + n], use_cache=False).logits[0]
        _close(packed[start:start + n], alone, f"packed sequence at {start}")
        start += n


def test_packed_batch_of_rows_and_training(kernels):
    """Two rows, each packing sequences (starts that are not 0 count too: a position that is not
    the previous + 1 starts a sequence, as in transformers' masks); eager's packed masks agree."""
    eager, ours = _pair("qwen2")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6],
                                 [5, 6, 7, 0, 1, 2, 3, 10, 11, 12, 13, 14]])
    ids = _ids(2, 12, seed=6)
    _compare_training(eager, ours, ids, position_ids=position_ids)
    assert kernels.calls[0]["cu_seqlens_q"] == [0, 5, 12, 15, 19, 24]


@pytest.mark.parametrize("case", ["cache", "all_ones_mask", "mask_and_cache"])
def test_no_packing_where_transformers_does_not_pack(kernels, case):
    """transformers packs rows only without attention_mask and without a cache: with either (a
    cache is eval's default, use_cache=True) reset position_ids are only positions, and flashjit
    must not split the rows either (review finding: it did, logits off by ~6)."""
    eager, ours = _pair("llama")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2)
    ids = _ids(2, 12, seed=8)
    kwargs = dict(position_ids=position_ids)
    if case != "all_ones_mask":
        kwargs["use_cache"] = True
    if case != "cache":
        kwargs["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        expected = eager(ids, **kwargs).logits
        got = ours(ids, **kwargs).logits
    _close(got, expected, case)
    assert kernels.kinds() == {"dense"}


def test_position_gaps_pack_as_transformers_does(kernels):
    """A gap (not only a reset) starts a sequence in transformers' masks without a cache: the same
    here, read from its mask function."""
    eager, ours = _pair("llama")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]])
    ids = _ids(1, 12, seed=9)
    with torch.no_grad():
        expected = eager(ids, position_ids=position_ids, use_cache=False).logits
        got = ours(ids, position_ids=position_ids, use_cache=False).logits
    _close(got, expected, "gap")
    assert kernels.calls[0]["cu_seqlens_q"] == [0, 6, 12]


def test_unpacked_position_ids_use_the_dense_kernel(kernels):
    _, ours = _pair("llama")
    with torch.no_grad():
        ours(_ids(2, 10), position_ids=torch.arange(3, 13)[None].expand(2, -1), use_cache=False)
    assert kernels.kinds() == {"dense"}


def test_precomputed_cu_seq_lens(kernels):
    """transformers' FlashAttentionKwargs (DataCollatorWithFlattening): used as given."""
    eager, ours = _pair("llama")
    lengths = [5, 9]
    ids = _ids(1, 14, seed=7)
    cu = torch.tensor([0, 5, 14], dtype=torch.int64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        out = ours(ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=9, max_length_k=9, use_cache=False).logits[0]
        alone = torch.cat([eager(ids[:, :5]).logits[0], eager(ids[:, 5:]).logits[0]])
    _close(out, alone, "cu_seq_lens")
    assert kernels.calls[0]["cu_seqlens_q"] == [0, 5, 14]


# ------------------------------------------------------------------------------------------------
# Generation with the KV cache
# ------------------------------------------------------------------------------------------------
def _generate(model, ids, mask=None, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None, **kwargs)  # no end of sequence: all 12 steps
    assert len(out.logits) == 12
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_greedy_generation_matches_eager(kernels, kind):
    eager, ours = _pair(kind)
    ids = _ids(1, 10, seed=8)  # 10 + 12 tokens: past the window of 8
    tokens_e, logits_e = _generate(eager, ids)
    tokens_o, logits_o = _generate(ours, ids)
    assert torch.equal(tokens_o, tokens_e)
    _close(logits_o, logits_e, "generation logits")
    decode = [c for c in kernels.calls if c["q"].shape[-3] == 1]
    assert decode and all(c["causal"] for c in decode)  # one query, bottom-right: every key


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_left_padded_generation_matches_eager(kernels, kind):
    eager, ours = _pair(kind)
    ids, mask = _padded_batch([11, 6], 11, "left")
    tokens_e, logits_e = _generate(eager, ids, mask)
    tokens_o, logits_o = _generate(ours, ids, mask)
    assert torch.equal(tokens_o, tokens_e)
    _close(logits_o, logits_e, "generation logits")
    assert "varlen" in kernels.kinds()


def test_static_cache_generation_matches_eager(kernels):
    """A static cache hands every layer max_cache_len keys, most of them empty slots: the mask
    is shorter than the keys and the slots past it are dropped."""
    eager, ours = _pair("llama")
    ids, mask = _padded_batch([9, 5], 9, "left")
    tokens_e, logits_e = _generate(eager, ids, mask, cache_implementation="static")
    tokens_o, logits_o = _generate(ours, ids, mask, cache_implementation="static")
    assert torch.equal(tokens_o, tokens_e)
    _close(logits_o, logits_e, "generation logits")


# ------------------------------------------------------------------------------------------------
# The attention function on its own: sinks, head dims, dtypes, refusals
# ------------------------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    is_causal = True


def _qkv(batch=2, heads=4, heads_k=2, seqlen=8, d=16, d_v=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(batch, heads, seqlen, d, generator=g).to(dtype)
    k = torch.randn(batch, heads_k, seqlen, d, generator=g).to(dtype)
    v = torch.randn(batch, heads_k, seqlen, d_v or d, generator=g).to(dtype)
    return q, k, v


def test_sink_gradient_comes_back_in_the_parameter_dtype(kernels):
    q, k, v = (t.requires_grad_() for t in _qkv())
    sinks = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
    out, weights = fjt.attention_forward(_Module(), q, k, v, None, scaling=0.3, s_aux=sinks)
    assert weights is None and out.shape == (2, 8, 4, 16)
    out.square().sum().backward()
    assert sinks.grad.dtype == torch.bfloat16
    sink32 = sinks.detach().float().requires_grad_()
    ref, _ = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 causal=True, sink=sink32, softmax_scale=0.3)
    ref.square().sum().backward()
    _close(out, ref, "out")
    _close(sinks.grad.float(), sink32.grad.to(torch.bfloat16).float(), "sink grad", atol=1e-2)


@pytest.mark.parametrize("d,d_v", [(12, 12), (16, 8), (8, 16)])
def test_head_dims_and_value_head_dims(kernels, d, d_v):
    """d not a multiple of 8 goes to flashjit as is (it pads); a value head dim unlike the
    query's is zero-padded to the larger and the output cropped; the scale stays q's."""
    q, k, v = _qkv(d=d, d_v=d_v)
    out, _ = fjt.attention_forward(_Module(), q, k, v, None)
    assert out.shape == (2, 8, 4, d_v)
    wide = max(d, d_v)
    pad = lambda t: torch.nn.functional.pad(t, (0, wide - t.shape[-1])).transpose(1, 2)  # noqa: E731
    ref, _ = attention_reference(pad(q), pad(k), pad(v), causal=True, softmax_scale=d ** -0.5)
    _close(out, ref[..., :d_v], "out")
    assert kernels.calls[-1]["scale"] == pytest.approx(d ** -0.5)


def test_float32_is_refused_with_a_hint(monkeypatch):
    monkeypatch.setattr(fjt, "DEVICE_TYPES", ("cuda", "cpu"))  # the dtype check, not the device's
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"float32.*attn_implementation=\"sdpa\""):
        fjt.attention_forward(_Module(), q, k, v, None)


def test_cpu_model_is_refused_first_with_a_hint():
    # the device is checked before the dtype: a CPU float32 model hears about the device, not
    # about a dtype change that would then fail on the device
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"CUDA.*cpu.*model.to\('cuda'\).*sdpa"):
        fjt.attention_forward(_Module(), q, k, v, None)


def test_float32_under_autocast_runs_in_the_autocast_dtype(monkeypatch):
    stub = Kernels()
    monkeypatch.setattr(interface, "flash_attn_func", stub.dense)
    monkeypatch.setattr(fjt, "DEVICE_TYPES", ("cuda", "cpu"))
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fjt.attention_forward(_Module(), q, k, v, None)
    assert out.dtype == torch.bfloat16 and stub.calls[0]["q"].dtype == torch.bfloat16


def test_head_dim_above_256_is_refused(kernels):
    q, k, v = _qkv(d=264)
    with pytest.raises(NotImplementedError, match="256.*sdpa"):
        fjt.attention_forward(_Module(), q, k, v, None)


def test_custom_4d_mask_is_refused(kernels):
    _, ours = _pair("llama")
    mask = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\).*sdpa"):
        ours(_ids(1, 8), attention_mask=mask)


def test_position_bias_is_refused(kernels):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="position_bias"):
        fjt.attention_forward(_Module(), q, k, v, None, position_bias=torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------
# Memo of the unpadding data and the packing decision
# ------------------------------------------------------------------------------------------------
def test_unpad_data_is_computed_once_per_mask(monkeypatch):
    calls = []
    nonzero = torch.nonzero

    def counting(*args, **kwargs):
        calls.append(1)
        return nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", counting)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    first = fjt._unpad_data(mask, 3)
    assert fjt._unpad_data(mask, 3) is first and len(calls) == 1
    assert fjt._unpad_data(mask, 1) is not first  # another query length
    mask[1, 0] = False  # changed in place: recomputed
    again = fjt._unpad_data(mask, 3)
    assert again is not first and again[2].tolist() == [0, 2, 4]
    with torch.inference_mode():  # no version counter: computed each time, no error
        frozen = torch.ones(2, 3, dtype=torch.bool)
        assert fjt._unpad_data(frozen, 3)[3].tolist() == [0, 3, 6]
        cu, longest = fjt._packed_sequences(torch.tensor([[0, 0, 1], [0, 0, 0]],
                                                         dtype=torch.int32))
        assert cu.tolist() == [0, 2, 3, 6] and longest == 3


def test_a_forward_pass_detects_packing_once(kernels, monkeypatch):
    computed = []
    original = fjt._TensorMemo.get

    def spy(self, t, extra, compute):
        return original(self, t, extra, lambda: computed.append(1) or compute())

    monkeypatch.setattr(fjt._TensorMemo, "get", spy)
    _, ours = _pair("llama")
    with torch.no_grad():
        ours(_ids(1, 10), position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]),
             use_cache=False)
    assert len(computed) == 1 and len(kernels.calls) == 2  # two layers, one packing decision
