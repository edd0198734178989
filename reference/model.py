"""The DeepSeek-V3/V2 model in JAX with Flax NNX: jit-compiled, float32 or bfloat16.

Each decoder layer declares its weights once, from ``reference.params`` (Hugging
Face names and shapes); initialisation, checkpoint loading and the NumPy
reference all follow that one declaration. The compute functions below take
``w`` — anything indexable by those names (an NNX layer or a plain dict) — so
the same code runs the model, the tests and the golden dumps.

MLA comes in two forms that give the same numbers:
  naive     keys/values expanded per head from the latent (training/prefill form);
  absorbed  W_uk folded into the query and W_uv into the output, attention done in
            the R=512-dim latent space: the cache holds only c_kv [R] and k_pe [P]
            per token (DeepSeek's own inference code).
MoE: exact top-k dispatch (no capacity, no dropped tokens); (token, expert) pairs are
sorted by expert and a loop visits only the experts in use, running each one's rows
in windows of a few rows, so the work is proportional to the selected experts, not to all E.

einsum letters: b batch, t query tokens, s key tokens, d hidden, h heads,
n nope dim, p rope dim, a value dim, r latent rank, e experts, f ffn, v vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsref.reference import dsa
from dsref.reference.config import MLA_NORM_EPS, ModelConfig
from dsref.reference.dispatch import expert_window_rows as block_size
from dsref.reference.expert_parallel import routed_experts_sharded
from dsref.reference.fp8_train import Fp8Recipe, fp8_linear
from dsref.reference.fp8_train import dgrad as fp8_dgrad
from dsref.reference.fp8_train import fprop as fp8_fprop
from dsref.reference.fp8_train import wgrad as fp8_wgrad
from dsref.reference.mesh import active_mesh
from dsref.reference.numpy_ref import rope_frequencies
from dsref.reference.params import EMBED, FINAL_NORM, Tensor, head_name, layer_tensors, tensors
from dsref.reference.unrolled import routed_experts_switch
from dsref.reference.weights import (BITS, F32, ExpertsAt, LayerAt, LayerStack, Weights, storage_dtype,
                                     take, to_storage)

NEG_INF = -jnp.inf


class Prefixed:
    """View of a flat {hf_name: array} dict under a prefix: Prefixed(w, 'model.layers.3.')."""

    def __init__(self, w, prefix: str):
        self.w, self.prefix = w, prefix

    def __getitem__(self, name):
        return self.w[self.prefix + name]

    def __contains__(self, name):
        return (self.prefix + name) in self.w

    def get(self, name, default=None):
        return self.w.get(self.prefix + name, default)


# ------------------------------------------------------------------ KV caches
# A cache is one per-layer array set: the fields below, each [B, S, ...]; the model keeps
# one per stack of layers, each field stacked [L, B, S, ...] (``zeros(..., layers=L)``),
# and a layer reads and writes its slice through ``LayerCache``.
class LatentCache(NamedTuple):
    """Absorbed-MLA cache: the normalised latent c_kv [B, S, R] and the rotated shared key
    k_pe [B, S, P] -- nothing per head (R + P values per token)."""

    c_kv: jax.Array
    k_pe: jax.Array

    expanded = False

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None = None) -> "LatentCache":
        lead = () if layers is None else (layers,)
        z = jnp.zeros if layers is None else _stored_zeros
        return cls(z((*lead, batch, length, cfg.kv_lora_rank), dtype),
                   z((*lead, batch, length, cfg.qk_rope_head_dim), dtype))

    @property
    def length(self) -> int:
        return self[0].shape[-2]

    def write(self, positions, c_kv, k_pe) -> "LatentCache":
        return _cache_write(self, positions, c_kv, k_pe)

    def read(self, dtype):
        return _cache_read(self, dtype)


class ExpandedCache(NamedTuple):
    """Naive-MLA cache: per-head keys k [B, S, H, N+P] and values v [B, S, H, A]."""

    k: jax.Array
    v: jax.Array

    expanded = True

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None = None) -> "ExpandedCache":
        H = cfg.num_attention_heads
        lead = () if layers is None else (layers,)
        z = jnp.zeros if layers is None else _stored_zeros
        return cls(z((*lead, batch, length, H, cfg.qk_head_dim), dtype),
                   z((*lead, batch, length, H, cfg.v_head_dim), dtype))

    @property
    def length(self) -> int:
        return self[0].shape[-3]

    def write(self, positions, k, v) -> "ExpandedCache":
        return _cache_write(self, positions, k, v)

    def read(self, dtype):
        return _cache_read(self, dtype)


class IndexedLatentCache(NamedTuple):
    """V3.2's absorbed-MLA cache: LatentCache's fields plus the indexer's key k_idx [B, S, J] per
    token (reference/dsa.py; one key shared by the indexer's heads, in the model dtype as
    transformers keeps it)."""

    c_kv: jax.Array
    k_pe: jax.Array
    k_idx: jax.Array

    expanded = False
    length = LatentCache.length
    read = LatentCache.read

    def write(self, positions, *new):
        return _cache_write(self, positions, *new)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None = None):
        return cls(*LatentCache.zeros(cfg, batch, length, dtype, layers), _index_zeros(cfg, batch, length, dtype, layers))


class IndexedExpandedCache(NamedTuple):
    """V3.2's naive-MLA cache: ExpandedCache's k and v plus the indexer's key k_idx [B, S, J]."""

    k: jax.Array
    v: jax.Array
    k_idx: jax.Array

    expanded = True
    length = ExpandedCache.length
    read = ExpandedCache.read

    def write(self, positions, *new):
        return _cache_write(self, positions, *new)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None = None):
        return cls(*ExpandedCache.zeros(cfg, batch, length, dtype, layers),
                   _index_zeros(cfg, batch, length, dtype, layers))


def _index_zeros(cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None):
    lead = () if layers is None else (layers,)
    return (jnp.zeros if layers is None else _stored_zeros)((*lead, batch, length, cfg.index_head_dim), dtype)


def cache_kind(cfg: ModelConfig, form: str = "absorbed"):
    """The cache class for MLA form 'absorbed' or 'naive' (V3.2: the one with the indexer's keys)."""
    if cfg.has_indexer:
        return IndexedLatentCache if form == "absorbed" else IndexedExpandedCache
    return LatentCache if form == "absorbed" else ExpandedCache


def _stored_zeros(shape, dtype):
    """Zeros of a stacked cache as stored (bf16 on CPU: bits, see LayerCache)."""
    return jnp.zeros(shape, storage_dtype(dtype))


def _cache_write(cache, positions, *new):
    """The cache with ``new`` (one array per field, [B, T, ...]) written at ``positions`` [B, T]."""
    b = jnp.arange(positions.shape[0])[:, None]
    return type(cache)(*(old.at[b, positions].set(x.astype(old.dtype)) for old, x in zip(cache, new, strict=True)))


def _cache_read(cache, dtype):
    """All S slots of every field, in the compute dtype."""
    return tuple(a.astype(dtype) for a in cache)


class LayerCache(NamedTuple):
    """Layer j (traced under the layer scan) of a stacked cache (fields [L, B, S, ...]),
    with the per-layer interface: write at positions, read all S slots. A bf16 stacked
    cache on CPU is stored as its bits, like the weights (reference/weights.py): XLA:CPU
    upcasts a bf16 scatter's or slice's whole operand, here every layer's cache."""

    stack: LatentCache | ExpandedCache | IndexedLatentCache | IndexedExpandedCache
    j: Any

    @property
    def expanded(self) -> bool:
        return self.stack.expanded

    @property
    def length(self) -> int:
        return self.stack.length

    def write(self, positions, *new) -> "LayerCache":
        b = jnp.arange(positions.shape[0])[:, None]
        out = []
        for old, x in zip(self.stack, new, strict=True):
            x = to_storage(x.astype(jnp.bfloat16)) if old.dtype == BITS else x.astype(old.dtype)
            out.append(old.at[self.j, b, positions].set(x))
        return LayerCache(type(self.stack)(*out), self.j)

    def read(self, dtype):
        return tuple(take(a, self.j).astype(dtype) for a in self.stack)


class ForwardOutput(NamedTuple):
    """What ``forward`` returns: logits [B, T, V] float32 ([B, V] with ``logits_at``), the new
    per-layer caches (None when none was given) and the final-normed hidden state [B, T, D]."""

    logits: jax.Array
    cache: list | None
    hidden: jax.Array


# ---------------------------------------------------------------- primitives
def _mm(cfg_dtype):
    """Matmul precision: full float32 for the oracle, native for bf16."""
    return jax.lax.Precision.HIGHEST if cfg_dtype == F32 else jax.lax.Precision.DEFAULT


def einsum(spec, a, b, precision=None):
    """einsum accumulating in float32 where the backend supports it for the input dtype
    (XLA:CPU has no bf16 x bf16 -> f32 dot; it accumulates bf16 dots in f32 internally).
    A float32 operand (a bf16 weight widened for XLA:CPU, see reference/weights.py) makes the
    product float32: bf16 values multiplied exactly, accumulated in float32."""
    if a.dtype != b.dtype and F32 in (a.dtype, b.dtype):
        return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=precision)
    acc = F32 if (a.dtype == F32 or jax.default_backend() != "cpu") else None
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=acc)


def _plain(prec):
    """The precision of what stays out of FP8 (V3 sec. 3.3.1: output head, gating, attention
    operators) when ``prec`` is an Fp8Recipe: full float32; otherwise ``prec`` itself."""
    return jax.lax.Precision.HIGHEST if isinstance(prec, Fp8Recipe) else prec


def linear(x, w, precision=None):
    """x @ w.T with w in [out, in] (checkpoint layout), result in x's dtype. precision: a
    jax.lax.Precision, or an Fp8Recipe for DeepSeek-V3's FP8 GEMMs (reference/fp8_train.py)."""
    if isinstance(precision, Fp8Recipe):
        return fp8_linear(x, w, precision)
    w = w if w.dtype == F32 else w.astype(x.dtype)
    return einsum("...i,oi->...o", x, w, precision).astype(x.dtype)


def rms_norm(x, weight, eps):
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(F32) * xf).astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions):
    """cos, sin [B, T, P/2] (float32) for positions [B, T]; frequencies from the NumPy reference."""
    inv_freq, att = rope_frequencies(cfg)
    ang = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(ang) * att, jnp.sin(ang) * att


def apply_rope(x, cos, sin, interleaved: bool = True):
    """Interleaved-pair rotation (2i, 2i+1), output kept interleaved (numpy_ref.apply_rope_interleaved);
    ``interleaved=False``: half-split pairs (i, i + P/2) (numpy_ref.apply_rope_half)."""
    while cos.ndim < x.ndim:
        cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(F32)
    if not interleaved:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------- MLA
def mla_project(w, cfg: ModelConfig, x, positions, prec):
    """Shared first half of MLA: q_nope [B,T,H,N], q_pe [B,T,H,P], c_kv [B,T,R], k_pe [B,T,P], and
    the compressed query qr = q_a_layernorm(q_a_proj(x)) [B,T,Q] (None without q_lora), which the
    V3.2 indexer reads too."""
    B, T, _ = x.shape
    H, N, P, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        qr = None
        q = linear(x, w["q_proj.weight"], prec)
    else:
        qr = rms_norm(linear(x, w["q_a_proj.weight"], prec), w["q_a_layernorm.weight"], MLA_NORM_EPS)
        q = linear(qr, w["q_b_proj.weight"], prec)
    q = q.reshape(B, T, H, N + P)
    kv = linear(x, w["kv_a_proj_with_mqa.weight"], prec)
    c_kv = rms_norm(kv[..., :R], w["kv_a_layernorm.weight"], MLA_NORM_EPS)
    cos, sin = rope_tables(cfg, positions)
    il = cfg.rope_interleave  # DeepSeek's checkpoints: True; transformers' switch for half-split pairs
    return q[..., :N], apply_rope(q[..., N:], cos, sin, il), c_kv, apply_rope(kv[..., R:], cos, sin, il), qr


def _softmax_attend(scores, mask):
    scores = jnp.where(mask[:, None], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def attention_mask(q_pos, k_pos, k_valid=None):
    """[B, T, S]: key s visible to query t iff k_pos <= q_pos (causal by position)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def expand_kv(w, cfg: ModelConfig, c_kv, k_pe, prec=None):
    """Naive MLA: per-head keys [B,S,H,N+P] (k_pe shared by all heads) and values [B,S,H,A]."""
    B, S, _ = c_kv.shape
    H, N, A = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kvb = linear(c_kv, w["kv_b_proj.weight"], prec).reshape(B, S, H, N + A)
    k = jnp.concatenate([kvb[..., :N], jnp.broadcast_to(k_pe[:, :, None, :], (B, S, H, k_pe.shape[-1]))], -1)
    return k, kvb[..., N:]


def attend_expanded(cfg: ModelConfig, q, k, v, mask, prec):
    """Ordinary multi-head attention: q [B,T,H,N+P], k [B,S,H,N+P], v [B,S,H,A] -> [B,T,H*A]."""
    prec = _plain(prec)  # attention operators stay out of FP8
    p = _softmax_attend(einsum("bthq,bshq->bhts", q, k, prec) * cfg.softmax_scale, mask)
    o = einsum("bhts,bsha->btha", p.astype(v.dtype), v, prec)
    return o.reshape(o.shape[0], o.shape[1], -1).astype(q.dtype)


def mla_naive(w, cfg: ModelConfig, q_nope, q_pe, c_kv, k_pe, mask, prec):
    """Expand keys/values per head from the latent, then ordinary attention. Returns [B,T,H*A]."""
    k, v = expand_kv(w, cfg, c_kv, k_pe, prec)
    return attend_expanded(cfg, jnp.concatenate([q_nope, q_pe], -1), k, v, mask, prec)


def mla_absorbed(w, cfg: ModelConfig, q_nope, q_pe, c_kv, k_pe, mask, prec):
    """Attention in the latent space: q_nope W_uk -> [B,T,H,R]; scores against c_kv; out via W_uv.
    Under an Fp8Recipe all of it (W_uk, W_uv included) stays out of FP8: FP8 training uses "naive"."""
    prec = _plain(prec)
    H, N, A, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    wkv = w["kv_b_proj.weight"].reshape(H, N + A, R)
    w_uk, w_uv = wkv[:, :N], wkv[:, N:]  # float32 (widened bf16 on CPU) or the model dtype
    q_lat = einsum("bthn,hnr->bthr", q_nope, w_uk, prec).astype(q_nope.dtype)
    scores = (einsum("bthr,bsr->bhts", q_lat, c_kv, prec)
              + einsum("bthp,bsp->bhts", q_pe, k_pe, prec))
    p = _softmax_attend(scores * cfg.softmax_scale, mask)
    o_lat = einsum("bhts,bsr->bthr", p.astype(c_kv.dtype), c_kv, prec)
    o = einsum("bthr,har->btha", o_lat.astype(q_nope.dtype), w_uv, prec)
    return o.reshape(o.shape[0], o.shape[1], -1).astype(q_nope.dtype)


# ---------------------------------------------------------------------- MoE
def route(w, cfg: ModelConfig, x):
    """Router in float32. x [M, D] -> logits [M, E], ids [M, k], weights [M, k] (see numpy_ref.gate)."""
    E, k, G, kg = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    logits = jnp.einsum("md,ed->me", x.astype(F32), w["gate.weight"].astype(F32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores
    if cfg.topk_method == "noaux_tc":
        choice = scores + w["gate.e_score_correction_bias"].astype(F32)
    if cfg.topk_method != "greedy" and G > 1:
        grouped = choice.reshape(-1, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep = jax.nn.one_hot(jax.lax.top_k(group_score, kg)[1], G, dtype=jnp.bool_).any(-2)
        # -inf, not 0: a biased score may be negative and must never lose to a masked expert.
        choice = jnp.where(jnp.repeat(keep, E // G, axis=-1), choice, NEG_INF)
    ids = jax.lax.top_k(choice, k)[1]
    wts = jnp.take_along_axis(scores, ids, axis=-1)  # unbiased scores
    if cfg.scoring_func == "sigmoid":
        if cfg.norm_topk_prob:
            wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        wts = wts * cfg.routed_scaling_factor
    elif cfg.norm_topk_prob and k > 1:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    else:
        wts = wts * cfg.routed_scaling_factor
    return logits, ids, wts


def swiglu(x, wg, wu, wd, prec):
    return linear(jax.nn.silu(linear(x, wg, prec)) * linear(x, wu, prec), wd, prec)


def routed_experts(w, x, ids, wts, num_experts: int, prec, valid=None):
    """Exact sum_k wts[m,k] * Expert_{ids[m,k]}(x[m]) with work proportional to the k selected.

    The (token, expert) assignments are sorted by expert. A loop visits only the
    experts in use and runs each one's rows through the SwiGLU in windows of C rows
    (the last window of an expert may run into the next expert's rows: those results
    are discarded). Unused experts are never read: a used expert's matrices are sliced
    out of the stacked [E, ...] weights (an ``ExpertsAt`` of a layer stack, or a plain
    array) by its id, one dynamic slice each, so the program has no branch per expert;
    given one array per expert (a tuple, reference/unrolled.py) a ``lax.switch`` on the
    id enters that expert's branch, which reads its arrays in place.
    x [M, D], ids/wts [M, k] -> [M, D]. valid [M] (optional): rows to compute; the others
    (padding of the expert-parallel buffers, reference/expert_parallel.py) give zeros and
    cost nothing: they are sorted behind every expert, to an extra id never visited.
    """
    M, D = x.shape
    A = ids.size
    if valid is not None:
        ids = jnp.where(valid[:, None], ids, num_experts)
    C, order, counts, start, used, n_used = dispatch_plan(ids, num_experts + (valid is not None))
    if valid is not None:
        n_used = jnp.count_nonzero(counts[:num_experts])  # the extra id sorts last in ``used``
    tok = order // ids.shape[1]
    xs = jnp.concatenate([x[tok], jnp.zeros((C - 1, D), x.dtype)])  # a window may run C-1 rows past the end
    wg, wu, wd = (w[f"experts.{n}_proj.weight"] for n in ("gate", "up", "down"))
    for m in (wg, wu, wd):
        E = m.num_experts if isinstance(m, (ExpertsAt, tuple)) else m.shape[0]
        if E != num_experts:
            raise ValueError(f"{E} routed experts in the weights for num_experts={num_experts}")

    if isinstance(wg, tuple):  # one array per expert (reference/unrolled.py): a branch per expert
        run = routed_experts_switch(wg, wu, wd, partial(_rows, xs, C, prec))

        def expert(j, ys):
            e = used[j]
            return run(e, ys, start[e], counts[e])
        ys = jax.lax.fori_loop(0, n_used, expert, jnp.zeros((A + C - 1, D), x.dtype))
    else:  # a layer stack's experts [L, E, ...] at layer j, or plain [E, ...] (as layer 0 of one)
        stacked = isinstance(wg, ExpertsAt)
        arrays = [m.stack if stacked else m[None] for m in (wg, wu, wd)]
        j = jnp.asarray(wg.j if stacked else 0, jnp.int32)
        ys = expert_rows(xs, *arrays, j, counts, start, used, n_used, C, prec)
    y = ys[:A].astype(F32) * wts.reshape(-1)[order].astype(F32)[:, None]
    return jnp.zeros((M, D), F32).at[tok].add(y).astype(x.dtype)


def _rows(xs, C, prec, ys, first, n, g, u, d):
    """Rows first..first+n-1 of the sorted xs through one expert's SwiGLU (g, u, d), written into
    ys, in windows of C rows (a window's rows past n belong to the next expert: kept as they are)."""
    def window(b, ys):
        r = first + b * C
        yb = swiglu(jax.lax.dynamic_slice_in_dim(xs, r, C), g, u, d, prec)
        mine = (jnp.arange(C) < n - b * C)[:, None]
        yb = jnp.where(mine, yb, jax.lax.dynamic_slice_in_dim(ys, r, C))
        return jax.lax.dynamic_update_slice_in_dim(ys, yb, r, axis=0)
    return jax.lax.fori_loop(0, (n + C - 1) // C, window, ys)


def _expert_rows(xs, gate, up, down, j, counts, start, used, n_used, C, prec):
    def expert(i, ys):
        e = used[i]
        return _rows(xs, C, prec, ys, start[e], counts[e], *(take(m, j, e) for m in (gate, up, down)))
    return jax.lax.fori_loop(0, n_used, expert, jnp.zeros(xs.shape, xs.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def expert_rows(xs, gate, up, down, j, counts, start, used, n_used, C, prec):
    """ys [A+C-1, D]: the expert-sorted rows xs through their experts' SwiGLU (experts [L, E, ...]
    of layer j; ``dispatch_plan``'s counts, start, used, n_used). The loop's trip count depends
    on the data (only used experts, only their windows), which reverse-mode AD cannot go
    through, so the gradient is written out (``_expert_rows_bwd``): the same loop, backwards."""
    return _expert_rows(xs, gate, up, down, j, counts, start, used, n_used, C, prec)


def _expert_rows_fwd(xs, gate, up, down, j, counts, start, used, n_used, C, prec):
    out = _expert_rows(xs, gate, up, down, j, counts, start, used, n_used, C, prec)
    return out, (xs, gate, up, down, j, counts, start, used, n_used)


def _expert_rows_bwd(C, prec, res, dys):
    """For each used expert and window (x rows, dy rows; W_g, W_u [F, D], W_d [D, F]):
    g = x W_g^T, u = x W_u^T, a = silu(g) u;  da = dy W_d;  dW_d += dy^T a;
    dg = da u silu'(g), du = da silu(g);  dx = dg W_g + du W_u;  dW_g += dg^T x, dW_u += du^T x.
    In float32; rows of a window past the expert's own are masked out of every sum.
    prec an Fp8Recipe: each GEMM is the recipe's Fprop, Dgrad or Wgrad (reference/fp8_train.py);
    a Wgrad's token tiles must not see the next expert's rows, so they are zeroed first."""
    xs, gate, up, down, j, counts, start, used, n_used = res
    fp8 = isinstance(prec, Fp8Recipe)

    def fprop(x, w):  # x [C, K] W^T, W [N, K]
        return fp8_fprop(x, w, prec) if fp8 else jnp.einsum("ck,nk->cn", x, w, precision=prec)

    def dgrad(dy, w):  # dy [C, N] W
        return fp8_dgrad(dy, w, prec) if fp8 else jnp.einsum("cn,nk->ck", dy, w, precision=prec)

    def wgrad(dy, x, mine):  # dy^T x, over the window's rows
        if fp8:
            return fp8_wgrad(dy, jnp.where(mine, x, 0.0), prec)
        return jnp.einsum("cn,ck->nk", dy, x, precision=prec)

    def expert(i, carry):
        dxs, dgate, dup, ddown = carry
        e = used[i]
        first, n = start[e], counts[e]
        wg, wu, wd = (take(m, j, e).astype(F32) for m in (gate, up, down))

        def window(b, c):
            dxs, gg, gu, gd = c
            r = first + b * C
            mine = (jnp.arange(C) < n - b * C)[:, None]
            x = jax.lax.dynamic_slice_in_dim(xs, r, C).astype(F32)
            dy = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dys, r, C).astype(F32), 0.0)
            g, u = fprop(x, wg), fprop(x, wu)
            sig = jax.nn.sigmoid(g)
            s = g * sig
            da = dgrad(dy, wd)
            dg, du = da * u * sig * (1 + g * (1 - sig)), da * s
            dx = dgrad(dg, wg) + dgrad(du, wu)
            dxs = jax.lax.dynamic_update_slice_in_dim(
                dxs, jnp.where(mine, dx, jax.lax.dynamic_slice_in_dim(dxs, r, C)), r, axis=0)
            return dxs, gg + wgrad(dg, x, mine), gu + wgrad(du, x, mine), gd + wgrad(dy, s * u, mine)

        zero = (jnp.zeros(wg.shape, F32), jnp.zeros(wu.shape, F32), jnp.zeros(wd.shape, F32))
        dxs, gg, gu, gd = jax.lax.fori_loop(0, (n + C - 1) // C, window, (dxs, *zero))
        return (dxs, dgate.at[j, e].add(gg), dup.at[j, e].add(gu), ddown.at[j, e].add(gd))

    init = (jnp.zeros(xs.shape, F32), *(jnp.zeros(m.shape, F32) for m in (gate, up, down)))
    dxs, dgate, dup, ddown = jax.lax.fori_loop(0, n_used, expert, init)
    return (dxs.astype(xs.dtype), dgate.astype(gate.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
            None, None, None, None, None)


expert_rows.defvjp(_expert_rows_fwd, _expert_rows_bwd)


def dispatch_plan(ids, num_experts: int):
    """Sort the M*k (token, expert) assignments by expert and list the experts in use.

    Returns C (rows per GEMM window, ``block_size``), order [A] (the assignment, as a
    flat index into ids, of each sorted row), counts [E] (rows per expert), start [E]
    (first sorted row of each expert), used [min(E, A)] (the experts with rows, in
    ascending order; the tail is padding) and n_used. Windows visited:
    sum_e ceil(counts_e / C) <= ceil(M*k/C) + n_used.
    """
    A = ids.size
    C = block_size(A, num_experts)
    e_flat = ids.reshape(-1)
    order = jnp.argsort(e_flat, stable=True)
    counts = jnp.bincount(e_flat, length=num_experts)
    start = jnp.cumsum(counts) - counts
    used = jnp.nonzero(counts, size=min(num_experts, A), fill_value=0)[0]
    return C, order, counts, start, used, jnp.count_nonzero(counts)


def moe(w, cfg: ModelConfig, x, prec, capture: dict | None = None):
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    logits, ids, wts = route(w, cfg, xf)
    if active_mesh() is not None:  # expert parallel over the mesh (reference/expert_parallel.py)
        out = routed_experts_sharded(w, x, ids.reshape(*shape[:-1], -1), wts.reshape(*shape[:-1], -1),
                                     cfg.n_routed_experts, prec, routed_experts).reshape(xf.shape)
    else:
        out = routed_experts(w, xf, ids, wts, cfg.n_routed_experts, prec)
    if cfg.n_shared_experts:
        out = out + swiglu(xf, w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"],
                           w["shared_experts.down_proj.weight"], prec)
    if capture is not None:
        capture.update(router_logits=logits.reshape(*shape[:-1], -1), topk_ids=ids.reshape(*shape[:-1], -1),
                       topk_weights=wts.reshape(*shape[:-1], -1))
    return out.reshape(shape)


# ------------------------------------------------------------------ layers
def decoder_layer(w, cfg: ModelConfig, i: int, h, positions, cache=None, *, mla_form="absorbed",
                  prec=None, capture: dict | None = None, k_valid=None, chunk_only: bool = False):
    """One pre-norm block: h + MLA(norm(h)); then + MoE/MLP(norm(h)).

    cache: None (attend within h only), or a layer's cache (a LatentCache, ExpandedCache, or
    a LayerCache of a stacked one) that the new latents (keys/values) are written into at
    ``positions``; the new cache is returned. capture: filled with this layer's attn_out,
    hidden and, for MoE layers, router_logits, topk_ids and topk_weights (unprefixed).
    chunk_only: the cache holds nothing before this chunk (a prefill from position 0),
    so attend within the chunk's own keys (in ``mla_form``) instead of over all S slots
    of the cache; the chunk is still written into the cache.
    V3.2 (cfg.has_indexer): the indexer's keys are cached beside the latents (the caches' k_idx
    field) and MLA attends to its top-index_topk keys only (reference/dsa.py); capture also gets
    index_ids, index_tie and index_tied (dsa.Selection).
    """
    idx_cap: dict | None = {} if capture is not None else None
    with jax.named_scope(f"layer{i}_mla"):
        x = rms_norm(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
        sa = Prefixed(w, "self_attn.")
        q_nope, q_pe, c_kv, k_pe, qr = mla_project(sa, cfg, x, positions, prec)
        if cache is None or chunk_only:
            k_pos = positions
        else:
            k_pos = jnp.broadcast_to(jnp.arange(cache.length), (h.shape[0], cache.length))
        if cfg.has_indexer and cache is not None and "k_idx" not in getattr(cache, "stack", cache)._fields:
            raise ValueError(f"{cfg.name}: a V3.2 model's cache needs the indexer's keys (k_idx): "
                             "make it with decode.init_cache or model.cache_kind")
        if cfg.has_indexer:  # V3.2: the mask is the indexer's top-k, chosen once its keys are known
            iq, ihw, ik = dsa.index_inputs_jax(sa, cfg, x, qr, positions, _plain(prec))
            extra, mask = (ik,), None
        else:
            extra, mask = (), attention_mask(positions, k_pos, k_valid)
        if cache is not None and cache.expanded:  # per-head keys and values are what is cached
            k, v = expand_kv(sa, cfg, c_kv, k_pe, prec)
            cache = cache.write(positions, k, v, *extra)
            if not chunk_only:
                k, v, *cached = cache.read(h.dtype)
                ik = cached[0] if cached else None
            mask = _index_mask(cfg, iq, ihw, ik, positions, k_pos, k_valid, idx_cap) if mask is None else mask
            o = attend_expanded(cfg, jnp.concatenate([q_nope, q_pe], -1), k, v, mask, prec)
        else:
            if cache is not None:  # the latent c_kv and k_pe are what is cached
                cache = cache.write(positions, c_kv, k_pe, *extra)
                if not chunk_only:
                    c_kv, k_pe, *cached = cache.read(h.dtype)
                    ik = cached[0] if cached else None
            mask = _index_mask(cfg, iq, ihw, ik, positions, k_pos, k_valid, idx_cap) if mask is None else mask
            attend = mla_absorbed if mla_form == "absorbed" else mla_naive
            o = attend(sa, cfg, q_nope, q_pe, c_kv, k_pe, mask, prec)
        a = linear(o, sa["o_proj.weight"], prec)
        h = h + a
    with jax.named_scope(f"layer{i}_{'moe' if cfg.is_moe_layer(i) else 'mlp'}"):
        x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        m = Prefixed(w, "mlp.")
        cap = {} if capture is not None else None
        if cfg.is_moe_layer(i):
            y = moe(m, cfg, x, prec, cap)
        else:
            y = swiglu(x, m["gate_proj.weight"], m["up_proj.weight"], m["down_proj.weight"], prec)
        h = h + y
    if capture is not None:
        capture.update(attn_out=a, hidden=h, **cap, **idx_cap)
    return h, cache


def _index_mask(cfg: ModelConfig, q, hw, k, positions, k_pos, k_valid, capture: dict | None):
    """V3.2: MLA's mask, the indexer's selection of the keys k [B, S, J] at k_pos (always a subset of
    the causal mask); capture gets index_ids (ascending, -1 padded), index_tie and index_tied."""
    sel = dsa.index_select_jax(q, hw, k, positions, k_pos, cfg.index_topk, k_valid)
    if capture is not None:
        capture.update(index_ids=sel.ids, index_tie=sel.tie, index_tied=sel.tied)
    return sel.mask


# ------------------------------------------------------------------- model
def layer_kind(cfg: ModelConfig, i: int) -> tuple:
    """What makes two decoder layers stackable: the same weights (names and shapes)."""
    return tuple((t.rel, t.shape) for t in layer_tensors(cfg, i))


def layer_runs(cfg: ModelConfig) -> list[range]:
    """The main decoder layers cut into maximal runs of consecutive layers of one kind
    (V3: the first_k_dense_replace dense layers, then the MoE layers): one scan each."""
    runs: list[range] = []
    for i in range(cfg.num_hidden_layers):
        if runs and layer_kind(cfg, i) == layer_kind(cfg, runs[-1].start):
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


class DeepseekModel(nnx.Module):
    """DeepSeek-V3/V2 causal LM. Weights: ``self.globals`` (embedding, final norm, head),
    ``self.stacks`` (one LayerStack per run of same-kind decoder layers, see ``layer_runs``),
    ``self.mtp`` (the MTP modules as one LayerStack, when loaded). ``layer(i)`` views one layer."""

    def __init__(self, cfg: ModelConfig, *, dtype=F32, rngs: nnx.Rngs | None = None, with_mtp: bool = False,
                 std: float = 0.02):
        if cfg.arch != "deepseek":
            raise ValueError(f"{cfg.name}: the JAX model implements DeepSeek MLA+MoE; GQA models "
                             "(dense, and Qwen3-MoE) run in the float64 NumPy reference "
                             "(reference/numpy_ref.py) and the simulators only")
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        by_layer: dict[int | None, list[Tensor]] = {}
        for t in tensors(cfg, mtp=with_mtp):
            by_layer.setdefault(t.layer, []).append(t)
        # Every key is drawn first, in tensor-table order (so an init is the same values as
        # one layer at a time): under nnx.eval_shape each draw walks the whole trace so far.
        keys = {layer: [rngs.params() for _ in rows] for layer, rows in by_layer.items()}
        self.globals = Weights(by_layer[None], dtype, keys[None], std)
        L = cfg.num_hidden_layers
        self.stacks = nnx.List([LayerStack(r.start, [by_layer[i] for i in r], dtype, [keys[i] for i in r], std)
                                for r in layer_runs(cfg)])
        mtp = [i for i in by_layer if i is not None and i >= L]
        self.mtp = nnx.List([LayerStack(L, [by_layer[i] for i in mtp], dtype, [keys[i] for i in mtp], std)]
                            if mtp else [])

    def layer(self, i: int) -> LayerAt:
        """Decoder layer i (an MTP module for i >= num_hidden_layers), addressed by names
        relative to 'model.layers.{i}.'; ``raw(name)`` gives the stored dtype."""
        for st in [*self.stacks, *self.mtp]:
            if i in st.layers:
                return st.at(i - st.first)
        raise IndexError(f"layer {i}: the model has layers 0..{self.cfg.num_hidden_layers - 1}"
                         + (f" and MTP {self.mtp[0].first}.." if len(self.mtp) else ""))

    # -- names <-> arrays (checkpoint layout)
    def hf_items(self):
        """(hf_name, param) for every weight, in checkpoint naming: the globals' nnx.Params,
        and a LayerSlice (layer j of a stacked Param, same interface) per layer tensor."""
        for n in self.globals.names():
            yield n, self.globals.param(n)
        for st in [*self.stacks, *self.mtp]:
            for n, j, p in st.slices():
                yield f"model.layers.{st.first + j}.{n}", p

    def load_hf(self, tensors: dict[str, Any]):
        """Set every weight from a {hf_name: array} dict (shapes must match exactly)."""
        for name, p in self.hf_items():
            a = tensors[name]
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"tensor {name}: shape {tuple(a.shape)} != expected {tuple(p.shape)}")
            p[...] = jnp.asarray(a, p.dtype)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(p[...]) for n, p in self.hf_items()}

    def __call__(self, tokens, positions=None, cache=None, *, mla_form="absorbed", capture: dict | None = None,
                 k_valid=None) -> ForwardOutput:
        return forward(self, tokens, positions, cache, mla_form=mla_form, capture=capture, k_valid=k_valid)


def run_stack(st: LayerStack, cfg: ModelConfig, h, positions, cache=None, *, mla_form="absorbed", prec=None,
              capture: dict | None = None, k_valid=None, chunk_only: bool = False, unroll: bool = False):
    """The layers of one stack, as one ``jax.lax.scan`` over the layer index: the weights
    stay stacked and each layer's are sliced out by index (reference/weights.py), the
    stacked cache (fields [L, B, S, ...]) rides in the carry and is updated in place.
    Returns (h, the new stacked cache or None); capture gets ``layers.{i}.*`` per layer.
    unroll: emit the scan fully unrolled (same computation; XLA's cost analysis counts a loop
    body once, so a FLOP count of every layer needs it)."""
    arrays = {n: st.stacked(n) for n in st.names()}

    def body(carry, j):
        h, c = carry
        cap = {} if capture is not None else None
        lc = None if c is None else LayerCache(c, j)
        h, lc = decoder_layer(LayerAt(arrays, j, st.expert_names), cfg, st.first, h, positions, lc,
                              mla_form=mla_form, prec=prec, capture=cap, k_valid=k_valid, chunk_only=chunk_only)
        return (h, None if c is None else lc.stack), cap

    with jax.named_scope(f"layers{st.first}-{st.first + st.count - 1}"):
        (h, cache), caps = jax.lax.scan(body, (h, cache), jnp.arange(st.count), unroll=st.count if unroll else 1)
    if capture is not None:
        for k, v in caps.items():
            capture.update({f"layers.{st.first + j}.{k}": v[j] for j in range(st.count)})
    return h, cache


def forward(model: DeepseekModel, tokens, positions=None, cache=None, *, mla_form="absorbed",
            capture: dict | None = None, k_valid=None, chunk_only: bool = False,
            logits_at=None, unroll_layers: bool = False, prec=None) -> ForwardOutput:
    """tokens [B, T] -> ForwardOutput(logits [B, T, V] float32, new cache, hidden [B, T, D]).

    positions [B, T] default to 0..T-1. cache: one stacked cache per layer stack (see
    ``reference.decode.init_cache``): LatentCache (c_kv [L, B, S, R], k_pe [L, B, S, P]) or
    ExpandedCache. chunk_only: see ``decoder_layer`` (prefill into an empty cache).
    logits_at [B] (int): compute the LM head only at that index of each sequence: logits
    [B, V] (a prefill needs the last prompt position only; the head is the largest matmul
    of small models). unroll_layers: see ``run_stack``. prec: the matmul precision instead of the
    dtype's default: a jax.lax.Precision, or an Fp8Recipe for the simulated FP8 training recipe
    (reference/fp8_train.py: the Linear layers in FP8; embedding, LM head, router, norms and
    attention operators not).
    """
    cfg, g = model.cfg, model.globals
    prec = _mm(model.dtype) if prec is None else prec
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h = g.raw(EMBED)[tokens].astype(model.dtype)  # rows gathered in the stored dtype
    if cache is not None and len(cache) != len(model.stacks):
        raise ValueError(f"cache has {len(cache)} stacks for the model's {len(model.stacks)} (init_cache)")
    new_cache = []
    for s, st in enumerate(model.stacks):
        h, c = run_stack(st, cfg, h, positions, None if cache is None else cache[s], mla_form=mla_form, prec=prec,
                         capture=capture, k_valid=k_valid, chunk_only=chunk_only, unroll=unroll_layers)
        new_cache.append(c)
    hn = rms_norm(h, g[FINAL_NORM], cfg.rms_norm_eps)
    head = g[head_name(cfg)]
    logits = linear(hn if logits_at is None else hn[jnp.arange(B), logits_at], head, _plain(prec)).astype(F32)
    return ForwardOutput(logits, None if cache is None else new_cache, hn)


def mtp_logits(model: DeepseekModel, tokens, h_main, positions=None, depth: int = 0, cache=None,
               capture: dict | None = None, prec=None):
    """MTP module `depth`: hidden h_t (after the final norm) + embedding of token t+1 -> logits for t+2.

    tokens [B, T] are the *next* tokens (t+1) aligned with h_main [B, T, D]. cache: a list
    holding one one-layer stacked cache (``init_cache(model, B, S, layers=1)``).
    Returns ForwardOutput(logits [B, T, V], the new MTP cache when one is given, the module's
    hidden state after its shared_head norm). capture: filled as ``decoder_layer`` fills it
    (unprefixed: attn_out, hidden, and the routing of an MoE module). prec: as ``forward``'s.
    """
    cfg, g, w = model.cfg, model.globals, model.mtp[0].at(depth)
    prec = _mm(model.dtype) if prec is None else prec
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    emb = g.raw(EMBED)[tokens].astype(model.dtype)
    x = jnp.concatenate([rms_norm(emb, w["enorm.weight"], cfg.rms_norm_eps),
                         rms_norm(h_main.astype(model.dtype), w["hnorm.weight"], cfg.rms_norm_eps)], axis=-1)
    x = linear(x, w["eh_proj.weight"], prec)
    x, c = decoder_layer(w, cfg, cfg.num_hidden_layers + depth, x, positions,
                         None if cache is None else LayerCache(cache[0], 0), prec=prec, capture=capture)
    head = g[head_name(cfg)]
    hn = rms_norm(x, w["shared_head.norm.weight"], cfg.rms_norm_eps)
    return ForwardOutput(linear(hn, head, _plain(prec)).astype(F32), None if cache is None else [c.stack], hn)


@partial(jax.jit, static_argnames=("graphdef", "mla_form"))
def _jit_forward(graphdef, state, tokens, mla_form):
    return forward(nnx.merge(graphdef, state), tokens, mla_form=mla_form).logits


def jit_forward(model: DeepseekModel, tokens, mla_form: str = "absorbed"):
    """Compiled full forward (no cache): logits [B, T, V]."""
    graphdef, state = nnx.split(model)
    return _jit_forward(graphdef, state, jnp.asarray(tokens), mla_form)
