"""Thin adapter: fast per-device step times under a parallel layout, *from* the cost model.

The simulator evaluates a step time at every simulated step (hundreds of
thousands per run), so it cannot rebuild ``sim.costmodel.forward_ops`` (1,300+
ops, ~6 ms for DeepSeek-V3) each time. Nothing here is a new cost formula:

1. Every op of ``costmodel.forward_ops`` has FLOPs and bytes that are affine in
   five shape features of the step, x = [1, M, B, M*S_eff, B*S] (M = B*T new
   tokens, B sequences, S_eff mean keys per query, S keys per sequence; see the
   counting conventions in sim/costmodel.py). ``OpTable.build`` evaluates the
   cost model at a handful of shapes and solves for the coefficients, then
   *checks* that they reproduce the cost model exactly (ValueError otherwise).
   Sums over requests of different lengths are then exact sums of per-request
   features (the cost model itself takes one uniform shape).
2. Seconds per FLOP and per byte of each op come from ``sim.roofline.op_time``
   (peaks and efficiencies from the hardware catalog); communication times from
   ``sim.comm`` volumes through ``sim.roofline.comm_time``.
3. The parallel layout (sim.parallel.Parallelism; what the cost model does not cover yet): DP attention
   (each device runs the attention/dense part for its own sequences), TP
   (non-expert FLOPs, weight and activation bytes / tp; the MLA latent cache is
   not split by TP), EP (routed-expert rows = all tokens of the EP group * k /
   ep per device, balanced as with DeepSeek's EPLB; expert weight bytes = the
   local expert replicas a step touches, uniform routing), PP (layer ranges).
4. DeepSeek-V4 (reference/config_v4.ModelConfigV4, ops from sim/costmodel_v4.py): its attention is
   not affine in the prefix (the sliding window saturates at W, compressed entries are
   floor(S/m), the CSA indexer keeps min(K, visible) entries, and a decode step reads only the
   selected entries), so it has its own features, ``V4Features``: the closed-form pair and entry
   counts of costmodel_v4 per sequence, summed over requests. Every op of
   ``costmodel_v4.forward_ops`` is linear in them (the fit checks it, as above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from types import SimpleNamespace

from dsref.reference.config import ModelConfig
from dsref.sim import costmodel, costmodel_v4, roofline
from dsref.sim.comm import CommOp, ep_comm, grouped_time, tp_comm
from dsref.sim.costmodel import StepShape
from dsref.sim.moe_stats import expected_distinct_uniform, expected_max_rank_load
from dsref.sim.parallel import Parallelism
from dsref.sim.quant import Quant, get_quant

# Shapes (batch, new tokens, prefix) at which the cost model is sampled for the fit:
# more rows than features and well conditioned; small so that sampling is cheap.
_FIT_SHAPES = ((1, 1, 0), (2, 3, 5), (3, 7, 11), (1, 16, 100), (4, 2, 50), (5, 9, 3), (2, 33, 7), (7, 1, 1000))
# Training ops have no prefix (features M and B*S coincide; the least-squares fit is exact on that subspace).
_TRAIN_FIT_SHAPES = ((1, 1, 0), (2, 3, 0), (3, 7, 0), (1, 16, 0), (4, 2, 0), (5, 9, 0), (2, 33, 0), (7, 5, 0))
# Extra shapes for a top-k (V3.2) model, prefix given relative to index_topk: past it, straddling it.
_SPARSE_FIT_SHAPES = ((1, 1, 7), (2, 3, 500), (1, 40, -20), (3, 9, 1000), (2, 1, -1), (1, 17, 3))
# DeepSeek-V4 shapes (batch, new tokens, prefix) beyond _FIT_SHAPES, as functions of the geometry
# (W window, mc CSA rate, K top-k, mh HCA rate): prefixes below, at and past the window, across
# HCA blocks, up to and past the CSA top-k's saturation (K * mc), single-token and longer steps.
def _v4_fit_shapes(g: "V4Geometry") -> tuple:
    W, cut, mh = g.window, g.topk * g.csa_rate, g.hca_rate
    return ((1, 1, W + 3), (2, 5, W - 2), (1, 1, 3 * mh + 5), (3, 2, 2 * mh - 1), (1, 40, cut - 20),
            (2, 1, cut + 7), (1, 1, 2 * cut), (3, 9, cut + 1000), (1, 17, mh - 3), (2, 1, 5 * g.csa_rate + 1),
            (1, 300, 2 * mh + 1), (2, 1, 10 * mh), (1, 2 * W, cut - W), (4, 1, W // 2))


_FIT_RTOL = 1e-7
MOE_KIND = "moe_gemm"
GEMM_ROW_KINDS = ("gemm", "head")  # dense GEMMs whose rows are the step's tokens (kernel-table curves)
WEIGHT_KINDS = ("gemm", "moe_gemm", "head", "router")  # ops whose backward has a weight-gradient half


class StepFeatures(NamedTuple):
    """The shape of a step as the cost model's ops see it: every op's FLOPs and bytes are
    affine in these (plus a constant per step, which the step cost adds). Summable: the
    features of a batch are the sum of its requests' (``+``). Built here only:
    ``uniform`` (B equal sequences), ``request`` (one request), ``RequestTable`` (runs of
    requests in O(1)).

    tokens: M, new tokens; seqs: B, sequences; attn: sum over sequences of T * S_eff
    (query-key pairs per head, flash attention); keys: sum over sequences of S (keys held).
    DeepSeek-V3.2 (a top-k given to the constructors): pair_excess, key_excess: the query-key
    pairs and keys beyond the indexer's top-k (costmodel.StepShape.topk_excess); 0 otherwise.
    """

    tokens: float = 0.0
    seqs: float = 0.0
    attn: float = 0.0
    keys: float = 0.0
    pair_excess: float = 0.0
    key_excess: float = 0.0

    def __add__(self, o: "StepFeatures") -> "StepFeatures":  # a sum of batches, not tuple concatenation
        return StepFeatures(self.tokens + o.tokens, self.seqs + o.seqs, self.attn + o.attn, self.keys + o.keys,
                            self.pair_excess + o.pair_excess, self.key_excess + o.key_excess)

    def scaled(self, f: float) -> "StepFeatures":
        return StepFeatures(self.tokens * f, self.seqs * f, self.attn * f, self.keys * f,
                            self.pair_excess * f, self.key_excess * f)

    def vector(self) -> np.ndarray:
        """x = [1, M, B, M*S_eff, B*S]: the order of the fitted coefficients (OpTable)."""
        return np.array([1.0, self.tokens, self.seqs, self.attn, self.keys])

    def sparse_vector(self) -> np.ndarray:
        """x = [1, M, B, M*S_eff, B*S, pair excess, key excess]: a top-k (V3.2) model's features."""
        return np.array([1.0, self.tokens, self.seqs, self.attn, self.keys, self.pair_excess, self.key_excess])


def _excess(tokens, prefix, topk):
    """(pair excess, key excess) of one sequence beyond a top-k (costmodel.StepShape.topk_excess)."""
    if topk is None:
        return 0.0, 0.0
    return costmodel.causal_excess(tokens, prefix, topk), max(0.0, prefix + tokens - topk)


def uniform(batch: float, tokens: float, prefix: float, topk=None):
    """B sequences of T new tokens after ``prefix`` cached ones (flash attention: S_eff = prefix + (T+1)/2);
    topk: the model's index_topk (DeepSeek-V3.2), a V4Geometry (DeepSeek-V4: V4Features), None for
    dense attention."""
    if isinstance(topk, V4Geometry):
        return _v4(tokens, prefix, topk, batch)
    m = batch * tokens
    if topk is None:
        return StepFeatures(m, batch, m * (prefix + (tokens + 1) / 2.0), batch * (prefix + tokens))
    pe, ke = _excess(float(tokens), float(prefix), topk)
    return StepFeatures(m, batch, m * (prefix + (tokens + 1) / 2.0), batch * (prefix + tokens), batch * pe, batch * ke)


def request(tokens: float, prefix: float, topk=None):
    """One request of ``tokens`` new tokens after ``prefix`` cached ones."""
    if isinstance(topk, V4Geometry):
        return _v4(tokens, prefix, topk)
    t, p = float(tokens), float(prefix)
    if topk is None:
        return StepFeatures(t, 1.0, t * (p + (t + 1) / 2.0), p + t)
    return StepFeatures(t, 1.0, t * (p + (t + 1) / 2.0), p + t, *_excess(t, p, topk))


class RequestTable:
    """The features of a list of requests as prefix sums: any contiguous run's sum in O(1)
    (the serving simulator's prefill batches are runs of the arrival-ordered queue)."""

    def __init__(self, tokens: np.ndarray, prefix: np.ndarray, topk=None):
        t = np.asarray(tokens, float)
        p = np.asarray(prefix, float)
        self._cls = V4Features if isinstance(topk, V4Geometry) else StepFeatures
        cols = [t, np.ones_like(t), t * (p + (t + 1) / 2.0), p + t]
        if self._cls is V4Features:
            cols = _v4_columns(t, p, topk)
        elif topk is None:
            cols += [np.zeros_like(t)] * 2
        else:
            cols += [np.asarray(costmodel.causal_excess(t, p, topk), float) * np.ones_like(t),
                     np.maximum(0.0, p + t - topk)]
        rows = np.stack(cols, axis=-1)
        self._cum = np.vstack([np.zeros(len(self._cls._fields)), np.cumsum(rows, axis=0)])

    def span(self, a: int, b: int):
        """Features of requests a .. b-1."""
        return self._cls(*(self._cum[b] - self._cum[a]).tolist())


@dataclass(frozen=True)
class V4Geometry:
    """What a DeepSeek-V4 model's step features depend on: window W, CSA rate mc and top-k K, HCA
    rate mh. Passed where a V3.2 model passes its top-k (``uniform``, ``request``, ``RequestTable``)."""

    window: int
    csa_rate: int
    topk: int
    hca_rate: int


def feature_key(cfg) -> "int | V4Geometry | None":
    """The ``topk`` argument of the feature constructors for ``cfg``: a V4Geometry (DeepSeek-V4),
    index_topk (DeepSeek-V3.2), None (dense attention)."""
    if cfg.arch == "deepseek_v4":
        return V4Geometry(cfg.sliding_window, cfg.compress_rate_csa, cfg.index_topk, cfg.compress_rate_hca)
    return cfg.index_topk if cfg.has_indexer else None


class V4Features(NamedTuple):
    """A DeepSeek-V4 step's features, summable over sequences like StepFeatures. Per sequence of T
    new tokens after P cached ones (S = P + T), with costmodel_v4's closed forms:
    win_pairs: window_pairs(P, T, W); win_keys: min(W, S); csa_pairs / hca_pairs: entry_pairs at
    the CSA / HCA rate (all visible entries: index scores, HCA attention); csa_sel: entry_pairs with
    the top-k (the entries CSA attends); csa_entries / hca_entries: S // m (entries held; the
    indexer keys read); csa_read: CSA entries the attention reads (min(K, S // mc) at T = 1, else
    all S // mc: a prefill's queries together read every entry)."""

    tokens: float = 0.0
    seqs: float = 0.0
    win_pairs: float = 0.0
    win_keys: float = 0.0
    csa_pairs: float = 0.0
    csa_sel: float = 0.0
    csa_entries: float = 0.0
    csa_read: float = 0.0
    hca_pairs: float = 0.0
    hca_entries: float = 0.0

    def __add__(self, o: "V4Features") -> "V4Features":  # a sum of batches, not tuple concatenation
        return V4Features(*(a + b for a, b in zip(self, o)))

    def scaled(self, f: float) -> "V4Features":
        return V4Features(*(a * f for a in self))

    def vector(self) -> np.ndarray:
        """x = [1, features...]: the order of the fitted coefficients (OpTable)."""
        return np.array((1.0,) + tuple(self))


def _visible_sum(N, m):
    """costmodel_v4.visible_sum on arrays (the same operations)."""
    q = np.floor_divide(N, m)
    return m * q * (q - 1) / 2 + q * (N - q * m + 1)


def _entry_pairs(P, T, m, topk=None):
    """costmodel_v4.entry_pairs on arrays (P, T: float arrays of integers)."""
    def Hs(N):
        if topk is None:
            return _visible_sum(N, m)
        cut = topk * m - 1
        return _visible_sum(np.minimum(N, cut), m) + topk * np.maximum(0.0, N - cut)
    return Hs(P + T) - Hs(P)


def _window_pairs(P, T, W):
    """costmodel_v4.window_pairs on arrays: sum_p min(W, p + 1) as G(P + T) - G(P)."""
    def G(N):
        c = np.minimum(N, W)
        return c * (c + 1) / 2 + (N - c) * W
    return G(P + T) - G(P)


def _v4_columns(tokens, prefix, g: V4Geometry) -> list:
    """The V4Features columns of sequences with ``tokens`` new after ``prefix`` (float arrays)."""
    t, p = np.asarray(tokens, float), np.asarray(prefix, float)
    S = p + t
    nc, nh = np.floor_divide(S, g.csa_rate), np.floor_divide(S, g.hca_rate)
    return [t, np.ones_like(t), _window_pairs(p, t, g.window), np.minimum(float(g.window), S),
            _entry_pairs(p, t, g.csa_rate), _entry_pairs(p, t, g.csa_rate, g.topk), nc,
            np.where(t == 1, np.minimum(float(g.topk), nc), nc), _entry_pairs(p, t, g.hca_rate), nh]


def _v4(tokens, prefix, g: V4Geometry, batch=1.0) -> V4Features:
    return V4Features(*(float(c) * batch for c in _v4_columns(tokens, prefix, g)))


def zero(topk=None):
    """The features of an empty batch (StepFeatures or V4Features, as ``topk`` says)."""
    return V4Features() if isinstance(topk, V4Geometry) else StepFeatures()


@dataclass(frozen=True)
class OpTable:
    """Affine coefficients of every op of one forward pass (per occurrence x count).

    flops/act/kv: [n_ops, 5] coefficients; weight: [n_ops] constant bytes (for MoE
    ops: bytes per touched expert); spf / spb: seconds per FLOP / per byte from
    sim.roofline.op_time; layer: -1 embedding side, L head side, else the layer.
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    layer: np.ndarray
    count: np.ndarray
    flops: np.ndarray
    act: np.ndarray
    kv: np.ndarray
    weight: np.ndarray
    moe_weight: np.ndarray
    spf: np.ndarray
    spb: np.ndarray
    is_moe: np.ndarray
    has_weight_grad: np.ndarray

    phase: tuple[str, ...] = ()

    @staticmethod
    def build(cfg: ModelConfig, quant: Quant | str, device, *, mla_form: str, logits: str,
              training: bool = False) -> "OpTable":
        """Fit the ops of ``costmodel.forward_ops`` (or, training=True, of ``costmodel.training_ops``
        without recomputation and optimizer: forward + backward, prefix 0)."""
        quant = get_quant(quant) if isinstance(quant, str) else quant
        X, runs = [], []
        shapes = _TRAIN_FIT_SHAPES if training else _FIT_SHAPES
        topk = feature_key(cfg)
        v4 = isinstance(topk, V4Geometry)
        if v4 and training:
            raise ValueError(f"{cfg.name}: training step costs of a DeepSeek-V4 model are not modelled")
        if v4:
            shapes = shapes + _v4_fit_shapes(topk)
        elif topk is not None and not training:
            # V3.2: the sparse features are zero while no sequence holds more than topk keys, so
            # shapes past the top-k (and straddling it) are needed to determine their coefficients
            shapes = shapes + tuple((b, t, p + topk) for b, t, p in _SPARSE_FIT_SHAPES)
        for b, t, p in shapes:
            X.append(uniform(b, t, p).vector() if topk is None else
                     uniform(b, t, p, topk).vector() if v4 else uniform(b, t, p, topk).sparse_vector())
            if v4:
                runs.append(costmodel_v4.forward_ops(cfg, quant, StepShape(b, t, p, logits=logits)))
            elif training:
                runs.append(costmodel.training_ops(cfg, quant, b, t, recompute="none", mla_form=mla_form,
                                                   include_optimizer=False))
            else:
                runs.append(costmodel.forward_ops(cfg, quant, StepShape(b, t, p, logits=logits, mla_form=mla_form)))
        X = np.array(X)
        if v4 and np.linalg.matrix_rank(X) < X.shape[1]:
            # an underdetermined fit could put a coefficient on a feature that only coincides with
            # another at the sampled shapes (e.g. a model whose window exceeds every sampled prefix)
            raise ValueError(f"{cfg.name}: the fit shapes do not determine every V4 feature's coefficient")
        pinv = np.linalg.pinv(X) if v4 else None
        ops0 = runs[0]
        n = len(ops0)
        if any(len(r) != n for r in runs):
            raise ValueError("cost model op list changes length with the shape; the adapter cannot fit it")
        m_vals = np.array([b * t for b, t, _ in shapes], float)

        def fit(getter):
            Y = np.array([[getter(op) for op in r] for r in runs])  # [shapes, ops]
            if v4:  # full column rank (checked above): the unique least-squares solution; lstsq's
                # SVD per right-hand side takes ~0.6 s for V4's 11 x 1,800 (pinv: ~10 ms)
                coef = pinv @ Y
            else:
                coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
            err = np.abs(X @ coef - Y).max(axis=0)
            bad = err > _FIT_RTOL * (np.abs(Y).max(axis=0) + 1.0)
            return coef.T, bad

        flops, bad_f = fit(lambda o: o.flops)
        act, bad_a = fit(lambda o: o.act_bytes_read + o.act_bytes_written)
        kv, bad_k = fit(lambda o: o.kv_bytes_read + o.kv_bytes_written)
        is_moe = np.array([o.kind == MOE_KIND for o in ops0])
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        weight, bad_w = fit(lambda o: 0.0 if o.kind == MOE_KIND else o.weight_bytes)
        moe_w = np.zeros(n)
        for i in np.flatnonzero(is_moe):
            ws = np.array([r[i].weight_bytes for r in runs])
            per = ws / np.array([expected_distinct_uniform(E, k, mv) for mv in m_vals])
            if np.ptp(per) > _FIT_RTOL * per.max():
                raise ValueError(f"op {ops0[i].name}: expert weight bytes not proportional to experts touched")
            moe_w[i] = per[0]
        if training and topk is not None:
            raise ValueError(f"{cfg.name}: training step costs of a top-k (DeepSeek-V3.2) model are not modelled")
        if training:  # prefix 0: B*S == M for every training shape; fold that column into M
            for arr in (flops, act, kv, weight):
                arr[:, 1] += arr[:, 4]
                arr[:, 4] = 0.0
        bad = bad_f | bad_a | bad_k | bad_w
        if bad.any():
            raise ValueError(f"cost model op {ops0[int(np.argmax(bad))].name} is not affine in the shape features")
        spf, spb = _rates(ops0, device)
        L = cfg.num_hidden_layers
        layer = np.array([(-1 if o.name == "embed" else L) if o.layer is None else o.layer for o in ops0])
        return OpTable(tuple(o.name for o in ops0), tuple(o.kind for o in ops0), layer,
                       np.array([o.count for o in ops0], float), flops, act, kv, weight, moe_w, spf, spb, is_moe,
                       np.array([o.kind in WEIGHT_KINDS and o.weight_bytes > 0 for o in ops0]),
                       tuple(o.phase for o in ops0))


def _rates(ops, device) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per FLOP and per byte of each op, from sim.roofline.op_time."""
    cache: dict = {}
    spf, spb = [], []
    for o in ops:
        # rows and matrix size change the rate on devices with measured curves (the host)
        key = (o.kind, o.precision, o.gemm_rows, o.gemm_padding, o.gemm_matrix_bytes)
        if key not in cache:
            unit = replace(o, flops=1.0, weight_bytes=1.0, act_bytes_read=0.0, act_bytes_written=0.0,
                           kv_bytes_read=0.0, kv_bytes_written=0.0, count=1)
            t = roofline.op_time(unit, device)
            cache[key] = (t.compute_s, t.memory_s)
        spf.append(cache[key][0])
        spb.append(cache[key][1])
    return np.array(spf), np.array(spb)


class StepCost:
    """Per-device time of one forward pass of a batch, for one phase (prefill or decode).

    Takes ``StepFeatures`` and derives from them and the parallel layout the tokens each
    device sends (EP dispatch, TP all-reduce) and the tokens routed across its EP group:
    ``prefill`` / ``decode`` (serving steps, (total, compute, comm) seconds),
    ``decode_compute_s`` and ``replica_compute_s`` (compute only), ``comm_s``.
    """

    def __init__(self, cfg: ModelConfig, quant: Quant | str, device, par: Parallelism, *, mla_form: str,
                 logits: str, node=None, latency_s: dict | None = None, layers: tuple[int, int] | None = None,
                 table: OpTable | None = None, rows: np.ndarray | None = None, scale: np.ndarray | None = None,
                 phase: str | None = None, cuda_graph: bool = False, routing_shares: np.ndarray | None = None,
                 kernel_floors: bool = True):
        """layers: [lo, hi) layer range (embedding with lo = 0, head with hi = L); rows: extra op mask;
        scale: per-op multiplier of FLOPs and bytes (e.g. the weight-gradient half of a backward op);
        phase: 'decode' | 'prefill' (serving steps pay the kernel profile's per-step host overhead once
        per step) or None (training micro-batches: no per-step host term); cuda_graph: kernels replayed
        from a captured graph (the profile's graph launch floor) instead of launched one by one;
        routing_shares: expert assignment shares for skewed routing (None: uniform; with redundant
        experts EPLB is taken to even out the ranks' means); kernel_floors: False turns every floor and
        size-dependent kernel curve off (the plain roofline, for ablations)."""
        self.cfg, self.device, self.par, self.node = cfg, device, par, node
        self.phase = phase
        # the model's top-k (V3.2): features carry the sparse columns and callers build them with it
        self.topk = feature_key(cfg)
        self._vec = (lambda f: f.sparse_vector()) if isinstance(self.topk, int) else (lambda f: f.vector())
        self.profile = device_kernel_profile(device) if kernel_floors else None
        self.routing_shares = routing_shares
        self.quant = get_quant(quant) if isinstance(quant, str) else quant
        self.latency_s = latency_s or {}
        self.table = table or OpTable.build(cfg, self.quant, device, mla_form=mla_form, logits=logits)
        t = self.table
        L = cfg.num_hidden_layers
        lo, hi = layers if layers is not None else (0, L)
        keep = (t.layer >= lo) & (t.layer < hi)
        if lo == 0:
            keep |= t.layer == -1
        if hi == L:
            keep |= t.layer == L
        if rows is not None:
            keep &= rows
        sc = np.ones(len(t.names)) if scale is None else np.asarray(scale, float)
        ccfg = self._comm_cfg = comm_view(cfg)
        self.moe_layer_fraction = (sum(ccfg.is_moe_layer(i) for i in range(lo, hi)) / ccfg.num_moe_layers
                                   if ccfg.num_moe_layers else 0.0)
        tp = par.tp
        # GQA: KV heads split over TP ranks, replicated once TP exceeds them; MLA's latent is not split
        kv_div = min(tp, max(cfg.num_key_value_heads, 1)) if cfg.arch == "dense" else 1
        dense = keep & ~t.is_moe
        moe = keep & t.is_moe
        # non-MoE byte coefficients merged: activation/tp + KV/kv_div + weight/tp
        scd, scm = sc[dense][:, None], sc[moe][:, None]
        gemm_kind = np.array([k in GEMM_ROW_KINDS for k in t.kinds])
        self._d = _compress(t.flops[dense] / tp * scd,
                            (t.act[dense] / tp + t.kv[dense] / kv_div + t.weight[dense] / tp) * scd,
                            t.spf[dense], t.spb[dense], t.count[dense], gemm_kind[dense].astype(float))
        self._m = (t.flops[moe] * scm, (t.act[moe] + t.weight[moe]) * scm, t.moe_weight[moe] * sc[moe],
                   t.spf[moe], t.spb[moe], t.count[moe])
        # fast evaluation: rows pre-multiplied by their seconds per FLOP / byte, stacked [compute; memory]
        f, b, spf, spb, cnt, is_gemm = self._d
        self._n = len(cnt)
        self._stack = np.vstack([f * spf[:, None], b * spb[:, None]])
        self._count = cnt
        self._is_gemm = is_gemm > 0.5
        self._gemm_idx = np.flatnonzero(self._is_gemm)  # rows rescaled by the kernel table (once per step)
        self._floor_kernel = 0.0
        self._step_overhead = 0.0
        self._eff = (device.efficiency("gemm"), device.efficiency("memory"))
        prof = self.profile
        if prof is not None:
            self._floor_kernel = prof.launch_graph_s if cuda_graph else prof.launch_eager_s
            self._step_overhead = (prof.step_overhead_s or {}).get(phase, 0.0) if phase else 0.0
        mtp_ = max(getattr(par, "moe_tp", 1), 1)  # experts split tensor-parallel: 1/moe_tp of each
        self._m = tuple(a / mtp_ for a in self._m[:3]) + self._m[3:]
        fm, bm, wm, spfm, spbm, cm = self._m
        if len(cm) and (np.abs(fm[:, 2:]).max() > _FIT_RTOL * np.abs(fm[:, 1]).max()
                        or np.abs(bm[:, 2:]).max() > _FIT_RTOL * np.abs(bm[:, 1]).max()):
            raise ValueError("routed-expert op depends on more than the token count; the EP model needs updating")
        rows: dict = {}
        for i in range(len(cm)):
            key = (fm[i, 0] * spfm[i], fm[i, 1] * spfm[i], bm[i, 0] * spbm[i], bm[i, 1] * spbm[i], wm[i] * spbm[i])
            rows[key] = rows.get(key, 0.0) + cm[i]
        self._moe_rows = [k + (v,) for k, v in rows.items()]
        self._comm_affine: tuple[float, float, float, float] | None = None
        self._ll = None
        self._overlap: float | None = None
        self._n_moe_kernels = float(sum(cm)) if len(cm) else 0.0
        self.layer_fraction = (hi - lo) / L
        self._rank_cache: dict[float, float] = {}
        self._n_moe_layers = ccfg.num_moe_layers
        self.slots = par.slots(cfg)
        self.local_slots = self.slots / max(par.ep, 1)

    # ------------------------------------------------------------------ compute
    def _compute(self, x: np.ndarray, ep_tokens: float, parts: dict | None = None) -> float:
        """Compute time of per-device features x = [1, M, B, M*S_eff, B*S] with ``ep_tokens`` tokens
        routed across the EP group: sum over ops of max(compute, memory, kernel floor).

        Kernel profile (hwmodels/kernels.py), when the device has one: GEMM ops run at the
        published kernel tables' compute and bandwidth fractions for their rows (dense: the step's
        M tokens on this device; routed experts: rows per touched expert on the busiest EP rank)
        instead of the catalog's flat gemm / memory efficiencies, and every kernel takes at least
        the launch floor. The busiest EP rank's routed rows are the expected maximum over ranks
        (sim/moe_stats.expected_max_rank_load), not the mean. ``parts``: if given, filled with the
        seconds bound by compute, memory and the floor (for reports)."""
        y = self._stack @ x
        n = self._n
        yc, ym = y[:n], y[n:]
        prof, floor = self.profile, self._floor_kernel
        if prof is not None and len(self._gemm_idx):
            eff = prof.gemm_efficiency(max(float(x[1]), 1.0), grouped=False)
            if eff is not None:  # y is this call's own array: rescale the GEMM rows in place
                g = self._gemm_idx
                yc[g] = yc[g] * (self._eff[0] / eff[0])
                ym[g] = ym[g] * (self._eff[1] / eff[1])
        t = np.maximum(np.maximum(yc, ym), floor)
        total = float(np.dot(t, self._count))
        if parts is not None:
            for key, sel in (("compute_s", (yc >= ym) & (yc >= floor)), ("memory_s", (ym > yc) & (ym >= floor)),
                             ("floor_s", (floor > yc) & (floor > ym))):
                parts[key] = parts.get(key, 0.0) + float(np.dot(t[sel], self._count[sel]))
        if self._moe_rows:
            m_dev = self.rank_tokens(ep_tokens)  # tokens whose rows land on the busiest EP rank
            touched = self.local_slots * (1.0 - (1.0 - self.cfg.num_experts_per_tok / self.slots)
                                          ** ep_tokens) if ep_tokens > 0 else 0.0
            fc = fb = 1.0
            if prof is not None and touched > 0:
                eff = prof.gemm_efficiency(m_dev * self.cfg.num_experts_per_tok / touched, grouped=True)
                if eff is not None:
                    fc, fb = self._eff[0] / eff[0], self._eff[1] / eff[1]
            for cf0, cf1, cb0, cb1, cw, cnt in self._moe_rows:
                c = (cf0 + cf1 * m_dev) * fc
                m = (cb0 + cb1 * m_dev + cw * touched) * fb
                tm = max(c, m, floor)
                total += cnt * tm
                if parts is not None:
                    key = "floor_s" if floor > max(c, m) else ("compute_s" if c >= m else "memory_s")
                    parts[key] = parts.get(key, 0.0) + cnt * tm
        return total

    def rank_tokens(self, ep_tokens: float) -> float:
        """Tokens whose routed rows land on the busiest of the EP group's ranks when ``ep_tokens``
        tokens are routed: the expected maximum rank load / k (uniform routing, or the scenario's
        skew; redundant experts (EPLB) even out the ranks' means, not the per-step fluctuation)."""
        ep = max(self.par.ep, 1)
        if ep == 1 or ep_tokens <= 0:
            return ep_tokens / ep
        key = round(ep_tokens, 3)
        hit = self._rank_cache.get(key)
        if hit is None:
            cfg = self.cfg
            E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            shares = self.routing_shares
            # redundant slots (EPLB) even out the ranks' means; a skew without them needs the
            # contiguous E / ep blocks of the model's own experts
            balanced = self.slots > E or shares is None or E % ep != 0
            hit = expected_max_rank_load(ep_tokens, E, k, ep, None if balanced else shares, balanced) / k
            if len(self._rank_cache) < 100_000:
                self._rank_cache[key] = hit
        return hit

    def compute_s(self, f: StepFeatures, ep_tokens: float) -> float:
        """Compute time of one device's features ``f`` with ``ep_tokens`` routed across its EP group."""
        return self._compute(self._vec(f), ep_tokens)

    # The tokens routed across one EP group, from the features and the layout; one rule per use:
    def _decode_ep_tokens(self, rank: StepFeatures) -> float:
        # decode: every DP rank charged at the busiest rank's batch (ranks differ by at most one
        # sequence); the EP group holds ep of the instance's devices (x moe_tp: each expert-TP
        # device sees every token of its group)
        return rank.tokens * self.par.dp * self.par.ep * max(self.par.moe_tp, 1) / self.par.devices

    def replica_compute_s(self, f: StepFeatures) -> float:
        """Training: compute time of one micro-batch ``f`` on one device; the EP group spans ep
        data-parallel replicas, each with its own micro-batch."""
        return self._compute(self._vec(f), f.tokens * self.par.ep)

    def decode_compute_s(self, rank: StepFeatures) -> float:
        """Compute time of the busiest DP rank's decode features ``rank`` (no communication)."""
        return self._compute(self._vec(rank), self._decode_ep_tokens(rank))

    # -------------------------------------------------------------------- comm
    def _comm_exact(self, tokens: float) -> tuple[float, float]:
        """(EP, TP) seconds of one forward pass over all layers (no layer-range fractions)."""
        ops: list[CommOp] = ep_comm(self._comm_cfg, tokens, self.par)
        ep_t = grouped_time(ops, lambda c: roofline.comm_time(c, self.device, node=self.node,
                                                              latency_s=self.latency_s))
        tp_t = sum(roofline.comm_time(c, self.device, node=self.node, latency_s=self.latency_s)
                   for c in tp_comm(self._comm_cfg, tokens, self.par, self.quant.act_bytes))
        return ep_t, tp_t

    def comm_s(self, tokens_per_device: float) -> float:
        """EP dispatch/combine and TP all-reduce time of one forward pass (sim.comm volumes through
        sim.roofline.comm_time: a bandwidth term + the per-call latency of the link and collective).
        Volumes are linear in tokens and each call adds a fixed latency, so each part is affine in
        tokens: evaluated exactly at 1 and 1025 tokens once, then interpolated (exact at every count).
        Decode EP runs DeepEP-style low-latency kernels: their published per-layer time at this EP
        size (kernel profile) is a floor under the bandwidth formula."""
        if tokens_per_device <= 0:
            return 0.0
        if self._comm_affine is None:
            (e1, t1), (e2, t2) = self._comm_exact(1), self._comm_exact(1025)
            self._comm_affine = (e1 - (e2 - e1) / 1024, (e2 - e1) / 1024, t1 - (t2 - t1) / 1024, (t2 - t1) / 1024)
            ll = None
            if self.phase == "decode" and self.profile is not None and self.par.ep > 1 and self.cfg.is_moe:
                ll = self.profile.ep_low_latency_s
            self._ll = ll
        ea, eb, ta, tb = self._comm_affine
        t = float(tokens_per_device)
        ep_t = ea + eb * t
        if self._ll is not None:
            lat = self._ll(self.par.ep, t)
            if lat is not None:
                ep_t = max(ep_t, (lat[0] + lat[1]) * self._n_moe_layers)
        return ep_t * self.moe_layer_fraction + (ta + tb * t) * self.layer_fraction

    # -------------------------------------------------------------------- steps
    def prefill(self, total: StepFeatures, *, two_microbatch: bool = False) -> tuple[float, float, float]:
        """(total, compute, comm) seconds of a serving step over the instance's batch ``total``:
        the busiest DP rank runs ceil(n / dp) of the n sequences (share of every feature); the
        EP group routes its ep / devices share of the instance's tokens."""
        n = max(1, int(round(total.seqs)))
        rank = total.scaled(math.ceil(n / self.par.dp) / n)
        return self._step(self._vec(rank), total.tokens * self.par.ep * max(self.par.moe_tp, 1) / self.par.devices,
                          rank.tokens, two_microbatch)

    def decode(self, rank: StepFeatures, *, two_microbatch: bool = False) -> tuple[float, float, float]:
        """(total, compute, comm) seconds of a decode step whose busiest DP rank has features ``rank``."""
        return self._step(self._vec(rank), self._decode_ep_tokens(rank), rank.tokens, two_microbatch)

    def _step(self, x: np.ndarray, ep_tokens: float, tokens_per_device: float,
              two_microbatch: bool) -> tuple[float, float, float]:
        """(total, compute, comm) seconds; total includes the profile's per-step host overhead.

        two_microbatch: the batch is split in two halves whose compute overlaps the other half's
        all-to-all. While the communication kernels run they hold part of the device (DeepEP's
        kernels occupy SMs), so overlapped compute runs at the catalog's ``overlap`` share of the
        device: C' = C / overlap with C = 2 * compute(half); the two halves pipeline over the
        step's n MoE layers, so one layer's shorter phase is exposed at the start and end:
        t = max(C', M) + min(C', M) / n (M = comm(all))."""
        if two_microbatch:
            c = 2.0 * self._compute(x / 2.0, ep_tokens / 2.0)
            m = self.comm_s(tokens_per_device)
            if self._overlap is None:
                self._overlap = self.device.efficiency("overlap")
            cs = c / self._overlap
            n = max(1.0, self.moe_layer_fraction * self._n_moe_layers)
            return max(cs, m) + min(cs, m) / n + self._step_overhead, c, m
        c = self._compute(x, ep_tokens)
        m = self.comm_s(tokens_per_device)
        return c + m + self._step_overhead, c, m

    def breakdown(self, rank: StepFeatures, ep_tokens: float | None = None, *,
                  two_microbatch: bool = False) -> dict:
        """Seconds of one step of ``rank`` features bound by compute, memory bandwidth, kernel floors,
        communication and host overhead: what binds a step. With ``two_microbatch`` the parts add up
        to the overlapped step (``_step``): compute, memory and floor scaled to the compute-side time
        of the step, ``comm_s`` only the communication that overlap leaves exposed."""
        parts: dict = {}
        ep_t = self._decode_ep_tokens(rank) if ep_tokens is None else ep_tokens
        self._compute(self._vec(rank), ep_t, parts)
        parts["comm_s"] = self.comm_s(rank.tokens)
        parts["host_s"] = self._step_overhead
        if two_microbatch:
            tot, c, _ = self._step(self._vec(rank), ep_t, rank.tokens, True)
            work = tot - self._step_overhead
            exposed = max(0.0, work - c / self._overlap)
            # the full batch's compute-side parts, stretched to the overlapped step's compute side
            # (two half batches, slowed by the SMs the EP kernels hold)
            own = sum(parts.get(k, 0.0) for k in ("compute_s", "memory_s", "floor_s"))
            scale = (work - exposed) / own if own else 0.0
            for k in ("compute_s", "memory_s", "floor_s"):
                parts[k] = parts.get(k, 0.0) * scale
            parts["comm_s"] = exposed
        return parts


def comm_view(cfg):
    """What sim.comm and the layer fractions read of a model: ``cfg`` itself, or for DeepSeek-V4
    (whose ModelConfigV4 has no MoE-layer fields: every layer is MoE) the same fields. V4's
    sub-layers exchange D-wide activations (the hyper-connection streams are collapsed to D before
    attention and the MoE, and expanded after): the TP all-reduce and the EP dispatch/combine
    volumes are those of a D-wide model with the same layers and k."""
    if cfg.arch != "deepseek_v4":
        return cfg
    L = cfg.num_hidden_layers
    return SimpleNamespace(name=cfg.name, is_moe=True, num_moe_layers=L, is_moe_layer=lambda i: 0 <= i < L,
                           num_hidden_layers=L, hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
                           num_experts_per_tok=cfg.num_experts_per_tok)


def _compress(f, b, spf, spb, count, flag):
    """Merge ops with identical coefficients, rates and GEMM flag (e.g. the same op in every MoE
    layer): their roofline times are identical, so one row with the summed count is exact."""
    rows = np.concatenate([f, b, spf[:, None], spb[:, None], flag[:, None]], axis=1)
    uniq, inv = np.unique(rows, axis=0, return_inverse=True)
    cnt = np.zeros(len(uniq))
    np.add.at(cnt, inv.ravel(), count)
    n = f.shape[1]
    return uniq[:, :n], uniq[:, n:2 * n], uniq[:, 2 * n], uniq[:, 2 * n + 1], cnt, uniq[:, 2 * n + 2]


def device_kernel_profile(device):
    """The device's kernel profile (hwmodels/kernels.py); None for a device with its own measured
    curves (the host probe file), whose rates already include what the profile would add."""
    if getattr(device, "gemm_rows_curve", None) is not None or getattr(device, "gemv_bandwidth_curve", None) is not None:
        return None
    from dsref.hwmodels.kernels import kernel_profile
    return kernel_profile(device)
