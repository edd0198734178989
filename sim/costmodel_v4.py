"""Operation lists (FLOPs and bytes) of DeepSeek-V4 prefill and decode steps.

A sibling of sim/costmodel.py for ModelConfigV4 (reference/config_v4.py): it reuses that module's
Op, StepShape, matmul/elementwise helpers and per-element constants, and counts what
reference/numpy_v4.py + numpy_v4_attention.py compute (docs/v4-reference.md), layer type by layer
type. One source for every size: weights are the rows of reference/params_v4.tensors stored as
DeepSeek's release stores them (``release_row_bytes``: FP8 E4M3 + one UE8M0 byte per 128x128
block, FP4 E2M1 experts = 0.5 byte + one UE8M0 byte per 32 inputs, BF16 / FP32 rows as listed);
cache sizes are ModelConfigV4.kv_bytes_per_token_by_type / kv_window_bytes, the code `dsref info`
prints them with.

Letters: M = B*T tokens of the step, P cached tokens per sequence (prefix), S = P + T, D hidden,
H heads, d head_dim (one shared K=V head), r rotated dims, Q q_lora_rank, g o_groups, d_g
o_lora_rank, W window, m rate of the layer's compressor (CSA 4, HCA 128), I/J indexer heads/dim,
K index_topk, n hc_mult, E experts, k experts per token, F expert width.

Counting conventions (beyond sim/costmodel.py's):
  * Keys a query at position p reads: min(W, p+1) window entries (sliding_mask: t-W < s <= t) and,
    in a compressed layer, its visible entries n_vis(p) = (p+1) // m (complete_blocks): HCA all of
    them, CSA min(K, n_vis) (the indexer's top-k). Both products (scores, values) run over d dims
    per head: K = V. Sums over the step's queries are closed forms (``window_pairs``,
    ``entry_pairs``).
  * Cache read per step (flash): per sequence the window min(W, S) entries, every compressed entry
    of an HCA layer, min(K, n) of a CSA layer at decode (all n at prefill: the union of many
    queries' selections) and all n indexer keys. Written: M window entries and the M/m entries the
    step closes (expected value). Element size: the Quant's kv_bytes (bf16, as `dsref info`).
  * Compressor: kv and gate projections (2*coff*d wide, coff = 2 for CSA's overlapping windows),
    gated pooling (gate + position bias, softmax over the slots, weighted sum: POOL_FLOPS_PER_ELEM
    per projected element), then RMSNorm and RoPE on each closed entry. The indexer has its own
    compressor at width J, plus q_b_proj, weights_proj, the Hadamard rotation + low-bit rounding of
    q and keys, the score product 2*pairs*I*J, relu * weight + head sum, and the top-k.
  * Hyper-connections (per sub-layer, attention and MoE): unweighted RMS of the n*D streams, the
    mixing matmul [M, n*D] x [n*D, (2+n)n] (FP32 weights, FP32 math as both codes do), the gates
    and the Sinkhorn iterations as elementwise work on n^2 per token, the collapse
    sum_j pre_j h_j (2nD per token) and the update post_k f + sum_j comb_jk h_j (n(2n+1)D per
    token). The n-wide residual stream is read three times and written once per sub-layer at the
    activation element size.
  * MoE: every layer computes the E router logits (hash layers too: their weights come from the
    scores); learned layers add the bias, top-k and renormalisation, hash layers read k int64 ids
    of tid2eid per token. Routed experts: expected distinct experts touched (sim.moe_stats, uniform
    routing) x their stored bytes; clipped SwiGLU. Shared expert: FP8 gate/up/down.
  * Matmul precision: FP8 weights at the Quant's gemm precision (fp8); FP4 expert weights also at
    gemm precision (FP8 activations x FP4 weights: no FP4-activation path is assumed); BF16
    weights (compressors, indexer weights_proj, router, head) at bf16; the indexer's score product
    at INDEX_SCORE_PRECISION_V4.
"""

from __future__ import annotations

import functools
import math

from dsref.reference.config_v4 import CSA, HCA, SLIDING, ModelConfigV4
from dsref.reference.dispatch import expert_window_rows
from dsref.reference.params_v4 import (BF16, EMBED, FINAL_NORM, FP4, FP8, FP32, HEAD, INT64, ROUTED_EXPERT,
                                       TensorV4, tensors)
from dsref.sim import moe_stats
from dsref.sim.costmodel import (COMBINE_FLOPS_PER_ELEM, INDEX_EPILOGUE_FLOPS_PER_ELEM, INDEX_ID_BYTES,
                                 INDEX_QUANT_FLOPS_PER_ELEM, INDEX_SCORE_BYTES, RMSNORM_FLOPS_PER_ELEM,
                                 ROPE_FLOPS_PER_ELEM, ROUTER_FLOPS_PER_SCORE, SILU_MUL_FLOPS_PER_ELEM,
                                 SOFTMAX_FLOPS_PER_ELEM, TOPK_FLOPS_PER_SCORE, Op, StepShape, _elem, _gemm,
                                 expected_expert_windows)
from dsref.sim.quant import Quant, get_quant

# Release storage (reference/params_v4.py release_tensors): bytes per element and scale geometry.
FP8_BLOCK = 128            # one UE8M0 scale byte per 128x128 block of an FP8 weight
FP4_GROUP = 32             # one UE8M0 scale byte per 32 inputs of an FP4 expert weight
SCALE_BYTES = 1            # float8_e8m0fnu
_ELEM_BYTES = {FP8: 1.0, FP4: 0.5, BF16: 2.0, FP32: 4.0, INT64: 8.0}

UNWEIGHTED_RMS_FLOPS_PER_ELEM = 3   # x*x, mean-reduce, x*rsqrt (no weight: hc norm, per-head q norm)
POOL_FLOPS_PER_ELEM = 7             # gate + bias, softmax over slots (max, sub, sum, div), x*w, sum
CLAMP_FLOPS_PER_ELEM = 3            # min(gate, L), clip(up, -L, L): V4's clipped SwiGLU
HC_GATE_FLOPS_PER_ELEM = 3          # a*scale + base, sigmoid's add/div (exp not counted); post's *2
SINKHORN_FLOPS_PER_ELEM_PASS = 3    # per normalisation pass and element: sum-reduce, +eps, divide
HC_SOFTMAX_FLOPS_PER_ELEM = 5       # comb's row softmax (4) + eps
HASH_ROUTER_FLOPS_PER_SCORE = 1     # hash layers only apply the score activation (its sqrt/log are
#                                     transcendentals); no bias, top-k over E, or group masking
TID2EID_BYTES = 8                   # int64 expert ids of the hash table
# DeepSeek's V4 indexer rounds q and keys to FP4 before the score product (fp4_act_quant,
# docs/v4-reference.md): the product's rate is the device's fp4 peak where it has one (Device.peak
# falls back otherwise) and its q/k operands are half a byte.
INDEX_SCORE_PRECISION_V4 = "fp4"
INDEX_QK_BYTES_V4 = 0.5


def release_row_bytes(t: TensorV4, n_experts: int) -> float:
    """Stored bytes of one table row in DeepSeek's release layout, scales included (the formulas of
    params_v4.release_tensors, per row; tests check the sum equals params_v4.release_bytes)."""
    if t.stored == FP8:
        o, i = t.shape
        return o * i + math.ceil(o / FP8_BLOCK) * math.ceil(i / FP8_BLOCK) * SCALE_BYTES
    if t.stored == FP4:
        for name, (o, i) in t.deepseek_tensors(n_experts)[:1]:
            if i % FP4_GROUP:
                raise ValueError(f"FP4 expert weight {name} has {i} inputs, not a multiple of {FP4_GROUP}: no release "
                                 "layout (fields hidden_size and moe_intermediate_size must be multiples of 32)")
        return sum(o * i * _ELEM_BYTES[FP4] + o * (i // FP4_GROUP) * SCALE_BYTES
                   for _, (o, i) in t.deepseek_tensors(n_experts))
    return t.numel * _ELEM_BYTES[t.stored]


class _WeightsV4:
    """Release bytes of each row: ``layer(i)[rel]``, ``glob(name)``, ``group(i, g)``; ``stored(i)[rel]``."""

    def __init__(self, cfg: ModelConfigV4):
        self._b: dict = {}
        self._s: dict = {}
        self._g: dict = {}
        for t in tensors(cfg):
            try:
                b = release_row_bytes(t, cfg.n_routed_experts)
            except ValueError as e:
                raise ValueError(f"model {cfg.name}: {e}") from None
            self._b.setdefault(t.layer, {})[t.rel] = b
            self._s.setdefault(t.layer, {})[t.rel] = t.stored
            if t.is_weight:
                self._g[(t.layer, t.group)] = self._g.get((t.layer, t.group), 0.0) + b

    def layer(self, i):
        return self._b[i]

    def stored(self, i):
        return self._s[i]

    def glob(self, name):
        return self._b[None][name]

    def group(self, i, g):
        return self._g.get((i, g), 0.0)


@functools.lru_cache(maxsize=16)
def _weights(cfg: ModelConfigV4) -> _WeightsV4:
    return _WeightsV4(cfg)


def weight_bytes(cfg: ModelConfigV4) -> dict:
    """Release bytes of the main model (no MTP; hash tables included): total, per layer, globals; bits
    per parameter."""
    w = _weights(cfg)
    layers = [sum(w.layer(i).values()) for i in range(cfg.num_hidden_layers)]  # tid2eid included: it is resident
    glob = sum(w.layer(None).values())
    total = glob + sum(layers)
    return {"total": total, "globals": glob, "layers": layers,
            "bits_per_weight": total * 8 / cfg.param_counts()["total_params"]}


def weight_split(cfg: ModelConfigV4) -> dict:
    """``weight_bytes``'s total split as a parallel layout places it: routed experts (FP4 + scales,
    split over EP), globals (embedding, head, final norm, head hyper-connection), non_expert (the
    rest of every layer: attention, compressors, indexer, shared expert, router, hash table)."""
    w = _weights(cfg)
    wb = weight_bytes(cfg)
    experts = sum(w.group(i, ROUTED_EXPERT) for i in range(cfg.num_hidden_layers))
    return {"experts": experts, "globals": wb["globals"], "non_expert": wb["total"] - experts - wb["globals"]}


# ------------------------------------------------------------------ closed-form pair counts
def window_pairs(prefix: int, tokens: int, W: int) -> float:
    """sum over positions p = prefix .. prefix+tokens-1 of min(W, p+1): window keys per query."""
    def G(N):
        return N * (N + 1) / 2 if N <= W else W * (W + 1) / 2 + (N - W) * W
    return G(prefix + tokens) - G(prefix)


def visible_sum(N: int, m: int) -> float:
    """sum_{v=1}^{N} v // m: compressed entries visible to the queries at positions 0 .. N-1."""
    q = N // m
    return m * q * (q - 1) / 2 + q * (N - q * m + 1)


def entry_pairs(prefix: int, tokens: int, m: int, topk: int | None = None) -> float:
    """sum over the step's query positions p of n_vis(p) = (p+1) // m, or of min(topk, n_vis(p))."""
    def Hs(N):
        if topk is None:
            return visible_sum(N, m)
        cut = topk * m - 1                # n_vis(v) = v // m < topk exactly for v <= cut
        return visible_sum(min(N, cut), m) + topk * max(0, N - cut)
    return Hs(prefix + tokens) - Hs(prefix)


def cache_entry_bytes(cfg: ModelConfigV4, kv_bytes: float) -> tuple[float, float, float]:
    """(window entry, compressed entry, indexer key) bytes, derived from ModelConfigV4's cache
    figures (kv_window_bytes, kv_bytes_per_token_by_type: the code `dsref info` prints) so the op
    lists and `dsref info` share one source."""
    per = cfg.kv_bytes_per_token_by_type(kv_bytes)
    window = cfg.kv_window_bytes(kv_bytes) / (cfg.num_hidden_layers * cfg.sliding_window)
    entry = per[HCA] * cfg.compress_rate_hca            # one d-wide entry per m' tokens
    return window, entry, per[CSA] * cfg.compress_rate_csa - entry   # CSA: entry + indexer key per m


# ---------------------------------------------------------------------------- the ops
def _prec(stored: str, gp: str) -> str:
    return "bf16" if stored in (BF16, FP32) else gp


def _hc_ops(cfg: ModelConfigV4, name: str, i, M: float, wfn: float, ab: float, mix: int) -> list[Op]:
    """One hyper-connection's pre side (norm, mixing matmul, gates, Sinkhorn, collapse); ``mix``
    columns of the mixing matmul ((2+n)n for a sub-layer, n for the head)."""
    n, D = cfg.hc_mult, cfg.hidden_size
    ops = [_elem(f"{name}_norm", i, M * n * D, UNWEIGHTED_RMS_FLOPS_PER_ELEM, ab, "norm"),
           _gemm(f"{name}_fn", i, M, n * D, mix, wfn, ab, "fp32")]
    if mix > n:  # a sub-layer: pre, post gates and the comb matrix through Sinkhorn
        passes = 2 * cfg.hc_sinkhorn_iters - 1   # iters column + (iters - 1) row normalisations
        ops.append(Op(f"{name}_gates_sinkhorn", i, "elementwise",
                      float(M * (2 * n * HC_GATE_FLOPS_PER_ELEM
                                 + n * n * (HC_SOFTMAX_FLOPS_PER_ELEM + passes * SINKHORN_FLOPS_PER_ELEM_PASS))),
                      0.0, M * mix * 4.0, M * mix * 4.0, precision="fp32"))
    else:
        ops.append(_elem(f"{name}_gates", i, M * n, HC_GATE_FLOPS_PER_ELEM, 4.0))
    ops.append(Op(f"{name}_collapse", i, "elementwise", 2.0 * M * n * D, 0.0, M * n * D * ab, M * D * ab,
                  precision="fp32"))
    return ops


def _hc_post(cfg: ModelConfigV4, name: str, i, M: float, ab: float) -> Op:
    n, D = cfg.hc_mult, cfg.hidden_size
    return Op(f"{name}_post", i, "elementwise", float(M * n * (2 * n + 1) * D), 0.0, M * (n + 1) * D * ab,
              M * n * D * ab, precision="fp32")


def _compressor_ops(cfg, name, i, w, st, sh: StepShape, width, coff, m, ab, gp, entry_bytes, prefix) -> list[Op]:
    """Projections, pooling, norm and RoPE of a compressor of ``width`` at rate m (module docstring);
    each closed entry is written to the cache (``entry_bytes``)."""
    M, D, r = sh.m, cfg.hidden_size, cfg.qk_rope_head_dim
    closed = M / m   # entries the step closes, expected
    return [_gemm(f"{name}_kv_proj", i, M, D, coff * width, w[prefix + "kv_proj.weight"], ab,
                  _prec(st[prefix + "kv_proj.weight"], gp)),
            _gemm(f"{name}_gate_proj", i, M, D, coff * width, w[prefix + "gate_proj.weight"], ab,
                  _prec(st[prefix + "gate_proj.weight"], gp)),
            _elem(f"{name}_pool", i, M * coff * width, POOL_FLOPS_PER_ELEM, ab, wbytes=w[prefix + "position_bias"]),
            Op(f"{name}_norm_rope", i, "norm", closed * (width * RMSNORM_FLOPS_PER_ELEM + r * ROPE_FLOPS_PER_ELEM),
               w[prefix + "kv_norm.weight"], closed * width * ab, 0.0, 0.0, closed * entry_bytes, precision="fp32")]


def _attention_ops(cfg: ModelConfigV4, quant: Quant, W_: _WeightsV4, i: int, sh: StepShape) -> list[Op]:
    kind = cfg.layer_type(i)
    D, H, d, r, Q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.q_lora_rank
    g, dg, Wn = cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window
    M, B, T, P, S = sh.m, sh.batch, sh.tokens, sh.prefix, sh.prefix + sh.tokens
    ab, gp, kvb = quant.act_bytes, quant.gemm_precision, quant.kv_bytes
    w, st = W_.layer(i), W_.stored(i)
    a = "self_attn."
    pr = lambda n: _prec(st[a + n], gp)  # noqa: E731
    ops = [_gemm("q_a_proj", i, M, D, Q, w[a + "q_a_proj.weight"], ab, pr("q_a_proj.weight")),
           _elem("q_a_norm", i, M * Q, RMSNORM_FLOPS_PER_ELEM, ab, "norm", w[a + "q_a_norm.weight"]),
           _gemm("q_b_proj", i, M, Q, H * d, w[a + "q_b_proj.weight"], ab, pr("q_b_proj.weight")),
           _elem("q_head_norm", i, M * H * d, UNWEIGHTED_RMS_FLOPS_PER_ELEM, ab, "norm"),
           _gemm("kv_proj", i, M, D, d, w[a + "kv_proj.weight"], ab, pr("kv_proj.weight")),
           _elem("kv_norm", i, M * d, RMSNORM_FLOPS_PER_ELEM, ab, "norm", w[a + "kv_norm.weight"]),
           _elem("rope", i, M * (H + 1) * r, ROPE_FLOPS_PER_ELEM, ab)]
    # keys each query reads, summed over the step's queries, and cache entries read per sequence
    win_b, entry_b, key_b = cache_entry_bytes(cfg, kvb)
    pairs = B * window_pairs(P, T, Wn)
    kv_read = B * min(Wn, S) * win_b
    kv_write = M * win_b
    if kind != SLIDING:
        m = cfg.compress_rate(kind)
        n_all = S // m                                    # entries of each sequence after the step
        coff = 2 if kind == CSA else 1
        ops += _compressor_ops(cfg, "compressor", i, w, st, sh, d, coff, m, ab, gp, entry_b, a + "compressor.")
        if kind == CSA:
            K, I, J = cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim
            ops += _compressor_ops(cfg, "index_compressor", i, w, st, sh, J, 2, m, ab, gp, key_b,
                                   a + "compressor.indexer.")
            ix = a + "compressor.indexer."
            ipairs = B * entry_pairs(P, T, m)             # (query, compressed key) index scores
            sel = B * entry_pairs(P, T, m, K)             # (query, entry) pairs the attention keeps
            ops += [
                _gemm("index_q_b_proj", i, M, Q, I * J, w[ix + "q_b_proj.weight"], ab, pr("compressor.indexer.q_b_proj.weight")),
                _gemm("index_weights_proj", i, M, D, I, w[ix + "scorer.weights_proj.weight"], ab,
                      pr("compressor.indexer.scorer.weights_proj.weight")),
                _elem("index_rope", i, M * I * r, ROPE_FLOPS_PER_ELEM, ab),
                _elem("index_rotate_quant", i, (M * I + M / m) * J, (J - 1).bit_length() + INDEX_QUANT_FLOPS_PER_ELEM, ab),
                Op("index_scores", i, "attention", 2.0 * ipairs * I * J, 0.0, M * I * (J * INDEX_QK_BYTES_V4 + 4),
                   ipairs * INDEX_SCORE_BYTES, B * n_all * key_b, 0.0, precision=INDEX_SCORE_PRECISION_V4),
                Op("index_relu_sum", i, "elementwise", float(ipairs * I * INDEX_EPILOGUE_FLOPS_PER_ELEM), precision="fp32"),
                Op("index_topk", i, "elementwise", float(ipairs * TOPK_FLOPS_PER_SCORE), 0.0, ipairs * INDEX_SCORE_BYTES,
                   sel * INDEX_ID_BYTES, precision="fp32")]
            pairs += sel
            # decode reads the selected entries; a prefill's many queries together read them all
            kv_read += B * (min(K, n_all) if T == 1 else n_all) * entry_b
        else:
            pairs += B * entry_pairs(P, T, m)
            kv_read += B * n_all * entry_b
    scores = H * pairs
    ops += [Op("attention", i, "attention", 2.0 * scores * d * 2, 0.0, M * H * d * ab, M * H * d * ab, kv_read,
               kv_write, precision=quant.attn_precision),
            _elem("softmax", i, scores, SOFTMAX_FLOPS_PER_ELEM, 0.0, wbytes=w[a + "sinks"]),
            _elem("derotate", i, M * H * r, ROPE_FLOPS_PER_ELEM, ab),
            # g groups, each [M, H*d/g] x [H*d/g, d_g]: one GEMM of M rows per group
            _gemm("o_a_proj", i, M * g, H * d // g, dg, w[a + "o_a_proj.weight"], ab, pr("o_a_proj.weight"), rows=M),
            _gemm("o_b_proj", i, M, g * dg, D, w[a + "o_b_proj.weight"], ab, pr("o_b_proj.weight"))]
    return ops


def _moe_ops(cfg: ModelConfigV4, quant: Quant, W_: _WeightsV4, i: int, M: int) -> list[Op]:
    D, E, k, F = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    ab, gp = quant.act_bytes, quant.gemm_precision
    w = W_.layer(i)
    swiglu = SILU_MUL_FLOPS_PER_ELEM + CLAMP_FLOPS_PER_ELEM
    ops = [_gemm("router", i, M, D, E, w["mlp.gate.weight"], ab, "bf16", "router")]
    if cfg.is_hash_layer(i):
        ops.append(Op("router_hash", i, "router", float(M * E * HASH_ROUTER_FLOPS_PER_SCORE), M * k * TID2EID_BYTES,
                      M * E * 4.0, M * k * 8.0, precision="fp32"))
    else:
        ops.append(_elem("router_scores", i, M * E, ROUTER_FLOPS_PER_SCORE, 4, wbytes=w["mlp.gate.e_score_correction_bias"]))
    touched = moe_stats.expected_distinct(None, E, k, M)
    per_expert = W_.group(i, ROUTED_EXPERT) / E
    rows = M * k
    window = expert_window_rows(rows, E)
    padding = expected_expert_windows(None, E, k, M, window) * window / rows if rows else 1.0
    ops += [Op("routed_experts", i, "moe_gemm", rows * 3 * 2.0 * D * F, touched * per_expert,
               rows * D * ab * 2 + rows * F * ab * 2, rows * D * ab + rows * F * ab * 2, precision=gp,
               gemm_rows=float(window), gemm_padding=max(1.0, padding), gemm_matrix_bytes=per_expert / 3),
            _elem("routed_swiglu", i, rows * F, swiglu, ab),
            _elem("moe_combine", i, rows * D, COMBINE_FLOPS_PER_ELEM, ab)]
    s = "mlp.shared_experts."
    ops += [_gemm("shared_gate_proj", i, M, D, F, w[s + "gate_proj.weight"], ab, gp),
            _gemm("shared_up_proj", i, M, D, F, w[s + "up_proj.weight"], ab, gp),
            _elem("shared_swiglu", i, M * F, swiglu, ab),
            _gemm("shared_down_proj", i, M, F, D, w[s + "down_proj.weight"], ab, gp)]
    return ops


def forward_ops(cfg: ModelConfigV4, quant: Quant | str, sh: StepShape) -> list[Op]:
    """Every op of one V4 forward pass of shape ``sh`` (embedding to logits); attn_impl 'flash' only."""
    if sh.attn_impl != "flash":
        raise ValueError(f"attn_impl: DeepSeek-V4 is costed with 'flash' (masked tiles skipped) only, got {sh.attn_impl!r}")
    quant = get_quant(quant) if isinstance(quant, str) else quant
    W_ = _weights(cfg)
    M, D, n, ab = sh.m, cfg.hidden_size, cfg.hc_mult, quant.act_bytes
    mix = (2 + n) * n
    ops = [Op("embed", None, "embed", 0.0, M * W_.glob(EMBED) / cfg.vocab_size, M * 4, M * n * D * ab,
              precision="fp32")]  # the row, copied into the n streams
    for i in range(cfg.num_hidden_layers):
        w = W_.layer(i)
        ops += _hc_ops(cfg, "attn_hc", i, M, w["attn_hc.fn"] + w["attn_hc.base"] + w["attn_hc.scale"], ab, mix)
        ops.append(_elem("input_layernorm", i, M * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm", w["input_layernorm.weight"]))
        ops += _attention_ops(cfg, quant, W_, i, sh)
        ops.append(_hc_post(cfg, "attn_hc", i, M, ab))
        ops += _hc_ops(cfg, "ffn_hc", i, M, w["ffn_hc.fn"] + w["ffn_hc.base"] + w["ffn_hc.scale"], ab, mix)
        ops.append(_elem("post_attention_layernorm", i, M * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                         w["post_attention_layernorm.weight"]))
        ops += _moe_ops(cfg, quant, W_, i, M)
        ops.append(_hc_post(cfg, "ffn_hc", i, M, ab))
    nl = M if sh.logits == "all" else sh.batch
    g = W_.layer(None)
    ops += _hc_ops(cfg, "hc_head", None, nl, g["model.hc_head.hc_fn"] + g["model.hc_head.hc_base"]
                   + g["model.hc_head.hc_scale"], ab, n)
    ops.append(_elem("final_norm", None, nl * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm", W_.glob(FINAL_NORM)))
    ops.append(_gemm("lm_head", None, nl, D, cfg.vocab_size, W_.glob(HEAD), ab, "bf16", "head"))
    return ops


def prefill_ops(cfg: ModelConfigV4, quant: Quant | str, batch: int, tokens: int, prefix: int = 0, *,
                logits: str = "last") -> list[Op]:
    """Prefill of ``batch`` sequences of ``tokens`` new tokens after ``prefix`` cached ones."""
    return forward_ops(cfg, quant, StepShape(batch, tokens, prefix, logits=logits))


def decode_ops(cfg: ModelConfigV4, quant: Quant | str, batch: int, context: int) -> list[Op]:
    """One decode step: ``batch`` sequences with ``context`` cached tokens, one new token each."""
    return forward_ops(cfg, quant, StepShape(batch, 1, context, logits="all"))


def kv_cache_bytes(cfg: ModelConfigV4, kv_bytes: float, context: int) -> float:
    """Cache of one sequence of ``context`` tokens, all main layers: the windows plus the
    compressed entries and indexer keys (ModelConfigV4's per-type figures, as `dsref info`)."""
    per = cfg.kv_bytes_per_token_by_type(kv_bytes)
    counts = cfg.layer_counts()
    window = cfg.num_hidden_layers * min(cfg.sliding_window, context) * cache_entry_bytes(cfg, kv_bytes)[0]
    comp = sum(counts[t] * per[t] * cfg.compress_rate(t) * (context // cfg.compress_rate(t)) for t in (CSA, HCA))
    return window + comp


def decode_kv_read_by_type(cfg: ModelConfigV4, kv_bytes: float, context: int) -> dict[str, float]:
    """Cache bytes ONE layer of each type reads per sequence in a decode step at ``context``
    cached tokens (the new token at position ``context``): window + entries read + indexer keys."""
    S = context + 1
    win_b, entry_b, key_b = cache_entry_bytes(cfg, kv_bytes)
    out = {SLIDING: min(cfg.sliding_window, S) * win_b}
    nc = S // cfg.compress_rate_csa
    out[CSA] = out[SLIDING] + min(cfg.index_topk, nc) * entry_b + nc * key_b
    out[HCA] = out[SLIDING] + (S // cfg.compress_rate_hca) * entry_b
    return out
