"""DeepSeek-V4 attention in JAX: the functions of reference/numpy_v4_attention.py, one for one.

Shared-KV sliding window, the CSA / HCA compressors, the lightning indexer, attention sinks and
the grouped output projection (equations: numpy_v4_attention's docstring, docs/v4-reference.md).
Weights: the flat dict of transformers' names (reference/params_v4.py), as in the NumPy reference.

Precision: matmul operands in the activation dtype (float32 or bfloat16) with float32
accumulation where the backend has it (``_acc``); RMSNorms, RoPE, the compressor's
gated pooling, the index scores and the attention softmax (sinks included) in float32, as both
DeepSeek's inference code and transformers do them; what is stored between steps (q, kv, the
compressed entries, the attention output) in the activation dtype.

Letters: b batch, t query tokens, s window keys, n compressed entries, h heads, d head_dim,
g o_groups, r o_lora_rank (einsum), k the per-group input, j index_head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsref.reference import dsa
from dsref.reference import numpy_v4_attention as na
from dsref.reference.config_v4 import CSA, HCA, SLIDING, ModelConfigV4
from dsref.reference.model import apply_rope, rms_norm

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _operands(a, b):
    """Both in a's dtype, unless one is float32 (a float32-stored weight, or float32 math): then both
    float32, bf16 values multiplied exactly (as reference.model.einsum)."""
    if a.dtype != b.dtype and F32 in (a.dtype, b.dtype):
        return a.astype(F32), b.astype(F32)
    return a, b.astype(a.dtype)


def _acc(dtype):
    """float32 accumulation, except bf16 on XLA:CPU (no bf16 x bf16 -> f32 dot there; it
    accumulates bf16 dots in float32 internally: reference.model.einsum)."""
    return F32 if (dtype == F32 or jax.default_backend() != "cpu") else None


def mm32(spec, a, b, prec):
    """einsum with a float32 result: operands as ``_operands``, accumulation as ``_acc``; the float32
    result is not rounded back to a bf16 activation dtype (scores, pooling and logits keep it)."""
    a, b = _operands(a, b)
    return jnp.einsum(spec, a, b, precision=prec, preferred_element_type=_acc(a.dtype)).astype(F32)


def linear32(x, w, prec):
    """x @ w.T (w [out, in], the checkpoint layout) with a float32 result. lax.dot_general rather
    than einsum: the same product, several times cheaper to trace (Flash's 43 layers, eval_shape)."""
    x, w = _operands(x, w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=prec,
                               preferred_element_type=_acc(x.dtype)).astype(F32)


def linear(x, w, prec):
    """x @ w.T, result in x's dtype."""
    return linear32(x, w, prec).astype(x.dtype)


def f32_linear(x, w):
    """x @ w.T entirely in float32 (router, hyper-connection mixers, index head weights: float32
    in both codes whatever the model dtype)."""
    return linear32(x.astype(F32), w.astype(F32), HIGHEST)


def unweighted_rms(x, eps):
    """x / sqrt(mean(x^2) + eps) in float32 (x float32)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def canonical_zero(s):
    """-0.0 -> +0.0 before lax.top_k, which orders floats totally (-0.0 below +0.0, measured on
    XLA:CPU) where the NumPy reference's stable sort and torch.topk treat them as equal. A guard: an
    index score is exactly zero when relu zeroes every head, and then its sign is that of the token's
    head weights, the same for every entry of the row, so the tests' tied rows never mix the two
    (checked: they select the same entries without it); a cache or decode path that fills or
    assembles scores differently could."""
    return jnp.where(s == 0, jnp.zeros_like(s), s)


# ------------------------------------------------------------------------------- RoPE / YaRN
def rope_cos_sin(cfg: ModelConfigV4, positions, compressed: bool):
    """cos, sin [..., r/2] float32 at integer positions: the inverse frequencies (YaRN on the
    compressed side only) from the NumPy reference, the angle in float32 as both codes do it."""
    inv = jnp.asarray(na.rope_inv_freq(cfg, compressed), F32)
    ang = jnp.asarray(positions).astype(F32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def rope_tail(x, cos, sin, r: int):
    """Rotate the last r dims of x as interleaved pairs (float32 math), the rest pass through.
    cos/sin [B, T, r/2] broadcast over any head axis between T and the feature axis."""
    rot = apply_rope(x[..., x.shape[-1] - r:], cos, sin)
    return jnp.concatenate([x[..., :x.shape[-1] - r], rot.astype(x.dtype)], axis=-1)


def derotate(o, cos, sin, r: int):
    """Rotate o's last r dims back by the query's angle (K = V carried the keys' rotation)."""
    return rope_tail(o, cos, -sin, r)


# -------------------------------------------------------------------------------- compressors
def entry_positions(n: int, m: int):
    """RoPE position of compressed entry w: w*m, its block's first token."""
    return jnp.arange(n) * m


def complete_blocks(positions, m: int):
    """Entries query t may read: w < (t + 1) // m  ->  [B, T] counts."""
    return (positions + 1) // m


def compress(x, w, cfg: ModelConfigV4, prefix: str, m: int, width: int, overlap: bool, prec):
    """Gated pooling of every complete block of m tokens into one entry -> [B, n, width] (x's dtype).

    n = T // m is static (T is). K, Z and the softmax over the block's slots in float32 (DeepSeek's
    Compressor pools in float32); CSA's overlap is block w-1's first-half series shifted one block
    along n next to block w's second half, block 0's predecessor K = 0, Z = -inf."""
    B, T, _ = x.shape
    n = T // m
    if n == 0:
        return jnp.zeros((B, 0, width), x.dtype)
    xs = x[:, :n * m]
    kv = linear32(xs, w[prefix + "kv_proj.weight"], prec).reshape(B, n, m, -1)
    gate = linear32(xs, w[prefix + "gate_proj.weight"], prec).reshape(B, n, m, -1)
    gate = gate + w[prefix + "position_bias"].astype(F32)
    if overlap:
        ca_k, cb_k = kv[..., :width], kv[..., width:]
        ca_z, cb_z = gate[..., :width], gate[..., width:]
        prev_k = jnp.concatenate([jnp.zeros_like(ca_k[:, :1]), ca_k[:, :-1]], axis=1)
        prev_z = jnp.concatenate([jnp.full_like(ca_z[:, :1], -jnp.inf), ca_z[:, :-1]], axis=1)
        kv = jnp.concatenate([prev_k, cb_k], axis=2)     # [B, n, 2m, width]
        gate = jnp.concatenate([prev_z, cb_z], axis=2)
    pooled = (kv * jax.nn.softmax(gate, axis=2)).sum(axis=2)
    c = rms_norm(pooled, w[prefix + "kv_norm.weight"], cfg.rms_norm_eps)
    cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(entry_positions(n, m), (B, n)), compressed=True)
    return rope_tail(c, cos, sin, cfg.qk_rope_head_dim).astype(x.dtype)


# ---------------------------------------------------------------------------- lightning indexer
def indexer(x, qr, w, cfg: ModelConfigV4, prefix: str, positions, prec) -> dsa.Selection:
    """The CSA layer's selection (numpy_v4_attention.indexer): keys K^I = compress(x) at width J,
    queries RoPE_tail((qr W_qb)_h), weights (x W_w)_h I^-1/2 (float32), scores
    sum_h w relu(q . K^I) J^-1/2 in float32, then the top min(index_topk, n) visible entries with
    dsa.select_topk_jax (lax.top_k: the lower entry first among equal scores, as the reference)."""
    m, I, J = cfg.compress_rate_csa, cfg.index_n_heads, cfg.index_head_dim
    p = prefix + "compressor.indexer."
    keys = compress(x, w, cfg, p, m, J, True, prec)
    B, T, _ = x.shape
    q = linear(qr, w[p + "q_b_proj.weight"], prec).reshape(B, T, I, J)
    cos, sin = rope_cos_sin(cfg, positions, compressed=True)
    q = rope_tail(q, cos, sin, cfg.qk_rope_head_dim)
    hw = f32_linear(x, w[p + "scorer.weights_proj.weight"]) * I ** -0.5
    qk = mm32("bthj,bnj->bthn", q, keys, prec)
    s = canonical_zero(jnp.einsum("bth,bthn->btn", hw, jax.nn.relu(qk), precision=HIGHEST) * J ** -0.5)
    vis = jnp.arange(keys.shape[1]) < complete_blocks(positions, m)[..., None]
    return dsa.select_topk_jax(s, vis, cfg.index_topk)


# ------------------------------------------------------------------------------------ attention
def sliding_mask(positions, W: int):
    """[B, T, T]: key s visible to query t iff t - W < s <= t."""
    t, s = positions[..., :, None], positions[..., None, :]
    return (s <= t) & (s > t - W)


def attend_with_sink(logits, sinks):
    """softmax over [logits, sink_h] per head (float32), the sink column dropped. logits
    [B, H, T, S] float32 with -inf where masked; sinks [H] raw logits."""
    sk = jnp.broadcast_to(sinks.astype(F32)[None, :, None, None], logits.shape[:-1] + (1,))
    return jax.nn.softmax(jnp.concatenate([logits, sk], axis=-1), axis=-1)[..., :-1]


def grouped_output(o, w, cfg: ModelConfigV4, prefix: str, prec):
    """o [B, T, H, d] -> g groups of H/g heads, group j times its block W_oa[j] [d_g, H d / g],
    concatenated, then W_ob -> [B, T, D]."""
    B, T = o.shape[:2]
    g, dg = cfg.o_groups, cfg.o_lora_rank
    wa = w[prefix + "o_a_proj.weight"].reshape(g, dg, -1)
    y = mm32("btgk,grk->btgr", o.reshape(B, T, g, -1), wa, prec).astype(o.dtype).reshape(B, T, g * dg)
    return linear(y, w[prefix + "o_b_proj.weight"], prec)


def attention(x, w, cfg: ModelConfigV4, i: int, positions, prec, capture: dict | None = None, index_ids=None):
    """One V4 attention layer; x [B, T, D] is input_layernorm(collapsed streams), positions [B, T].
    Dense over [window keys | compressed entries] with masks (a prefill reference, O(T^2));
    capture gets index_ids / index_tie / index_tied on CSA layers (the indexer's own choice).
    index_ids [B, T, min(index_topk, n)] (-1 for none; CSA only): read these entries instead of the
    indexer's choice (model_v4.forward_v4's ``pinned``)."""
    B, T, _ = x.shape
    H, d, r, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    kind = cfg.layer_type(i)
    prefix = f"model.layers.{i}.self_attn."
    compressed = kind != SLIDING
    cos, sin = rope_cos_sin(cfg, positions, compressed)

    qr = rms_norm(linear(x, w[prefix + "q_a_proj.weight"], prec), w[prefix + "q_a_norm.weight"], eps)
    q = linear(qr, w[prefix + "q_b_proj.weight"], prec).reshape(B, T, H, d)
    q = rope_tail(unweighted_rms(q.astype(F32), eps).astype(x.dtype), cos, sin, r)
    kv = linear(x, w[prefix + "kv_proj.weight"], prec)
    kv = rope_tail(rms_norm(kv, w[prefix + "kv_norm.weight"], eps), cos, sin, r)

    scale = cfg.softmax_scale
    logits = mm32("bthd,bsd->bhts", q, kv, prec) * scale
    logits = jnp.where(sliding_mask(positions, cfg.sliding_window)[:, None], logits, -jnp.inf)
    values = kv
    if compressed:
        m = cfg.compress_rate(kind)
        c = compress(x, w, cfg, prefix + "compressor.", m, d, kind == CSA, prec)    # [B, n, d]
        n = c.shape[1]
        if kind == CSA:
            if n:
                sel = indexer(x, qr, w, cfg, prefix, positions, prec)
                visible = sel.mask if index_ids is None else (index_ids[..., None] == jnp.arange(n)).any(-2)
                cap = dict(index_ids=sel.ids, index_tie=sel.tie, index_tied=sel.tied)
            else:  # no complete block: the indexer has nothing to choose from
                cap = dict(index_ids=jnp.zeros((B, T, 0), jnp.int32), index_tie=jnp.zeros((B, T), bool),
                           index_tied=jnp.zeros((B, T, 0), bool))
            if capture is not None:
                capture.update(cap)
        else:
            assert kind == HCA
            visible = jnp.arange(n) < complete_blocks(positions, m)[..., None]
        if n:
            lc = mm32("bthd,bnd->bhtn", q, c, prec) * scale
            logits = jnp.concatenate([logits, jnp.where(visible[:, None], lc, -jnp.inf)], axis=-1)
            values = jnp.concatenate([kv, c], axis=1)
    p = attend_with_sink(logits, w[prefix + "sinks"])
    o = mm32("bhts,bsd->bthd", p.astype(values.dtype), values, prec).astype(x.dtype)
    o = derotate(o, cos, sin, r)
    return grouped_output(o, w, cfg, prefix, prec)

