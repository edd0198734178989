"""Exact parameter shapes and counts, declared once per layer.

Every other piece (JAX init, NumPy reference, checkpoint loader, simulator) takes
its shapes from here, so the model is described in exactly one place.
Names are the Hugging Face checkpoint names relative to the layer.
"""

from __future__ import annotations

from reference.config import ModelConfig


def attention_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """MLA weights of one layer, in HF layout [out_features, in_features]."""
    D, H = c.hidden_size, c.num_attention_heads
    N, P, A, R = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    s: dict[str, tuple[int, ...]] = {}
    if c.arch == "dense":
        hd, K = c.dense_head_dim, c.num_key_value_heads
        s["q_proj.weight"] = (H * hd, D)
        s["k_proj.weight"] = (K * hd, D)
        s["v_proj.weight"] = (K * hd, D)
        if c.attention_bias:
            s["q_proj.bias"] = (H * hd,)
            s["k_proj.bias"] = (K * hd,)
            s["v_proj.bias"] = (K * hd,)
        s["o_proj.weight"] = (D, H * hd)
        return s
    if c.q_lora_rank is None:
        s["q_proj.weight"] = (H * (N + P), D)
    else:
        s["q_a_proj.weight"] = (c.q_lora_rank, D)
        s["q_a_layernorm.weight"] = (c.q_lora_rank,)
        s["q_b_proj.weight"] = (H * (N + P), c.q_lora_rank)
    s["kv_a_proj_with_mqa.weight"] = (R + P, D)
    s["kv_a_layernorm.weight"] = (R,)
    s["kv_b_proj.weight"] = (H * (N + A), R)
    s["o_proj.weight"] = (D, H * A)
    return s


def mlp_shapes(D: int, F: int) -> dict[str, tuple[int, ...]]:
    return {"gate_proj.weight": (F, D), "up_proj.weight": (F, D), "down_proj.weight": (D, F)}


def moe_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Router + stacked routed experts [E, ...] + shared experts (HF names; experts stacked)."""
    D, E, F = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    s: dict[str, tuple[int, ...]] = {"gate.weight": (E, D)}
    if c.topk_method == "noaux_tc":
        s["gate.e_score_correction_bias"] = (E,)
    for k, v in mlp_shapes(D, F).items():
        s["experts." + k] = (E, *v)
    if c.n_shared_experts:
        for k, v in mlp_shapes(D, F * c.n_shared_experts).items():
            s["shared_experts." + k] = v
    return s


def layer_shapes(c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """All weights of decoder layer i, names relative to 'model.layers.{i}.'."""
    D = c.hidden_size
    s = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
    s.update({"self_attn." + k: v for k, v in attention_shapes(c).items()})
    mlp = moe_shapes(c) if c.is_moe_layer(i) else mlp_shapes(D, c.intermediate_size)
    s.update({"mlp." + k: v for k, v in mlp.items()})
    return s


def mtp_extra_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Weights an MTP module adds around its decoder layer (DeepSeek-V3 layout).

    The checkpoint also stores copies of embed_tokens and shared_head.head; the
    model shares them with the main model, so they are counted separately.
    """
    D = c.hidden_size
    return {"enorm.weight": (D,), "hnorm.weight": (D,), "eh_proj.weight": (D, 2 * D),
            "shared_head.norm.weight": (D,)}


def global_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
         "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return s


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _sum(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(_numel(v) for v in shapes.values())


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Exact counts.

    total_params: main model (embeddings, all layers, final norm, LM head).
    activated_params: weights a token computes with: all layers except the routed
      experts it does not select (k of E count), plus the LM head; the input
      embedding table is excluded (a token reads one row of it). This convention
      reproduces the published 37B (V3: 36.6B), 21B (V2: 20.9B), 2.4B (V2-Lite:
      2.45B) and 32B (Kimi-K2: 31.7B).
    mtp_params: the MTP module(s) without the embedding/head copies;
    mtp_checkpoint_params: as stored in the published checkpoint (with copies).
    """
    glob = _sum(global_shapes(c))
    total = glob
    embed = c.vocab_size * c.hidden_size
    active = glob - (0 if c.tie_word_embeddings else embed)
    for i in range(c.num_hidden_layers):
        ls = layer_shapes(c, i)
        n = _sum(ls)
        total += n
        if c.is_moe_layer(i):
            per_expert = _sum({k: v for k, v in ls.items() if ".experts." in k}) // c.n_routed_experts
            n -= per_expert * (c.n_routed_experts - c.num_experts_per_tok)
        active += n
    mtp = 0
    if c.is_moe and c.num_nextn_predict_layers:
        last = c.num_hidden_layers  # MTP layers are indexed after the main layers (MoE blocks)
        mtp = c.num_nextn_predict_layers * (_sum(layer_shapes(c, last)) + _sum(mtp_extra_shapes(c)))
    copies = c.num_nextn_predict_layers * 2 * c.vocab_size * c.hidden_size if mtp else 0
    return {
        "total_params": total,
        "activated_params": active,
        "embedding_params": c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2),
        "mtp_params": mtp,
        "mtp_checkpoint_params": mtp + copies,
        "checkpoint_params": total + mtp + copies,
    }
