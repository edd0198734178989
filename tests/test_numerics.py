"""The numerical details independent implementations get wrong: one test each,
plus NumPy float64 vs JAX, naive vs absorbed MLA, the exact MoE dispatch and
property tests of the gate."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dsref.reference import numpy_ref
from dsref.reference.config import RopeScaling
from dsref.reference.model import (DeepseekModel, apply_rope, dispatch_plan, jit_forward, route, routed_experts,
                             swiglu)
from dsref.reference.weights import ExpertsAt, to_storage
from dsref.reference.presets import get_preset

HIGHEST = jax.lax.Precision.HIGHEST


def random_model(cfg, seed=0, std=0.15, dtype=jnp.float32):
    m = DeepseekModel(cfg, rngs=nnx.Rngs(seed), std=std, dtype=dtype)
    sd = m.state_dict()
    rng = np.random.default_rng(seed)
    for k in sd:
        if k.endswith("e_score_correction_bias"):
            sd[k] = rng.normal(0, 0.3, sd[k].shape).astype(np.float32)
        elif k.endswith("norm.weight"):
            sd[k] = (1 + 0.3 * rng.normal(size=sd[k].shape)).astype(np.float32)
    return m.load_hf(sd), sd


# ------------------------------------------------------------------ RoPE
def test_rope_rotates_interleaved_pairs():
    """Pair (x0, x1) is rotated by the first (fastest) frequency; (x0, x_{P/2}) is not a pair."""
    cfg = get_preset("tiny-v3").replace(rope_scaling=None)
    P = cfg.qk_rope_head_dim
    x = np.zeros((1, 1, P))
    x[..., 0] = 1.0
    cos, sin = numpy_ref.rope_cos_sin(cfg, np.array([[3]]))
    y = numpy_ref.apply_rope_interleaved(x, cos, sin)
    # position 3, inv_freq[0] = 1: (1, 0) -> (cos 3, sin 3) in slots 0 and 1
    np.testing.assert_allclose(y[0, 0, :2], [math.cos(3), math.sin(3)], atol=1e-12)
    assert np.all(y[0, 0, 2:] == 0)
    # the half-split (LLaMA) layout moves the mass to slot P/2 instead
    z = numpy_ref.apply_rope_half(x, cos, sin)
    assert abs(z[0, 0, P // 2]) > 0.1 and z[0, 0, 1] == 0
    # JAX agrees with NumPy
    yj = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32))
    np.testing.assert_allclose(np.asarray(yj), y, atol=1e-6)


def test_rope_transformers_layout_is_a_permutation_of_ours():
    """transformers de-interleaves q_pe/k_pe: [evens | odds] of our rotated vector."""
    torch = pytest.importorskip("torch")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    cfg = get_preset("tiny-v3")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, cfg.qk_rope_head_dim))
    pos = np.arange(5)[None]
    cos, sin = numpy_ref.rope_cos_sin(cfg, pos)
    ours = numpy_ref.apply_rope_interleaved(x, cos, sin)
    cat = lambda a: torch.as_tensor(np.concatenate([a, a], -1))
    q, _ = apply_rotary_pos_emb_interleave(torch.as_tensor(x)[:, None], torch.as_tensor(x)[:, None],
                                           cat(cos), cat(sin))
    perm = np.r_[0:cfg.qk_rope_head_dim:2, 1:cfg.qk_rope_head_dim:2]
    np.testing.assert_allclose(q[:, 0].numpy(), ours[..., perm], atol=1e-12)


# ------------------------------------------------------------------ YaRN
@pytest.mark.parametrize("factor,orig,bf,bs", [(40.0, 4096, 32.0, 1.0), (4.0, 32, 32.0, 1.0), (8.0, 64, 8.0, 2.0)])
def test_yarn_blend_extremes_and_transformers(factor, orig, bf, bs):
    cfg = get_preset("deepseek-v3").replace(rope_scaling=RopeScaling(
        factor=factor, original_max_position_embeddings=orig, beta_fast=bf, beta_slow=bs, mscale=1.0,
        mscale_all_dim=1.0))
    inv, att = numpy_ref.rope_frequencies(cfg)
    P = cfg.qk_rope_head_dim
    base = 1.0 / cfg.rope_theta ** (np.arange(0, P, 2) / P)
    assert inv[0] == pytest.approx(base[0])  # fastest dimension: extrapolated (unchanged)
    assert inv[-1] == pytest.approx(base[-1] / factor)  # slowest: interpolated by 1/factor
    assert np.all(np.diff(inv) < 0) and att == 1.0
    pytest.importorskip("transformers")
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6)
    assert hf_att == pytest.approx(att)


def test_yarn_mscale_scales_whole_logit():
    """V3: scale = (0.1 * mscale_all_dim * ln(factor) + 1)^2 / sqrt(N + P) on q.k (nope and rope parts)."""
    cfg = get_preset("deepseek-v3")
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(m * m / math.sqrt(192))
    assert get_preset("deepseek-v3").replace(rope_scaling=None).softmax_scale == pytest.approx(192 ** -0.5)
    # V2: mscale_all_dim = 0.707
    m2 = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert get_preset("deepseek-v2").softmax_scale == pytest.approx(m2 * m2 / math.sqrt(192))
    # and the model uses it: a wrong scale changes the logits
    small = get_preset("tiny-v3")
    model, sd = random_model(small)
    toks = np.arange(10)[None] % small.vocab_size
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    good = numpy_ref.forward(toks, w, small)
    assert np.abs(np.asarray(jit_forward(model, toks)) - good).max() / np.abs(good).max() < 1e-5
    bad = numpy_ref.forward(toks, w, small.replace(rope_scaling=RopeScaling(
        **{**small.rope_scaling.__dict__, "mscale_all_dim": 0.0})))
    assert np.abs(bad - good).max() / np.abs(good).max() > 1e-3


# ------------------------------------------------------------------ gate
def _v3_gate_inputs(E=16, G=4):
    cfg = get_preset("tiny-v3").replace(n_routed_experts=E, n_group=G, topk_group=2, num_experts_per_tok=4)
    D = cfg.hidden_size
    rng = np.random.default_rng(5)
    w = {"p.gate.weight": rng.normal(0, 0.05, (E, D)), "p.gate.e_score_correction_bias": np.zeros(E)}
    return cfg, w, rng.normal(size=(32, D))


def test_group_mask_uses_minus_inf_not_zero():
    """With biases that push every biased score below 0, masking with 0 would pick masked-group experts."""
    cfg, w, x = _v3_gate_inputs()
    w["p.gate.e_score_correction_bias"] = np.full(cfg.n_routed_experts, -2.0)
    _, ids, _ = numpy_ref.gate(x, w, cfg, "p.")
    logits = x @ w["p.gate.weight"].T
    biased = 1 / (1 + np.exp(-logits)) - 2.0
    per = cfg.n_routed_experts // cfg.n_group
    grp = np.sort(biased.reshape(len(x), cfg.n_group, per), -1)[..., -2:].sum(-1)
    top_groups = np.argsort(-grp, -1)[:, :cfg.topk_group]
    for t in range(len(x)):
        assert set(ids[t] // per) <= set(top_groups[t]), "selected an expert from a masked group"
    jl, jids, jw = route({k[2:]: jnp.asarray(v, jnp.float32) for k, v in w.items()}, cfg, jnp.asarray(x, jnp.float32))
    assert np.array_equal(np.sort(np.asarray(jids), -1), np.sort(ids, -1))
    # the 0-fill bug really would differ here
    keep = np.zeros((len(x), cfg.n_group), bool)
    np.put_along_axis(keep, top_groups, True, -1)
    wrong = np.where(np.repeat(keep, per, -1), biased, 0.0)
    wrong_ids = np.argsort(-wrong, -1)[:, :cfg.num_experts_per_tok]
    assert (np.sort(wrong_ids, -1) != np.sort(ids, -1)).any()


def test_gate_weights_come_from_unbiased_scores():
    cfg, w, x = _v3_gate_inputs()
    w["p.gate.e_score_correction_bias"] = np.random.default_rng(1).normal(0, 0.5, cfg.n_routed_experts)
    logits, ids, wts = numpy_ref.gate(x, w, cfg, "p.")
    s = 1 / (1 + np.exp(-logits))
    chosen = np.take_along_axis(s, ids, -1)
    np.testing.assert_allclose(wts, chosen / chosen.sum(-1, keepdims=True) * cfg.routed_scaling_factor)
    biased = np.take_along_axis(s + w["p.gate.e_score_correction_bias"], ids, -1)
    assert not np.allclose(wts, biased / biased.sum(-1, keepdims=True) * cfg.routed_scaling_factor)


def test_topk_normalisation_and_scaling_factor():
    cfg, w, x = _v3_gate_inputs()
    _, _, wts = numpy_ref.gate(x, w, cfg, "p.")
    np.testing.assert_allclose(wts.sum(-1), cfg.routed_scaling_factor)
    _, ids, wts_n = numpy_ref.gate(x, w, cfg.replace(norm_topk_prob=False), "p.")
    s = 1 / (1 + np.exp(-(x @ w["p.gate.weight"].T)))
    np.testing.assert_allclose(wts_n, np.take_along_axis(s, ids, -1) * cfg.routed_scaling_factor)
    # V2 (softmax, norm_topk_prob false): softmax probabilities times routed_scaling_factor, no normalisation
    v2 = get_preset("tiny-v2")
    w2 = {"p.gate.weight": w["p.gate.weight"][: v2.n_routed_experts]}
    logits, ids, wts2 = numpy_ref.gate(x, w2, v2, "p.")
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(wts2, np.take_along_axis(p, ids, -1) * v2.routed_scaling_factor)
    assert np.all(wts2.sum(-1) < v2.routed_scaling_factor)


def test_router_and_bias_stay_float32_in_bfloat16_model():
    cfg = get_preset("tiny-v3")
    m = DeepseekModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    lw = m.layer(1)
    assert lw.raw("mlp.gate.e_score_correction_bias").dtype == jnp.float32
    assert lw.raw("mlp.gate.weight").dtype == jnp.bfloat16
    x = jnp.ones((3, cfg.hidden_size), jnp.bfloat16)
    logits, _, wts = route(_Pref(lw), cfg, x)
    assert logits.dtype == jnp.float32 and wts.dtype == jnp.float32
    # a bias of 1e-3 is invisible next to 1.0 in bfloat16 but must still break ties in float32
    assert jnp.bfloat16(1.0) + jnp.bfloat16(1e-3) == jnp.bfloat16(1.0)


class _Pref:
    def __init__(self, lw):
        self.lw = lw

    def __getitem__(self, n):
        return self.lw["mlp." + n]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.sampled_from([1, 2, 4, 8]), kg_frac=st.floats(0.2, 1.0),
       k=st.integers(1, 6), bias_scale=st.floats(0.0, 3.0), method=st.sampled_from(["noaux_tc", "v2"]))
def test_gate_properties(seed, G, kg_frac, k, bias_scale, method):
    E = 16
    kg = max(1, int(round(kg_frac * G)))
    per = E // G
    if kg * per < k:
        k = kg * per
    base = get_preset("tiny-v3" if method == "noaux_tc" else "tiny-v2")
    cfg = base.replace(n_routed_experts=E, n_group=G, topk_group=kg, num_experts_per_tok=k,
                       topk_method="noaux_tc" if method == "noaux_tc" else (
                           "group_limited_greedy" if G > 1 else "greedy"))
    rng = np.random.default_rng(seed)
    D = 8
    w = {"p.gate.weight": rng.normal(0, 1, (E, D)), "p.gate.e_score_correction_bias": rng.normal(0, bias_scale, E)}
    x = rng.normal(size=(20, D))
    logits, ids, wts = numpy_ref.gate(x, w, cfg, "p.")
    assert all(len(set(r)) == k for r in ids)  # k distinct experts
    assert np.all(wts > 0)
    choice = (1 / (1 + np.exp(-logits)) + w["p.gate.e_score_correction_bias"]) if method == "noaux_tc" else \
        np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in range(len(x)):
        groups = set(ids[t] // per)
        assert len(groups) <= kg
        allowed = np.isin(np.arange(E) // per, list(groups)) if G > 1 else np.ones(E, bool)
        # the chosen experts are the k best of the groups they come from
        assert choice[t, ids[t]].min() >= np.sort(choice[t, allowed])[-k] - 1e-12
    if method == "noaux_tc" and cfg.norm_topk_prob:
        np.testing.assert_allclose(wts.sum(-1), cfg.routed_scaling_factor, rtol=1e-9)
    jw = {k2[2:]: jnp.asarray(v, jnp.float32) for k2, v in w.items()}
    _, jids, jwts = route(jw, cfg, jnp.asarray(x, jnp.float32))
    # float32 vs float64 may break near-ties differently; demand agreement on clear cases
    assert (np.sort(np.asarray(jids), -1) == np.sort(ids, -1)).all(-1).mean() >= 0.9


# ------------------------------------------------------------------ MoE dispatch
@pytest.mark.parametrize("M,E,k,skew", [(1, 16, 4, False), (7, 16, 4, False), (200, 8, 2, False),
                                        (64, 32, 6, True), (300, 4, 1, True)])
def test_moe_dispatch_exact_and_proportional(M, E, k, skew):
    D, F = 16, 24
    rng = np.random.default_rng(M + E)
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    if skew:  # every token picks expert 0 plus others: one block-heavy expert
        ids = np.stack([np.r_[0, rng.choice(np.arange(1, E), k - 1, replace=False)] for _ in range(M)])
    else:
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(M)])
    wts = rng.uniform(0.1, 1, (M, k))
    w = {"experts.gate_proj.weight": jnp.asarray(rng.normal(0, .3, (E, F, D)), jnp.float32),
         "experts.up_proj.weight": jnp.asarray(rng.normal(0, .3, (E, F, D)), jnp.float32),
         "experts.down_proj.weight": jnp.asarray(rng.normal(0, .3, (E, D, F)), jnp.float32)}
    got = routed_experts(w, x, jnp.asarray(ids), jnp.asarray(wts, jnp.float32), E, HIGHEST)
    ref = np.zeros((M, D))
    for t in range(M):
        for j in range(k):
            e = ids[t, j]
            ref[t] += wts[t, j] * np.asarray(swiglu(x[t:t + 1], w["experts.gate_proj.weight"][e],
                                                     w["experts.up_proj.weight"][e],
                                                     w["experts.down_proj.weight"][e], HIGHEST))[0]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    # the model's own layout: layer 1 of a stack [L, E, ...] (layer 0 holds other values)
    stack = {n: ExpertsAt(jnp.stack([-v, v]), jnp.int32(1)) for n, v in w.items()}
    got_st = routed_experts(stack, x, jnp.asarray(ids), jnp.asarray(wts, jnp.float32), E, HIGHEST)
    np.testing.assert_array_equal(np.asarray(got_st), np.asarray(got))
    C, order, counts_j, start, used, n_used = dispatch_plan(jnp.asarray(ids), E)
    counts = np.bincount(ids.reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(counts_j), counts)
    # rows sorted by expert, each expert's rows contiguous from its start
    e_sorted = ids.reshape(-1)[np.asarray(order)]
    assert (np.diff(e_sorted) >= 0).all()
    np.testing.assert_array_equal(np.asarray(start), np.cumsum(counts) - counts)
    # only the selected experts are visited, each once; windows visited stay proportional to M*k
    assert int(n_used) == np.count_nonzero(counts)
    assert list(np.asarray(used)[: int(n_used)]) == list(np.flatnonzero(counts))
    assert np.sum(-(-counts // C)) <= -(-M * k // C) + np.count_nonzero(counts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_weights_are_sliced_per_used_expert_not_copied_whole(dtype):
    """Under the layer scan the weights stay stacked [L, E, ...] and a used expert's matrices
    are one dynamic slice each: the compiled program must never make an array the size of a
    layer's experts or of the whole stack. The check can fail: a bf16 stack sliced as bf16 on
    XLA:CPU got the whole [L, E, F, D] converted to float32, hoisted out of the loop
    (reference/weights.py); that version is compiled below and caught."""
    import re
    L, E, D, F, k = 3, 8, 40, 24, 3
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    stacked = {"experts.gate_proj.weight": jnp.asarray(rng.normal(size=(L, E, F, D)), dt),
               "experts.up_proj.weight": jnp.asarray(rng.normal(size=(L, E, F, D)), dt),
               "experts.down_proj.weight": jnp.asarray(rng.normal(size=(L, E, D, F)), dt)}
    x, ids, wts = jnp.ones((2, D), dt), jnp.asarray([[1, 5, 6], [0, 5, 7]]), jnp.ones((2, k))
    big = re.compile(rf"\[(?:{L},)?{E},(?:{F},{D}|{D},{F})\]")

    def compiled(to_experts, keep_bits=True):
        def run(w, x):
            def body(h, j):
                return h + routed_experts({n: to_experts(v, j) for n, v in w.items()}, h, ids, wts, E, HIGHEST), None
            return jax.lax.scan(body, x, jnp.arange(L))[0]
        return jax.jit(run).lower({n: to_storage(v) if keep_bits else v for n, v in stacked.items()}, x
                               ).compile().as_text()

    body_text = compiled(ExpertsAt)  # the stacks stored as the model stores them (bf16 on CPU: bits)
    made = [ln for ln in body_text.splitlines() if "= " in ln and big.search(ln.split("=", 1)[1].split("(", 1)[0])
            and "parameter(" not in ln and "get-tuple-element(" not in ln]
    assert made == [], made[:3]
    if dtype == "bfloat16" and jax.default_backend() == "cpu":  # the naive bf16 slice is caught
        naive = compiled(lambda v, j: jax.lax.dynamic_index_in_dim(v, j, 0, False).astype(jnp.float32), False)
        assert any(big.search(ln.split("=", 1)[1].split("(", 1)[0]) and "f32" in ln
                   for ln in naive.splitlines() if "= " in ln and "parameter(" not in ln)


def test_layers_compile_as_one_scan_per_stack():
    """Compile size independent of depth: 2 or 12 MoE layers give programs of about the same
    size (one scan body per layer kind); unrolled, the second would be ~6x the first."""
    from dsref.reference.model import forward, layer_runs

    def hlo_size(layers):
        cfg = get_preset("tiny-v3").replace(num_hidden_layers=layers)
        assert [len(r) for r in layer_runs(cfg)] == [1, layers - 1]
        gd, st = nnx.split(nnx.eval_shape(lambda: DeepseekModel(cfg)))
        toks = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return len(jax.jit(lambda s, t: forward(nnx.merge(gd, s), t).logits).lower(st, toks).as_text())

    small, deep = hlo_size(3), hlo_size(13)
    assert deep < 1.2 * small, (small, deep)


def test_stack_view_reads_and_writes_one_layer():
    cfg = get_preset("tiny-v3")
    m = DeepseekModel(cfg, rngs=nnx.Rngs(0))
    i = cfg.first_k_dense_replace + 1
    name = f"model.layers.{i}.mlp.experts.down_proj.weight"
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    view = dict(m.hf_items())[name]
    assert view.shape == (E, D, F) and view.dtype == jnp.float32
    before = m.state_dict()
    new = np.random.default_rng(1).normal(size=(E, D, F)).astype(np.float32)
    m.load_hf({**before, name: new})
    after = m.state_dict()
    np.testing.assert_array_equal(after[name], new)
    np.testing.assert_array_equal(np.asarray(m.layer(i).raw("mlp.experts.down_proj.weight")[3]), new[3])
    for n in before:  # every other tensor, the other layers of the same stack included, as it was
        if n != name:
            np.testing.assert_array_equal(after[n], before[n])
    with pytest.raises(ValueError, match="shape"):
        view.set_value(new[:-1])


# ------------------------------------------------------------------ whole model
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-v2-lite"])
def test_numpy_float64_vs_jax_float32_and_mla_forms(preset):
    cfg = get_preset(preset)
    model, sd = random_model(cfg, seed=3)
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 9))
    ref = numpy_ref.forward(toks, {k: v.astype(np.float64) for k, v in sd.items()}, cfg)
    a = np.asarray(jit_forward(model, toks, "absorbed"))
    n = np.asarray(jit_forward(model, toks, "naive"))
    assert np.abs(a - ref).max() / np.abs(ref).max() < 1e-5
    assert np.abs(n - ref).max() / np.abs(ref).max() < 1e-5
    assert np.abs(a - n).max() / np.abs(n).max() < 1e-5


def test_bfloat16_model_close_to_float32():
    cfg = get_preset("tiny-v3")
    model, sd = random_model(cfg, seed=4, std=0.05)
    m16 = DeepseekModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16).load_hf(sd)
    toks = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 8))
    f32 = np.asarray(jit_forward(model, toks))
    b16 = np.asarray(jit_forward(m16, toks))
    assert b16.dtype == np.float32
    rel = np.abs(b16 - f32).max() / np.abs(f32).max()
    assert 1e-4 < rel < 5e-2, rel  # bf16 really ran (not silently float32), and stayed close


def test_routed_experts_gradient_matches_dense():
    """The routed-expert loop's hand-written gradient (model.expert_rows, a custom VJP: the loop
    visits only used experts, which reverse-mode AD cannot differentiate) equals autodiff of a
    dense gather-every-token's-experts form, for x, the gate weights and every expert matrix of
    one layer of a stack, with one expert taking most rows (several windows) and some none."""
    rng = np.random.default_rng(0)
    L, E, D, F, M, k, j = 3, 6, 8, 5, 40, 2, 1
    G, U = (jnp.asarray(rng.standard_normal((L, E, F, D)), jnp.float32) for _ in range(2))
    Dn = jnp.asarray(rng.standard_normal((L, E, D, F)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    ids = np.argsort(rng.random((M, E)), -1)[:, :k]
    ids[:30, 0] = np.where(ids[:30, 1] == 1, 2, 1)  # expert 1 takes most tokens; expert 5 may get none
    ids = jnp.asarray(ids, jnp.int32)
    wts = jnp.asarray(rng.random((M, k)), jnp.float32)
    c = jnp.cos(jnp.arange(M * D, dtype=jnp.float32)).reshape(M, D)
    hi = jax.lax.Precision.HIGHEST

    def ours(x, wts, G, U, Dn):
        w = {"experts.gate_proj.weight": ExpertsAt(G, j), "experts.up_proj.weight": ExpertsAt(U, j),
             "experts.down_proj.weight": ExpertsAt(Dn, j)}
        return jnp.sum(routed_experts(w, x, ids, wts, E, hi) * c)

    def dense(x, wts, G, U, Dn):
        y = 0
        for kk in range(k):
            e = ids[:, kk]
            h = (jax.nn.silu(jnp.einsum("md,mfd->mf", x, G[j][e], precision=hi))
                 * jnp.einsum("md,mfd->mf", x, U[j][e], precision=hi))
            y = y + wts[:, kk:kk + 1] * jnp.einsum("mf,mdf->md", h, Dn[j][e], precision=hi)
        return jnp.sum(y * c)

    args = (x, wts, G, U, Dn)
    got = jax.jit(jax.grad(ours, argnums=range(5)))(*args)
    want = jax.grad(dense, argnums=range(5))(*args)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name
    other = np.asarray(got[2])[[0, 2]]  # layers other than j get no gradient
    assert not other.any()
