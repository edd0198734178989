"""DeepSeek-V4 caches and cached decoding in JAX: any chunk of new tokens through per-layer caches.

``step_v4(weights, cfg, tokens, positions, cache)`` runs tokens [B, T] at absolute positions
[B, T] (each row continuing its cache: position = tokens seen so far + 0..T-1) and returns the
logits of those positions and the updated cache; prefill in one call, in chunks of any sizes, or
one token at a time gives the full forward's (model_v4.forward_v4) logits at every position
(tests/test_decode_v4.py). Everything that is not cache handling is model_v4's (hc_pre/hc_post,
the MoE, the head, RoPE, the grouped output, the sink softmax, the indexer's top-k).

Per layer (``init_cache_v4``; docs/v4-reference.md "Caches and decoding"):
  every layer   ring [B, W, d] K = V rows of the last W positions (activation dtype) and
                ring_pos [B, W] their positions (a very negative number: empty slot);
  CSA / HCA     entries [B, max_len // m, d] the compressed entries (activation dtype), written
                when (pos + 1) % m == 0, RoPE'd at pos + 1 - m (the block's first token);
                pend_kv / pend_z [B, m, c] float32: the current partial block's compressor K and
                gate rows (c = 2d on CSA: the Ca | Cb series, d on HCA), gate without position bias;
  CSA only      prev_kv / prev_z [B, m, d] float32: the previous complete block's Ca rows (the
                overlap the next entry pools; zeros / -inf before the first block, as the
                prefill's block 0); and the lightning indexer's own compressor state the same way
                (idx_entries [B, max_len // m, J], idx_pend_*, idx_prev_*).
Plus ``length`` [B] int32, the positions seen per row. max_len is static (a pytree meta field).

Why the block buffer: a chunk may start inside a block and finish several blocks later; the rows
of every block it touches are assembled into one [B, nb, m, .] buffer (pending rows, then the
chunk's), with nb = T // m + 2 static, so the entries pool exactly as compress() pools a prefill;
blocks the chunk does not complete are dropped at the scatter (mode='drop').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from dsref.reference import dsa
from dsref.reference.config_v4 import CSA, SLIDING, ModelConfigV4
from dsref.reference.model import rms_norm
from dsref.reference.model_v4 import _check_inputs, hc_head, hc_post, hc_pre, moe
from dsref.reference.model_v4_attention import F32, HIGHEST, attend_with_sink, canonical_zero, \
    derotate, f32_linear, grouped_output, linear, linear32, mm32, rope_cos_sin, rope_tail, unweighted_rms
from dsref.reference.params_v4 import EMBED, FINAL_NORM, HEAD

EMPTY = -(1 << 30)  # ring_pos of a slot never written: outside every query's window


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CacheV4:
    """layers: one dict of arrays per layer (module docstring); length [B] int32; max_len static."""
    layers: tuple
    length: jax.Array
    max_len: int = field(metadata=dict(static=True))


def _compressor_state(B: int, n: int, m: int, width: int, overlap: bool, dtype, key: str) -> dict:
    c = 2 * width if overlap else width
    st = {key + "entries": jnp.zeros((B, n, width), dtype),
          key + "pend_kv": jnp.zeros((B, m, c), F32), key + "pend_z": jnp.zeros((B, m, c), F32)}
    if overlap:  # before block 0 the overlap slots are empty: K = 0, Z = -inf (compress())
        st.update({key + "prev_kv": jnp.zeros((B, m, width), F32),
                   key + "prev_z": jnp.full((B, m, width), -jnp.inf, F32)})
    return st


def init_cache_v4(cfg: ModelConfigV4, batch: int, max_len: int, dtype=F32) -> CacheV4:
    """An empty cache for ``batch`` sequences of up to ``max_len`` positions (module docstring)."""
    if int(batch) < 1 or int(max_len) < 1:
        raise ValueError(f"init_cache_v4: batch and max_len must be >= 1, got batch={batch} max_len={max_len}")
    B, d, W = int(batch), cfg.head_dim, cfg.sliding_window
    layers = []
    for i in range(cfg.num_hidden_layers):
        kind = cfg.layer_type(i)
        st = {"ring": jnp.zeros((B, W, d), dtype), "ring_pos": jnp.full((B, W), EMPTY, jnp.int32)}
        if kind != SLIDING:
            m = cfg.compress_rate(kind)
            st.update(_compressor_state(B, max_len // m, m, d, kind == CSA, dtype, ""))
            if kind == CSA:
                st.update(_compressor_state(B, max_len // m, m, cfg.index_head_dim, True, dtype, "idx_"))
        layers.append(st)
    return CacheV4(tuple(layers), jnp.zeros((B,), jnp.int32), int(max_len))


def cache_bytes_v4(cache) -> int:
    """Bytes of a cache (or of its jax.eval_shape)."""
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(cache)))


# --------------------------------------------------------------------------- compressor update
def _rows(a, idx):
    """a [B, S, c] gathered at idx [B, R] (in range) -> [B, R, c]."""
    return jnp.take_along_axis(a, idx[..., None], axis=1)


def _update_compressor(x, w, cfg: ModelConfigV4, st: dict, key: str, prefix: str, m: int, width: int,
                       overlap: bool, start, prec):
    """The chunk's compressor rows through the pending state: new entries written, pending (and
    prev) state advanced. x [B, T, D] the chunk's normed layer input, start [B] its first position.
    Returns the new state dict (only this compressor's keys)."""
    B, T, _ = x.shape
    nb = T // m + 2                                   # blocks a chunk can touch (start anywhere in one)
    kv = linear32(x, w[prefix + "kv_proj.weight"], prec)            # [B, T, c] float32, as compress()
    z = linear32(x, w[prefix + "gate_proj.weight"], prec)
    b0 = (start // m) * m                             # first position of the block the chunk starts in
    off = (start - b0)[:, None]                       # pending rows before the chunk, [B, 1]
    j = jnp.arange(nb * m)[None, :]
    from_pend, from_new = j < off, (j >= off) & (j - off < T)
    pi, ni = jnp.clip(j, 0, m - 1) + 0 * off, jnp.clip(j - off, 0, T - 1)

    def assemble(pend, new):
        # zeros past the chunk's end: those blocks are incomplete and dropped (no -inf: no NaN)
        return jnp.where(from_pend[..., None], _rows(pend, pi),
                         jnp.where(from_new[..., None], _rows(new, ni), 0.0))
    rk, rz = assemble(st[key + "pend_kv"], kv), assemble(st[key + "pend_z"], z)   # [B, nb m, c]
    bias = w[prefix + "position_bias"].astype(F32)                                 # [m, c]
    bk, bz = rk.reshape(B, nb, m, -1), rz.reshape(B, nb, m, -1) + bias
    if overlap:  # block k pools {Ca of block k-1, Cb of block k}; block -1 is the cached prev block
        pk, pz = st[key + "prev_kv"], st[key + "prev_z"] + bias[:, :width]
        ca_k = jnp.concatenate([pk[:, None], bk[:, :-1, :, :width]], axis=1)
        ca_z = jnp.concatenate([pz[:, None], bz[:, :-1, :, :width]], axis=1)
        pk_all = jnp.concatenate([ca_k, bk[..., width:]], axis=2)                   # [B, nb, 2m, width]
        pz_all = jnp.concatenate([ca_z, bz[..., width:]], axis=2)
    else:
        pk_all, pz_all = bk, bz
    pooled = (pk_all * jax.nn.softmax(pz_all, axis=2)).sum(axis=2)
    c = rms_norm(pooled, w[prefix + "kv_norm.weight"], cfg.rms_norm_eps)
    ent = b0[:, None] // m + jnp.arange(nb)[None, :]                                # entry ids [B, nb]
    cos, sin = rope_cos_sin(cfg, ent * m, compressed=True)                           # at the block's start
    c = rope_tail(c, cos, sin, cfg.qk_rope_head_dim).astype(st[key + "entries"].dtype)
    end = start + T
    N = st[key + "entries"].shape[1]
    complete = (ent + 1) * m <= end[:, None]
    dst = jnp.where(complete, ent, N)                 # N: out of range, dropped
    out = {key + "entries": st[key + "entries"].at[jnp.arange(B)[:, None], dst].set(c, mode="drop")}
    # the new partial block starts at (end // m) m, row j2 of the buffer (a multiple of m)
    j2 = ((end // m) * m - b0)[:, None] + jnp.arange(m)[None, :]
    pad = lambda a: jnp.concatenate([a, jnp.zeros((B, m, a.shape[-1]), F32)], axis=1)  # noqa: E731
    out[key + "pend_kv"], out[key + "pend_z"] = _rows(pad(rk), j2), _rows(pad(rz), j2)
    if overlap:  # Ca rows of the block before the new partial one: the old prev if none completed
        ext_k = jnp.concatenate([st[key + "prev_kv"], rk[..., :width]], axis=1)
        ext_z = jnp.concatenate([st[key + "prev_z"], rz[..., :width]], axis=1)
        out[key + "prev_kv"], out[key + "prev_z"] = _rows(ext_k, j2), _rows(ext_z, j2)
    return out


# ---------------------------------------------------------------------------------- attention
def cached_attention(x, w, cfg: ModelConfigV4, i: int, positions, st: dict, prec, capture: dict | None = None):
    """model_v4_attention.attention for a chunk x [B, T, D] at positions [B, T] against the layer's
    cache st: keys = [ring | the chunk's own rows | the compressed entries]. Returns (out, new st)."""
    B, T, _ = x.shape
    H, d, r, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    W = cfg.sliding_window
    kind = cfg.layer_type(i)
    prefix = f"model.layers.{i}.self_attn."
    compressed = kind != SLIDING
    cos, sin = rope_cos_sin(cfg, positions, compressed)
    start = positions[:, 0]

    qr = rms_norm(linear(x, w[prefix + "q_a_proj.weight"], prec), w[prefix + "q_a_norm.weight"], eps)
    q = linear(qr, w[prefix + "q_b_proj.weight"], prec).reshape(B, T, H, d)
    q = rope_tail(unweighted_rms(q.astype(F32), eps).astype(x.dtype), cos, sin, r)
    kv = linear(x, w[prefix + "kv_proj.weight"], prec)
    kv = rope_tail(rms_norm(kv, w[prefix + "kv_norm.weight"], eps), cos, sin, r).astype(st["ring"].dtype)

    keys = jnp.concatenate([st["ring"], kv], axis=1)                                 # [B, W + T, d]
    kpos = jnp.concatenate([st["ring_pos"], positions], axis=1)
    t, s = positions[:, :, None], kpos[:, None, :]
    scale = cfg.softmax_scale
    logits = mm32("bthd,bsd->bhts", q, keys, prec) * scale
    logits = jnp.where(((s <= t) & (s > t - W))[:, None], logits, -jnp.inf)
    values = keys
    new = {}
    if compressed:
        m = cfg.compress_rate(kind)
        new.update(_update_compressor(x, w, cfg, st, "", prefix + "compressor.", m, d, kind == CSA, start, prec))
        c = new["entries"]
        N = c.shape[1]
        visible = jnp.arange(N) < ((positions + 1) // m)[..., None]
        if kind == CSA and N:
            ip = prefix + "compressor.indexer."
            new.update(_update_compressor(x, w, cfg, st, "idx_", ip, m, cfg.index_head_dim, True, start, prec))
            I, J = cfg.index_n_heads, cfg.index_head_dim
            iq = linear(qr, w[ip + "q_b_proj.weight"], prec).reshape(B, T, I, J)
            iq = rope_tail(iq, cos, sin, r)
            hw = f32_linear(x, w[ip + "scorer.weights_proj.weight"]) * I ** -0.5
            qk = mm32("bthj,bnj->bthn", iq, new["idx_entries"], prec)
            sc = canonical_zero(jnp.einsum("bth,bthn->btn", hw, jax.nn.relu(qk), precision=HIGHEST) * J ** -0.5)
            sel = dsa.select_topk_jax(sc, visible, cfg.index_topk)
            visible = sel.mask
            if capture is not None:
                capture.update(index_ids=sel.ids, index_tie=sel.tie)
        if N:
            lc = mm32("bthd,bnd->bhtn", q, c, prec) * scale
            logits = jnp.concatenate([logits, jnp.where(visible[:, None], lc, -jnp.inf)], axis=-1)
            values = jnp.concatenate([keys, c], axis=1)
    p = attend_with_sink(logits, w[prefix + "sinks"])
    o = mm32("bhts,bsd->bthd", p.astype(values.dtype), values, prec).astype(x.dtype)
    o = derotate(o, cos, sin, r)
    # the ring keeps the last W positions: the chunk's last min(T, W) rows (distinct slots pos % W)
    L = min(T, W)
    slot = positions[:, T - L:] % W
    bi = jnp.arange(B)[:, None]
    new["ring"] = st["ring"].at[bi, slot].set(kv[:, T - L:])
    new["ring_pos"] = st["ring_pos"].at[bi, slot].set(positions[:, T - L:])
    return grouped_output(o, w, cfg, prefix, prec), {**st, **new}


# ------------------------------------------------------------------------------------- model
def _step(weights, cfg: ModelConfigV4, tokens, positions, cache: CacheV4, prec, with_capture: bool = True):
    """The jitted body of step_v4: (logits [B, T, V] float32, new cache, capture dict)."""
    dtype = cache.layers[0]["ring"].dtype
    B, T = tokens.shape
    e = weights[EMBED][tokens].astype(dtype)
    h = jnp.broadcast_to(e[:, :, None, :], (B, T, cfg.hc_mult, cfg.hidden_size))
    layers, capture = [], {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        cap = {} if with_capture else None
        x, post, comb = hc_pre(h, weights, cfg, p + "attn_hc.")
        a, st = cached_attention(rms_norm(x, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps), weights,
                                 cfg, i, positions, cache.layers[i], prec, cap)
        layers.append(st)
        h = hc_post(a, h, post, comb)
        x, post, comb = hc_pre(h, weights, cfg, p + "ffn_hc.")
        f = moe(rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps), weights, cfg, i,
                tokens, prec, cap)
        h = hc_post(f, h, post, comb)
        if with_capture:
            capture.update({f"layers.{i}.{k}": cap[k] for k in ("index_ids", "index_tie", "topk_ids") if k in cap})
    hn = rms_norm(hc_head(h, weights, cfg), weights[FINAL_NORM], cfg.rms_norm_eps)
    logits = linear32(hn, weights[HEAD], prec)
    return logits, CacheV4(tuple(layers), cache.length + T, cache.max_len), capture


@lru_cache(maxsize=16)
def _compiled(cfg: ModelConfigV4, options: tuple):
    # the capture (a few int arrays) is always returned: one compile per chunk shape serves both
    # captured and plain calls (compiles take ~10 s for tiny-v4 on XLA:CPU; decode steps are ms)
    def run(weights, tokens, positions, cache):
        dtype = cache.layers[0]["ring"].dtype
        prec = HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT
        return _step(weights, cfg, tokens, positions, cache, prec)
    return jax.jit(run, donate_argnums=(3,), compiler_options=dict(options) or None)


def _check_step(cfg: ModelConfigV4, tokens, positions, cache: CacheV4):
    """One-line errors: shapes, the cache's batch/config, positions continuing the cache, capacity."""
    B, T = tokens.shape
    if not isinstance(cache, CacheV4) or len(cache.layers) != cfg.num_hidden_layers:
        raise ValueError(f"cache: expected init_cache_v4(cfg, ...) for {cfg.name} ({cfg.num_hidden_layers} layers)")
    if tuple(cache.length.shape) != (B,):
        raise ValueError(f"cache: built for batch {cache.length.shape[0]}, tokens have batch {B}")
    if tuple(np.shape(positions)) != (B, T):
        raise ValueError(f"positions: expected shape {(B, T)} like tokens, got {tuple(np.shape(positions))}")
    if isinstance(positions, jax.core.Tracer) or isinstance(cache.length, jax.core.Tracer):
        return
    pos, seen = np.asarray(positions), np.asarray(cache.length)
    want = seen[:, None] + np.arange(T)
    if not np.array_equal(pos, want):
        raise ValueError(f"positions: each row must continue its cache (row 0 expects {want[0, 0]}..{want[0, -1]}, "
                         f"got {pos[0, 0]}..{pos[0, -1]}); the caches hold the positions seen, in order")
    if pos.max() >= cache.max_len:
        raise ValueError(f"cache: max_len={cache.max_len} is too small for position {pos.max()} "
                         f"(needs max_len >= {pos.max() + 1}; init_cache_v4 with a larger max_len)")


def step_v4(weights: dict, cfg: ModelConfigV4, tokens, positions, cache: CacheV4, capture: dict | None = None,
            compiler_options: dict | None = None):
    """(logits [B, T, V] float32, new cache) for tokens [B, T] at positions [B, T] (module docstring).
    The activation dtype is the cache's (init_cache_v4's dtype). The cache passed in is donated
    (consumed): use the returned one. capture: filled with layers.{i}.topk_ids, and index_ids /
    index_tie on CSA layers (ids over the cache's entry slots, -1 for none)."""
    _check_inputs(weights, cfg, tokens)
    tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    _check_step(cfg, tokens, positions, cache)
    options = tuple(sorted((compiler_options or {}).items()))
    logits, cache, cap = _compiled(cfg, options)(weights, tokens, positions.astype(jnp.int32),
                                                                        cache)
    if capture is not None:
        capture.update(cap)
    return logits, cache


def greedy_generate_v4(weights: dict, cfg: ModelConfigV4, prompt_ids, n: int, dtype=F32,
                       compiler_options: dict | None = None):
    """Greedy decoding: the prompt [B, P] prefilled in one step, then n tokens, one step each.
    Returns the generated ids [B, n] (int32 numpy)."""
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 2 or 0 in prompt.shape:
        raise ValueError(f"prompt_ids: expected a non-empty integer array [B, P], got shape {prompt.shape}")
    if int(n) < 1:
        raise ValueError(f"n: the number of tokens to generate must be >= 1, got {n}")
    B, P = prompt.shape
    cache = init_cache_v4(cfg, B, P + n, dtype)
    pos = np.broadcast_to(np.arange(P), (B, P))
    logits, cache = step_v4(weights, cfg, prompt, pos, cache, compiler_options=compiler_options)
    out = []
    for k in range(n):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(nxt)
        if k + 1 < n:
            logits, cache = step_v4(weights, cfg, nxt[:, None], np.full((B, 1), P + k), cache,
                                    compiler_options=compiler_options)
    return np.asarray(jnp.stack(out, axis=1))
