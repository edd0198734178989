"""The float64 NumPy DeepSeek-V4 reference (reference/numpy_v4.py) against transformers'
``DeepseekV4ForCausalLM`` (5.24, the independent implementation), and the numerical gotchas.

transformers runs in float32, eager attention, stateless prefill (use_cache=False), on
adversarial weights (tests/conftest.py randomize_hf plus: random distinct tid2eid rows, sinks
~ N(0, 1), hyper-connection scales ~ 1 +- 0.5 and biases ~ N(0, 0.5^2), position biases
~ N(0, 1)). We take its state_dict (transformers' names: reference/params_v4.py) in float64 and
require max|ours - theirs| / max|theirs| <= 1e-5 on the logits, identical experts per MoE layer
and identical indexer selections.

Indexer ties: with few index heads the relu often zeroes every head's term, so several entries
score exactly 0 and the top-k boundary is a tie; torch.topk's choice among equal values is
unspecified (it differs from our lower-entry-first rule, and the logits then differ by O(1)).
The parity model therefore adds -1e-30 * entry to transformers' index scores (a forward hook on
the scorer): exact ties resolve lower-entry-first as ours do, and no score that is not exactly
tied moves (1e-30 is far below one float32 ulp of any non-zero score).
test_untied_rows_agree_without_tiebreak runs transformers untouched.

Each gotcha test swaps one mechanism of ours for a plausible wrong variant and shows the logits
move by > 1e-3 (100 x the tolerance) away from transformers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dsref.reference import numpy_v4 as nv4  # noqa: E402
from dsref.reference import numpy_v4_attention as na  # noqa: E402
from dsref.reference.config import RopeScaling  # noqa: E402
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfigV4  # noqa: E402
from dsref.reference.presets import get_preset  # noqa: E402
from tests.conftest import randomize_hf  # noqa: E402

T = 42  # > sliding_window; CSA (4): 10 entries, tiny-v4's HCA (8): 5; 42 % 4 = 2 tokens left over
TOL = 1e-5
MOVED = 1e-3


def variant_cfg():
    """Not tuned to tiny-v4: 2 streams, 4 output groups, window 5, partial rotary 1/2, HCA rate 6,
    another layer and hash schedule, sigmoid router, other clamp / YaRN / Sinkhorn settings (hc_eps
    large enough that the eps terms show)."""
    return get_preset("tiny-v4").replace(
        name="tiny-v4-variant", num_hidden_layers=5, layer_types=(CSA, HCA, SLIDING, CSA, HCA),
        mlp_layer_types=(HASH_MOE, MOE, HASH_MOE, MOE, MOE), hc_mult=2, o_groups=4, o_lora_rank=10,
        sliding_window=5, qk_rope_head_dim=16, compress_rate_hca=6, index_n_heads=3, index_topk=2,
        q_lora_rank=20, scoring_func="sigmoid", swiglu_limit=0.8, hc_sinkhorn_iters=3, hc_eps=0.05,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0,
                                 mscale=1.0, mscale_all_dim=0.0, attention_factor=1.0))


CONFIGS = {"tiny-v4": lambda: get_preset("tiny-v4"), "variant": variant_cfg}


def build_hf(cfg, seed: int):
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    model = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    randomize_hf(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("tid2eid"):  # default zeros: every token on expert 0, k times
                p.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(p.shape[0])]))
            elif name.endswith("sinks") or name.endswith("position_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("hc.scale") or name.endswith("hc_scale"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("hc.base") or name.endswith("hc_base"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def tiebreak_hooks(model):
    """-1e-30 * entry on every indexer's scores: see the module docstring."""
    hooks = []
    for layer in model.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            hooks.append(comp.indexer.scorer.register_forward_hook(
                lambda m, a, o: o - 1e-30 * torch.arange(o.shape[-1], dtype=o.dtype)))
    return hooks


def run_hf(model, tokens):
    """Logits and per-layer captures (attention output, streams, router, indexer) of transformers."""
    cap, hooks = {}, []

    def put(key, fn):
        return lambda m, a, o: cap.__setitem__(key, fn(o))

    np64 = lambda t: t.detach().double().numpy()  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(put(f"layers.{i}.hidden", np64)))
        hooks.append(layer.self_attn.register_forward_hook(put(f"layers.{i}.attn_out", lambda o: np64(o[0]))))
        hooks.append(layer.mlp.gate.register_forward_hook(
            put(f"layers.{i}.gate", lambda o: (np64(o[0]), np64(o[1]), o[2].numpy()))))
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            hooks.append(comp.indexer.register_forward_hook(put(f"layers.{i}.index_ids", lambda o: o.numpy())))
    try:
        with torch.no_grad():
            logits = model(torch.tensor(tokens), use_cache=False).logits.double().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, cap


@pytest.fixture(scope="session")
def v4_cases():
    """name -> dict(cfg, model, weights, tokens, theirs, hf_cap, ours, cap): each transformers model
    built once per session."""
    out = {}
    for seed, (name, make) in enumerate(CONFIGS.items()):
        cfg = make()
        model = build_hf(cfg, seed)
        hooks = tiebreak_hooks(model)
        w = {k: v.detach().numpy().astype(np.float64) if v.dtype.is_floating_point else v.numpy()
             for k, v in model.state_dict().items()}
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T))
        theirs, hf_cap = run_hf(model, tokens)
        for h in hooks:
            h.remove()
        cap = {}
        ours = nv4.forward(tokens, w, cfg, capture=cap)
        out[name] = dict(cfg=cfg, model=model, w=w, tokens=tokens, theirs=theirs, hf_cap=hf_cap, ours=ours, cap=cap)
    return out


def hf_ids(ids):
    """transformers' indexer output (top-k order, -1 for invisible picks) in ours: ascending, -1 last."""
    big = np.iinfo(np.int64).max
    srt = np.sort(np.where(ids < 0, big, ids), -1)
    return np.where(srt == big, -1, srt)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(v4_cases, name):
    c = v4_cases[name]
    cfg = c["cfg"]
    # the sequence exercises what it should: window exceeded, several complete blocks of each
    # compressor, more CSA entries than the indexer keeps
    assert T > 2 * cfg.sliding_window
    assert T // cfg.compress_rate_csa > cfg.index_topk and T // cfg.compress_rate_hca >= 3
    assert {CSA, HCA, SLIDING} <= set(cfg.layer_types)
    assert rel(c["ours"], c["theirs"]) <= TOL, f"{name}: rel err {rel(c['ours'], c['theirs']):.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_outputs_match(v4_cases, name):
    """Attention outputs and the hc_mult streams after every layer (localises a failure)."""
    c = v4_cases[name]
    for i in range(c["cfg"].num_hidden_layers):
        for key in ("attn_out", "hidden"):
            k = f"layers.{i}.{key}"
            assert rel(c["cap"][k], c["hf_cap"][k]) <= TOL, f"{name} {k}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_routing_identical(v4_cases, name):
    """Same experts per token in every MoE layer (transformers' top-k is unsorted: compare sets),
    hash layers exactly tid2eid[token] on both sides, same weights."""
    c = v4_cases[name]
    cfg, tokens = c["cfg"], c["tokens"].reshape(-1)
    for i in range(cfg.num_hidden_layers):
        logits, wts, ids = c["hf_cap"][f"layers.{i}.gate"]
        ours_ids = c["cap"][f"layers.{i}.topk_ids"].reshape(-1, cfg.num_experts_per_tok)
        ours_w = c["cap"][f"layers.{i}.topk_weights"].reshape(ids.shape)
        assert (np.sort(ours_ids, -1) == np.sort(ids, -1)).all(), f"{name} layer {i}"
        if cfg.is_hash_layer(i):
            table = c["w"][f"model.layers.{i}.mlp.gate.tid2eid"][tokens]
            assert (ours_ids == table).all() and (ids == table).all()
        order_o, order_t = np.argsort(ours_ids, -1), np.argsort(ids, -1)
        ow, tw = np.take_along_axis(ours_w, order_o, -1), np.take_along_axis(wts, order_t, -1)
        assert np.abs(ow - tw).max() <= 1e-5 * np.abs(tw).max()
        assert rel(c["cap"][f"layers.{i}.router_logits"].reshape(logits.shape), logits) <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_indexer_selections_identical(v4_cases, name):
    """Every CSA layer, every row: the same selected entries (-1 for none) as transformers."""
    c = v4_cases[name]
    cfg = c["cfg"]
    csa = [i for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) == CSA]
    assert csa
    for i in csa:
        theirs, ours = hf_ids(c["hf_cap"][f"layers.{i}.index_ids"]), c["cap"][f"layers.{i}.index_ids"]
        assert theirs.shape == ours.shape
        assert (theirs == ours).all(), f"{name} layer {i}"


@pytest.mark.parametrize("t", [3, 4, 8])
def test_short_sequences(v4_cases, t):
    """No complete block yet (t < 4), exactly one CSA block (t = 4), the first HCA block (t = 8):
    empty and single-entry compressed sets behave as in transformers."""
    c = v4_cases["tiny-v4"]
    hooks = tiebreak_hooks(c["model"])
    try:
        theirs, _ = run_hf(c["model"], c["tokens"][:, :t])
    finally:
        for h in hooks:
            h.remove()
    assert rel(nv4.forward(c["tokens"][:, :t], c["w"], c["cfg"]), theirs) <= TOL


def test_untied_rows_agree_without_tiebreak(v4_cases):
    """transformers untouched (no tie-break hook): in the first CSA layer (same input on both
    sides: everything before it is sliding), rows without an exact tie select the same entries;
    tied rows exist (so the tie-break of the parity model is needed, not decoration)."""
    c = v4_cases["tiny-v4"]
    cfg = c["cfg"]
    i = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) == CSA)
    assert all(cfg.layer_type(j) == SLIDING for j in range(i))
    _, hf_cap = run_hf(c["model"], c["tokens"])
    theirs = hf_ids(hf_cap[f"layers.{i}.index_ids"])
    ours, tie = c["cap"][f"layers.{i}.index_ids"], c["cap"][f"layers.{i}.index_tie"]
    assert tie.any()
    differ = (theirs != ours).any(-1)
    assert not (differ & ~tie).any()


def test_block_boundary_visibility(v4_cases):
    """A compressed entry becomes visible at its block's LAST token: query t reads entries
    w < (t + 1) // m. CSA (m = 4): t = 2 sees none, t = 3 sees entry 0; transformers agrees."""
    c = v4_cases["tiny-v4"]
    cfg = c["cfg"]
    i = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) == CSA)
    m = cfg.compress_rate_csa
    for ids in (c["cap"][f"layers.{i}.index_ids"], hf_ids(c["hf_cap"][f"layers.{i}.index_ids"])):
        assert (ids[:, m - 2] == -1).all()
        assert (ids[:, m - 1] == np.array([0] + [-1] * (ids.shape[-1] - 1))).all()
    assert na.complete_blocks(np.arange(12), 4).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


# --------------------------------------------------------------------------------- gotchas
def _yarn_everywhere(orig):
    """Sliding layers get YaRN too (with their own theta)."""
    def inv_freq(cfg, compressed, yarn=True):
        return orig(cfg if compressed else cfg.replace(compress_rope_theta=cfg.rope_theta), True, yarn)
    return inv_freq


def _yarn_amplitude(orig):
    def cos_sin(cfg, positions, compressed):
        cos, sin = orig(cfg, positions, compressed)
        f = 0.1 * math.log(cfg.rope_scaling.factor) + 1.0 if compressed else 1.0  # YaRN's default mscale
        return cos * f, sin * f
    return cos_sin


def _swap_overlap_halves(orig):
    """Read the first half of the CSA projections as the block's own series (Cb) and the second
    as the one feeding the next block (Ca): the opposite of both codes."""
    def compress(x, w, cfg, prefix, m, width, overlap):
        if overlap:
            w = dict(w)
            for n in ("kv_proj.weight", "gate_proj.weight", "position_bias"):
                a = np.asarray(w[prefix + n])
                h = a.shape[-1] if n == "position_bias" else a.shape[0]
                sw = np.concatenate([a[..., h // 2:], a[..., :h // 2]], -1) if n == "position_bias" else \
                    np.concatenate([a[h // 2:], a[:h // 2]], 0)
                w[prefix + n] = sw
        return orig(x, w, cfg, prefix, m, width, overlap)
    return compress


def _router_bias_weighs(orig):
    def router(x, w, cfg, i, tokens):
        logits, ids, wts = orig(x, w, cfg, i, tokens)
        if not cfg.is_hash_layer(i):
            s = nv4.score(logits, cfg.scoring_func) + w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
            wts = np.take_along_axis(s, ids, -1)
            wts = wts / wts.sum(-1, keepdims=True) * cfg.routed_scaling_factor
        return logits, ids, wts
    return router


def _router_hash_by_topk(orig):
    """Hash layers choose the k best scores (no bias: they have none) instead of tid2eid[token]."""
    def router(x, w, cfg, i, tokens):
        logits, ids, wts = orig(x, w, cfg, i, tokens)
        if cfg.is_hash_layer(i):
            s = nv4.score(logits, cfg.scoring_func)
            ids = np.argsort(-s, -1, kind="stable")[:, :cfg.num_experts_per_tok]
            wts = np.take_along_axis(s, ids, -1)
            wts = wts / wts.sum(-1, keepdims=True) * cfg.routed_scaling_factor
        return logits, ids, wts
    return router


GOTCHAS = {
    # Sinkhorn: iters column normalisations after the softmax (not iters full rounds beyond it)
    "sinkhorn_one_extra_round": ("tiny-v4", nv4, "sinkhorn",
                                 lambda o: lambda lg, it, eps: o(lg, it + 1, eps)),
    "sinkhorn_without_eps": ("variant", nv4, "sinkhorn", lambda o: lambda lg, it, eps: o(lg, it, 0.0)),
    "sinkhorn_rows_last": ("tiny-v4", nv4, "sinkhorn",
                           lambda o: lambda lg, it, eps: (lambda m: m / (m.sum(-1, keepdims=True) + eps))(
                               o(lg, it, eps))),
    # hc_post reads comb transposed (sum over the FIRST index)
    "comb_not_transposed": ("tiny-v4", nv4, "hc_post",
                            lambda o: lambda f, h, post, comb: o(f, h, post, np.swapaxes(comb, -1, -2))),
    # clipped SwiGLU: the gate is clamped from above only
    "swiglu_gate_clamped_both_sides": ("tiny-v4", nv4, "clipped_swiglu",
                                       lambda o: lambda g, u, L: o(np.clip(g, -L, L) if L else g, u, L)),
    "swiglu_no_clamp": ("tiny-v4", nv4, "clipped_swiglu", lambda o: lambda g, u, L: o(g, u, None)),
    # YaRN only on the compressed layers, and with no amplitude factor on cos/sin
    "yarn_on_sliding_layers_too": ("tiny-v4", na, "rope_inv_freq", _yarn_everywhere),
    "yarn_nowhere": ("tiny-v4", na, "rope_inv_freq", lambda o: lambda cfg, comp, yarn=True: o(cfg, comp, False)),
    "yarn_amplitude_factor": ("tiny-v4", na, "rope_cos_sin", _yarn_amplitude),
    # V3's YaRN temperature (softmax scale * mscale^2) does not carry over: V4 uses head_dim^-1/2
    "v3_softmax_mscale": ("tiny-v4", ModelConfigV4, "softmax_scale", lambda o: property(
        lambda c: c.head_dim ** -0.5 * (0.1 * math.log(c.rope_scaling.factor) + 1.0) ** 2)),
    # compressor boundaries: an entry is visible from its block's last token, RoPE'd at its first
    "entry_visible_one_token_late": ("tiny-v4", na, "complete_blocks",
                                     lambda o: lambda pos, m: np.asarray(pos) // m),
    "entry_rope_at_block_end": ("tiny-v4", na, "entry_positions", lambda o: lambda n, m: o(n, m) + m - 1),
    "csa_overlap_halves_swapped": ("tiny-v4", na, "compress", _swap_overlap_halves),
    # K = V: the output's rope slice is rotated back by the query angle
    "no_output_derotation": ("tiny-v4", na, "derotate", lambda o: lambda x, cos, sin, r: x),
    # sinks are raw logits, not scaled by 1/sqrt(d), and they do take mass
    "sink_scaled": ("tiny-v4", na, "attend_with_sink", lambda o: lambda lg, s: o(lg, np.asarray(s) * 32 ** -0.5)),
    "no_sink": ("tiny-v4", na, "attend_with_sink", lambda o: lambda lg, s: o(lg, np.full_like(s, -np.inf))),
    # the correction bias chooses the experts but does not weigh them
    "router_bias_in_weights": ("tiny-v4", nv4, "router", _router_bias_weighs),
    # hash layers route by tid2eid, not by score
    "hash_layers_by_topk": ("tiny-v4", nv4, "router", _router_hash_by_topk),
}


@pytest.mark.parametrize("gotcha", list(GOTCHAS))
def test_gotcha_changes_logits(v4_cases, monkeypatch, gotcha):
    name, module, attr, make_wrong = GOTCHAS[gotcha]
    c = v4_cases[name]
    monkeypatch.setattr(module, attr, make_wrong(getattr(module, attr)))
    wrong = nv4.forward(c["tokens"], c["w"], c["cfg"])
    assert rel(c["ours"], c["theirs"]) <= TOL
    assert rel(wrong, c["theirs"]) > MOVED, f"{gotcha}: the wrong variant is invisible ({rel(wrong, c['theirs']):.1e})"


def test_shared_expert_clamp_flag(v4_cases):
    """shared_expert_clamp=True (DeepSeek's inference/model.py and transformers 5.24) is the one
    transformers reproduces; False (transformers' first V4 port, issue #46018) moves the logits."""
    for c in v4_cases.values():
        off = nv4.forward(c["tokens"], c["w"], c["cfg"], shared_expert_clamp=False)
        assert rel(off, c["theirs"]) > MOVED
        assert rel(nv4.forward(c["tokens"], c["w"], c["cfg"], shared_expert_clamp=True), c["theirs"]) <= TOL


def test_sinkhorn_is_doubly_stochastic_after_enough_iterations():
    """The projection converges to rows and columns summing to 1 (up to eps terms)."""
    lg = np.random.default_rng(0).normal(size=(5, 4, 4))
    m = nv4.sinkhorn(lg, 100, 1e-12)
    assert np.abs(m.sum(-1) - 1).max() < 1e-9 and np.abs(m.sum(-2) - 1).max() < 1e-9
    m1 = nv4.sinkhorn(lg, 1, 1e-12)  # one iteration: columns exact, rows not yet
    assert np.abs(m1.sum(-2) - 1).max() < 1e-9 and np.abs(m1.sum(-1) - 1).max() > 1e-3


def test_bad_tokens_one_line_error(v4_cases):
    c = v4_cases["tiny-v4"]
    for bad in (np.array([[0, c["cfg"].vocab_size]]), np.array([1, 2, 3]), np.array([[0.5, 1.0]])):
        with pytest.raises(ValueError, match="^tokens: "):
            nv4.forward(bad, c["w"], c["cfg"])
