"""The DeepSeek-V3/V2 forward pass in plain NumPy float64: the ground truth.

Short and literal on purpose: every function follows the equations of the
DeepSeek-V2 (MLA, arXiv 2405.04434) and DeepSeek-V3 (arXiv 2412.19437) papers,
and docs/architecture.md points here. GQA models (arch "dense": Qwen2.5, LLaMA,
Qwen3 with its per-head q/k RMSNorm, Qwen3-MoE with its softmax top-k router)
run through ``gqa`` and ``qwen3_gate`` (docs/models.md).

Weights are a flat dict with Hugging Face names; routed experts are stacked:
``model.layers.{i}.mlp.experts.gate_proj.weight`` has shape [E, F, D].

Shapes use the project's letters: B batch, T tokens, D hidden, H heads,
N nope dim, P rope dim, A value dim, R kv_lora_rank, E experts, k top-k, F ffn.
"""

from __future__ import annotations

import math

import numpy as np

from dsref.reference.config import MLA_NORM_EPS, ModelConfig, yarn_get_mscale
from dsref.reference.params import EMBED, FINAL_NORM, head_name

f64 = np.float64


def rms_norm(x, w, eps):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * w."""
    x = x.astype(f64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, w, b=None):
    """x @ w.T (+ b), with w in [out, in] layout as in the checkpoints."""
    y = x @ np.asarray(w, f64).T
    return y if b is None else y + b


# ----------------------------------------------------------------- rotary (YaRN)
def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [P/2] and the cos/sin attention factor.

    YaRN (arXiv 2309.00071): dimensions that rotate fast (more than beta_fast turns
    over the original context) keep their frequency (extrapolation); slow ones
    (fewer than beta_slow turns) are divided by `factor` (interpolation); a linear
    ramp blends the dimensions in between.
    """
    dim, base = cfg.qk_rope_head_dim if cfg.arch == "deepseek" else cfg.dense_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=f64) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    def correction_dim(num_rotations):
        # dimension index whose wavelength makes `num_rotations` turns in the original context
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=f64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = inv_freq / rs.factor * (1.0 - extrapolate) + inv_freq * extrapolate
    return inv_freq, rope_attention_factor(cfg)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Factor on cos/sin (Hugging Face semantics): mscale(f, mscale)/mscale(f, mscale_all_dim).

    For every released DeepSeek config mscale == mscale_all_dim, so it is 1; the
    temperature then lives entirely in the softmax scale (ModelConfig.softmax_scale).
    """
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.attention_factor is not None:
        return rs.attention_factor
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_get_mscale(rs.factor)


def rope_cos_sin(cfg: ModelConfig, positions):
    """cos, sin of shape [..., P/2] for integer positions [...]."""
    inv_freq, att = rope_frequencies(cfg)
    ang = np.asarray(positions, f64)[..., None] * inv_freq
    return np.cos(ang) * att, np.sin(ang) * att


def _bcast(c, x):
    """[B, T, P/2] -> [B, T, 1.., P/2] so it broadcasts over head axes of x."""
    while c.ndim < x.ndim:
        c = c[..., None, :]
    return c


def apply_rope_interleaved(x, cos, sin):
    """Rotate interleaved pairs (x0,x1),(x2,x3),... by angle i (DeepSeek's layout).

    x: [B, T, ..., P]; cos/sin: [B, T, P/2]. The output stays interleaved, as in
    DeepSeek's own inference code (transformers de-interleaves instead; the dot
    products q.k are identical, the stored k_pe is a permutation).
    """
    cos, sin = _bcast(cos, x), _bcast(sin, x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=f64)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def apply_rope_half(x, cos, sin):
    """Rotate halves (x_i, x_{i+P/2}) (LLaMA/Qwen layout), for dense models."""
    cos, sin = _bcast(cos, x), _bcast(sin, x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ------------------------------------------------------------------------- MLA
NUMERICS = ("exact", "deepseek-fp8")  # the oracle; DeepSeek-V3.2's deployed FP8 indexer and KV cache


def mla(x, w, cfg: ModelConfig, positions, prefix: str, capture: dict | None = None, numerics: str = "exact"):
    """Multi-head Latent Attention, naive form (keys/values expanded per head).

    c_kv = RMSNorm(x W_dkv)            latent   [B, T, R]   (what the cache stores)
    k_pe = RoPE(x W_kr)                shared   [B, T, P]   (cached too)
    [k_nope | v] = c_kv W_ukv          per head [B, T, H, N+A]
    q = (RMSNorm(x W_dq)) W_uq  (or x W_q without q_lora)   [B, T, H, N+P]
    o = softmax(q.k * scale + causal) v,  out = o W_o
    V3.2 (cfg.has_indexer): ``causal`` becomes the lightning indexer's top-index_topk selection
    (reference/dsa.py), a subset of it; capture gets index_ids, index_tie and index_tied.
    numerics "deepseek-fp8" (V3.2 only; an option, not the oracle): DeepSeek's inference code's
    FP8 + Hadamard indexer and its FP8 rounding of the latent c_kv (reference/dsa_official.py).
    """
    B, T, _ = x.shape
    H, N, P, A, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim, cfg.kv_lora_rank)
    g = lambda n: w[prefix + n]
    if cfg.q_lora_rank is None:
        q = linear(x, g("q_proj.weight"))
    else:
        q = linear(rms_norm(linear(x, g("q_a_proj.weight")), g("q_a_layernorm.weight"), MLA_NORM_EPS),
                   g("q_b_proj.weight"))
    q = q.reshape(B, T, H, N + P)
    q_nope, q_pe = q[..., :N], q[..., N:]
    kv = linear(x, g("kv_a_proj_with_mqa.weight"))
    c_kv = rms_norm(kv[..., :R], g("kv_a_layernorm.weight"), MLA_NORM_EPS)
    if numerics == "deepseek-fp8":  # what the FP8 KV cache holds, used by prefill and decode alike
        from dsref.reference.dsa_official import round_kv_fp8
        c_kv = round_kv_fp8(c_kv)
    cos, sin = rope_cos_sin(cfg, positions)
    # DeepSeek's checkpoints rotate interleaved pairs (2i, 2i+1); a config.json with
    # rope_interleave false (transformers' switch) rotates half-split pairs (i, i + P/2)
    rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope_half
    q_pe = rope(q_pe, cos, sin)
    k_pe = rope(kv[..., R:], cos, sin)  # [B, T, P], one head shared by all
    kvb = linear(c_kv, g("kv_b_proj.weight")).reshape(B, T, H, N + A)
    k_nope, v = kvb[..., :N], kvb[..., N:]
    scores = (np.einsum("bthn,bshn->bhts", q_nope, k_nope)
              + np.einsum("bthp,bsp->bhts", q_pe, k_pe)) * cfg.softmax_scale
    causal = np.triu(np.ones((T, T), bool), k=1)
    if cfg.has_indexer:
        from dsref.reference import dsa  # dsa builds on this module's rope and norms
        if numerics == "deepseek-fp8":
            from dsref.reference.dsa_official import indexer_official
            sel = indexer_official(x, w, cfg, positions, prefix)
        else:
            sel = dsa.indexer(x, w, cfg, positions, prefix)
        causal = ~sel.mask[:, None]  # [B, 1, T, T]: keys the indexer did not select
        if capture is not None:
            capture.update(index_ids=sel.ids, index_tie=sel.tie, index_tied=sel.tied)
    scores = np.where(causal, -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bsha->btha", p, v).reshape(B, T, H * A)
    return linear(o, g("o_proj.weight"))


def gqa(x, w, cfg: ModelConfig, positions, prefix: str):
    """Grouped-query attention (Qwen2.5 / LLaMA / Qwen3 / Qwen3-MoE).

    Qwen3 (qk_norm): q and k are RMS-normalised over head_dim, each head on its own
    with one shared [head_dim] weight, after the projection and *before* RoPE
    (transformers Qwen3MoeAttention; eps = rms_norm_eps).
    """
    B, T, _ = x.shape
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dense_head_dim
    g = lambda n: w.get(prefix + n)
    q = linear(x, g("q_proj.weight"), g("q_proj.bias")).reshape(B, T, H, hd)
    k = linear(x, g("k_proj.weight"), g("k_proj.bias")).reshape(B, T, K, hd)
    v = linear(x, g("v_proj.weight"), g("v_proj.bias")).reshape(B, T, K, hd)
    if cfg.qk_norm:
        q = rms_norm(q, g("q_norm.weight"), cfg.rms_norm_eps)
        k = rms_norm(k, g("k_norm.weight"), cfg.rms_norm_eps)
    cos, sin = rope_cos_sin(cfg, positions)
    q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * cfg.softmax_scale
    s = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hd)
    return linear(o, g("o_proj.weight"))


# ------------------------------------------------------------------------- MoE
def gate(x, w, cfg: ModelConfig, prefix: str):
    """Router: returns (router_logits [M, E], topk_ids [M, k], topk_weights [M, k]).

    V3 (noaux_tc): s = sigmoid(x W_g); selection uses s + bias (the auxiliary-loss-free
    balancing bias), restricted to the topk_group groups with the largest sum of their
    top-2 biased scores (others masked with -inf, never 0: biased scores can be < 0);
    the weights are the *unbiased* s of the chosen experts, normalised if
    norm_topk_prob, times routed_scaling_factor.
    V2 (softmax): s = softmax(x W_g); greedy top-k, or group_limited_greedy with
    a group scored by its max. Weights: normalised if norm_topk_prob, else scaled
    by routed_scaling_factor (DeepSeek-V2's own code does one or the other).
    """
    E, k, G, kg = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    logits = linear(x, w[prefix + "gate.weight"])
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores.copy()
    if cfg.topk_method == "noaux_tc":
        choice = choice + w[prefix + "gate.e_score_correction_bias"]
    if cfg.topk_method != "greedy" and G > 1:
        grouped = choice.reshape(-1, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, :kg]
        mask = np.ones_like(group_score, bool)
        np.put_along_axis(mask, keep_groups, False, axis=-1)
        choice = np.where(np.repeat(mask, E // G, axis=-1), -np.inf, choice)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(scores, ids, axis=-1)
    if cfg.scoring_func == "sigmoid":
        if cfg.norm_topk_prob:
            wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        wts = wts * cfg.routed_scaling_factor
    elif cfg.norm_topk_prob and k > 1:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    else:
        wts = wts * cfg.routed_scaling_factor
    return logits, ids, wts


def qwen3_gate(x, w, cfg: ModelConfig, prefix: str):
    """Qwen3-MoE router (transformers Qwen3MoeTopKRouter): p = softmax(x W_g) over all E
    experts, the k largest p, divided by their sum iff norm_topk_prob (also for k = 1);
    no groups, no bias, no scaling. Returns (router_logits, topk_ids, topk_weights)."""
    k = cfg.num_experts_per_tok
    logits = linear(x, w[prefix + "gate.weight"])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(p, ids, axis=-1)
    if cfg.norm_topk_prob:
        wts = wts / wts.sum(-1, keepdims=True)
    return logits, ids, wts


def mlp(x, w, prefix: str):
    """SwiGLU MLP: (silu(x W_gate) * x W_up) W_down."""
    return linear(silu(linear(x, w[prefix + "gate_proj.weight"])) * linear(x, w[prefix + "up_proj.weight"]),
                  w[prefix + "down_proj.weight"])


def moe(x, w, cfg: ModelConfig, prefix: str, capture: dict | None = None):
    """DeepSeekMoE: shared experts (always on) + weighted sum of the k routed experts.
    Qwen3-MoE (arch 'dense'): the same sum with its own router and no shared expert."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits, ids, wts = (gate if cfg.arch == "deepseek" else qwen3_gate)(x, w, cfg, prefix)
    out = np.zeros_like(x)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        ew = {n: w[prefix + "experts." + n][e] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")}
        out[tok] += mlp(x[tok], ew, "") * wts[tok, slot][:, None]
    if cfg.n_shared_experts:
        out += mlp(x, w, prefix + "shared_experts.")
    if capture is not None:
        capture.update(router_logits=logits.reshape(*shape[:-1], -1),
                       topk_ids=ids.reshape(*shape[:-1], -1), topk_weights=wts.reshape(*shape[:-1], -1))
    return out.reshape(shape)


# --------------------------------------------------------------------- model
def check_numerics(cfg: ModelConfig, numerics: str) -> None:
    """ValueError naming the option unless ``numerics`` is one of NUMERICS and fits the model."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    if numerics != "exact" and not cfg.has_indexer:
        raise ValueError(f"numerics {numerics!r} is DeepSeek-V3.2's (its FP8 indexer and KV cache); "
                         f"{cfg.name} has no indexer")


def decoder_layer(h, w, cfg: ModelConfig, i: int, positions, capture: dict | None = None,
                  prefix: str | None = None, numerics: str = "exact"):
    p = f"model.layers.{i}." if prefix is None else prefix
    layer_cap: dict | None = {} if capture is not None else None
    x = rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    if cfg.arch != "deepseek":
        a = gqa(x, w, cfg, positions, p + "self_attn.")
    elif cfg.has_indexer:  # capture by keyword for V3.2 only: fault injections replace mla with the 5-argument form
        a = mla(x, w, cfg, positions, p + "self_attn.", capture=layer_cap,
                **({"numerics": numerics} if numerics != "exact" else {}))
    else:
        a = mla(x, w, cfg, positions, p + "self_attn.")
    h = h + a
    x = rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    if cfg.is_moe_layer(i):
        h = h + moe(x, w, cfg, p + "mlp.", layer_cap)
    else:
        h = h + mlp(x, w, p + "mlp.")
    if capture is not None:
        capture[f"layers.{i}.attn_out"] = a
        capture[f"layers.{i}.hidden"] = h
        for k2, v in layer_cap.items():
            capture[f"layers.{i}.{k2}"] = v
    return h


def forward(tokens, w, cfg: ModelConfig, capture: dict | None = None, return_hidden: bool = False,
            numerics: str = "exact"):
    """Logits [B, T, V] (float64) for token ids [B, T] (causal, positions 0..T-1). numerics: see mla."""
    check_numerics(cfg, numerics)
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    h = np.asarray(w[EMBED], f64)[tokens]
    for i in range(cfg.num_hidden_layers):
        h = decoder_layer(h, w, cfg, i, positions, capture, numerics=numerics)
    hn = rms_norm(h, w[FINAL_NORM], cfg.rms_norm_eps)
    head = w[head_name(cfg)]
    logits = linear(hn, head)
    return (logits, hn) if return_hidden else logits


def mtp_forward(tokens, h_main, w, cfg: ModelConfig, depth: int = 0, numerics: str = "exact"):
    """DeepSeek-V3 multi-token prediction module `depth`: logits [B, T-1, V] (see mtp_hidden)."""
    return linear(mtp_hidden(tokens, h_main, w, cfg, depth, numerics), w[head_name(cfg)])


def mtp_hidden(tokens, h_main, w, cfg: ModelConfig, depth: int = 0, numerics: str = "exact"):
    """DeepSeek-V3 multi-token prediction module `depth` (predicts token t+2 at position t), up
    to its shared_head norm (the streaming golden applies the head in vocabulary chunks).

    What this code computes: x = eh_proj [enorm(Emb(t_{t+1})); hnorm(h_t)], embedding
    FIRST, where h_t is the main model's hidden state AFTER its final norm (the `hn`
    that forward(return_hidden=True) returns), then one decoder layer and this module's
    shared_head.norm. Inputs: tokens [B, T] and that post-norm hidden state [B, T, D];
    position t uses h_t and the embedding of token t+1, so the output covers positions
    0..T-2.

    Two conventions exist, and this follows the one the released weights are run with:
    * order: the V3 report's eq. (21) writes M_k [RMSNorm(h); RMSNorm(Emb)] (hidden
      first); vLLM's deepseek_mtp.py and SGLang's deepseek_nextn.py concatenate [enorm(emb); hnorm(h)]
      to feed the released eh_proj.weight [D, 2D] (its shape cannot tell the order).
    * pre/post final norm: DeepSeek never documented it (its V3 inference code has no
      MTP); vLLM/SGLang feed the post-norm state, llama.cpp PR #24025 and torchtitan's
      training code the pre-norm state. docs/oracle.md ("MTP") has the sources.
    The conformance kit's case `mtp` (w) pins both: its faults mtp_concat_order and
    mtp_prenorm_hidden (tests/broken_reference.py) must each fail it.
    """
    i = cfg.num_hidden_layers + depth
    p = f"model.layers.{i}."
    emb = np.asarray(w[EMBED], f64)[np.asarray(tokens)[:, 1:]]
    h = h_main[:, :-1]
    x = np.concatenate([rms_norm(emb, w[p + "enorm.weight"], cfg.rms_norm_eps),
                        rms_norm(h, w[p + "hnorm.weight"], cfg.rms_norm_eps)], axis=-1)
    x = linear(x, w[p + "eh_proj.weight"])
    B, T1, _ = x.shape
    positions = np.broadcast_to(np.arange(T1), (B, T1))
    x = decoder_layer(x, w, cfg, i, positions, prefix=p, numerics=numerics)
    return rms_norm(x, w[p + "shared_head.norm.weight"], cfg.rms_norm_eps)
