"""The DeepSeek-V4 faults of the conformance kit's fault injection (tests/broken_reference.py).

Each fault is one mistake an engine can make in V4, switched on in the float64 reference
(reference/numpy_v4.py, numpy_v4_attention.py) or its checkpoint reader (checkpoint_v4.py) with
``unittest.mock.patch`` -- ``patch_v4(patch, fault, tokens)`` applies it; broken_reference.inject
restores everything on exit. Test code only.
"""

from __future__ import annotations

import math

import numpy as np

FAULTS_V4 = {
    "v4_no_sinks": "V4 attention sinks ignored (softmax over the keys alone)",
    "v4_window_off_by_one": "V4 sliding window of W + 1 keys (t - W <= s instead of t - W < s)",
    "v4_comb_not_transposed": "V4 hyper-connection comb applied untransposed (sum over its second index)",
    "v4_router_sigmoid": "V4 router scored with sigmoid whatever scoring_func says (sqrtsoftplus)",
    "v4_entry_visible_late": "V4 compressed entry readable only from the token after its block (t // m)",
    "v4_entry_visible_early": "V4 compressed entry readable from its block's first token (t // m + 1)",
    "v4_entry_rope_at_block_end": "V4 compressed entry RoPE'd at its block's last token instead of its first",
    "v4_index_not_causal": "V4 CSA indexer's top-k over every entry, later blocks included",
    "v4_csa_overlap_swapped": "V4 CSA compressor's two halves swapped (own block from the first half)",
    "v4_index_no_relu": "V4 indexer scores without the relu: sum_h w_h (q_h . K)",
    "v4_hash_by_topk": "V4 hash layers route by the router's top-k instead of tid2eid[token]",
    "v4_hash_by_position": "V4 hash layers look tid2eid up by position instead of token id",
    "v4_yarn_amplitude": "V4 YaRN with its default amplitude 0.1 ln(factor) + 1 on cos/sin",
    "v4_yarn_on_sliding": "V4 YaRN applied to the sliding-window layers too",
    "v4_sinkhorn_iters_fixed": "V4 Sinkhorn iterations fixed at the released 20 (config's ignored)",
    "v4_hc_eps_fixed": "V4 hc_eps fixed at the released 1e-6 (config's ignored)",
    "v4_swiglu_no_clamp": "V4 SwiGLU never clamped (swiglu_limit ignored)",
    "v4_swiglu_gate_both_sides": "V4 SwiGLU gate clamped to [-L, L] (it is clamped from above only)",
    "v4_shared_expert_unclamped": "V4 shared expert's SwiGLU not clamped (transformers' first V4 port)",
    "v4_ue8m0_bias_128": "UE8M0 scales decoded as 2^(byte - 128) (exponent bias off by one)",
    "v4_fp4_nibbles_swapped": "FP4 e2m1 pairs unpacked high nibble first",
}


def _indexer_no_relu(na):
    """numpy_v4_attention.indexer with relu(q . K) replaced by q . K (everything else its own steps)."""
    from dsref.reference.numpy_ref import linear

    def indexer(x, qr, w, cfg, prefix, positions):
        m, I, J = cfg.compress_rate_csa, cfg.index_n_heads, cfg.index_head_dim
        p = prefix + "compressor.indexer."
        keys = na.compress(x, w, cfg, p, m, J, overlap=True)
        B, T, _ = x.shape
        q = linear(qr, w[p + "q_b_proj.weight"]).reshape(B, T, I, J)
        cos, sin = na.rope_cos_sin(cfg, positions, compressed=True)
        q = na.rope_tail(q, cos, sin, cfg.qk_rope_head_dim)
        hw = linear(x, w[p + "scorer.weights_proj.weight"]) * I ** -0.5
        s = np.einsum("bth,bthn->btn", hw, np.einsum("bthj,bnj->bthn", q, keys)) * J ** -0.5
        return na.select_top(s, na.complete_blocks(positions, m), cfg.index_topk)
    return indexer


def _swap_overlap_halves(orig):
    def compress(x, w, cfg, prefix, m, width, overlap):
        if overlap:
            w = dict(w)
            for n in ("kv_proj.weight", "gate_proj.weight"):
                a = np.asarray(w[prefix + n])
                w[prefix + n] = np.concatenate([a[a.shape[0] // 2:], a[:a.shape[0] // 2]], 0)
            a = np.asarray(w[prefix + "position_bias"])
            w[prefix + "position_bias"] = np.concatenate([a[:, a.shape[1] // 2:], a[:, :a.shape[1] // 2]], 1)
        return orig(x, w, cfg, prefix, m, width, overlap)
    return compress


def _hash_router(nv4, orig, by: str, tokens):
    def router(x, w, cfg, i, toks):
        logits, ids, wts = orig(x, w, cfg, i, toks)
        if not cfg.is_hash_layer(i):
            return logits, ids, wts
        s = nv4.score(logits, cfg.scoring_func)
        if by == "topk":
            ids = np.argsort(-s, -1, kind="stable")[:, :cfg.num_experts_per_tok]
        else:  # the token's position within its sequence
            T = np.shape(tokens)[1]
            ids = np.asarray(w[f"model.layers.{i}.mlp.gate.tid2eid"])[np.arange(len(toks)) % T].astype(np.int64)
        wts = np.take_along_axis(s, ids, -1)
        return logits, ids, wts / wts.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    return router


def patch_v4(patch, fault: str, tokens) -> None:
    """Switch one V4 fault on through ``patch(obj, name, new)`` (broken_reference.inject's)."""
    from dsref.reference import checkpoint_v4 as ck4
    from dsref.reference import numpy_v4 as nv4
    from dsref.reference import numpy_v4_attention as na
    if fault == "v4_no_sinks":
        o = na.attend_with_sink
        patch(na, "attend_with_sink", lambda logits, sinks: o(logits, np.full(np.shape(sinks), -np.inf)))
    elif fault == "v4_window_off_by_one":
        o = na.sliding_mask
        patch(na, "sliding_mask", lambda positions, W: o(positions, W + 1))
    elif fault == "v4_comb_not_transposed":
        o = nv4.hc_post
        patch(nv4, "hc_post", lambda f, h, post, comb: o(f, h, post, np.swapaxes(comb, -1, -2)))
    elif fault == "v4_router_sigmoid":
        o = nv4.score
        patch(nv4, "score", lambda logits, scoring_func: o(logits, "sigmoid"))
    elif fault == "v4_entry_visible_late":
        patch(na, "complete_blocks", lambda positions, m: np.asarray(positions) // m)
    elif fault == "v4_entry_visible_early":
        patch(na, "complete_blocks", lambda positions, m: np.asarray(positions) // m + 1)
    elif fault == "v4_entry_rope_at_block_end":
        o = na.entry_positions
        patch(na, "entry_positions", lambda n, m: o(n, m) + m - 1)
    elif fault == "v4_index_not_causal":
        o = na.select_top
        patch(na, "select_top", lambda scores, n_visible, k: o(scores, np.full(np.shape(n_visible),
                                                                                 scores.shape[-1]), k))
    elif fault == "v4_csa_overlap_swapped":
        patch(na, "compress", _swap_overlap_halves(na.compress))
    elif fault == "v4_index_no_relu":
        patch(na, "indexer", _indexer_no_relu(na))
    elif fault in ("v4_hash_by_topk", "v4_hash_by_position"):
        patch(nv4, "router", _hash_router(nv4, nv4.router, fault.rsplit("_", 1)[1], tokens))
    elif fault == "v4_yarn_amplitude":
        o = na.rope_cos_sin

        def cos_sin(cfg, positions, compressed):
            cos, sin = o(cfg, positions, compressed)
            f = 0.1 * math.log(cfg.rope_scaling.factor) + 1.0 if compressed and cfg.rope_scaling else 1.0
            return cos * f, sin * f
        patch(na, "rope_cos_sin", cos_sin)
    elif fault == "v4_yarn_on_sliding":
        o = na.rope_inv_freq
        patch(na, "rope_inv_freq", lambda cfg, compressed, yarn=True:
              o(cfg if compressed else cfg.replace(compress_rope_theta=cfg.rope_theta), True, yarn))
    elif fault == "v4_sinkhorn_iters_fixed":
        o = nv4.sinkhorn
        patch(nv4, "sinkhorn", lambda logits, iters, eps: o(logits, 20, eps))
    elif fault == "v4_hc_eps_fixed":
        o_pre, o_head = nv4.hc_pre, nv4.hc_head
        fix = lambda cfg: cfg.replace(hc_eps=1e-6)  # noqa: E731
        patch(nv4, "hc_pre", lambda h, w, cfg, prefix: o_pre(h, w, fix(cfg), prefix))
        patch(nv4, "hc_head", lambda h, w, cfg, prefix="model.hc_head.": o_head(h, w, fix(cfg), prefix))
    elif fault == "v4_swiglu_no_clamp":
        o = nv4.clipped_swiglu
        patch(nv4, "clipped_swiglu", lambda g, u, L: o(g, u, None))
    elif fault == "v4_swiglu_gate_both_sides":
        o = nv4.clipped_swiglu
        patch(nv4, "clipped_swiglu", lambda g, u, L: o(np.clip(g, -L, L) if L else g, u, L))
    elif fault == "v4_shared_expert_unclamped":
        o = nv4.forward
        patch(nv4, "forward", lambda *a, **k: o(*a, **{**k, "shared_expert_clamp": False}))
    elif fault == "v4_ue8m0_bias_128":
        o = ck4.ue8m0_to_float
        patch(ck4, "ue8m0_to_float", lambda s: o(s) * 0.5)
    elif fault == "v4_fp4_nibbles_swapped":
        o = ck4.dequantize_fp4

        def dequant(packed, scale):
            p = np.asarray(packed).view(np.uint8)
            return o((((p & 0x0F) << 4) | (p >> 4)).astype(np.uint8).view(np.asarray(packed).dtype), scale)
        patch(ck4, "dequantize_fp4", dequant)
    else:
        raise ValueError(f"not a V4 fault: {fault!r}")
