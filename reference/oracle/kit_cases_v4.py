"""The conformance kit's DeepSeek-V4 family: its baseline config and its adversarial weights.

The V4 cases themselves are listed with the others in oracle/kit_cases.py (one CASES tuple, one
attribution); this module holds what only they need, so kit_cases stays one screen of cases.

The **V4 baseline** (``v4-baseline``) is one V4 decoder layer at its simplest: sliding-window
attention only (window 4 over 12 tokens, so the window bites), shared K=V head with partial RoPE
(the last 8 of 16 dims), attention sinks, 2 output groups, hc_mult 3 hyper-connection streams (2
would hide a transposed comb: a 2x2 doubly stochastic matrix is symmetric)
with the released Sinkhorn settings (20 iterations, eps 1e-6), a sqrtsoftplus router with zero
correction bias choosing 2 of 8 experts, one shared expert, swiglu_limit 10 (which values of
this size never reach), no YaRN, float32 weights. Every other V4 case changes one thing from it.
"""

from __future__ import annotations

import numpy as np

from dsref.reference.config_v4 import MOE, SLIDING
from dsref.reference.params_v4 import INT64, tensors

V4_BASELINE = "v4-baseline"

BASE_V4 = dict(
    vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, q_lora_rank=24, qk_rope_head_dim=8, o_groups=2, o_lora_rank=8,
    sliding_window=4, layer_types=(SLIDING,), compress_rate_csa=4, compress_rate_hca=4, index_n_heads=2,
    index_head_dim=16, index_topk=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    mlp_layer_types=(MOE,), scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
    hc_mult=3, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
    compress_rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64, num_nextn_predict_layers=0,
    mtp_layer_types=())


def case_weights_v4(seed: int, cfg, comb_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Deterministic weights for a V4 case (transformers' names, float32; tid2eid int64): random
    matrices with x W ~ O(1), norms around 1, sinks and compressor position biases ~ N(0, 1) (so
    they matter), hyper-connection scales around 1 and bases around 0 (so pre / post / comb are
    far from uniform), zero router correction bias (the baseline's), and a tid2eid table giving
    each token id k distinct experts (hash routing then differs from any top-k of the scores).
    comb_scale multiplies the hyper-connections' comb logit scale (s2): sharp logits keep the
    Sinkhorn-Knopp iteration far from converged for a few steps, so its iteration count shows."""
    rng = np.random.default_rng(2000 + seed)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    w = {}
    for t in tensors(cfg):
        n, s = t.name, t.shape
        if t.stored == INT64:
            w[n] = np.stack([rng.permutation(E)[:k] for _ in range(s[0])]).astype(np.int64)
            continue
        if n.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(s)
        elif n.endswith("e_score_correction_bias"):
            a = np.zeros(s)
        elif n.endswith(("sinks", "position_bias")):
            a = rng.standard_normal(s)
        elif n.endswith(("hc.scale", "hc_scale")):
            a = 1.0 + 0.5 * rng.standard_normal(s)
            if n.endswith("hc.scale"):  # [pre, post, comb]; hc_head's has one entry
                a[2] *= comb_scale
        elif n.endswith(("hc.base", "hc_base")):
            a = 0.5 * rng.standard_normal(s)
        elif n.endswith("embed_tokens.weight"):
            a = rng.standard_normal(s)
        else:
            a = 0.3 * rng.standard_normal(s) * min(1.0, (32 / s[-1]) ** 0.5)  # keep x W ~ O(1) at any width
        w[n] = np.asarray(a, np.float32)
    return w


def routing_margins_v4(golden: dict[str, np.ndarray], cfg, w: dict[str, np.ndarray]) -> dict[str, float]:
    """Per routed (not hash) MoE layer, the smallest gap over tokens between the k-th and next
    biased score (sqrtsoftplus or sigmoid of the golden router logits + correction bias), float64.
    Hash layers are decided by tid2eid alone: no margin (inf)."""
    from dsref.reference.numpy_v4 import score
    out = {}
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    for i in range(cfg.num_hidden_layers):
        if cfg.is_hash_layer(i) or k >= E:
            out[f"layers.{i}"] = float("inf")
            continue
        s = score(golden[f"layers.{i}.router_logits"].reshape(-1, E).astype(np.float64), cfg.scoring_func)
        srt = -np.sort(-(s + np.asarray(w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"], np.float64)), -1)
        out[f"layers.{i}"] = float((srt[:, k - 1] - srt[:, k]).min())
    return out


def index_margins_v4(golden: dict[str, np.ndarray], cfg, w: dict[str, np.ndarray], tokens: np.ndarray) -> dict[str, float]:
    """Per CSA layer, the smallest relative gap (dsa.boundary_gap, float64) between the index_topk-th
    and next visible index score, over rows that select (more than index_topk entries visible) and
    are not exact ties. Layer i's input streams are the golden's layers.{i-1}.hidden (the embedding
    copied into every stream for layer 0)."""
    from dsref.reference import dsa, numpy_v4_attention as na
    from dsref.reference.config_v4 import CSA
    from dsref.reference.numpy_ref import linear, rms_norm
    from dsref.reference.numpy_v4 import hc_pre
    from dsref.reference.params_v4 import EMBED
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    B, T = tokens.shape
    n, D = cfg.hc_mult, cfg.hidden_size
    pos = np.broadcast_to(np.arange(T), (B, T))
    out = {}
    for i in range(cfg.num_hidden_layers):
        if cfg.layer_type(i) != CSA:
            continue
        h = (np.repeat(f64(w[EMBED])[tokens][:, :, None], n, axis=2) if i == 0 else
             f64(golden[f"layers.{i - 1}.hidden"]).reshape(B, T, n, D))
        p = f"model.layers.{i}."
        lw = {k: (v if np.asarray(v).dtype.kind in "iu" else f64(v)) for k, v in w.items() if k.startswith(p)}
        x = rms_norm(hc_pre(h, lw, cfg, p + "attn_hc.")[0], lw[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        a = p + "self_attn."
        qr = rms_norm(linear(x, lw[a + "q_a_proj.weight"]), lw[a + "q_a_norm.weight"], cfg.rms_norm_eps)
        sel = na.indexer(x, qr, lw, cfg, a, pos)
        vis = np.arange(sel.scores.shape[-1]) < na.complete_blocks(pos, cfg.compress_rate_csa)[..., None]
        gap = dsa.boundary_gap(sel, vis, cfg.index_topk)[~sel.tie]
        out[f"layers.{i}"] = float(gap.min()) if gap.size else float("inf")
    return out
