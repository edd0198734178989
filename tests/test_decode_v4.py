"""V4 caches and cached decoding (reference/decode_v4.py) against the full JAX forward (model_v4).

tiny-v4 with tests/test_numpy_v4.py's adversarial weights (seed 0), tokens [2, 42]: the window
(6) wraps 7 times, 10 CSA (rate 4) and 5 HCA (rate 8) blocks complete. Chunks of 7 start at
block offsets 0, 3, 2 (CSA) and 0, 7, 6 (HCA) and are longer than the window, then single tokens;
every position's logits within 1e-5 relative (float32) of one full forward, the same experts in
the same order in every MoE layer, the same indexer entries on every CSA row. Greedy decoding
equals the full forward's argmax and transformers' generate. Only two chunk shapes (7 and 1),
shared with the greedy tests: each step compile costs ~10 s on XLA:CPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsref.reference import decode_v4 as dv
from dsref.reference import model_v4 as mv4
from dsref.reference.config_v4 import CSA, SLIDING
from dsref.reference.presets import get_preset

TOL = 1e-5
T = 42
CHUNK = 7
FAST = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


@pytest.fixture(scope="module")
def case():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.test_numpy_v4 import build_hf

    cfg = get_preset("tiny-v4")
    model = build_hf(cfg, 0)
    w = {k: v.detach().numpy().astype(np.float64) if v.dtype.is_floating_point else v.numpy()
         for k, v in model.state_dict().items()}
    jw = mv4.cast_weights(w, cfg, jnp.float32)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T))
    full, jcap = mv4.jit_forward_v4(jw, cfg, tokens, capture=True, compiler_options=FAST)
    return dict(cfg=cfg, jw=jw, tokens=tokens, full=np.asarray(full), jcap={k: np.asarray(v) for k, v in jcap.items()},
                model=model)


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def chunked(case):
    """Logits and captures of a chunked prefill (3 x 7) then 21 single-token steps."""
    cfg, jw, tokens = case["cfg"], case["jw"], case["tokens"]
    cache = dv.init_cache_v4(cfg, 2, T)
    sizes = [CHUNK] * 3 + [1] * (T - 3 * CHUNK)
    logits, caps, p = [], [], 0
    for s in sizes:
        cap = {}
        lg, cache = dv.step_v4(jw, cfg, tokens[:, p:p + s], np.broadcast_to(np.arange(p, p + s), (2, s)), cache,
                               capture=cap, compiler_options=FAST)
        logits.append(np.asarray(lg))
        caps.append({k: np.asarray(v) for k, v in cap.items()})
        p += s
    cap = {k: np.concatenate([c[k] for c in caps], axis=1) for k in caps[0]}
    return np.concatenate(logits, axis=1), cap, cache


def test_chunked_prefill_and_decode_equal_full_forward(case, chunked):
    ours, cap, cache = chunked
    full = case["full"]
    err = rel(ours, full)
    assert err <= TOL, f"logits {err:.2e} from the full forward"
    # every position on its own (a wrong cache shows late, where the full logits may be smaller)
    per_pos = np.abs(ours - full).max(axis=(0, 2)) / np.abs(full).max(axis=(0, 2))
    print(f"logits rel {err:.2e}, worst position {per_pos.argmax()}: {per_pos.max():.2e}")
    assert per_pos.max() <= 2 * TOL, f"worst position {per_pos.argmax()}: {per_pos.max():.2e}"
    assert np.asarray(cache.length).tolist() == [T, T]


def test_same_routing_and_indexer_selections(case, chunked):
    cfg, jcap = case["cfg"], case["jcap"]
    _, cap, _ = chunked
    n_csa = 0
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_array_equal(cap[f"layers.{i}.topk_ids"], jcap[f"layers.{i}.topk_ids"], f"experts, layer {i}")
        if cfg.layer_type(i) == CSA:
            n_csa += 1
            mine, theirs = cap[f"layers.{i}.index_ids"], jcap[f"layers.{i}.index_ids"]
            assert mine.shape == theirs.shape  # both min(index_topk, 10) = 3 wide
            np.testing.assert_array_equal(mine, theirs, f"indexer entries, layer {i}")
            assert (theirs >= 0).sum() > T  # real selections were compared, not just padding
    assert n_csa == 2


def test_greedy_generate_equals_argmax_of_full_forward(case):
    """Greedy from a 7-token prompt for 35 tokens; by causality, the full forward over the prompt
    and the generated ids must pick each generated id as the argmax at the position before it."""
    cfg, jw, tokens = case["cfg"], case["jw"], case["tokens"]
    gen = dv.greedy_generate_v4(jw, cfg, tokens[:, :CHUNK], T - CHUNK, compiler_options=FAST)
    assert gen.shape == (2, T - CHUNK)
    seq = np.concatenate([tokens[:, :CHUNK], gen], axis=1)
    full, _ = mv4.jit_forward_v4(jw, cfg, seq, capture=True, compiler_options=FAST)   # the fixture's compile
    full = np.asarray(full)
    np.testing.assert_array_equal(full[:, CHUNK - 1:-1].argmax(-1), gen)
    # no near-tie excuses the equality: the chosen logit beats the runner-up clearly
    top2 = np.sort(full[:, CHUNK - 1:-1], axis=-1)[..., -2:]
    gap = (top2[..., 1] - top2[..., 0]).min() / np.abs(full).max()
    print(f"smallest top-2 gap {gap:.2e} of max|logit|")
    assert gap > 1e-4
    assert len(set(gen.ravel().tolist())) > 3  # not a degenerate constant output


def test_greedy_generate_equals_transformers_generate(case):
    """transformers' own cache path (generate, do_sample=False, no EOS stop) picks the same 35
    tokens. Its indexer gets test_numpy_v4's tie-break hook (exact ties lower entry first, as ours);
    1.6 s in the suite (one standalone run under heavy machine load took 36 s)."""
    import torch
    from tests.test_numpy_v4 import tiebreak_hooks

    cfg, jw, tokens, model = case["cfg"], case["jw"], case["tokens"], case["model"]
    gen = dv.greedy_generate_v4(jw, cfg, tokens[:, :CHUNK], T - CHUNK, compiler_options=FAST)
    hooks = tiebreak_hooks(model)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor(tokens[:, :CHUNK]), max_new_tokens=T - CHUNK, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(2, CHUNK, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    np.testing.assert_array_equal(out[:, CHUNK:].numpy(), gen)


def test_cache_too_small_is_refused(case):
    cfg, jw, tokens = case["cfg"], case["jw"], case["tokens"]
    cache = dv.init_cache_v4(cfg, 2, CHUNK - 1)
    with pytest.raises(ValueError, match=r"max_len=6 is too small for position 6") as e:
        dv.step_v4(jw, cfg, tokens[:, :CHUNK], np.broadcast_to(np.arange(CHUNK), (2, CHUNK)), cache)
    assert "\n" not in str(e.value)


def test_bad_positions_and_batch_are_refused(case):
    cfg, jw, tokens = case["cfg"], case["jw"], case["tokens"]
    cache = dv.init_cache_v4(cfg, 2, T)
    with pytest.raises(ValueError, match="must continue its cache"):
        dv.step_v4(jw, cfg, tokens[:, :1], np.full((2, 1), 3), cache)
    with pytest.raises(ValueError, match="batch 2, tokens have batch 1"):
        dv.step_v4(jw, cfg, tokens[:1, :1], np.zeros((1, 1), int), cache)
    with pytest.raises(ValueError, match="batch and max_len must be >= 1"):
        dv.init_cache_v4(cfg, 2, 0)


def test_cache_shapes_full_size_flash():
    """The full V4-Flash cache traces (eval_shape, no memory); what grows per token is the
    compressed entries (+ the indexer's keys on CSA layers): bf16 (d or d + J) / m per layer; the
    ring and the block state are a fixed size."""
    cfg = get_preset("deepseek-v4-flash")
    a = jax.eval_shape(lambda: dv.init_cache_v4(cfg, 1, 4096, jnp.bfloat16))
    b = jax.eval_shape(lambda: dv.init_cache_v4(cfg, 1, 8192, jnp.bfloat16))
    grow = (dv.cache_bytes_v4(b) - dv.cache_bytes_v4(a)) / 4096
    d, J = cfg.head_dim, cfg.index_head_dim
    want = sum(2 * (d + (J if cfg.layer_type(i) == CSA else 0)) / cfg.compress_rate(cfg.layer_type(i))
               for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) != SLIDING)
    assert grow == pytest.approx(want)
    assert grow > 0
