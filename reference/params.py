"""Exact parameter shapes and counts, declared once: the tensor table.

``tensors(cfg, mtp=...)`` yields one row per weight (name, shape, layer, group).
Every other piece (JAX init and the checkpoint view, checkpoint IO, parameter
counts, every byte count of the simulator) iterates over it, so the model is
described in exactly one place: a new layer kind means editing the shape
functions below and the compute functions, nothing else. Names are the Hugging
Face checkpoint names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsref.reference.config import ModelConfig


def attention_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Attention weights of one layer (MLA, or GQA for arch 'dense'), in HF layout
    [out_features, in_features]. Qwen3's q_norm / k_norm are one head_dim-wide RMSNorm
    weight each, shared by all heads (transformers Qwen3MoeAttention)."""
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
        if c.qk_norm:
            s["q_norm.weight"] = (hd,)
            s["k_norm.weight"] = (hd,)
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
    if c.has_indexer:
        s.update({INDEXER + k: v for k, v in indexer_shapes(c).items()})
    return s


#: Where a V3.2 layer's indexer weights live, relative to the layer (transformers
#: DeepseekV32Attention.indexer; the released checkpoints use the same names).
INDEXER = "indexer."


def indexer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3.2's lightning indexer of one layer (reference/dsa.py), relative to
    'self_attn.indexer.', in transformers' DeepseekV32Indexer order and names, which are the
    released checkpoint's (model.layers.{i}.self_attn.indexer.wq_b.weight ...). DeepSeek's own
    inference code keeps the leaf names under 'layers.{i}.attn.indexer.' (its convert.py maps
    wq_b, wk, k_norm, weights_proj to themselves).

      wq_b          [I*J, Q]  queries from MLA's compressed query (after q_a_layernorm)
      wk            [J, D]    one key per token, shared by the I heads
      k_norm        [J] + [J] LayerNorm weight and bias (a LayerNorm, not an RMSNorm)
      weights_proj  [I, D]    per-head weights of the score sum

    In the released FP8 checkpoint wq_b and wk are float8_e4m3fn with 128x128 block scales;
    weights_proj is bf16 and k_norm float32 (the dump cited in reference/presets.py)."""
    D, Q, I, J = c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim
    return {"wq_b.weight": (I * J, Q), "wk.weight": (J, D), "k_norm.weight": (J,), "k_norm.bias": (J,),
            "weights_proj.weight": (I, D)}


def mlp_shapes(D: int, F: int) -> dict[str, tuple[int, ...]]:
    return {"gate_proj.weight": (F, D), "up_proj.weight": (F, D), "down_proj.weight": (D, F)}


def moe_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Router + stacked routed experts [E, ...] + shared experts (HF names; experts stacked).

    Qwen3-MoE uses the same rows: its checkpoint stores each expert separately
    (mlp.experts.{e}.gate_proj.weight, transformers 5 fuses gate_up_proj in memory);
    the table stacks them [E, ...] as for DeepSeek, with no correction bias and no
    shared expert."""
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


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def head_name(c: ModelConfig) -> str:
    """The output layer's weight: the input embedding when tied."""
    return EMBED if c.tie_word_embeddings else HEAD


def global_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    s = {EMBED: (c.vocab_size, c.hidden_size), FINAL_NORM: (c.hidden_size,)}
    if not c.tie_word_embeddings:
        s[HEAD] = (c.vocab_size, c.hidden_size)
    return s


# ------------------------------------------------------------- the tensor table
# What a tensor is for. Every consumer (model init, the checkpoint view and IO,
# parameter counts, every byte count of the simulator) reads the group from here
# instead of matching names.
GLOBAL = "global"                # embedding, final norm, LM head
LAYER_NORM = "layer_norm"        # a decoder layer's input / post-attention RMSNorm
ATTENTION = "attention"          # MLA (or dense attention) weights
DENSE_MLP = "dense_mlp"          # the SwiGLU MLP of a dense layer
ROUTER = "router"                # gate.weight and its balancing bias
ROUTED_EXPERT = "routed_expert"  # stacked [E, ...] routed experts
SHARED_EXPERT = "shared_expert"  # shared experts (always active)
MTP = "mtp"                      # what an MTP module adds around its decoder layer
GROUPS = (GLOBAL, LAYER_NORM, ATTENTION, DENSE_MLP, ROUTER, ROUTED_EXPERT, SHARED_EXPERT, MTP)


@dataclass(frozen=True)
class Tensor:
    """One row of the tensor table.

    name: full Hugging Face name (``model.layers.3.mlp.experts.gate_proj.weight``; routed
      experts stacked [E, ...]); rel: the name within its layer (``mlp.experts.gate_proj.weight``;
      globals: the full name); layer: decoder-layer index (None for globals; MTP modules
      follow the main layers at L, L+1, ...); group: one of GROUPS; mtp: part of an MTP module.
    """

    name: str
    rel: str
    shape: tuple[int, ...]
    layer: int | None
    group: str
    mtp: bool = False

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def spec(self) -> tuple[str | None, ...]:
        """How this tensor is split over a device mesh: one entry per dimension, the mesh
        axis (TENSOR or EXPERT) that dimension is divided over, or None (replicated).
        ``reference.mesh`` places the model by it and ``sim.plan`` sizes memory by it."""
        return partition(self)


# ------------------------------------------------------------- sharding
# Mesh axes a weight dimension is split over. The data axis never splits a weight (data
# parallel replicas hold all of them); see reference/mesh.py and docs/scaling.md.
TENSOR = "tensor"  # Megatron-style: attention heads, FFN intermediate, vocabulary
EXPERT = "expert"  # expert parallel: routed experts, whole experts per device

_COLUMN = (TENSOR, None)  # [out, in] split on out: heads / FFN rows (q, k, v, kv_b, gate, up)
_ROW = (None, TENSOR)     # [out, in] split on in: the projections back to D (o_proj, down)


def partition(t: Tensor) -> tuple[str | None, ...]:
    """The partition spec of one tensor-table row (``Tensor.spec``).

    Column-parallel projections split their output rows over TENSOR and the row-parallel
    ones that follow them (o_proj, down_proj) their input columns, so an attention block or
    an MLP needs one all-reduce at its end (Megatron-LM). MLA's down-projections
    (q_a_proj, kv_a_proj_with_mqa) and their norms are small and stay replicated: the latent
    c_kv is shared by every head. Routed experts are split over EXPERT on E (whole experts
    per device) and over TENSOR on their intermediate dim; the router, every norm and the
    MTP projection are replicated. The vocabulary splits over TENSOR (embedding and head).
    V3.2's indexer is replicated whole: DeepSeek's inference code builds wq_b, wk and
    weights_proj as plain (unsplit) Linear layers and checks that every rank selects the same
    top-k, and its convert.py shards none of them (dim None); transformers' tensor-parallel plan
    leaves the indexer out. It is 7% of a layer's attention weights (V3.2: 14.0M of 201.1M).
    """
    leaf = t.rel.rsplit(".", 2)[-2] if t.rel.count(".") >= 1 else t.rel
    if t.rel.startswith("self_attn." + INDEXER):
        return (None,) * len(t.shape)
    if t.group == GLOBAL:
        return _COLUMN if len(t.shape) == 2 else (None,) * len(t.shape)
    if t.group in (ATTENTION, DENSE_MLP, SHARED_EXPERT, ROUTED_EXPERT):
        if leaf in ("q_proj", "q_b_proj", "k_proj", "v_proj", "kv_b_proj", "gate_proj", "up_proj"):
            spec = _COLUMN if len(t.shape) - (t.group == ROUTED_EXPERT) == 2 else (TENSOR,)
        elif leaf in ("o_proj", "down_proj"):
            spec = _ROW
        else:
            spec = (None,) * (len(t.shape) - (t.group == ROUTED_EXPERT))
        return ((EXPERT,) + spec) if t.group == ROUTED_EXPERT else spec
    return (None,) * len(t.shape)


def numel(shape: tuple[int, ...]) -> int:
    """Elements of an array of this shape."""
    return math.prod(shape)


def _group_of(rel: str) -> str:
    if rel.endswith("layernorm.weight") and "." not in rel.removesuffix(".weight"):
        return LAYER_NORM
    if rel.startswith("self_attn."):
        return ATTENTION
    if rel.startswith("mlp.experts."):
        return ROUTED_EXPERT
    if rel.startswith("mlp.shared_experts."):
        return SHARED_EXPERT
    if rel.startswith("mlp.gate."):
        return ROUTER
    if rel.startswith("mlp."):
        return DENSE_MLP
    return MTP


def layer_tensors(c: ModelConfig, i: int) -> list[Tensor]:
    """Rows of decoder layer i (an MTP module's layer for i >= num_hidden_layers)."""
    mtp = i >= c.num_hidden_layers
    pre = f"model.layers.{i}."
    rows = [Tensor(pre + k, k, s, i, _group_of(k), mtp) for k, s in layer_shapes(c, i).items()]
    if mtp:
        rows += [Tensor(pre + k, k, s, i, MTP, True) for k, s in mtp_extra_shapes(c).items()]
    return rows


def tensors(c: ModelConfig, mtp: bool = False) -> list[Tensor]:
    """The tensor table: one row per weight, globals first, then layer by layer, then
    (mtp=True) each MTP module. The embedding/head copies an MTP layer carries in
    DeepSeek's checkpoints are not rows: the model shares the main ones."""
    rows = [Tensor(k, k, s, None, GLOBAL) for k, s in global_shapes(c).items()]
    n_layers = c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)
    for i in range(n_layers):
        rows += layer_tensors(c, i)
    return rows


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Exact counts, summed over the tensor table.

    total_params: main model (embeddings, all layers, final norm, LM head).
    activated_params: weights a token computes with: all layers except the routed
      experts it does not select (k of E count), plus the LM head; the input
      embedding table is excluded (a token reads one row of it). This convention
      reproduces the published 37B (V3: 36.6B), 21B (V2: 20.9B), 2.4B (V2-Lite:
      2.45B) and 32B (Kimi-K2: 31.7B). DeepSeek's README_WEIGHTS.md uses another one (V3:
      36.7B including 0.9B embedding and 0.9B head); `dsref info` prints ours with the
      embedding added too (V3: 37.55B) and docs/architecture.md compares the two.
    mtp_params: the MTP module(s) without the embedding/head copies;
    mtp_checkpoint_params: as stored in the published checkpoint (with copies).
    """
    total = active = mtp = 0
    embed = c.vocab_size * c.hidden_size
    with_mtp = c.is_moe and c.num_nextn_predict_layers > 0
    for t in tensors(c, mtp=with_mtp):
        if t.mtp:
            mtp += t.numel
            continue
        total += t.numel
        if t.group == ROUTED_EXPERT:
            active += t.numel // c.n_routed_experts * c.num_experts_per_tok
        elif t.name != EMBED or c.tie_word_embeddings:
            active += t.numel
    copies = c.num_nextn_predict_layers * 2 * embed if mtp else 0
    return {
        "total_params": total,
        "activated_params": active,
        "embedding_params": embed * (1 if c.tie_word_embeddings else 2),
        "mtp_params": mtp,
        "mtp_checkpoint_params": mtp + copies,
        "checkpoint_params": total + mtp + copies,
    }
