"""The DeepSeek-V4 forward pass in JAX: reference/numpy_v4.py function for function, jit-able.

Manifold-constrained hyper-connections (Sinkhorn-Knopp), hash- and sqrtsoftplus-routed MoE with
clipped SwiGLU, the final hyper-connection head; attention in reference/model_v4_attention.py;
the multi-token-prediction module (``mtp_v4``, numpy_v4.mtp's equation).
Proven equal to the float64 NumPy reference (and to transformers) in tests/test_model_v4.py.

Weights: a plain dict {transformers' name: array} (reference/params_v4.py), the NumPy reference's
own interface. Why not an NNX module: the table's names are the one interface every V4 piece shares
(NumPy reference, transformers' state_dict, the future release loader); a dict is a pytree, so it
goes through jax.jit and jax.eval_shape as it is (``abstract_weights``), and an NNX module or a
sharded loader can hand its arrays in by name later without this code changing.
``cast_weights`` gives any {name: array} dict the storage dtypes of a run (float32, or bf16 with
the float32 tensors of the release kept float32).

Routed experts are computed densely: every expert on every token, combined with a [M, E] weight
matrix that is zero off the token's k experts. Exact, and fine for the tiny test configs; the
full-size models only trace (jax.eval_shape) here; a sorted dispatch (reference/model.py's
routed_experts) is what a real-size run needs.

Letters: b batch, t tokens, n hc_mult streams (j, k: two of them), d hidden, m = b*t rows,
e experts, f 2*moe_intermediate_size (gate rows then up rows), o outputs.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from dsref.reference.config_v4 import CSA, ModelConfigV4
from dsref.reference.model import rms_norm
from dsref.reference.model_v4_attention import F32, HIGHEST, attention, f32_linear, linear, \
    linear32, mm32, unweighted_rms
from dsref.reference.params import MTP
from dsref.reference.params_v4 import EMBED, FINAL_NORM, FP32, HEAD, INT64, layer_tensors, tensors

BF16 = jnp.bfloat16


# ------------------------------------------------------------------------------- weights
def storage_dtype(stored: str, dtype):
    """The dtype a table row is held in for a run in ``dtype``: tid2eid int32 (token/expert ids;
    JAX's default int width), the release's float32 tensors (hyper-connection mixers, sinks,
    compressor position biases, router correction bias) float32, every other weight ``dtype``."""
    if stored == INT64:
        return jnp.int32
    return F32 if stored == FP32 else dtype


def cast_weights(weights: dict, cfg: ModelConfigV4, dtype=F32, mtp: bool = False) -> dict:
    """{name: jnp array} in the run's storage dtypes (``storage_dtype``) from any {name: array}
    (e.g. the NumPy reference's float64 dict); only the table's tensors, each checked by shape.
    mtp: also the MTP modules that ``weights`` has (``mtp.{k}.e_proj.weight`` present), each in full
    (a checkpoint may keep fewer modules than num_nextn_predict_layers: the golden dumps module 0)."""
    out = {}
    L = cfg.num_hidden_layers
    rows = tensors(cfg)
    if mtp:
        rows += [t for k in range(cfg.num_nextn_predict_layers) if f"mtp.{k}.e_proj.weight" in weights
                 for t in layer_tensors(cfg, L + k)]
    for t in rows:
        if t.name not in weights:
            raise ValueError(f"weights: tensor {t.name} missing (reference/params_v4.py table, config {cfg.name})")
        a = np.asarray(weights[t.name])
        if tuple(a.shape) != t.shape:
            raise ValueError(f"weights: tensor {t.name} has shape {tuple(a.shape)}, the table says {t.shape}")
        out[t.name] = jnp.asarray(a.astype(np.int32) if t.stored == INT64 else a, storage_dtype(t.stored, dtype))
    return out


def abstract_weights(cfg: ModelConfigV4, dtype=BF16) -> dict:
    """{name: jax.ShapeDtypeStruct} of the whole model (no memory): for jax.eval_shape."""
    return {t.name: jax.ShapeDtypeStruct(t.shape, storage_dtype(t.stored, dtype)) for t in tensors(cfg)}


def _check_inputs(weights, cfg: ModelConfigV4, tokens):
    """One-line errors for bad tokens (shape/dtype always; values when concrete) and for missing
    or mis-shaped weights (shapes are static, so this works under jit and eval_shape too)."""
    if not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens)
    shape, dtype = tuple(tokens.shape), tokens.dtype
    if len(shape) != 2 or 0 in shape or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens: expected a non-empty integer array [B, T], got shape {tuple(shape)} dtype {dtype}")
    if not isinstance(tokens, jax.core.Tracer):
        t = np.asarray(tokens)
        if t.min() < 0 or t.max() >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must lie in [0, vocab_size={cfg.vocab_size}), got [{t.min()}, {t.max()}]")
    for t in tensors(cfg):
        if t.name not in weights:
            raise ValueError(f"weights: tensor {t.name} missing (reference/params_v4.py table, config {cfg.name})")
        if tuple(weights[t.name].shape) != t.shape:
            raise ValueError(f"weights: tensor {t.name} has shape {tuple(weights[t.name].shape)}, "
                             f"the table says {t.shape}")


def _check_pinned(pinned: dict, cfg: ModelConfigV4, B: int, T: int):
    """forward_v4's ``pinned``: known keys, integer arrays of the shape the capture has."""
    for key, v in pinned.items():
        parts = key.split(".")
        ok = len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and \
            int(parts[1]) < cfg.num_hidden_layers and parts[2] in ("topk_ids", "index_ids")
        if ok and parts[2] == "index_ids":
            ok = cfg.layer_type(int(parts[1])) == CSA
        if not ok:
            raise ValueError(f"pinned: unknown key {key!r} (layers.{{i}}.topk_ids, or layers.{{i}}.index_ids of a "
                             f"CSA layer i < {cfg.num_hidden_layers})")
        want = (B, T, cfg.num_experts_per_tok) if parts[2] == "topk_ids" else \
            (B, T, min(cfg.index_topk, T // cfg.compress_rate_csa))
        if tuple(v.shape) != want or not jnp.issubdtype(v.dtype, jnp.integer):
            raise ValueError(f"pinned: {key} must be an integer array of shape {want}, got {tuple(v.shape)} {v.dtype}")


# ------------------------------------------------------------------------ hyper-connections
def sinkhorn(comb_logits, iters: int, eps: float):
    """numpy_v4.sinkhorn in float32: softmax_row + eps, a column normalisation, then iters - 1
    rounds of (row, column); a fori_loop (Flash/Pro: 20 iterations) keeps the graph small."""
    m = jax.nn.softmax(comb_logits.astype(F32), axis=-1) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)

    def round_(_, m):
        m = m / (m.sum(-1, keepdims=True) + eps)
        return m / (m.sum(-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, round_, m)


def hc_pre(h, w, cfg: ModelConfigV4, prefix: str):
    """(collapsed [B, T, D] in h's dtype, post [B, T, n], comb [B, T, n, n] float32) from the
    streams h [B, T, n, D]: the mixer, the sigmoids, Sinkhorn and the collapse all in float32
    (DeepSeek's Block.hc_pre works on x.float())."""
    B, T, n, D = h.shape
    hf = h.astype(F32)
    a = f32_linear(unweighted_rms(hf.reshape(B, T, n * D), cfg.rms_norm_eps), w[prefix + "fn"])
    b, s = w[prefix + "base"].astype(F32), w[prefix + "scale"].astype(F32)
    pre = jax.nn.sigmoid(a[..., :n] * s[0] + b[:n]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(a[..., n:2 * n] * s[1] + b[n:2 * n])
    comb = sinkhorn((a[..., 2 * n:] * s[2] + b[2 * n:]).reshape(B, T, n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return (pre[..., None] * hf).sum(2).astype(h.dtype), post, comb


def hc_post(f, h, post, comb):
    """h'_k = post_k f + sum_j comb[j, k] h_j in float32, stored in h's dtype."""
    mixed = jax.lax.dot_general(comb, h.astype(F32), (((2,), (2,)), ((0, 1), (0, 1))), precision=HIGHEST)
    y = post[..., None] * f.astype(F32)[:, :, None, :] + mixed                 # [b, t, k, d]
    return y.astype(h.dtype)


def hc_head(h, w, cfg: ModelConfigV4, prefix: str = "model.hc_head."):
    """Final collapse of the n streams (float32): sigmoid(RMSNorm_1(vec h) hc_fn^T s + b) + hc_eps."""
    B, T, n, D = h.shape
    hf = h.astype(F32)
    a = f32_linear(unweighted_rms(hf.reshape(B, T, n * D), cfg.rms_norm_eps), w[prefix + "hc_fn"])
    pre = jax.nn.sigmoid(a * w[prefix + "hc_scale"].astype(F32) + w[prefix + "hc_base"].astype(F32)) + cfg.hc_eps
    return (pre[..., None] * hf).sum(2).astype(h.dtype)


# ------------------------------------------------------------------------------------- MoE
def score(logits, scoring_func: str):
    """sqrtsoftplus = sqrt(log(1 + e^x)), or sigmoid (float32)."""
    if scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jnp.logaddexp(0.0, logits))
    return jax.nn.sigmoid(logits)


def router(x, w, cfg: ModelConfigV4, i: int, tokens, ids=None):
    """(logits [M, E], ids [M, k], weights [M, k]) for x [M, D], tokens [M], all in float32 (DeepSeek's
    Gate: linear(x.float(), weight.float())). Hash layers: ids = tid2eid[token]; others: lax.top_k of
    s + bias (descending, lower expert first among equal values: the reference's stable argsort).
    ids [M, k] given (``pinned``): these experts, weighted by this router's own scores."""
    p = f"model.layers.{i}.mlp.gate."
    logits = f32_linear(x, w[p + "weight"])
    s = score(logits, cfg.scoring_func)
    if ids is not None:
        ids = ids.astype(jnp.int32)
    elif cfg.is_hash_layer(i):
        ids = w[p + "tid2eid"][tokens].astype(jnp.int32)
    else:
        ids = jax.lax.top_k(s + w[p + "e_score_correction_bias"].astype(F32), cfg.num_experts_per_tok)[1]
    wts = jnp.take_along_axis(s, ids, axis=-1)
    return logits, ids, wts / wts.sum(-1, keepdims=True) * cfg.routed_scaling_factor


def clipped_swiglu(gate, up, limit: float | None):
    """silu(min(gate, L)) * clip(up, -L, L) (float32 in, float32 out); limit None: plain SwiGLU."""
    if limit is not None:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def expert(x, gate_w, up_w, down_w, limit: float | None, prec):
    """One SwiGLU expert (the shared one): the activation in float32 (DeepSeek's Expert: w1(x).float(),
    w3(x).float()), rounded to x's dtype before W_down."""
    a = clipped_swiglu(linear32(x, gate_w, prec), linear32(x, up_w, prec), limit)
    return linear(a.astype(x.dtype), down_w, prec)


def routed_dense(x, gate_up, down, ids, wts, limit: float | None, prec):
    """sum_k wts[m, k] Expert_{ids[m, k]}(x[m]) for x [M, D], computed DENSELY: every expert on every
    row, [M, E, 2F] and [M, E, D] intermediates, combined by a [M, E] float32 matrix that is zero off
    the row's experts (.add: a repeated id counts twice, as the reference's loop). Exact; the cost is
    E/k times the routed work: tiny configs only (module docstring)."""
    M, E, F = x.shape[0], gate_up.shape[0], gate_up.shape[1] // 2
    combine = jnp.zeros((M, E), F32).at[jnp.arange(M)[:, None], ids].add(wts)
    g = mm32("md,efd->mef", x, gate_up, prec)
    a = clipped_swiglu(g[..., :F], g[..., F:], limit).astype(x.dtype)
    y = mm32("mef,edf->med", a, down, prec)
    return jnp.einsum("me,med->md", combine, y, precision=HIGHEST)


def moe(x, w, cfg: ModelConfigV4, i: int, tokens, prec, capture: dict | None = None,
        shared_expert_clamp: bool = True, topk_ids=None):
    """Routed experts (router weights, float32 combine) + the shared expert, x [B, T, D] -> x's dtype.
    shared_expert_clamp: numpy_v4.moe's flag (True: DeepSeek's code and transformers 5.24).
    topk_ids [B, T, k]: route to these experts (``pinned``); capture then records them."""
    shape = x.shape
    xm = x.reshape(-1, shape[-1])
    pin = None if topk_ids is None else topk_ids.reshape(-1, topk_ids.shape[-1])
    logits, ids, wts = router(xm, w, cfg, i, tokens.reshape(-1), pin)
    p = f"model.layers.{i}.mlp."
    L = cfg.swiglu_limit
    out = routed_dense(xm, w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"], ids, wts, L, prec)
    s = p + "shared_experts."
    out = out + expert(xm, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"],
                       L if shared_expert_clamp else None, prec).astype(F32)
    if capture is not None:
        capture.update(router_logits=logits.reshape(*shape[:-1], -1), topk_ids=ids.reshape(*shape[:-1], -1),
                       topk_weights=wts.reshape(*shape[:-1], -1))
    return out.astype(x.dtype).reshape(shape)


# ------------------------------------------------------------------------------------ model
def decoder_layer(h, w, cfg: ModelConfigV4, i: int, tokens, positions, prec, capture: dict | None = None,
                  shared_expert_clamp: bool = True, pinned: dict | None = None):
    """h [B, T, n, D] -> h: attention and MoE, each between hc_pre and hc_post (numpy_v4.decoder_layer).
    pinned: forward_v4's."""
    p = f"model.layers.{i}."
    pinned = pinned or {}
    cap: dict | None = {} if capture is not None else None
    with jax.named_scope(f"layer{i}_{cfg.layer_type(i)}"):
        x, post, comb = hc_pre(h, w, cfg, p + "attn_hc.")
        a = attention(rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps), w, cfg, i, positions, prec,
                      cap, pinned.get(f"layers.{i}.index_ids"))
        h = hc_post(a, h, post, comb)
    # MTP blocks (i >= num_hidden_layers) have no mlp_layer_types entry: learned routing always
    with jax.named_scope(f"layer{i}_{cfg.mlp_layer_types[i] if i < cfg.num_hidden_layers else 'mtp_moe'}"):
        x, post, comb = hc_pre(h, w, cfg, p + "ffn_hc.")
        f = moe(rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps), w, cfg, i, tokens, prec,
                cap, shared_expert_clamp, pinned.get(f"layers.{i}.topk_ids"))
        h = hc_post(f, h, post, comb)
    if capture is not None:
        capture.update({f"layers.{i}.attn_out": a, f"layers.{i}.hidden": h, f"layers.{i}.mlp_out": f})
        capture.update({f"layers.{i}.{k}": v for k, v in cap.items()})
    return h


def forward_v4(weights: dict, cfg: ModelConfigV4, tokens, capture: dict | None = None, precision=None,
               dtype=F32, shared_expert_clamp: bool = True, return_hidden: bool = False, pinned: dict | None = None):
    """Logits [B, T, V] float32 for token ids [B, T] (one causal prefill, positions 0..T-1).

    weights: {name: array} (params_v4 table; ``cast_weights`` for the storage dtypes); dtype: the
    activation dtype (float32 or bfloat16: the hyper-connections, norms, router, Sinkhorn, scores
    and softmaxes stay float32 either way); precision: the matmul precision, default HIGHEST for
    float32 activations and DEFAULT for bf16. capture: filled with numpy_v4.forward's keys (traced
    values under jit). return_hidden: also the normed final hidden state [B, T, D].

    pinned: the discrete decisions to take instead of this model's own, by capture key:
    ``layers.{i}.topk_ids`` [B, T, k] (experts; weighted by this model's scores) and
    ``layers.{i}.index_ids`` [B, T, min(index_topk, n)] (CSA entries read, -1 for none). Passing the
    float64 reference's capture measures the continuous (rounding) error of a bf16 run apart from
    the near-tie routing/indexer flips that rounding causes (tests/test_model_v4.py)."""
    _check_inputs(weights, cfg, tokens)
    dtype = jnp.dtype(dtype)
    prec = precision if precision is not None else (HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT)
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape
    if pinned:
        _check_pinned(pinned, cfg, B, T)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    e = weights[EMBED][tokens].astype(dtype)
    h = jnp.broadcast_to(e[:, :, None, :], (B, T, cfg.hc_mult, cfg.hidden_size))
    for i in range(cfg.num_hidden_layers):
        h = decoder_layer(h, weights, cfg, i, tokens, positions, prec, capture, shared_expert_clamp, pinned)
    with jax.named_scope("head"):
        hn = rms_norm(hc_head(h, weights, cfg), weights[FINAL_NORM], cfg.rms_norm_eps)
        logits = linear32(hn, weights[HEAD], prec)
    return (logits, hn) if return_hidden else logits


@lru_cache(maxsize=16)
def _compiled(cfg: ModelConfigV4, dtype: str, with_capture: bool, shared_expert_clamp: bool, options: tuple):
    def run(weights, tokens, pinned):
        cap = {} if with_capture else None
        logits = forward_v4(weights, cfg, tokens, cap, dtype=jnp.dtype(dtype), shared_expert_clamp=shared_expert_clamp,
                            pinned=pinned)
        return logits, cap
    return jax.jit(run, compiler_options=dict(options) or None)


def jit_forward_v4(weights: dict, cfg: ModelConfigV4, tokens, dtype=F32, capture: bool = False,
                   shared_expert_clamp: bool = True, pinned: dict | None = None,
                   compiler_options: dict | None = None):
    """Compiled forward_v4 (one compile per config, dtype, flags, compiler options and set of pinned
    keys): (logits, capture dict or None). compiler_options: XLA's (jax.jit's argument), e.g. the
    tests' {"xla_backend_optimization_level": 0}: XLA:CPU then compiles the tiny models about twice as
    fast (less LLVM optimisation: the same program, results differing in the last bits, measured
    float32 logits 2.0e-6 from float64 vs 1.6e-6 at the default level)."""
    _check_inputs(weights, cfg, tokens)
    pinned = None if pinned is None else {k: jnp.asarray(np.asarray(v).astype(np.int32)) for k, v in pinned.items()}
    options = tuple(sorted((compiler_options or {}).items()))
    return _compiled(cfg, jnp.dtype(dtype).name, capture, shared_expert_clamp, options)(weights, jnp.asarray(tokens),
                                                                                         pinned)


# ------------------------------------------------------------------- multi-token prediction
def mtp_block_weights(weights: dict, cfg: ModelConfigV4, depth: int) -> dict:
    """numpy_v4.mtp_block_weights: module ``depth``'s block under ``model.layers.{L+depth}.`` names."""
    i = cfg.num_hidden_layers + depth
    out = {}
    for r in layer_tensors(cfg, i):
        if r.group == MTP:
            continue
        if r.name not in weights:
            raise ValueError(f"weights: MTP tensor {r.name} missing (reference/params_v4.py table, config {cfg.name}; "
                             "cast_weights(..., mtp=True) keeps them)")
        out[f"model.layers.{i}." + r.rel] = weights[r.name]
    return out


def mtp_v4(weights: dict, cfg: ModelConfigV4, tokens, h_streams, depth: int = 0, precision=None, dtype=F32,
           shared_expert_clamp: bool = True):
    """numpy_v4.mtp in JAX: logits [B, T-1, V] float32 of MTP module ``depth`` (row t predicts token
    t+2) from tokens [B, T] and the main model's streams after its last layer h_streams [B, T, n, D]
    (forward_v4's capture ``layers.{L-1}.hidden``). Equation and source (DeepSeek's
    inference/model.py ``MTPBlock.forward``) in numpy_v4.mtp. Dtypes as DeepSeek's code: enorm/hnorm
    computed in float32 and rounded to ``dtype``, e_proj/h_proj and their sum in ``dtype``, then the
    decoder block, hc_head, norm and head as forward_v4 has them. Shapes are checked here (static);
    token values by the caller (``jit_mtp_v4``)."""
    dtype = jnp.dtype(dtype)
    prec = precision if precision is not None else (HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT)
    L, n, D = cfg.num_hidden_layers, cfg.hc_mult, cfg.hidden_size
    if not 0 <= depth < cfg.num_nextn_predict_layers:
        raise ValueError(f"depth: {depth} is not an MTP module of {cfg.name} "
                         f"(num_nextn_predict_layers = {cfg.num_nextn_predict_layers})")
    B, T = tokens.shape
    if T < 2:
        raise ValueError(f"tokens: MTP needs T >= 2 tokens per sequence, got shape {tuple(tokens.shape)}")
    if tuple(h_streams.shape) != (B, T, n, D):
        raise ValueError(f"h_streams: expected the main model's streams [B, T, n, D] = {[B, T, n, D]}, "
                         f"got {list(h_streams.shape)}")
    p, eps = f"mtp.{depth}.", cfg.rms_norm_eps
    for r in layer_tensors(cfg, L + depth):
        if r.group == MTP and r.name not in weights:
            raise ValueError(f"weights: MTP tensor {r.name} missing (reference/params_v4.py table, config {cfg.name})")
    nxt = tokens[:, 1:]
    with jax.named_scope(f"mtp{depth}_combine"):
        e = linear(rms_norm(weights[EMBED][nxt].astype(dtype), weights[p + "enorm.weight"], eps),
                   weights[p + "e_proj.weight"], prec)
        hs = rms_norm(h_streams[:, :-1].astype(dtype), weights[p + "hnorm.weight"], eps)
        x = e[:, :, None, :] + linear(hs, weights[p + "h_proj.weight"], prec)
    positions = jnp.broadcast_to(jnp.arange(T - 1), (B, T - 1))
    x = decoder_layer(x, mtp_block_weights(weights, cfg, depth), cfg, L + depth, nxt, positions, prec, None,
                      shared_expert_clamp)
    with jax.named_scope(f"mtp{depth}_head"):
        hn = rms_norm(hc_head(x, weights, cfg, p + "hc_head."), weights[p + "norm.weight"], eps)
        return linear32(hn, weights[HEAD], prec)


@lru_cache(maxsize=16)
def _compiled_mtp(cfg: ModelConfigV4, dtype: str, depth: int, shared_expert_clamp: bool, options: tuple):
    def run(weights, tokens, h_streams):
        return mtp_v4(weights, cfg, tokens, h_streams, depth, dtype=jnp.dtype(dtype),
                      shared_expert_clamp=shared_expert_clamp)
    return jax.jit(run, compiler_options=dict(options) or None)


def jit_mtp_v4(weights: dict, cfg: ModelConfigV4, tokens, h_streams, depth: int = 0, dtype=F32,
               shared_expert_clamp: bool = True, compiler_options: dict | None = None):
    """Compiled mtp_v4 (one compile per config, dtype, depth, flag and compiler options): logits
    [B, T-1, V] float32. weights: ``cast_weights(..., mtp=True)``; tokens checked as forward_v4's."""
    t = np.asarray(tokens)
    if t.ndim != 2 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens: expected a non-empty integer array [B, T], got shape {t.shape} dtype {t.dtype}")
    if t.min() < 0 or t.max() >= cfg.vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, vocab_size={cfg.vocab_size}), got [{t.min()}, {t.max()}]")
    options = tuple(sorted((compiler_options or {}).items()))
    return _compiled_mtp(cfg, jnp.dtype(dtype).name, depth, shared_expert_clamp, options)(
        weights, jnp.asarray(t), jnp.asarray(h_streams))
