"""DeepSeek-V4 attention in plain NumPy float64: shared-KV sliding window, the CSA / HCA
compressors, the lightning indexer, attention sinks and the grouped output projection.

Sources read for every step (docs/v4-reference.md lists them with the places they differ):
transformers 5.24 ``models/deepseek_v4/modeling_deepseek_v4.py`` (DeepseekV4Attention,
DeepseekV4HCACompressor, DeepseekV4CSACompressor, DeepseekV4Indexer, eager_attention_forward) and
DeepSeek's inference code (deepseek-ai/DeepSeek-V4-Flash ``inference/model.py`` Attention,
Compressor, Indexer, get_window_topk_idxs, get_compress_topk_idxs; ``kernel.py`` sparse_attn).

  qr   = RMSNorm_w(x W_qa)                                  compressed query          [B, T, Q]
  q    = RoPE_tail(RMSNorm_1((qr W_qb)[h]))                 per-head, unweighted norm [B, T, H, d]
  kv   = RoPE_tail(RMSNorm_w(x W_kv))                       ONE head, key = value     [B, T, d]
  C    = compressor(x): one entry per m complete tokens     compressed K = V          [B, n, d]
  o    = softmax_with_sink(q.[kv_window | C_visible] / sqrt d) [kv | C]             [B, T, H, d]
  o    = RoPE_tail^-1(o) at the query position (K = V carried the keys' rotation into o)
  out  = concat_g(o_g W_oa[g]^T) W_ob^T                     g groups of H/g heads     [B, T, D]

RoPE_tail rotates the LAST r = qk_rope_head_dim dims as interleaved pairs (2i, 2i+1) (both codes:
DeepSeek ``x[..., -rd:]`` as complex pairs, transformers ``rotate_half`` on 0::2 / 1::2). Sliding
layers use plain RoPE (rope_theta); compressed layers, their compressors and the indexer use
compress_rope_theta with YaRN (rope_scaling) and NO amplitude factor on cos/sin (V4 forces
attention_factor 1; YaRN's default would be 0.1 ln(factor) + 1).

Letters: B batch, T tokens, D hidden, H heads, d head_dim, r qk_rope_head_dim, Q q_lora_rank,
g o_groups, d_g o_lora_rank, W sliding_window, m compress rate, n = T // m compressed entries,
I index_n_heads, J index_head_dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from dsref.reference.config_v4 import CSA, HCA, SLIDING, ModelConfigV4
from dsref.reference.numpy_ref import apply_rope_interleaved, linear, rms_norm

f64 = np.float64


# ------------------------------------------------------------------------------- RoPE / YaRN
def rope_inv_freq(cfg: ModelConfigV4, compressed: bool, yarn: bool = True) -> np.ndarray:
    """Inverse frequencies [r/2]: theta^(-2i/r), theta = compress_rope_theta on compressed layers
    (and every compressor / indexer), rope_theta on sliding layers. YaRN (arXiv 2309.00071) only
    on the compressed side: dims turning more than beta_fast times over the original context keep
    their frequency, fewer than beta_slow are divided by ``factor``, a linear ramp in between; the
    range is floored / ceiled (DeepSeek's find_correction_range always, transformers' default).
    ``yarn=False`` exists for the test that shows YaRN matters."""
    r = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    inv = 1.0 / base ** (np.arange(0, r, 2, dtype=f64) / r)
    rs = cfg.rope_scaling
    if not (compressed and yarn and rs is not None):
        return inv

    def correction_dim(rot):
        return r * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # both codes: avoid a zero-width ramp
    ramp = np.clip((np.arange(r // 2, dtype=f64) - low) / (high - low), 0.0, 1.0)
    return inv / rs.factor * ramp + inv * (1.0 - ramp)


def rope_cos_sin(cfg: ModelConfigV4, positions, compressed: bool):
    """cos, sin [..., r/2] at integer positions [...] (no amplitude factor: V4 fixes it to 1)."""
    ang = np.asarray(positions, f64)[..., None] * rope_inv_freq(cfg, compressed)
    return np.cos(ang), np.sin(ang)


def rope_tail(x, cos, sin, r: int):
    """Rotate the last r dims of x as interleaved pairs; the first d - r pass through.
    The inverse rotation is rope_tail(x, cos, -sin, r)."""
    return np.concatenate([x[..., :-r], apply_rope_interleaved(x[..., -r:], cos, sin)], axis=-1)


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


# -------------------------------------------------------------------------------- compressors
def compress(x, w, cfg: ModelConfigV4, prefix: str, m: int, width: int, overlap: bool):
    """Gated pooling of every complete block of m tokens into one entry  ->  [B, n, width].

    HCA (overlap=False):  C_w = RMSNorm_w( sum_{j<m} softmax_j(Z[wm+j] + B_j) * K[wm+j] )
    CSA (overlap=True):   the projections are 2*width wide, two series per token: Ca (first half)
      feeds the NEXT block's entry, Cb (second half) its own. Entry w pools 2m slots, block w-1's
      Ca and block w's Cb, one softmax over the 2m slots per channel; block 0 has no predecessor
      (its Ca slots hold K = 0, Z = -inf: weight 0).
    K = x W_kv, Z = x W_gate, B = position_bias [m, coff*width] (added to the gate, per slot).
    Each entry is RoPE'd (compressed frequencies) at position w*m, its block's FIRST token.
    Tokens past the last complete block (T mod m) produce nothing yet (both codes)."""
    B, T, _ = x.shape
    n = T // m
    if n == 0:
        return np.zeros((B, 0, width))
    kv = linear(x[:, :n * m], w[prefix + "kv_proj.weight"]).reshape(B, n, m, -1)
    gate = linear(x[:, :n * m], w[prefix + "gate_proj.weight"]).reshape(B, n, m, -1)
    gate = gate + np.asarray(w[prefix + "position_bias"], f64)
    if overlap:
        ca_k, cb_k = kv[..., :width], kv[..., width:]
        ca_z, cb_z = gate[..., :width], gate[..., width:]
        prev_k = np.concatenate([np.zeros_like(ca_k[:, :1]), ca_k[:, :-1]], axis=1)
        prev_z = np.concatenate([np.full_like(ca_z[:, :1], -np.inf), ca_z[:, :-1]], axis=1)
        kv = np.concatenate([prev_k, cb_k], axis=2)     # [B, n, 2m, width]
        gate = np.concatenate([prev_z, cb_z], axis=2)
    pooled = (kv * softmax(gate, axis=2)).sum(axis=2)   # [B, n, width]
    c = rms_norm(pooled, w[prefix + "kv_norm.weight"], cfg.rms_norm_eps)
    cos, sin = rope_cos_sin(cfg, np.broadcast_to(entry_positions(n, m), (B, n)), compressed=True)
    return rope_tail(c, cos, sin, cfg.qk_rope_head_dim)


def entry_positions(n: int, m: int):
    """RoPE position of compressed entry w: w*m, its block's first token (DeepSeek
    ``freqs_cis[:cutoff:ratio]`` in prefill, ``freqs_cis[start_pos + 1 - ratio]`` when decode closes
    a block; transformers ``positions * compress_rate + first_window_position``)."""
    return np.arange(n) * m


def complete_blocks(positions, m: int):
    """Entries a query may read: those whose whole block lies at or before it, w < (t + 1) // m
    (so the block's last token already sees its entry)  ->  [B, T] counts."""
    return (np.asarray(positions) + 1) // m


# ---------------------------------------------------------------------------- lightning indexer
class Selection(NamedTuple):
    """The indexer's choice per query row (CSA layers).

    ids [B, T, min(index_topk, n)]: selected entries, ascending, -1 where fewer are visible;
    mask [B, T, n]: True at the selected entries (what the attention may read);
    tie [B, T]: the k-th and (k+1)-th best visible scores are exactly equal (the selected set is
      implementation-defined there);
    scores [B, T, n]: index scores (invisible entries included);
    tied [B, T, n]: in tie rows, the visible entries scoring exactly the k-th best."""

    ids: np.ndarray
    mask: np.ndarray
    tie: np.ndarray
    scores: np.ndarray
    tied: np.ndarray


def indexer(x, qr, w, cfg: ModelConfigV4, prefix: str, positions) -> Selection:
    """Lightning indexer over the CSA compressed entries (transformers DeepseekV4Indexer,
    DeepSeek Indexer):

      K^I   = compress(x) at width J with its own weights (overlapping, m = CSA rate)  [B, n, J]
      q[t,h]= RoPE_tail((qr W_qb^T)[h]) at position t (compressed frequencies)        [B, T, I, J]
      w[t,h]= (x W_w^T)[h] * I^-1/2                                                   [B, T, I]
      s[t,w]= sum_h w[t,h] * relu(q[t,h] . K^I_w) * J^-1/2
    then the top min(index_topk, n) of the visible entries (w < (t+1)//m). DeepSeek also rotates q
    and K^I by a Hadamard transform and rounds them to FP4: orthogonal, so exactly computed it
    changes nothing; this is the exact form, as in transformers."""
    m, I, J = cfg.compress_rate_csa, cfg.index_n_heads, cfg.index_head_dim
    p = prefix + "compressor.indexer."
    keys = compress(x, w, cfg, p, m, J, overlap=True)
    B, T, _ = x.shape
    q = linear(qr, w[p + "q_b_proj.weight"]).reshape(B, T, I, J)
    cos, sin = rope_cos_sin(cfg, positions, compressed=True)
    q = rope_tail(q, cos, sin, cfg.qk_rope_head_dim)
    hw = linear(x, w[p + "scorer.weights_proj.weight"]) * I ** -0.5
    s = np.einsum("bth,bthn->btn", hw, np.maximum(np.einsum("bthj,bnj->bthn", q, keys), 0.0)) * J ** -0.5
    return select_top(s, complete_blocks(positions, m), cfg.index_topk)


def select_top(scores, n_visible, k: int) -> Selection:
    """Top-k of scores[b, t, :n_visible[b, t]] per row; a stable sort, so among exactly equal
    scores the lower entry wins (torch.topk promises no order: such rows carry ``tie``)."""
    B, T, n = scores.shape
    kk = min(k, n)
    vis = np.arange(n) < np.asarray(n_visible)[..., None]                      # [B, T, n]
    masked = np.where(vis, scores, -np.inf)
    order = np.argsort(-masked, axis=-1, kind="stable")[..., :kk]
    ok = np.take_along_axis(vis, order, axis=-1)
    ids = np.sort(np.where(ok, order, n), axis=-1)
    ids = np.where(ids == n, -1, ids)
    mask = (ids[..., None] == np.arange(n)).any(axis=-2)                       # -1 matches nothing
    srt = -np.sort(-masked, axis=-1)
    if n > kk:
        kth, nxt = srt[..., kk - 1], srt[..., kk]
        tie = np.isfinite(nxt) & (kth == nxt)
        tied = tie[..., None] & vis & (masked == kth[..., None])
    else:
        tie, tied = np.zeros((B, T), bool), np.zeros((B, T, n), bool)
    return Selection(ids, mask, tie, scores, tied)


# ------------------------------------------------------------------------------------ attention
def sliding_mask(positions, W: int):
    """[B, T, T]: key s visible to query t iff t - W < s <= t (W keys, the query's own included:
    DeepSeek get_window_topk_idxs, transformers' sliding-window mask)."""
    t = np.asarray(positions)[..., :, None]
    s = np.asarray(positions)[..., None, :]
    return (s <= t) & (s > t - W)


def attend_with_sink(logits, sinks):
    """softmax over [logits, sink_h] per head, the sink's column dropped  ->  probabilities.
    logits [B, H, T, S] (-inf where masked); sinks [H] are raw logits (not scaled by 1/sqrt d)."""
    sk = np.broadcast_to(np.asarray(sinks, f64)[None, :, None, None], logits.shape[:-1] + (1,))
    return softmax(np.concatenate([logits, sk], axis=-1))[..., :-1]


def derotate(o, cos, sin, r: int):
    """Rotate o's last r dims back by the QUERY's angle: the values are the keys, so each value
    carried its own position's rotation into o; undoing the query's leaves a function of the
    relative distance (DeepSeek ``apply_rotary_emb(o[..., -rd:], freqs_cis, True)``, transformers
    ``apply_rotary_pos_emb(o, cos, -sin)``)."""
    return rope_tail(o, cos, -sin, r)


def grouped_output(o, w, cfg: ModelConfigV4, prefix: str):
    """o [B, T, H, d] -> g groups of H/g consecutive heads, group j projected by its own block
    W_oa[j] = o_a_proj.weight[j*d_g:(j+1)*d_g] ([d_g, H*d/g]), concatenated, then W_ob  ->  [B, T, D]."""
    B, T = o.shape[:2]
    g, dg = cfg.o_groups, cfg.o_lora_rank
    wa = np.asarray(w[prefix + "o_a_proj.weight"], f64).reshape(g, dg, -1)
    y = np.einsum("btgk,grk->btgr", o.reshape(B, T, g, -1), wa).reshape(B, T, g * dg)
    return linear(y, w[prefix + "o_b_proj.weight"])


def attention(x, w, cfg: ModelConfigV4, i: int, positions, capture: dict | None = None):
    """One V4 attention layer (module docstring). x [B, T, D] is input_layernorm(collapsed
    streams). capture gets, on CSA layers, index_ids / index_tie / index_tied (Selection)."""
    B, T, _ = x.shape
    H, d, r, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    kind = cfg.layer_type(i)
    prefix = f"model.layers.{i}.self_attn."
    g = lambda n: w[prefix + n]  # noqa: E731
    compressed = kind != SLIDING
    cos, sin = rope_cos_sin(cfg, positions, compressed)

    qr = rms_norm(linear(x, g("q_a_proj.weight")), g("q_a_norm.weight"), eps)
    q = linear(qr, g("q_b_proj.weight")).reshape(B, T, H, d)
    q = rope_tail(q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + eps), cos, sin, r)
    kv = rope_tail(rms_norm(linear(x, g("kv_proj.weight")), g("kv_norm.weight"), eps), cos, sin, r)

    scale = cfg.softmax_scale
    logits = np.einsum("bthd,bsd->bhts", q, kv) * scale
    logits = np.where(sliding_mask(positions, cfg.sliding_window)[:, None], logits, -np.inf)
    values = kv
    if compressed:
        m = cfg.compress_rate(kind)
        c = compress(x, w, cfg, prefix + "compressor.", m, d, overlap=kind == CSA)    # [B, n, d]
        if kind == CSA:
            sel = indexer(x, qr, w, cfg, prefix, positions)
            visible = sel.mask
            if capture is not None:
                capture.update(index_ids=sel.ids, index_tie=sel.tie, index_tied=sel.tied)
        else:
            assert kind == HCA
            visible = np.arange(c.shape[1]) < complete_blocks(positions, m)[..., None]
        lc = np.einsum("bthd,bnd->bhtn", q, c) * scale
        logits = np.concatenate([logits, np.where(visible[:, None], lc, -np.inf)], axis=-1)
        values = np.concatenate([kv, c], axis=1)
    p = attend_with_sink(logits, g("sinks"))
    o = np.einsum("bhts,bsd->bthd", p, values)
    o = derotate(o, cos, sin, r)
    return grouped_output(o, w, cfg, prefix)
