"""Operation lists (FLOPs and bytes) of prefill, decode and training steps.

Everything is derived from ``reference.config.ModelConfig`` and the weight shapes
of ``reference.params`` (one source of truth); bytes per weight come from a
``sim.quant.Quant``. Letters follow reference/config.py: B batch, T new
tokens per sequence, S keys, D hidden, H heads, K kv heads, R latent rank,
Q q_lora_rank, N nope dim, P rope dim, A value dim, E experts, k experts/token,
F expert / MLP width, V vocab. M = B*T tokens in the step.

Counting conventions
  * A matmul [m, n] x [n, p] is 2*m*n*p FLOPs.
  * Attention: scores 2*M*H*d_qk*S_eff, values 2*M*H*d_v*S_eff, where S_eff is
    the mean number of keys a query computes against. attn_impl="flash" skips
    fully masked tiles (FlashAttention / FlashMLA): S_eff = prefix + (T+1)/2 for
    causal prefill, prefix + 1 for decode. attn_impl="masked" computes all key
    slots and masks afterwards (what reference/model.py does): S_eff = keys.
  * MLA absorbed: q_nope is mapped into the latent space (2*M*H*N*R), scores run
    over R+P dims and the value product over R dims per head, the output is
    mapped back (2*M*H*R*A); the cache read is (R+P) values per token per layer.
    MLA naive: kv_b_proj expands the latent of *every key* (2*B*S*R*H*(N+A), i.e.
    over all L cached tokens at each decode step), then ordinary attention.
    MLA expanded_cache (llama.cpp before April 2025): only the new tokens are
    expanded; the cache holds H*(N+P) keys and H*A values per token and layer.
  * GEMM rows: every matmul op records ``gemm_rows``, the M of each GEMM call it
    is made of (tokens for projections, tokens per head for the absorbed
    per-head products, keys for kv_b_expand, one window of routed-expert rows),
    and ``gemm_padding``, rows computed / rows counted (routed experts: each
    touched expert's rows run in windows of C rows, ``expert_window_rows``, as
    reference/model.py ``routed_experts`` does; expected whole windows from each
    expert's Binomial(M, p_e) row count). Only devices with a measured GEMM-rows
    curve use them (sim/roofline.py); FLOPs and bytes do not change.
  * Elementwise ops count the arithmetic per element of the reference code
    (constants below); transcendentals (exp, rsqrt, sigmoid's exp) are not FLOPs,
    as in XLA's HloCostAnalysis.
  * DeepSeek-V3.2 (cfg.has_indexer, DeepSeek Sparse Attention; docs/simulator.md): every layer
    adds its lightning indexer (reference/dsa.py): wq_b [M,Q]x[Q,I*J], wk [M,D]x[D,J],
    weights_proj [M,D]x[D,I], the key LayerNorm, RoPE on (I+1)*P dims, the Hadamard rotation and
    FP8 quantisation of q and k, the score product 2*M*I*J*S_eff (every visible key: S_eff as
    above, FP8 -- INDEX_SCORE_PRECISION), relu * weight + head-sum on each of the I*M*S_eff
    products, the top-k over M*S_eff scores, and the indexer key cache (J elements per token and
    layer: read B*S, write M). MLA (absorbed form = DeepSeek's MQA mode) then runs over
    sum_t min(index_topk, visible_t) query-key pairs instead of M*S_eff, and reads
    sum_seq min(index_topk, S) latent rows instead of B*S (``StepShape.topk_excess``). With
    S <= index_topk nothing changes: V3's MLA exactly, plus the indexer. The naive and
    expanded_cache forms keep dense attention with the selection as a mask (DeepSeek's
    "masked MHA mode" for short prefill), plus the indexer.
  * Training: backward = 2x forward for every op (activation gradient +
    weight gradient, each one forward-sized product: Kaplan et al. 2020 "6N").
    Recomputation adds forward work: "selective" the attention core
    (FlashAttention recomputes scores in backward), "full" every layer forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from dsref.reference.config import ModelConfig
from dsref.reference.dispatch import expert_window_rows
from dsref.reference.params import EMBED, FINAL_NORM, ROUTED_EXPERT, ROUTER, head_name, tensors
from dsref.sim import moe_stats
from dsref.sim.quant import Quant, get_quant, tensor_bytes

KINDS = ("gemm", "attention", "norm", "elementwise", "router", "embed", "head", "moe_gemm")

# Per-element arithmetic of the reference implementation (reference/model.py).
RMSNORM_FLOPS_PER_ELEM = 4   # x*x, mean-reduce, x*rsqrt(.), weight*x
ROPE_FLOPS_PER_ELEM = 3      # x1*cos - x2*sin (2 mul + 1 add per output)
SOFTMAX_FLOPS_PER_ELEM = 6   # scale, (nope+pe) add, max-reduce, subtract, sum-reduce, divide
SILU_MUL_FLOPS_PER_ELEM = 5  # x*sigmoid(x) (negate, add, divide, multiply) * up
RESIDUAL_FLOPS_PER_ELEM = 1
ROUTER_FLOPS_PER_SCORE = 4   # scoring function, bias add, group masking, normalisation
# Qwen3-MoE router (reference/numpy_ref.py qwen3_gate): softmax over all E logits -- max-reduce,
# subtract, sum-reduce, divide (exp is a transcendental) -- then top-k; renormalising k weights
# is O(k), not O(E), and is left out.
ROUTER_SOFTMAX_FLOPS_PER_SCORE = 4
COMBINE_FLOPS_PER_ELEM = 2   # weight * expert output, scatter-add into the token
# DeepSeek-V3.2 lightning indexer (reference/dsa.py; DeepSeek-V3.2-Exp inference/model.py Indexer).
LAYERNORM_FLOPS_PER_ELEM = 7  # k_norm: mean-reduce, subtract, square, var-reduce, x*rsqrt, *weight, +bias
# q and k are rotated by a Walsh-Hadamard transform (rotate_activation: log2(J) add/sub stages per
# element) and rounded to FP8 with a per-128 scale (act_quant: amax-reduce, divide): log2(J) + 2.
INDEX_QUANT_FLOPS_PER_ELEM = 2
# fp8_index kernel epilogue per (query, head, key) product: relu, * head weight, sum over heads.
INDEX_EPILOGUE_FLOPS_PER_ELEM = 3
# Top-k over each query's scores: a radix select on float32 keys makes one histogram update per
# 8-bit digit, 4 passes in the worst case (torch.topk / CUB radix select); counted per score.
TOPK_FLOPS_PER_SCORE = 4
INDEX_SCORE_BYTES = 4        # fp32 index scores written by fp8_index and read by the top-k
INDEX_ID_BYTES = 4           # int32 selected key ids handed to sparse MLA
# The index score product runs in FP8 (DeepSeek-V3.2-Exp paper, sec. 1: the indexer "can be
# implemented in FP8"; inference/kernel.py fp8_index: FP8 q and k, FP32 accumulation). Used when
# the quantisation's GEMMs are FP8 (DeepSeek's recipe); otherwise at the attention precision.
INDEX_SCORE_PRECISION = "fp8"

BACKWARD_FLOPS_RATIO = 2     # dgrad + wgrad per forward product (Kaplan et al. 2020)
# AdamW with fp32 master weights: read grad (bf16) and param, m, v (fp32); write param, m, v.
ADAM_STATE_BYTES = 4 + 4 + 4          # fp32 master weight, first and second moment
ADAM_GRAD_BYTES = 2                    # bf16 gradient
ADAM_FLOPS_PER_PARAM = 12              # m, v updates, bias corrections, sqrt, divide, decay, step


@dataclass(frozen=True)
class Op:
    """One operation of a step. Numbers are per occurrence; totals multiply by ``count``."""

    name: str
    layer: int | None
    kind: str
    flops: float
    weight_bytes: float = 0.0
    act_bytes_read: float = 0.0
    act_bytes_written: float = 0.0
    kv_bytes_read: float = 0.0
    kv_bytes_written: float = 0.0
    count: int = 1
    precision: str = "bf16"
    phase: str = "fwd"  # fwd | bwd | recompute | optim
    gemm_rows: float | None = None  # M of each GEMM call (None: not a GEMM); see "GEMM rows" above
    gemm_padding: float = 1.0  # GEMM rows computed / rows counted (>= 1)
    gemm_matrix_bytes: float | None = None  # bytes of the weight matrix one GEMM call streams

    @property
    def bytes(self) -> float:
        return (self.weight_bytes + self.act_bytes_read + self.act_bytes_written
                + self.kv_bytes_read + self.kv_bytes_written)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte of memory traffic."""
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass(frozen=True)
class StepShape:
    """The shape of one forward pass: B sequences, T new tokens each, ``prefix`` cached tokens.

    key_slots: keys held per sequence (default prefix + T); attn_impl 'flash' or
    'masked'; logits 'all' or 'last' (inference prefill needs only the last).
    """

    batch: int
    tokens: int
    prefix: int = 0
    key_slots: int | None = None
    attn_impl: str = "flash"
    logits: str = "all"
    mla_form: str = "absorbed"

    @property
    def m(self) -> int:
        return self.batch * self.tokens

    @property
    def keys(self) -> int:
        return self.key_slots if self.key_slots is not None else self.prefix + self.tokens

    @property
    def keys_per_query(self) -> float:
        """S_eff: mean keys each query computes against."""
        if self.attn_impl == "masked":
            return float(self.keys)
        if self.attn_impl != "flash":
            raise ValueError(f"attn_impl must be 'flash' or 'masked', got {self.attn_impl!r}")
        return self.prefix + (self.tokens + 1) / 2

    def topk_excess(self, topk: int | None) -> tuple[float, float]:
        """(query-key pairs, keys) beyond a top-k selection, over the whole step:
        sum over queries of max(0, visible - topk) (flash: query t of T sees prefix + t keys;
        masked: every query computes all key slots) and sum over sequences of max(0, S - topk).
        (0, 0) without a top-k (dense attention) or when nothing exceeds it."""
        if topk is None:
            return 0.0, 0.0
        B, T, S = self.batch, self.tokens, self.keys
        if self.attn_impl == "masked":
            return float(B * T * max(0, S - topk)), float(B * max(0, S - topk))
        return B * causal_excess(T, self.prefix, topk), float(B * max(0, S - topk))


def causal_excess(tokens, prefix, topk):
    """sum_{v=prefix+1}^{prefix+tokens} max(0, v - topk): the visible keys beyond the top-k of
    ``tokens`` causal queries after ``prefix`` cached tokens (arrays broadcast; float)."""
    t, p = np.asarray(tokens, float), np.asarray(prefix, float)
    lo = np.maximum(p + 1.0, topk + 1.0)      # first position with more than topk visible keys
    hi = p + t
    n = np.maximum(hi - lo + 1.0, 0.0)
    out = n * ((lo - topk) + (hi - topk)) / 2.0
    return float(out) if out.ndim == 0 else out


class _Weights:
    """Stored bytes of each weight tensor under a quantisation (sim.quant.tensor_bytes over the
    tensor table): ``layer(i)`` by name within the layer, ``glob(name)`` for globals,
    ``group(i, g)`` summed over a tensor group of layer i (e.g. all routed experts)."""

    def __init__(self, cfg: ModelConfig, quant: Quant):
        self._bytes: dict[int | None, dict[str, float]] = {}
        self._prec: dict[int | None, dict[str, str]] = {}
        self._groups: dict[tuple[int | None, str], float] = {}
        for t in tensors(cfg):
            b = tensor_bytes(cfg, quant, t)
            self._bytes.setdefault(t.layer, {})[t.rel] = b
            # the rate its matmul runs at (an FP4 recipe keeps the MLA projections in BF16)
            self._prec.setdefault(t.layer, {})[t.rel] = quant.tensor_precision(t.rel, t.shape, cfg)
            self._groups[(t.layer, t.group)] = self._groups.get((t.layer, t.group), 0.0) + b

    def layer(self, i: int) -> dict[str, float]:
        return self._bytes[i]

    def glob(self, name: str) -> float:
        return self._bytes[None][name]

    def prec(self, i: int) -> dict[str, str]:
        """Peak-rate key of each weight's matmul in layer i (sim.quant.Quant.tensor_precision)."""
        return self._prec[i]

    def group(self, i: int, group: str) -> float:
        return self._groups.get((i, group), 0.0)


@functools.lru_cache(maxsize=32)
def _weights(cfg: ModelConfig, quant: Quant) -> _Weights:
    """One read-only table per (model, quantisation): OpTable.build samples forward_ops at several shapes."""
    return _Weights(cfg, quant)


def _gemm(name, layer, m, k_in, n_out, wbytes, ab, prec, kind="gemm", rows=None) -> Op:
    """[m, k_in] x [k_in, n_out]; rows: M of each GEMM call when the product is batched (default m)."""
    return Op(name, layer, kind, 2.0 * m * k_in * n_out, wbytes, m * k_in * ab, m * n_out * ab, precision=prec,
              gemm_rows=float(m if rows is None else rows), gemm_matrix_bytes=wbytes or None)


def _elem(name, layer, n_elems, flops_per, ab, kind="elementwise", wbytes=0.0, prec="fp32") -> Op:
    return Op(name, layer, kind, float(n_elems * flops_per), wbytes, n_elems * ab, n_elems * ab, precision=prec)


# --------------------------------------------------------------------- attention
def _mla_ops(cfg: ModelConfig, quant: Quant, w: dict[str, float], i: int, sh: StepShape,
             prec: dict[str, str] | None = None) -> list[Op]:
    D, H, R, P = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    N, A = cfg.qk_nope_head_dim, cfg.v_head_dim
    M, B, ab, gp = sh.m, sh.batch, quant.act_bytes, quant.gemm_precision
    pr = (prec or {}).get
    kvb = quant.kv_bytes
    ops: list[Op] = []
    if cfg.q_lora_rank is None:
        ops.append(_gemm("q_proj", i, M, D, H * (N + P), w["self_attn.q_proj.weight"], ab, pr("self_attn.q_proj.weight", gp)))
    else:
        Q = cfg.q_lora_rank
        ops.append(_gemm("q_a_proj", i, M, D, Q, w["self_attn.q_a_proj.weight"], ab, pr("self_attn.q_a_proj.weight", gp)))
        ops.append(_elem("q_a_layernorm", i, M * Q, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                         w["self_attn.q_a_layernorm.weight"]))
        ops.append(_gemm("q_b_proj", i, M, Q, H * (N + P), w["self_attn.q_b_proj.weight"], ab, pr("self_attn.q_b_proj.weight", gp)))
    ops.append(_gemm("kv_a_proj_with_mqa", i, M, D, R + P, w["self_attn.kv_a_proj_with_mqa.weight"], ab, pr("self_attn.kv_a_proj_with_mqa.weight", gp)))
    ops.append(_elem("kv_a_layernorm", i, M * R, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                     w["self_attn.kv_a_layernorm.weight"]))
    ops.append(_elem("rope", i, M * (H + 1) * P, ROPE_FLOPS_PER_ELEM, ab))
    S, Se = sh.keys, sh.keys_per_query
    cache_read = B * S * (R + P) * kvb
    cache_write = M * (R + P) * kvb
    scores = M * H * Se
    w_kvb = w["self_attn.kv_b_proj.weight"]
    if cfg.has_indexer:
        ops += _indexer_ops(cfg, quant, w, i, sh, pr)
        pair_ex, key_ex = sh.topk_excess(cfg.index_topk)
        if sh.mla_form == "absorbed" and (pair_ex or key_ex):  # sparse MLA: only the selected keys
            scores = H * (M * Se - pair_ex)
            cache_read = (B * S - key_ex) * (R + P) * kvb
    if sh.mla_form == "absorbed":
        ops.append(_gemm("q_absorb", i, M * H, N, R, w_kvb * N / (N + A), ab, pr("self_attn.kv_b_proj.weight", gp), rows=M))  # one [M,N]x[N,R] per head
        ops.append(Op("mla_attention", i, "attention", 2.0 * scores * (R + P) + 2.0 * scores * R,
                      0.0, M * H * (R + P) * ab, M * H * R * ab, cache_read, cache_write, precision=quant.attn_precision))
        ops.append(_elem("softmax", i, scores, SOFTMAX_FLOPS_PER_ELEM, 0.0))
        ops.append(_gemm("out_absorb", i, M * H, R, A, w_kvb * A / (N + A), ab, pr("self_attn.kv_b_proj.weight", gp), rows=M))
    elif sh.mla_form == "naive":
        ops.append(Op("kv_b_expand", i, "gemm", 2.0 * B * S * R * H * (N + A), w_kvb,
                      act_bytes_written=B * S * H * (N + A) * ab, kv_bytes_read=cache_read,
                      kv_bytes_written=cache_write, precision=pr("self_attn.kv_b_proj.weight", gp), gemm_rows=float(B * S),
                      gemm_matrix_bytes=w_kvb))
        ops.append(Op("attention", i, "attention", 2.0 * scores * (N + P) + 2.0 * scores * A, 0.0,
                      M * H * (N + P) * ab + B * S * (H * (N + A) + P) * ab, M * H * A * ab,
                      precision=quant.attn_precision))
        ops.append(_elem("softmax", i, scores, SOFTMAX_FLOPS_PER_ELEM, 0.0))
    elif sh.mla_form == "expanded_cache":
        # llama.cpp before its MLA support (ggml-org/llama.cpp PR #12801, April 2025): kv_b_proj
        # expands only the new tokens, and the cache holds the expanded keys H*(N+P) (rope part
        # repeated per head) and values H*A, which every decode step reads back.
        ops.append(Op("kv_b_proj", i, "gemm", 2.0 * M * R * H * (N + A), weight_bytes=w_kvb,
                      act_bytes_read=M * R * ab, act_bytes_written=M * H * (N + A) * ab,
                      kv_bytes_written=M * H * (N + P + A) * kvb, precision=pr("self_attn.kv_b_proj.weight", gp), gemm_matrix_bytes=w_kvb))
        ops.append(Op("attention", i, "attention", 2.0 * scores * (N + P) + 2.0 * scores * A,
                      act_bytes_read=M * H * (N + P) * ab, act_bytes_written=M * H * A * ab,
                      kv_bytes_read=B * S * H * (N + P + A) * kvb, precision=quant.attn_precision))
        ops.append(_elem("softmax", i, scores, SOFTMAX_FLOPS_PER_ELEM, 0.0))
    else:
        raise ValueError(f"mla_form must be 'absorbed', 'naive' or 'expanded_cache', got {sh.mla_form!r}")
    ops.append(_gemm("o_proj", i, M, H * A, D, w["self_attn.o_proj.weight"], ab, pr("self_attn.o_proj.weight", gp)))
    return ops


def _indexer_ops(cfg: ModelConfig, quant: Quant, w: dict[str, float], i: int, sh: StepShape, pr) -> list[Op]:
    """The V3.2 lightning indexer of layer i (conventions: module docstring)."""
    D, Q, P = cfg.hidden_size, cfg.q_lora_rank, cfg.qk_rope_head_dim
    I, J, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    M, B, ab, gp, kvb = sh.m, sh.batch, quant.act_bytes, quant.gemm_precision, quant.kv_bytes
    S, Se = sh.keys, sh.keys_per_query
    pair_ex, _ = sh.topk_excess(K)
    n = "self_attn.indexer."
    prec = INDEX_SCORE_PRECISION if quant.gemm_precision == "fp8" else quant.attn_precision
    qk_bytes = 1.0 if prec == "fp8" else ab  # q and k as the score product reads them
    pairs = M * Se
    return [
        _gemm("index_wq_b", i, M, Q, I * J, w[n + "wq_b.weight"], ab, pr(n + "wq_b.weight", gp)),
        _gemm("index_wk", i, M, D, J, w[n + "wk.weight"], ab, pr(n + "wk.weight", gp)),
        _elem("index_k_norm", i, M * J, LAYERNORM_FLOPS_PER_ELEM, ab, "norm", w[n + "k_norm.weight"] + w[n + "k_norm.bias"]),
        _gemm("index_weights_proj", i, M, D, I, w[n + "weights_proj.weight"], ab, pr(n + "weights_proj.weight", gp)),
        _elem("index_rope", i, M * (I + 1) * P, ROPE_FLOPS_PER_ELEM, ab),
        _elem("index_rotate_quant", i, M * (I + 1) * J, (J - 1).bit_length() + INDEX_QUANT_FLOPS_PER_ELEM, ab),
        # one key per token and layer in the indexer cache: every visible key read, the new ones written
        Op("index_scores", i, "attention", 2.0 * pairs * I * J, 0.0, M * I * (J * qk_bytes + 4),
           pairs * INDEX_SCORE_BYTES, B * S * J * kvb, M * J * kvb, precision=prec),
        Op("index_relu_sum", i, "elementwise", float(pairs * I * INDEX_EPILOGUE_FLOPS_PER_ELEM), precision="fp32"),
        Op("index_topk", i, "elementwise", float(pairs * TOPK_FLOPS_PER_SCORE), 0.0, pairs * INDEX_SCORE_BYTES,
           (pairs - pair_ex) * INDEX_ID_BYTES, precision="fp32"),
    ]


def _gqa_ops(cfg: ModelConfig, quant: Quant, w: dict[str, float], i: int, sh: StepShape,
            prec: dict[str, str] | None = None) -> list[Op]:
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dense_head_dim
    M, B, ab, gp = sh.m, sh.batch, quant.act_bytes, quant.gemm_precision
    pr = (prec or {}).get
    ops = [_gemm("q_proj", i, M, D, H * hd, w["self_attn.q_proj.weight"], ab, pr("self_attn.q_proj.weight", gp)),
           _gemm("k_proj", i, M, D, K * hd, w["self_attn.k_proj.weight"], ab, pr("self_attn.k_proj.weight", gp)),
           _gemm("v_proj", i, M, D, K * hd, w["self_attn.v_proj.weight"], ab, pr("self_attn.v_proj.weight", gp))]
    if cfg.attention_bias:
        ops.append(_elem("qkv_bias", i, M * (H + 2 * K) * hd, RESIDUAL_FLOPS_PER_ELEM, ab, wbytes=sum(
            w[f"self_attn.{p}_proj.bias"] for p in "qkv")))
    if cfg.qk_norm:  # Qwen3: RMSNorm of every q and k head over head_dim, before RoPE
        ops.append(_elem("qk_norm", i, M * (H + K) * hd, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                         w["self_attn.q_norm.weight"] + w["self_attn.k_norm.weight"]))
    ops.append(_elem("rope", i, M * (H + K) * hd, ROPE_FLOPS_PER_ELEM, ab))
    S, Se = sh.keys, sh.keys_per_query
    scores = M * H * Se
    ops.append(Op("attention", i, "attention", 2.0 * scores * hd * 2, 0.0, M * H * hd * ab, M * H * hd * ab,
                  B * S * 2 * K * hd * quant.kv_bytes, M * 2 * K * hd * quant.kv_bytes, precision=quant.attn_precision))
    ops.append(_elem("softmax", i, scores, SOFTMAX_FLOPS_PER_ELEM, 0.0))
    ops.append(_gemm("o_proj", i, M, H * hd, D, w["self_attn.o_proj.weight"], ab, pr("self_attn.o_proj.weight", gp)))
    return ops


# --------------------------------------------------------------------------- FFN
def _mlp_ops(prefix: str, i: int, M: float, D: int, F: int, w: dict[str, float], ab, gp, kind="gemm") -> list[Op]:
    return [_gemm(f"{prefix}gate_proj", i, M, D, F, w[f"mlp.{prefix}gate_proj.weight"], ab, gp, kind),
            _gemm(f"{prefix}up_proj", i, M, D, F, w[f"mlp.{prefix}up_proj.weight"], ab, gp, kind),
            _elem(f"{prefix}silu_mul", i, M * F, SILU_MUL_FLOPS_PER_ELEM, ab),
            _gemm(f"{prefix}down_proj", i, M, F, D, w[f"mlp.{prefix}down_proj.weight"], ab, gp, kind)]


def routed_expert_flops(cfg: ModelConfig, rows: float) -> float:
    """FLOPs of ``rows`` (token, expert) rows through one SwiGLU expert (3 matmuls + silu*mul)."""
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    return rows * (3 * 2.0 * D * F + SILU_MUL_FLOPS_PER_ELEM * F)




def expected_expert_windows(shares, num_experts: int, k: int, n_tokens: float, window: int) -> float:
    """Expected windows of ``window`` rows over all experts: sum_e E[ceil(c_e / window)] with
    c_e ~ Binomial(n_tokens, p_e), p_e = k/E (uniform) or min(1, k * share_e) (sim.moe_stats)."""
    n = int(round(n_tokens))
    if n <= 0:
        return 0.0
    if shares is None:
        probs: tuple[float, ...] = (k / num_experts,) * num_experts
    else:
        probs = tuple(float(p) for p in moe_stats.touch_probabilities(shares, k))
    return _expected_windows(n, probs, window)


@functools.lru_cache(maxsize=256)
def _expected_windows(n: int, probs: tuple[float, ...], window: int) -> float:
    uniq, mult = np.unique(np.asarray(probs), return_counts=True)
    cdf = moe_stats._binom_cdf_table(n, uniq)  # [distinct p, n + 1]
    # E[ceil(c / C)] = sum_{j >= 0} P(c > j C)
    tail = 1.0 - cdf[:, ::window]
    return float(np.sum(mult * np.clip(tail, 0.0, 1.0).sum(axis=1)))


def _moe_ops(cfg: ModelConfig, quant: Quant, weights: _Weights, i: int, M: int, shares) -> list[Op]:
    """Router + routed experts (+ shared experts). DeepSeekMoE and Qwen3-MoE (arch 'dense')
    differ only in the router's scoring and in having shared experts: the routed experts are
    the same ops, so sim/stepcost.py's EP model (ROUTED_EXPERT rows) applies to both."""
    D, E, k, F = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    ab, gp = quant.act_bytes, quant.gemm_precision
    w = weights.layer(i)
    router_w = weights.group(i, ROUTER)
    per_score = ROUTER_FLOPS_PER_SCORE if cfg.is_mla else ROUTER_SOFTMAX_FLOPS_PER_SCORE
    ops = [_gemm("router", i, M, D, E, router_w, ab, "fp32", "router"),
           _elem("router_scores", i, M * E, per_score, 4)]
    touched = moe_stats.expected_distinct(shares, E, k, M)
    per_expert = weights.group(i, ROUTED_EXPERT) / E
    rows = M * k
    window = expert_window_rows(rows, E)
    padding = expected_expert_windows(shares, E, k, M, window) * window / rows if rows else 1.0
    ops.append(Op("routed_experts", i, "moe_gemm", rows * 3 * 2.0 * D * F, touched * per_expert,
                  rows * D * ab * 2 + rows * F * ab * 2, rows * D * ab + rows * F * ab * 2, precision=gp,
                  gemm_rows=float(window), gemm_padding=max(1.0, padding),
                  gemm_matrix_bytes=per_expert / 3))  # gate, up, down: one matrix per call
    ops.append(_elem("routed_silu_mul", i, rows * F, SILU_MUL_FLOPS_PER_ELEM, ab))
    ops.append(_elem("moe_combine", i, rows * D, COMBINE_FLOPS_PER_ELEM, ab))
    if cfg.n_shared_experts:
        ops += _mlp_ops("shared_experts.", i, M, D, F * cfg.n_shared_experts, w, ab, gp)
    return ops


# --------------------------------------------------------------------- the model
def forward_ops(cfg: ModelConfig, quant: Quant | str, sh: StepShape, moe_shares=None) -> list[Op]:
    """Every operation of one forward pass of shape ``sh`` (embedding to logits)."""
    quant = get_quant(quant) if isinstance(quant, str) else quant
    weights = _weights(cfg, quant)
    M, D, ab = sh.m, cfg.hidden_size, quant.act_bytes
    emb_row = weights.glob(EMBED) / cfg.vocab_size
    ops = [Op("embed", None, "embed", 0.0, M * emb_row, M * 4, M * D * ab, precision="fp32")]
    for i in range(cfg.num_hidden_layers):
        w = weights.layer(i)
        ops.append(_elem("input_layernorm", i, M * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm", w["input_layernorm.weight"]))
        ops += (_mla_ops if cfg.arch == "deepseek" else _gqa_ops)(cfg, quant, w, i, sh, weights.prec(i))
        ops.append(_elem("attn_residual", i, M * D, RESIDUAL_FLOPS_PER_ELEM, ab))
        ops.append(_elem("post_attention_layernorm", i, M * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                         w["post_attention_layernorm.weight"]))
        if cfg.is_moe_layer(i):
            ops += _moe_ops(cfg, quant, weights, i, M, moe_shares)
        else:
            ops += _mlp_ops("", i, M, D, cfg.intermediate_size, w, ab, quant.gemm_precision)
        ops.append(_elem("mlp_residual", i, M * D, RESIDUAL_FLOPS_PER_ELEM, ab))
    n_logits = M if sh.logits == "all" else sh.batch
    ops.append(_elem("final_norm", None, n_logits * D, RMSNORM_FLOPS_PER_ELEM, ab, "norm",
                     weights.glob(FINAL_NORM)))
    head = head_name(cfg)
    ops.append(_gemm("lm_head", None, n_logits, D, cfg.vocab_size, weights.glob(head), ab,
                     quant.head_precision or quant.gemm_precision, "head"))
    return ops


def prefill_ops(cfg: ModelConfig, quant: Quant | str, batch: int, tokens: int, prefix: int = 0, *,
                mla_form: str = "naive", attn_impl: str = "flash", logits: str = "last", moe_shares=None) -> list[Op]:
    """Prefill of ``batch`` sequences of ``tokens`` new tokens after ``prefix`` cached ones.

    DeepSeek prefills in the naive (expanded, MHA-like) MLA form: fewer FLOPs per
    key when T is long; pass mla_form='absorbed' for the latent form.
    """
    sh = StepShape(batch, tokens, prefix, attn_impl=attn_impl, logits=logits, mla_form=mla_form)
    return forward_ops(cfg, quant, sh, moe_shares)


def decode_ops(cfg: ModelConfig, quant: Quant | str, batch: int, context: int, *, mla_form: str = "absorbed",
               attn_impl: str = "flash", key_slots: int | None = None, moe_shares=None) -> list[Op]:
    """One decode step: ``batch`` sequences with ``context`` cached tokens each, one new token.

    The new token attends to context + 1 keys. key_slots (with attn_impl='masked')
    models an implementation that computes over a fixed-size cache.
    """
    sh = StepShape(batch, 1, context, key_slots=key_slots, attn_impl=attn_impl, logits="all", mla_form=mla_form)
    return forward_ops(cfg, quant, sh, moe_shares)


def training_ops(cfg: ModelConfig, quant: Quant | str, batch: int, seq: int, *, recompute: str = "none",
                 mla_form: str = "naive", include_optimizer: bool = True) -> list[Op]:
    """One training step on ``batch`` sequences of ``seq`` tokens (forward + backward [+ recompute] + AdamW).

    recompute: 'none', 'selective' (attention core recomputed in backward) or
    'full' (every layer's forward recomputed).
    """
    quant = get_quant(quant) if isinstance(quant, str) else quant
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    fwd = forward_ops(cfg, quant, StepShape(batch, seq, 0, logits="all", mla_form=mla_form), None)
    ops = list(fwd)
    for op in fwd:
        ops.append(replace(op, name=op.name + "_bwd", phase="bwd", flops=BACKWARD_FLOPS_RATIO * op.flops,
                           weight_bytes=2 * op.weight_bytes,
                           act_bytes_read=op.act_bytes_read + op.act_bytes_written,
                           act_bytes_written=op.act_bytes_read, kv_bytes_read=op.kv_bytes_written,
                           kv_bytes_written=0.0))
        redo = (recompute == "full" and op.layer is not None) or (
            recompute == "selective" and op.kind == "attention")
        if redo:
            ops.append(replace(op, name=op.name + "_recompute", phase="recompute"))
    if include_optimizer:
        n = cfg.param_counts()["total_params"]
        ops.append(Op("adamw", None, "elementwise", float(ADAM_FLOPS_PER_PARAM * n), 0.0,
                      n * (ADAM_STATE_BYTES + ADAM_GRAD_BYTES), n * ADAM_STATE_BYTES, precision="fp32",
                      phase="optim"))
    return ops


# ----------------------------------------------------------------------- totals
def totals(ops: list[Op]) -> dict:
    """Sums over ops (x count), overall and per kind."""
    out = {"flops": 0.0, "weight_bytes": 0.0, "act_bytes": 0.0, "kv_bytes": 0.0, "bytes": 0.0, "by_kind": {}}
    for op in ops:
        c = op.count
        out["flops"] += op.flops * c
        out["weight_bytes"] += op.weight_bytes * c
        out["act_bytes"] += (op.act_bytes_read + op.act_bytes_written) * c
        out["kv_bytes"] += (op.kv_bytes_read + op.kv_bytes_written) * c
        out["bytes"] += op.bytes * c
        k = out["by_kind"].setdefault(op.kind, {"flops": 0.0, "bytes": 0.0, "weight_bytes": 0.0})
        k["flops"] += op.flops * c
        k["bytes"] += op.bytes * c
        k["weight_bytes"] += op.weight_bytes * c
    return out


MATMUL_KINDS = ("gemm", "attention", "router", "head", "moe_gemm")


def matmul_flops(ops: list[Op]) -> float:
    """FLOPs of products only (the convention of published per-token figures)."""
    return sum(op.flops * op.count for op in ops if op.kind in MATMUL_KINDS)


def training_flops_per_token(cfg: ModelConfig, seq: int = 4096, recompute: str = "none") -> float:
    """Matmul FLOPs per trained token: forward + backward (3x forward) of all products,
    causal attention (each query sees (T+1)/2 keys on average), sequence ``seq``.

    With recompute='none' this is 6 * activated params + 3 * causal attention, the
    convention that reproduces the DeepSeek ISCA'25 table (250 GFLOPs V3, 155 V2).
    """
    ops = training_ops(cfg, "bf16", 1, seq, recompute=recompute, include_optimizer=False)
    return matmul_flops(ops) / seq

