"""The DeepSeek-V4 forward pass in plain NumPy float64: the ground truth for V4.

A sibling of reference/numpy_ref.py (V3) with V4's pieces: manifold-constrained hyper-connections
(hc_mult residual streams, Sinkhorn-Knopp), hash-routed and sqrtsoftplus-routed MoE with clipped
SwiGLU, the final hyper-connection head; attention lives in reference/numpy_v4_attention.py.
``mtp`` is the multi-token-prediction module as DeepSeek's inference code defines it (transformers
has none; docs/v4-reference.md "Multi-token prediction").
Checked against transformers 5.24 ``DeepseekV4ForCausalLM`` (tests/test_numpy_v4.py); every
place transformers and DeepSeek's inference code (deepseek-ai/DeepSeek-V4-Flash
``inference/model.py``) differ is listed in docs/v4-reference.md with the choice made here.

Weights: a flat dict with transformers' state_dict names (reference/params_v4.py), routed experts
stacked: ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows then up rows), ``down_proj`` [E, D, F].

Letters: B batch, T tokens, D hidden, n hc_mult, E experts, k experts per token,
F moe_intermediate_size, V vocab.
"""

from __future__ import annotations

import numpy as np

from dsref.reference.config_v4 import ModelConfigV4
from dsref.reference.numpy_ref import linear, rms_norm, silu
from dsref.reference.numpy_v4_attention import attention, softmax
from dsref.reference.params import MTP
from dsref.reference.params_v4 import EMBED, FINAL_NORM, HEAD, layer_tensors

f64 = np.float64


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def unweighted_rms(x, eps):
    """x / sqrt(mean(x^2) + eps): the hyper-connections' norm of the flattened n*D streams."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


# ------------------------------------------------------------------------ hyper-connections
def sinkhorn(comb_logits, iters: int, eps: float):
    """Project [..., n, n] logits towards a doubly-stochastic matrix (both codes, step for step):

      M = softmax_row(logits) + eps;  M /= colsum(M) + eps;
      repeat iters - 1 times:  M /= rowsum(M) + eps;  M /= colsum(M) + eps.
    So ``iters`` column normalisations and iters - 1 row ones, after the softmax's own."""
    m = softmax(comb_logits, axis=-1) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdims=True) + eps)
        m = m / (m.sum(-2, keepdims=True) + eps)
    return m


def hc_pre(h, w, cfg: ModelConfigV4, prefix: str):
    """Mixing weights of one hyper-connection from the streams h [B, T, n, D]:

      x'   = RMSNorm_1(vec(h))  (eps = rms_norm_eps)                    [B, T, n*D]
      a    = x' fn^T                                                    [B, T, (2+n)n]
      pre  = sigmoid(a_pre * s0 + b_pre) + hc_eps                       [B, T, n]
      post = 2 sigmoid(a_post * s1 + b_post)                            [B, T, n]
      comb = Sinkhorn(a_comb * s2 + b_comb)                             [B, T, n, n]
    Returns (collapsed = sum_j pre_j h_j [B, T, D], post, comb)."""
    B, T, n, D = h.shape
    a = linear(unweighted_rms(h.reshape(B, T, n * D), cfg.rms_norm_eps), w[prefix + "fn"])
    b, s = np.asarray(w[prefix + "base"], f64), np.asarray(w[prefix + "scale"], f64)
    pre = sigmoid(a[..., :n] * s[0] + b[:n]) + cfg.hc_eps
    post = 2.0 * sigmoid(a[..., n:2 * n] * s[1] + b[n:2 * n])
    comb = sinkhorn((a[..., 2 * n:] * s[2] + b[2 * n:]).reshape(B, T, n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return np.einsum("btn,btnd->btd", pre, h), post, comb


def hc_post(f, h, post, comb):
    """New streams: h'_k = post_k * f + sum_j comb[j, k] h_j  (comb read transposed: DeepSeek
    ``sum(comb[..., j, k, None] * h[..., j, None, :], dim=j)``, transformers comb^T @ h)."""
    return post[..., None] * f[:, :, None, :] + np.einsum("btjk,btjd->btkd", comb, h)


def hc_head(h, w, cfg: ModelConfigV4, prefix: str = "model.hc_head."):
    """Final collapse: pre = sigmoid(RMSNorm_1(vec h) fn^T * s + b) + hc_eps; out = sum_j pre_j h_j."""
    B, T, n, D = h.shape
    a = linear(unweighted_rms(h.reshape(B, T, n * D), cfg.rms_norm_eps), w[prefix + "hc_fn"])
    pre = sigmoid(a * np.asarray(w[prefix + "hc_scale"], f64) + np.asarray(w[prefix + "hc_base"], f64)) + cfg.hc_eps
    return np.einsum("btn,btnd->btd", pre, h)


# ------------------------------------------------------------------------------------- MoE
def score(logits, scoring_func: str):
    """Router activation: sqrtsoftplus = sqrt(log(1 + e^x)) (V4's), or sigmoid."""
    if scoring_func == "sqrtsoftplus":
        return np.sqrt(np.logaddexp(0.0, logits))
    return sigmoid(logits)


def router(x, w, cfg: ModelConfigV4, i: int, tokens):
    """(logits [M, E], ids [M, k], weights [M, k]) for x [M, D], tokens [M].

    s = score(x W_g^T). Hash layers: ids = tid2eid[token] (no bias); others: the k largest
    s + e_score_correction_bias (the bias chooses, it does not weigh). weights = s[ids] / sum
    * routed_scaling_factor (DeepSeek divides exactly; transformers adds 1e-20 to the sum)."""
    p = f"model.layers.{i}.mlp.gate."
    logits = linear(x, w[p + "weight"])
    s = score(logits, cfg.scoring_func)
    if cfg.is_hash_layer(i):
        ids = np.asarray(w[p + "tid2eid"])[np.asarray(tokens)].astype(np.int64)
    else:
        choice = s + np.asarray(w[p + "e_score_correction_bias"], f64)
        ids = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    wts = np.take_along_axis(s, ids, axis=-1)
    return logits, ids, wts / wts.sum(-1, keepdims=True) * cfg.routed_scaling_factor


def clipped_swiglu(gate, up, limit: float | None):
    """silu(min(gate, L)) * clip(up, -L, L): the gate is clamped from above only, up on both
    sides (both codes); limit None: plain SwiGLU."""
    if limit is not None:
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    return silu(gate) * up


def expert(x, gate_w, up_w, down_w, limit: float | None):
    return linear(clipped_swiglu(linear(x, gate_w), linear(x, up_w), limit), down_w)


def moe(x, w, cfg: ModelConfigV4, i: int, tokens, capture: dict | None = None, shared_expert_clamp: bool = True):
    """Routed experts (weighted by the router) + the shared expert, x [B, T, D].

    shared_expert_clamp: clip the shared expert's SwiGLU at swiglu_limit too. True is DeepSeek's
    code (inference/model.py MoE: ``Expert(..., swiglu_limit=args.swiglu_limit)``) and transformers
    5.24 (DeepseekV4MLP); False is transformers' first V4 port (issue huggingface/transformers#46018)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits, ids, wts = router(x, w, cfg, i, np.asarray(tokens).reshape(-1))
    p = f"model.layers.{i}.mlp."
    F, L = cfg.moe_intermediate_size, cfg.swiglu_limit
    gu, down = w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
    out = np.zeros_like(x)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        gw = np.asarray(gu[e], f64)
        out[tok] += expert(x[tok], gw[:F], gw[F:], down[e], L) * wts[tok, slot][:, None]
    s = p + "shared_experts."
    out += expert(x, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"],
                  L if shared_expert_clamp else None)
    if capture is not None:
        capture.update(router_logits=logits.reshape(*shape[:-1], -1), topk_ids=ids.reshape(*shape[:-1], -1),
                       topk_weights=wts.reshape(*shape[:-1], -1))
    return out.reshape(shape)


# ------------------------------------------------------------------------------------ model
def decoder_layer(h, w, cfg: ModelConfigV4, i: int, tokens, positions, capture: dict | None = None,
                  shared_expert_clamp: bool = True):
    """h [B, T, n, D] -> h [B, T, n, D]: attention and MoE, each between hc_pre and hc_post."""
    p = f"model.layers.{i}."
    cap: dict | None = {} if capture is not None else None
    x, post, comb = hc_pre(h, w, cfg, p + "attn_hc.")
    a = attention(rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps), w, cfg, i, positions, cap)
    h = hc_post(a, h, post, comb)
    x, post, comb = hc_pre(h, w, cfg, p + "ffn_hc.")
    f = moe(rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps), w, cfg, i, tokens, cap,
            shared_expert_clamp)
    h = hc_post(f, h, post, comb)
    if capture is not None:
        capture[f"layers.{i}.attn_out"] = a
        capture[f"layers.{i}.hidden"] = h
        capture[f"layers.{i}.mlp_out"] = f
        for k2, v in cap.items():
            capture[f"layers.{i}.{k2}"] = v
    return h


def forward(tokens, w, cfg: ModelConfigV4, capture: dict | None = None, return_hidden: bool = False,
            shared_expert_clamp: bool = True):
    """Logits [B, T, V] (float64) for token ids [B, T] (causal, positions 0..T-1, one prefill).

    The embedding is copied into the n hyper-connection streams; after the layers hc_head
    collapses them, the final RMSNorm and the LM head follow. return_hidden: also the normed
    final hidden state [B, T, D]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected a non-empty integer array [B, T], got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    B, T = tokens.shape
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    positions = np.broadcast_to(np.arange(T), (B, T))
    e = np.asarray(w[EMBED], f64)[tokens]
    h = np.repeat(e[:, :, None, :], cfg.hc_mult, axis=2)
    for i in range(cfg.num_hidden_layers):
        h = decoder_layer(h, w, cfg, i, tokens, positions, capture, shared_expert_clamp)
    hn = rms_norm(hc_head(h, w, cfg), w[FINAL_NORM], cfg.rms_norm_eps)
    logits = linear(hn, w[HEAD])
    return (logits, hn) if return_hidden else logits


# ------------------------------------------------------------------- multi-token prediction
def mtp_block_weights(w, cfg: ModelConfigV4, depth: int) -> dict:
    """The decoder block of MTP module ``depth`` under the names ``decoder_layer`` reads for layer
    i = num_hidden_layers + depth: ``mtp.{depth}.<rel>`` -> ``model.layers.{i}.<rel>`` (the arrays
    themselves, not copies). Why a renamed view: the block is a plain decoder layer (DeepSeek's
    ``MTPBlock`` subclasses ``Block``), so the main model's layer code runs it unchanged."""
    i = cfg.num_hidden_layers + depth
    rows = [r for r in layer_tensors(cfg, i) if r.group != MTP]
    missing = [r.name for r in rows if r.name not in w]
    if missing:
        raise ValueError(f"weights: MTP tensor {missing[0]} missing (reference/params_v4.py table, config "
                         f"{cfg.name}; {len(missing)} such)")
    return {f"model.layers.{i}." + r.rel: w[r.name] for r in rows}


def mtp_combine(emb, h_streams, w, cfg: ModelConfigV4, prefix: str):
    """The MTP block's input streams [B, T', n, D] from the next tokens' embeddings emb [B, T', D] and
    the main model's streams h_streams [B, T', n, D]:

      x_k = e_proj(enorm(emb)) + h_proj(hnorm(h_k))   for every stream k
    (DeepSeek's inference/model.py ``MTPBlock.forward``: ``e = self.enorm(self.embed(input_ids));
    x = self.hnorm(x); x = self.e_proj(e).unsqueeze(2) + self.h_proj(x)``): hnorm normalises each
    stream over D on its own, h_proj maps each stream, and one projected embedding is added to all n."""
    eps = cfg.rms_norm_eps
    e = linear(rms_norm(emb, w[prefix + "enorm.weight"], eps), w[prefix + "e_proj.weight"])
    return e[:, :, None, :] + linear(rms_norm(h_streams, w[prefix + "hnorm.weight"], eps), w[prefix + "h_proj.weight"])


def mtp(tokens, h_streams, w, cfg: ModelConfigV4, depth: int = 0, shared_expert_clamp: bool = True,
        return_streams: bool = False):
    """Logits [B, T-1, V] (float64) of MTP module ``depth``: row t predicts token t+2 from the main
    model's streams at t and the embedding of token t+1 (golden's ``mtp.0.logits``, V3's layout).

    tokens [B, T] (T >= 2): the sequence the main model ran on; h_streams [B, T, n, D]: the main
    model's hyper-connection streams after its last layer, BEFORE hc_head and the final norm
    (``forward``'s capture ``layers.{L-1}.hidden``). DeepSeek's V4 inference code,
    deepseek-ai/DeepSeek-V4-Flash ``inference/model.py`` (read in public copies found with the code
    index; the HF repository itself cannot be fetched here), ``MTPBlock.forward(x, start_pos,
    input_ids)`` with x the [b, s, hc, d] streams, then ``Transformer.__init__`` (``m.embed =
    self.embed; m.head = self.head``):

      x_k    = e_proj(enorm(Emb(tok_{t+1}))) + h_proj(hnorm(h_{t,k}))        (mtp_combine)
      x      = Block_{L+depth}(x)   positions 0..T-2, attention mtp_layer_types[depth], MoE learned-routed
      logits = head(norm_mtp(hc_head_mtp(x)))

    Block: the main model's decoder layer (hc_pre/hc_post around attention and MoE) with the module's
    own weights; hc_head_mtp and norm_mtp are the module's own (``hc_head_fn/base/scale``, ``norm``);
    Emb and head are the main model's (the release stores no MTP copies). Positions restart at 0 over
    the T-1 rows, as ``MTPBlock.forward(h, 0, ids)`` in DeepSeek's own self-test; row t sits at
    position t, the main model's position of h_t. DeepSeek's code defines one module and no chaining;
    depth > 0 runs module ``depth`` on the h_streams it is given (whatever the caller chains in).
    return_streams: also the block's output streams [B, T-1, n, D]."""
    tokens = np.asarray(tokens)
    L, n, D = cfg.num_hidden_layers, cfg.hc_mult, cfg.hidden_size
    if not 0 <= depth < cfg.num_nextn_predict_layers:
        raise ValueError(f"depth: {depth} is not an MTP module of {cfg.name} "
                         f"(num_nextn_predict_layers = {cfg.num_nextn_predict_layers})")
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected an integer array [B, T] with T >= 2, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    B, T = tokens.shape
    if np.shape(h_streams) != (B, T, n, D):
        raise ValueError(f"h_streams: expected the main model's streams [B, T, n, D] = {[B, T, n, D]}, "
                         f"got {list(np.shape(h_streams))}")
    p = f"mtp.{depth}."
    nxt = tokens[:, 1:]
    x = mtp_combine(np.asarray(w[EMBED], f64)[nxt], np.asarray(h_streams, f64)[:, :-1], w, cfg, p)
    positions = np.broadcast_to(np.arange(T - 1), (B, T - 1))
    # The block's MoE gets the shifted ids (DeepSeek passes input_ids on); they only matter to hash
    # routing, which an MTP module never uses (config_v4.is_hash_layer).
    x = decoder_layer(x, mtp_block_weights(w, cfg, depth), cfg, L + depth, nxt, positions, None,
                      shared_expert_clamp)
    logits = linear(rms_norm(hc_head(x, w, cfg, p + "hc_head."), w[p + "norm.weight"], cfg.rms_norm_eps), w[HEAD])
    return (logits, x) if return_streams else logits
