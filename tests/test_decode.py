"""Cached decoding equals the full forward pass; generation matches transformers; MTP speculation
keeps greedy output identical; sampling is seeded and respects top-k / top-p."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsref.reference.decode import bucket, compiled_steps, cache_bytes, generate, init_cache, sample
from dsref.reference.model import DeepseekModel, jit_forward
from dsref.reference.presets import get_preset


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny-v3")
    model = DeepseekModel(cfg, rngs=nnx.Rngs(7), std=0.15, with_mtp=True)
    sd = model.state_dict()
    rng = np.random.default_rng(7)
    for k in sd:
        if k.endswith("e_score_correction_bias"):
            sd[k] = rng.normal(0, 0.3, sd[k].shape).astype(np.float32)
    return model.load_hf(sd)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_cached_decode_equals_full_forward(tiny, form):
    """Prompts of different lengths, prefilled together, then teacher-forced one token a step."""
    cfg = tiny.cfg
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, 20) for _ in range(3)]
    lens = [3, 9, 14]
    fns, state = compiled_steps(tiny)
    B, S = 3, 32
    T = bucket(max(lens))
    toks = np.zeros((B, T), np.int32)
    for b in range(B):
        toks[b, : lens[b]] = seqs[b][: lens[b]]
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    cache = init_cache(tiny, B, S, form)
    step = fns.step
    logits, _, cache = step(state, jnp.asarray(toks), jnp.asarray(pos), cache)
    full = [np.asarray(jit_forward(tiny, s[None])[0]) for s in seqs]
    for b in range(B):
        np.testing.assert_allclose(np.asarray(logits[b, : lens[b]]), full[b][: lens[b]], rtol=2e-5, atol=2e-5)
    cur = np.array(lens)
    for _ in range(5):
        step_toks = np.array([[seqs[b][cur[b]]] for b in range(B)], np.int32)
        logits, _, cache = step(state, jnp.asarray(step_toks), jnp.asarray(cur[:, None].astype(np.int32)), cache)
        for b in range(B):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), full[b][cur[b]], rtol=2e-5, atol=2e-5)
        cur += 1


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_prefill_step_equals_cached_step(tiny, form):
    """The prefill (attention within the prompt, naive MLA form, LM head at the last position only)
    gives the logits and cache of the general cached step over all cache slots."""
    cfg = tiny.cfg
    rng = np.random.default_rng(1)
    lens = np.array([5, 16, 11])
    B, T, S = 3, 16, 32
    toks = np.zeros((B, T), np.int32)
    for b in range(B):
        toks[b, : lens[b]] = rng.integers(0, cfg.vocab_size, lens[b])
    pos = jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))
    fns, state = compiled_steps(tiny)
    ref_logits, ref_hidden, ref_cache = fns.step(state, jnp.asarray(toks), pos, init_cache(tiny, B, S, form))
    logits, hidden, cache = fns.prefill(state, jnp.asarray(toks), pos, init_cache(tiny, B, S, form),
                                        jnp.asarray(lens - 1, jnp.int32))
    assert logits.shape == (B, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits)[np.arange(B), lens - 1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), rtol=2e-5, atol=2e-5)
    for a, b in zip(cache, ref_cache):
        assert type(a) is type(b)
        for name, x, y in zip(a._fields, a, b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-5, err_msg=name)


def test_latent_cache_bytes():
    cfg = get_preset("deepseek-v3")
    # one token of the latent cache: (R + P) per layer in bf16 == ModelConfig's figure
    per_tok = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert per_tok == cfg.kv_cache_bytes_per_token() == 70_272
    small = get_preset("tiny-v3")
    m = DeepseekModel(small, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    lat = cache_bytes(init_cache(m, 1, 64, "absorbed"))
    naive = cache_bytes(init_cache(m, 1, 64, "naive"))
    assert lat == small.kv_cache_bytes_per_token(2.0) * 64
    assert naive == small.kv_cache_bytes_per_token(2.0, absorbed=False) * 64


def test_greedy_matches_transformers_generate():
    torch = pytest.importorskip("torch")
    from tests.conftest import hf_state_to_ours, make_hf_model
    for preset, seed in (("tiny-v3", 0), ("tiny-v2", 1)):
        cfg = get_preset(preset)
        hf = make_hf_model(cfg, seed, std=0.3)
        model = DeepseekModel(cfg, rngs=nnx.Rngs(0)).load_hf(hf_state_to_ours(hf.state_dict(), cfg))
        prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, 7)
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor(prompt[None]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=32)[0, 7:].tolist()
        got = generate(model, [prompt.tolist()], 32).tokens[0]
        assert got == ref, preset
        assert len(set(got)) > 3  # not a degenerate constant sequence


def test_batch_generation_equals_single(tiny):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    batch = generate(tiny, prompts, 12).tokens
    for p, g in zip(prompts, batch):
        assert generate(tiny, [p], 12).tokens[0] == g


def test_stop_tokens_and_sampling_reproducible(tiny):
    g = generate(tiny, [[3, 4, 5]], 20).tokens[0]
    stop = g[4]
    first = g.index(stop)
    assert generate(tiny, [[3, 4, 5]], 20, stop_tokens=[stop]).tokens[0] == g[: first + 1]
    a = generate(tiny, [[3, 4, 5]], 16, temperature=1.0, top_k=20, top_p=0.9, seed=11).tokens
    b = generate(tiny, [[3, 4, 5]], 16, temperature=1.0, top_k=20, top_p=0.9, seed=11).tokens
    c = generate(tiny, [[3, 4, 5]], 16, temperature=1.0, top_k=20, top_p=0.9, seed=12).tokens
    assert a == b and a != c


def test_sampler_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    draws = {int(sample(logits, jax.random.key(i), 1.0, 2, 1.0)[0]) for i in range(200)}
    assert draws == {0, 1}
    draws = {int(sample(logits, jax.random.key(i), 1.0, 0, 0.85)[0]) for i in range(300)}
    assert draws == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.9
    assert int(sample(logits, jax.random.key(0), 0.0, 0, 1.0)[0]) == 0


def test_mtp_speculation_keeps_greedy_output(tiny):
    prompts = [[9, 8, 7, 6], [1, 2]]
    plain = generate(tiny, prompts, 24)
    spec = generate(tiny, prompts, 24, use_mtp=True)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate is not None and 0 <= spec.acceptance_rate <= 1


def test_mtp_accepts_when_the_draft_is_right():
    """A model whose next token depends only on the current one (all residual branches zero),
    with an MTP module wired to apply the same map to the token it is given: every draft is
    right, so each step emits two tokens."""
    cfg = get_preset("tiny-v3")
    m = DeepseekModel(cfg, rngs=nnx.Rngs(3), std=0.3, with_mtp=True)
    sd = m.state_dict()
    D = cfg.hidden_size
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = np.zeros_like(sd[k])
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    sd[mtp + "eh_proj.weight"] = np.concatenate([np.eye(D), np.zeros((D, D))], 1).astype(np.float32)
    sd[mtp + "shared_head.norm.weight"] = sd["model.norm.weight"]
    m.load_hf(sd)
    plain = generate(m, [[1, 2, 3]], 20)
    spec = generate(m, [[1, 2, 3]], 20, use_mtp=True)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate > 0.9 and spec.steps < plain.steps * 0.6


@pytest.mark.parametrize("kind", ["latent", "expanded"])
def test_cache_write_places_each_sequence_at_its_positions(tiny, kind):
    """write(positions, ...) puts token t of sequence b at slot positions[b, t], in the cache
    dtype, and leaves every other slot as it was; read() gives all slots in the compute dtype."""
    from dsref.reference.model import ExpandedCache, LatentCache
    cls = LatentCache if kind == "latent" else ExpandedCache
    cache = cls.zeros(tiny.cfg, 2, 8, jnp.bfloat16)
    pos = jnp.asarray([[1, 2], [5, 6]])
    new = [jnp.arange(np.prod((2, 2, *a.shape[2:])), dtype=jnp.float32).reshape(2, 2, *a.shape[2:]) + 1
           for a in cache]
    out = cache.write(pos, *new)
    assert type(out) is cls and all(a.dtype == jnp.bfloat16 for a in out)
    for a, x in zip(out, new):
        a = np.asarray(a.astype(jnp.float32))
        for b in range(2):
            np.testing.assert_array_equal(a[b, np.asarray(pos[b])], np.asarray(x[b].astype(jnp.bfloat16), np.float32))
            others = np.setdiff1d(np.arange(8), np.asarray(pos[b]))
            assert not a[b, others].any()
    assert all(r.dtype == jnp.float32 for r in out.read(jnp.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unrolled_layers_compute_what_the_scan_computes(dtype):
    """layers='unrolled' (separate per-layer and per-expert arrays aliasing the stacks, a branch
    per expert) against the layer scan: float32 bit-identical (logits, caches, tokens); bf16
    within bf16 rounding (XLA fuses the two programs differently, so intermediate bf16
    roundings differ)."""
    from dsref.reference.unrolled import split_weights
    cfg = get_preset("tiny-v3")
    m = DeepseekModel(cfg, rngs=nnx.Rngs(1), std=0.2, dtype=jnp.dtype(dtype))
    toks, pos = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]] * 2), jnp.broadcast_to(jnp.arange(8), (2, 8))
    outs = []
    for mode in ("scan", "unrolled"):
        fns, st = compiled_steps(m, mode)
        lg, _, c = fns.prefill(st, toks, pos, init_cache(m, 2, 16), jnp.asarray([7, 5]))
        nxt, c = fns.decode(st, jnp.asarray([[9], [4]]), jnp.asarray([[8], [6]]), c, jax.random.key(0), 0.0, 1.0,
                            greedy=True, top_k=0)
        outs.append((np.asarray(lg), [np.asarray(a) for s in c for a in s]))
    (l1, c1), (l2, c2) = outs
    if dtype == "float32":
        np.testing.assert_array_equal(l1, l2)
        for a, b in zip(c1, c2):
            np.testing.assert_array_equal(a, b)
        p = [[1, 2, 3, 4, 5], [7, 8]]
        assert generate(m, p, 10).tokens == generate(m, p, 10, layers="unrolled").tokens
    else:
        assert np.abs(l1 - l2).max() / np.abs(l1).max() < 5e-2
    # the split arrays alias the stacks: no second copy of the model on CPU
    w = split_weights(m)
    st0 = m.stacks[-1]
    name = st0.expert_names[0]
    if jax.default_backend() == "cpu":
        a = w["layers"][st0.first + 1][name][3]
        want = st0.stacked(name).unsafe_buffer_pointer() + (1 * st0.stacked(name).shape[1] + 3) * a.nbytes
        assert a.unsafe_buffer_pointer() == want
    with pytest.raises(ValueError, match="layers"):
        generate(m, [[1, 2]], 2, layers="sideways")
    with pytest.raises(ValueError, match="scan"):
        generate(m, [[1, 2]], 2, layers="unrolled", use_mtp=True)
