"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer, in float64 NumPy and in JAX.

Each layer's indexer scores every visible key for each query and MLA then attends only to the
index_topk best (-inf elsewhere). Sources read for every step (transformers 5.24
``models/deepseek_v32/modular_deepseek_v32.py`` DeepseekV32Indexer; DeepSeek's inference code,
github deepseek-ai/DeepSeek-V3.2-Exp ``inference/model.py`` Indexer, and its 2025-11-17 update):

  qr        = q_a_layernorm(q_a_proj(x))             MLA's compressed query     [B, T, Q]
  q[t, h]   = RoPE_half(qr W_qb^T)                   queries                    [B, T, I, J]
  k[s]      = RoPE_half(LayerNorm(x W_k^T))          one key per token          [B, S, J]
  w[t, h]   = (x W_w^T)[h] * I^-1/2 * J^-1/2         per-head weights, float32  [B, T, I]
  score[t,s]= sum_h w[t, h] * relu(q[t, h] . k[s])                              [B, T, S]
  selected  = top-index_topk of score[t, s] over the keys visible to t (k_pos <= q_pos)

RoPE_half rotates only the first qk_rope_head_dim (P) dims of the J, as pairs (i, i + P/2)
(transformers ``apply_rotary_pos_emb`` with rotate_half), with MLA's own (YaRN) frequencies; the
remaining J - P dims pass through. MLA itself keeps DeepSeek's interleaved pairs (2i, 2i+1):
DeepSeek's first V3.2 code rotated the indexer interleaved too and fixed it on 2025-11-17
("rope in indexer is not interleaved"); ``interleaved=True`` below reproduces that bug.
Note the order: the indexer puts its rotated dims FIRST (q_pe, q_nope = split(q, [P, J-P])),
MLA LAST (q_nope, q_pe = split(q, [N, P])).

Scales: transformers multiplies q.k by J^-1/2 inside the relu and the weights by I^-1/2; the
official code folds both (and the FP8 scales) into the weights, outside the relu. The two agree:
both factors are positive. The key norm is a LayerNorm with weight and bias, eps 1e-6
(config.INDEX_NORM_EPS), not an RMSNorm. The official code also rotates q and k by a Hadamard
transform and rounds them to FP8 before the dot product (the transform is orthogonal, so exactly
computed it changes nothing); this file computes the exact form, as transformers does.

Top-k: ``lax.top_k`` / a stable sort, so among exactly equal scores the lower key position wins;
transformers' torch.topk does not promise any order there. Few heads make such ties common (relu
can zero every head's term), so each query row carries a ``tie`` flag: the k-th and (k+1)-th best
visible scores are exactly equal and the selected set is implementation-defined. A row with at
most index_topk visible keys selects all of them: that is dense causal attention, exactly.

Letters: B batch, T queries, S keys, D hidden, Q q_lora_rank, I index_n_heads,
J index_head_dim, P qk_rope_head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsref.reference.config import INDEX_NORM_EPS, MLA_NORM_EPS, ModelConfig
from dsref.reference.numpy_ref import (apply_rope_half, apply_rope_interleaved, linear, rms_norm, rope_cos_sin,
                                       rope_frequencies)

f64 = np.float64
F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


class Selection(NamedTuple):
    """What the indexer hands MLA, per query row.

    ids [B, T, min(index_topk, S)]: the selected key slots, ascending, padded with -1 where
      fewer keys are visible (the first rows of a sequence);
    mask [B, T, S]: True at the selected (and visible) keys: MLA's attention mask;
    tie [B, T]: the index_topk-th and next best visible scores are exactly equal;
    scores [B, T, S]: the index scores (invisible keys included, unmasked);
    tied [B, T, S]: in tie rows, the visible keys whose score equals the index_topk-th best: the
      selection may take any of them (as many as it needs to fill index_topk) and be right.
      Golden dumps store them (oracle.golden: index_tie_keys) so compare can excuse exactly that."""

    ids: object
    mask: object
    tie: object
    scores: object
    tied: object


# ======================================================================= float64 NumPy
def compressed_query(x, w, prefix: str):
    """qr = RMSNorm(x W_qa) with q_a_layernorm: MLA's compressed query, shared with the indexer."""
    return rms_norm(linear(x, w[prefix + "q_a_proj.weight"]), w[prefix + "q_a_layernorm.weight"], MLA_NORM_EPS)


def layer_norm(x, weight, bias, eps: float = INDEX_NORM_EPS):
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias, over the last axis."""
    x = np.asarray(x, f64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def rope_first(x, cos, sin, P: int, interleaved: bool = False):
    """Rotate the first P dims (half-split pairs (i, i+P/2); interleaved: the pre-fix bug), keep the rest."""
    rot = apply_rope_interleaved if interleaved else apply_rope_half
    return np.concatenate([rot(x[..., :P], cos, sin), x[..., P:]], axis=-1)


def index_queries(qr, w, cfg: ModelConfig, cos, sin, prefix: str, interleaved: bool = False):
    """q[t, h] = RoPE_half((qr W_qb^T)[h])  ->  [B, T, I, J]."""
    B, T, _ = qr.shape
    q = linear(qr, w[prefix + "indexer.wq_b.weight"]).reshape(B, T, cfg.index_n_heads, cfg.index_head_dim)
    return rope_first(q, cos, sin, cfg.qk_rope_head_dim, interleaved)


def index_keys(x, w, cfg: ModelConfig, cos, sin, prefix: str, interleaved: bool = False):
    """k[s] = RoPE_half(LayerNorm(x_s W_k^T))  ->  [B, S, J]: what the indexer key cache stores."""
    g = lambda n: w[prefix + "indexer." + n]  # noqa: E731
    k = layer_norm(linear(x, g("wk.weight")), g("k_norm.weight"), g("k_norm.bias"))
    return rope_first(k, cos, sin, cfg.qk_rope_head_dim, interleaved)


def index_head_weights(x, w, cfg: ModelConfig, prefix: str):
    """w[t, h] = (x_t W_w^T)[h] * I^-1/2 * J^-1/2  ->  [B, T, I] (J^-1/2 moved out of the relu: > 0)."""
    return linear(x, w[prefix + "indexer.weights_proj.weight"]) * (cfg.index_n_heads ** -0.5 * cfg.index_softmax_scale)


def index_scores(q, k, hw):
    """score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])  ->  [B, T, S]."""
    return np.einsum("bth,bths->bts", hw, np.maximum(np.einsum("bthj,bsj->bths", q, k), 0.0))


def visible(q_pos, k_pos, k_valid=None):
    """[B, T, S]: key s visible to query t iff k_pos[s] <= q_pos[t] (by position, so a chunk or a
    decode step past position 0 sees its cached prefix), and the cache slot is filled (k_valid)."""
    m = np.asarray(k_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]
    return m if k_valid is None else m & np.asarray(k_valid)[:, None, :]


def select_topk(scores, vis, topk: int) -> Selection:
    """The topk best visible keys of each row (lower position first among equal scores)."""
    S = scores.shape[-1]
    kk = min(topk, S)
    s = np.where(vis, scores, -np.inf)
    order = np.argsort(-s, axis=-1, kind="stable")
    best = np.take_along_axis(s, order, -1)
    ids = order[..., :kk]
    ok = np.take_along_axis(vis, ids, -1)
    mask = np.zeros(s.shape, bool)
    np.put_along_axis(mask, ids, ok, -1)
    n_vis = vis.sum(-1)
    tie = (n_vis > kk) & (best[..., kk - 1] == best[..., kk]) if kk < S else np.zeros(n_vis.shape, bool)
    tied = tie[..., None] & vis & (s == best[..., kk - 1:kk])
    ids = np.sort(np.where(ok, ids, S), -1)
    return Selection(np.where(ids == S, -1, ids), mask, tie, scores, tied)


def boundary_gap(sel: Selection, vis, topk: int):
    """[B, T]: (k-th best - next best visible score) / max |score| of the row; inf where every
    visible key is selected. Rows with a small gap may flip between float32 and float64."""
    S = vis.shape[-1]
    if topk >= S:
        return np.full(vis.shape[:2], np.inf)
    s = -np.sort(-np.where(vis, sel.scores, -np.inf), -1)
    s = np.where(np.isfinite(s), s, 0.0)  # rows with <= topk visible keys: no boundary
    scale = np.max(np.abs(np.where(vis, sel.scores, 0.0)), -1) + 1e-300
    return np.where(vis.sum(-1) > topk, (s[..., topk - 1] - s[..., topk]) / scale, np.inf)


def index_select(q, hw, k, q_pos, k_pos, topk: int, k_valid=None) -> Selection:
    """Score queries q [B,T,I,J] (weights hw) against keys k [B,S,J] (a cache) and select."""
    return select_topk(index_scores(q, k, hw), visible(q_pos, k_pos, k_valid), topk)


def indexer(x, w, cfg: ModelConfig, positions, prefix: str, interleaved: bool = False) -> Selection:
    """Prefill: the tokens x [B, T, D] (the layer's normed input) at ``positions`` [B, T] select among
    themselves. ``prefix``: the layer's 'model.layers.{i}.self_attn.'."""
    cos, sin = rope_cos_sin(cfg, positions)
    q = index_queries(compressed_query(x, w, prefix), w, cfg, cos, sin, prefix, interleaved)
    k = index_keys(x, w, cfg, cos, sin, prefix, interleaved)
    return index_select(q, index_head_weights(x, w, cfg, prefix), k, positions, positions, cfg.index_topk)


# ================================================================================= JAX
# Same steps; ``w`` is a layer's attention weights by name relative to 'self_attn.' (as
# reference/model.py's mla_project reads them). Projections run in x's dtype; the key norm,
# the head weights (float32 in transformers and DeepSeek's code: weights_proj is kept in
# float32) and the scores are float32, as the router is.
def _linear_jax(x, w, prec):
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), precision=prec)


def compressed_query_jax(w, cfg: ModelConfig, x, prec=HIGHEST):
    """qr = RMSNorm(x W_qa) (q_a_layernorm), in float32 arithmetic, returned in x's dtype."""
    qa = _linear_jax(x, w["q_a_proj.weight"], prec).astype(F32)
    qa = qa * jax.lax.rsqrt(jnp.mean(qa * qa, -1, keepdims=True) + MLA_NORM_EPS)
    return (w["q_a_layernorm.weight"].astype(F32) * qa).astype(x.dtype)


def layer_norm_jax(x, weight, bias, eps: float = INDEX_NORM_EPS):
    xf = x.astype(F32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    return ((xf - mu) * jax.lax.rsqrt(var + eps) * weight.astype(F32) + bias.astype(F32)).astype(x.dtype)


def rope_tables_jax(cfg: ModelConfig, positions):
    """cos, sin [B, T, P/2] float32: MLA's own (YaRN) tables, as reference.model.rope_tables (not
    imported: model.py imports this module)."""
    inv_freq, att = rope_frequencies(cfg)
    ang = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(ang) * att, jnp.sin(ang) * att


def rope_first_jax(x, cos, sin, P: int, interleaved: bool = False):
    """Rotate the first P dims as half-split pairs (i, i+P/2) (interleaved: the bug), keep the rest."""
    while cos.ndim < x.ndim:
        cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(F32)
    r = xf[..., :P]
    x1, x2 = (r[..., 0::2], r[..., 1::2]) if interleaved else (r[..., :P // 2], r[..., P // 2:])
    a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rot = jnp.stack([a, b], -1).reshape(r.shape) if interleaved else jnp.concatenate([a, b], -1)
    return jnp.concatenate([rot, xf[..., P:]], -1).astype(x.dtype)


def index_queries_jax(w, cfg: ModelConfig, qr, cos, sin, prec=HIGHEST, interleaved: bool = False):
    """q [B, T, I, J] from the compressed query qr [B, T, Q]."""
    B, T, _ = qr.shape
    q = _linear_jax(qr, w["indexer.wq_b.weight"], prec).reshape(B, T, cfg.index_n_heads, cfg.index_head_dim)
    return rope_first_jax(q, cos, sin, cfg.qk_rope_head_dim, interleaved)


def index_keys_jax(w, cfg: ModelConfig, x, cos, sin, prec=HIGHEST, interleaved: bool = False):
    """k [B, S, J]: LayerNorm(x W_k^T) with its first P dims rotated (the indexer key cache)."""
    k = layer_norm_jax(_linear_jax(x, w["indexer.wk.weight"], prec), w["indexer.k_norm.weight"],
                       w["indexer.k_norm.bias"])
    return rope_first_jax(k, cos, sin, cfg.qk_rope_head_dim, interleaved)


def index_head_weights_jax(w, cfg: ModelConfig, x):
    """[B, T, I] float32: (x W_w^T) * I^-1/2 * J^-1/2, x and W_w widened to float32."""
    hw = jnp.einsum("btd,id->bti", x.astype(F32), w["indexer.weights_proj.weight"].astype(F32), precision=HIGHEST)
    return hw * (cfg.index_n_heads ** -0.5 * cfg.index_softmax_scale)


def index_scores_jax(q, k, hw):
    """[B, T, S] float32: sum_h w[t, h] * relu(q[t, h] . k[s])."""
    qk = jnp.einsum("bthj,bsj->bths", q.astype(F32), k.astype(F32), precision=HIGHEST)
    return jnp.einsum("bth,bths->bts", hw, jax.nn.relu(qk), precision=HIGHEST)


def visible_jax(q_pos, k_pos, k_valid=None):
    """[B, T, S]: k_pos[s] <= q_pos[t] (and the slot filled): causal by position."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    return m if k_valid is None else m & k_valid[:, None, :]


def select_topk_jax(scores, vis, topk: int) -> Selection:
    """``select_topk`` with lax.top_k (lower index first among equal values)."""
    B, T, S = scores.shape
    kk = min(topk, S)
    # lax.top_k orders -0.0 below +0.0 (NumPy and torch call them equal): make every zero +0.0
    s = jnp.where(vis, jnp.where(scores == 0, 0.0, scores), -jnp.inf)
    best, order = jax.lax.top_k(s, min(kk + 1, S))
    ids = order[..., :kk]
    ok = jnp.take_along_axis(vis, ids, -1)
    mask = jnp.zeros((B, T, S), bool).at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], ids].set(ok)
    tie = (vis.sum(-1) > kk) & (best[..., kk - 1] == best[..., -1]) if kk < S else jnp.zeros((B, T), bool)
    tied = tie[..., None] & vis & (s == best[..., kk - 1:kk])
    ids = jnp.sort(jnp.where(ok, ids, S), -1)
    return Selection(jnp.where(ids == S, -1, ids), mask, tie, scores, tied)


def index_select_jax(q, hw, k, q_pos, k_pos, topk: int, k_valid=None) -> Selection:
    """Queries against keys (a cache [B, S, J]) -> the selection; see index_select."""
    return select_topk_jax(index_scores_jax(q, k, hw), visible_jax(q_pos, k_pos, k_valid), topk)


def index_inputs_jax(w, cfg: ModelConfig, x, qr, positions, prec=HIGHEST, interleaved: bool = False):
    """A layer's indexer inputs from its tokens x [B, T, D] (the normed layer input) at positions:
    queries [B, T, I, J], head weights [B, T, I] float32, and the tokens' own keys [B, T, J] (what
    the indexer key cache stores). qr: MLA's compressed query [B, T, Q]."""
    cos, sin = rope_tables_jax(cfg, positions)
    return (index_queries_jax(w, cfg, qr, cos, sin, prec, interleaved), index_head_weights_jax(w, cfg, x),
            index_keys_jax(w, cfg, x, cos, sin, prec, interleaved))


def indexer_jax(w, cfg: ModelConfig, x, positions, prec=HIGHEST, interleaved: bool = False,
                qr=None) -> Selection:
    """Prefill: x [B, T, D] (the layer's normed input) at positions [B, T] selects among itself.
    qr: MLA's compressed query when the caller has it (else recomputed from q_a_proj)."""
    qr = compressed_query_jax(w, cfg, x, prec) if qr is None else qr
    q, hw, k = index_inputs_jax(w, cfg, x, qr, positions, prec, interleaved)
    return index_select_jax(q, hw, k, positions, positions, cfg.index_topk)
