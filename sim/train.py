"""Discrete-event simulation (SimPy) of one training step: pipeline schedules at micro-batch granularity.

One SimPy process per pipeline rank walks that rank's ordered list of chunks
(forward F, backward B, weight-gradient W, or an overlapped forward+backward pair
FB). A chunk starts when the rank is free and its inputs have arrived: the same
micro-batch's chunk on the neighbouring rank has finished plus the point-to-point
activation send (sim.comm.pp_comm through sim.roofline.comm_time). Nothing is
assumed about bubbles: they come out of the dependencies.

Schedules
  * 1F1B (PipeDream-Flush / Megatron): rank r runs min(PP-1-r, m) warm-up forwards,
    then alternates F/B, then drains the backwards. Closed form with uniform stage
    times and free sends: bubble fraction (PP-1)/(m+PP-1).
  * DualPipe (DeepSeek-V3 technical report sec. 3.2.1; deepseek-ai/DualPipe):
    micro-batches enter from both ends; rank r holds stage r for direction 0 and
    stage PP-1-r for direction 1 (two copies of the parameters). The rank's chunk
    order is the reference implementation's 8 phases (nF0, nF0F1, nB1W1F1,
    nF0B1F1B0, nB1F1B0, nB1B0, nWB0, nW), mirrored for the second half of the ranks.
    Zero-bubble splitting: B = input gradient, W = weight gradient, each half of a
    backward GEMM (sim.costmodel.BACKWARD_FLOPS_RATIO = 2: dgrad + wgrad).

Chunk times (sim.stepcost over costmodel.training_ops, per device)
  * F, B, W compute of the rank's stage (layers split contiguously, embedding on the
    first stage, final norm + LM head on the last); recomputation adds forward ops to
    B: 'selective' = every RMSNorm and the MLA up-projections (q_b_proj, kv_b_proj
    expansion), as DeepSeek-V3 does; 'full' = the stage's whole forward.
  * EP dispatch + combine (sim.comm.ep_comm) in F and in B. ep_overlap: 1F1B hides
    each chunk's all-to-all behind its own compute (max(c, m)); DualPipe hides it only
    inside F&B pairs (max(Fc + Bc, Fm + Bm)); lone chunks pay c + m.
  * After the pipeline: ZeRO-1 (sim.comm.dp_zero1_comm) gradient reduce-scatter,
    AdamW on the rank's optimizer shard (the costmodel's adamw op per parameter),
    parameter all-gather. dp_overlap starts the reduce-scatter at the start of the
    rank's last backward chunk instead of after it.

Kernel mechanisms the FLOP counts miss (each a time multiplier on one class of ops, from a
cited kernel benchmark; ``TrainSim(mechanisms=...)`` switches them off for attribution):
  * attention_backward: FlashAttention's backward runs 5 matmuls per tile where the forward
    runs 2 (it recomputes the scores), i.e. 2.5x the forward FLOPs, not the cost model's 2x,
    and at a lower rate than the forward (FA3 paper, head dim 128: 542 vs 638 TFLOP/s at seq 4K).
  * wgrad_gemm: FP8 weight-gradient GEMMs (reduction over tokens, transposed operands) run
    below the forward GEMM's rate at the same shapes (DeepGEMM's PR #95 wgrad tables vs its
    PR #74 forward tables, H800). Applied to FP8 GEMMs only (the tables are FP8).
  * fp8_cast: the BF16 -> FP8 quantisation passes before each FP8 GEMM and the backward's
    gradient casts and 1x128 -> 128x1 transposes (TR sec. 3.5.2), memory-bound.
Attribution: ``run()``'s breakdown.step_attribution splits the step of the rank that finishes
last into compute by op kind, recomputation, the SMs held by the all-to-all, exposed all-to-all,
pipeline idle and the DP tail (the parts add up to the step time); ``mechanism_effects(sc)``
gives the step time with each mechanism switched off.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import simpy

from dsref.sim import costmodel, roofline
from dsref.sim.comm import dp_zero1_comm, pp_comm
from dsref.sim.deployment import Deployment, resolve
from dsref.sim.parallel import stage_params
from dsref.sim.scenario import Scenario, ScenarioError
from dsref.sim.stepcost import OpTable, StepCost, uniform

SECONDS_PER_DAY = 86400.0
SECONDS_PER_HOUR = 3600.0
UP_PROJECTIONS = ("q_b_proj", "kv_b_expand")  # MLA up-projections (naive/training form), DeepSeek-V3 sec. 3.2.3
DEFAULT_MFU_PRECISION = "bf16"

# ------------------------------------------------------------ kernel mechanisms (sources inline)
# FlashAttention backward FLOPs / forward FLOPs as the kernels execute them (QK^T recomputed, dP, dV,
# dQ, dK: 5 products vs 2): Dao-AILab/flash-attention benchmarks/benchmark_flash_attention.py,
# flops(): bwd = 2.5 x fwd (the convention of every FA paper's backward TFLOP/s). Confidence: high.
FA_BWD_FLOPS_RATIO = 2.5
# FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608), BF16 on H100 SXM5, head dim 128: the bar
# labels of the figures "Attention forward speed, head dim 128" and "Attention backward speed, head
# dim 128" (TFLOP/s; the backward counted as 2.5x the forward FLOPs) at sequence lengths 512 .. 16K.
# The causal-mask setting of the two figures was not re-checked here; the same setting is assumed for
# both (only their ratio is used). H800 has the H100's SMs. MLA's training attention has d_qk 192 /
# d_v 128 (DeepSeek's kernels are not public): head dim 128 is the nearest published point.
# Confidence: medium.
FA3_SEQ = (512, 1024, 2048, 4096, 8192, 16384)
FA3_FWD_TFLOPS = (467.0, 565.0, 625.0, 638.0, 646.0, 648.0)
FA3_BWD_TFLOPS = (316.0, 424.0, 501.0, 542.0, 559.0, 561.0)


def attention_backward_time_ratio(seq_len: int) -> float:
    """Backward attention time / the cost model's (2x forward FLOPs at the forward's rate): 2.5/2 x
    the FA3 forward/backward rate ratio at ``seq_len`` (linear in log2 between the figure's lengths,
    clamped outside 512 .. 16K)."""
    lg = np.log2(FA3_SEQ)
    x = float(np.clip(np.log2(max(seq_len, 1)), lg[0], lg[-1]))
    fwd, bwd = np.interp(x, lg, FA3_FWD_TFLOPS), np.interp(x, lg, FA3_BWD_TFLOPS)
    return FA_BWD_FLOPS_RATIO / costmodel.BACKWARD_FLOPS_RATIO * float(fwd / bwd)


# DeepGEMM FP8 (fine-grained scaling, CUDA-core promotion every 128 elements) on H800, TFLOP/s at
# DeepSeek-V3 shapes, the same forward/wgrad shape pairs (weight [N, K] <-> wgrad output [K, N]):
#   forward: deepseek-ai/DeepGEMM PR #74 (Mar 2025) 'Opti' column, dense M = 4096 rows,
#            grouped-contiguous 4 groups x 8192 rows;
#   wgrad:   deepseek-ai/DeepGEMM PR #95 (May 2025) tables, reduction over 4096 tokens (dense) and
#            8192 tokens per expert (k-grouped, 4 groups; the PR #95 figures as quoted in issue #107).
# The ratio of equal-FLOP times is what is applied (the catalog's gpu.gemm sets the forward rate).
# Confidence: medium (PR #95 says its kernels are ~20% faster than DeepSeek's internal CUTLASS
# wgrad, so V3's own training wgrad may have been slower still; not used).
DEEPGEMM_FWD_DENSE = {(24576, 1536): 1166.0, (32768, 512): 748.0, (7168, 16384): 1470.0, (7168, 2048): 1204.0}
DEEPGEMM_WGRAD_DENSE = {(24576, 1536): 986.0, (32768, 512): 878.0, (7168, 16384): 994.0, (7168, 2048): 920.0}
DEEPGEMM_FWD_GROUPED = {(4096, 7168): 1381.0, (7168, 2048): 1262.0}
DEEPGEMM_WGRAD_GROUPED = {(4096, 7168): 1044.0, (7168, 2048): 1033.0}


def equal_flop_time_ratio(slow: dict, fast: dict) -> float:
    """Time of equal-FLOP GEMMs at the ``slow`` rates / at the ``fast`` rates (same shape keys)."""
    if set(slow) != set(fast):
        raise ValueError("kernel tables must cover the same shapes")
    return sum(1.0 / slow[k] for k in slow) / sum(1.0 / fast[k] for k in fast)


WGRAD_TIME_RATIO = {"gemm": equal_flop_time_ratio(DEEPGEMM_WGRAD_DENSE, DEEPGEMM_FWD_DENSE),
                    "moe_gemm": equal_flop_time_ratio(DEEPGEMM_WGRAD_GROUPED, DEEPGEMM_FWD_GROUPED)}
# FP8 casts around the GEMMs. TR sec. 3.5.2 (suggestions on hardware design) describes them as
# separate HBM round trips today: BF16 activations are read from HBM to be quantised, the FP8 values
# written back and read again by the MMA; in the backward, the FP8 activations cached in 1x128 tiles
# are read, dequantised, transposed, re-quantised into 128x1 tiles and written back (paraphrased).
# Bytes moved per element (fp32 scale per 128 elements, TR sec. 3.3):
#   forward, each FP8 GEMM input: read BF16 + write FP8 + scale;
#   backward, each FP8 GEMM's output gradient (Dgrad's FP8 input): read BF16, write FP8 in both
#     tile layouts (1x128 for Dgrad, 128x1 for Wgrad) -- an assumption: one pass, two outputs;
#   backward, each cached FP8 input (Wgrad's other operand): read FP8 + write FP8 transposed.
# Memory-bound passes at the catalog's memory efficiency. Confidence: medium-low (which casts
# DeepSeek fused into neighbouring kernels is not published; the TR names these as unfused).
_SCALE_B = 4.0 / 128
FP8_CAST_BYTES = {"forward_input": 2.0 + 1.0 + _SCALE_B, "backward_grad": 2.0 + 2.0 + 2 * _SCALE_B,
                  "backward_input_transpose": 1.0 + _SCALE_B + 1.0 + _SCALE_B}


def fp8_gemm_widths(cfg, moe: bool) -> tuple[float, float]:
    """(input elements, output elements) per token of one layer's FP8 GEMMs, each input cast once
    (q_a and kv_a share theirs; the MoE input is cast once before the dispatch, TR sec. 3.3.3, and
    shared with the shared expert's gate/up); routed experts count k rows per token."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.arch == "deepseek":
        R, P, N, A = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        Q = cfg.q_lora_rank
        if Q is None:
            ins, outs = D + R + H * A, H * (N + P) + (R + P) + H * (N + A) + D
        else:
            ins, outs = D + Q + R + H * A, Q + (R + P) + H * (N + P) + H * (N + A) + D
    else:
        hd, K = cfg.dense_head_dim, cfg.num_key_value_heads
        ins, outs = D + H * hd, (H + 2 * K) * hd + D
    if moe:
        k, F = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        Fs = F * cfg.n_shared_experts
        ins += D + Fs + k * F
        outs += 2 * Fs + D + k * (2 * F + D)
    else:
        ins += D + cfg.intermediate_size
        outs += 2 * cfg.intermediate_size + D
    return float(ins), float(outs)


MECHANISMS = ("attention_backward", "wgrad_gemm", "fp8_cast")
PHASES = ("F", "B", "R", "W")  # forward, backward input-gradient, recomputation, weight gradient


# --------------------------------------------------------------- schedules
def schedule_1f1b(pp: int, rank: int, m: int) -> list[tuple]:
    """Chunk order of one rank: ('F', phase, mb) / ('BW', phase, mb) (backward incl. weight gradient)."""
    warm = min(pp - 1 - rank, m)
    out = [("F", 0, i) for i in range(warm)]
    for i in range(m - warm):
        out += [("F", 0, warm + i), ("BW", 0, i)]
    out += [("BW", 0, i) for i in range(m - warm, m)]
    return out


def schedule_dualpipe(pp: int, rank: int, m: int) -> list[tuple]:
    """DualPipe chunk order of one rank (port of deepseek-ai/DualPipe ``DualPipe.step``).

    m: micro-batches in total (m/2 per direction). Chunks: ('F', p, mb), ('B', p, mb)
    (input gradient only, its W queued), ('BW', p, mb), ('W', p, mb), ('FB', (p, mb), (q, mb'))
    (forward of direction p overlapped with the full backward of direction q).
    """
    if pp % 2 or m % 2 or m // 2 < pp:
        raise ValueError(f"DualPipe needs an even pp and m/2 >= pp (pp={pp}, m={m})")
    nh, hc = pp // 2, m // 2
    half = min(rank, pp - 1 - rank)
    second = rank >= nh
    middle = rank in (nh - 1, nh)
    fc, bc = [0, 0], [0, 0]
    wq: deque = deque()
    out: list = []

    def ph(p):
        return p ^ second

    def F(p):
        p = ph(p)
        out.append(("F", p, fc[p]))
        fc[p] += 1

    def B(p, zb=False):
        p = ph(p)
        if zb:
            out.append(("B", p, bc[p]))
            wq.append((p, bc[p]))
        else:
            out.append(("BW", p, bc[p]))
        bc[p] += 1

    def W():
        p, i = wq.popleft()
        out.append(("W", p, i))

    def FB(pf, pb):
        pf, pb = ph(pf), ph(pb)
        out.append(("FB", (pf, fc[pf]), (pb, bc[pb])))
        fc[pf] += 1
        bc[pb] += 1

    for _ in range((nh - half - 1) * 2):       # 1: nF0
        F(0)
    for _ in range(half + 1):                  # 2: nF0F1
        F(0)
        F(1)
    for _ in range(nh - half - 1):             # 3: nB1W1F1 (zero bubble)
        B(1, zb=True)
        W()
        F(1)
    for i in range(hc - pp + half + 1):        # 4: nF0B1F1B0 (main)
        if i == 0 and middle:                  # not overlapped, to shrink the bubble (reference code)
            F(0)
            B(1)
        else:
            FB(0, 1)
        FB(1, 0)
    for _ in range(nh - half - 1):             # 5: nB1F1B0
        B(1)
        FB(1, 0)
    zb = False
    steps6 = half + 1
    for i in range(steps6):                    # 6: nB1B0 (second half zero bubble)
        if i == steps6 // 2 and half % 2 == 1:
            zb = True
        B(1, zb)
        if i == steps6 // 2 and half % 2 == 0:
            zb = True
        B(0, zb)
    for _ in range(nh - half - 1):             # 7: nWB0
        W()
        B(0, zb=True)
    for _ in range(half + 1):                  # 8: nW
        W()
    if fc != [hc, hc] or bc != [hc, hc] or wq:
        raise AssertionError(f"DualPipe schedule of rank {rank} is incomplete: F {fc}, B {bc}, W left {len(wq)}")
    return out


# --------------------------------------------------------------- chunk costs
@dataclass(frozen=True)
class StageTimes:
    """Per-device seconds of one micro-batch on one stage."""

    f_c: float
    f_m: float
    b_c: float
    b_m: float
    w_c: float


def balanced_ranges(costs, pp: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``len(costs)`` layers over ``pp`` stages (each >= 1 layer) that minimise
    the most expensive stage (linear partition by dynamic programming; ties, to a relative 1e-9: the
    earliest split).
    costs[i]: layer i's per-micro-batch compute, with the embedding folded into the first layer and
    the head (and MTP) into the last, so the stages holding them get fewer layers."""
    n = len(costs)
    if not 1 <= pp <= n:
        raise ValueError(f"{pp} stages for {n} layers")
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    best = np.full((pp + 1, n + 1), np.inf)
    cut = np.zeros((pp + 1, n + 1), int)
    best[0, 0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            i = np.arange(k - 1, j)
            v = np.maximum(best[k - 1, i], pre[j] - pre[i])
            # identical layers make many splits equally good, and their costs then differ only in
            # the rounding of the prefix sums (which a NumPy release may change): take the earliest
            # split within a relative 1e-9 of the best, so the layout does not hang on the last bit
            a = int(np.flatnonzero(v <= v.min() * (1 + 1e-9))[0])
            best[k, j], cut[k, j] = v[a], i[a]
    out, j = [], n
    for k in range(pp, 0, -1):
        out.append((int(cut[k, j]), j))
        j = cut[k, j]
    return out[::-1]


_TABLES: dict = {}


def _table(cfg, quant, device) -> OpTable:
    """The training OpTable of (model, quantisation, device), built once per process (a few hundred
    ms; attribution builds several simulators of the same scenario)."""
    key = (cfg, quant, repr(device))  # Device holds dicts (unhashable); its repr lists every field
    hit = _TABLES.get(key)
    if hit is None:
        hit = _TABLES[key] = OpTable.build(cfg, quant, device, mla_form="naive", logits="all", training=True)
    return hit


def stage_ranges(L: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as even as possible (the first stages take the remainder)."""
    base, rem = divmod(L, pp)
    out, lo = [], 0
    for s in range(pp):
        hi = lo + base + (1 if s < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


class TrainSim:
    """One training step of a scenario; ``run()`` returns the metrics dict."""

    def __init__(self, sc: Scenario | Deployment, *, record: bool = False, fixed: StageTimes | None = None,
                 p2p_s: float = 0.0, mechanisms: tuple[str, ...] | None = None):
        """fixed: the same chunk times on every stage, with sends of ``p2p_s`` and no DP traffic,
        replacing the cost model (tests of the schedules' closed forms). mechanisms: the kernel
        mechanisms applied (default: all of MECHANISMS; () gives the plain cost-model chunk times)."""
        dep = sc if isinstance(sc, Deployment) else resolve(sc)
        sc = dep.sc
        if sc.kind != "train":
            raise ScenarioError(f"{sc.source}: field 'kind': expected a train scenario, got {sc.kind!r}")
        self.mechanisms = MECHANISMS if mechanisms is None else tuple(mechanisms)
        bad = sorted(set(self.mechanisms) - set(MECHANISMS))
        if bad:
            raise ValueError(f"unknown training mechanism(s) {bad}; known: {list(MECHANISMS)}")
        self.sc, self.record, self.fixed = sc, record, fixed
        d = sc
        self.cfg, self.quant, self.node, self.device = dep.cfg, dep.quant, dep.node, dep.device
        self.par = dep.par["train"]
        self.n_dev = self.par.devices
        self.seq, self.mbs = d.seq_len, d.micro_batch
        self.m = d.global_batch // self.par.dp // self.mbs
        self.tokens_mb = self.seq * self.mbs
        self.lat = dep.latency_s
        self.ranges = stage_ranges(self.cfg.num_hidden_layers, self.par.pp)
        self.parts: list[dict] | None = None  # per stage: {phase: {op kind: seconds per micro-batch}}
        if fixed is not None:
            self.p2p_s = p2p_s
            self.stages = [fixed] * self.par.pp
        else:
            self.stages = self._stage_times()

    # ---------------------------------------------------------- chunk costs
    def _phase_rows(self, table: OpTable) -> dict:
        """Per phase: (op mask, per-op FLOP/byte multiplier) over the table's ops.

        B = the input-gradient half of every weight op + the whole backward of ops without weights;
        W = the weight-gradient half; R = the forward ops recomputed in the backward."""
        cfg = self.cfg
        phase, kinds = np.array(table.phase), np.array(table.kinds)
        fwd, bwd = phase == "fwd", phase == "bwd"
        wgt = table.has_weight_grad
        half = 1.0 / costmodel.BACKWARD_FLOPS_RATIO
        rc = self.sc.recompute
        if rc == "none":
            recomp = np.zeros_like(fwd)
        elif rc == "full":
            recomp = fwd & (table.layer >= 0) & (table.layer < cfg.num_hidden_layers)
        else:
            names = np.array(table.names)
            recomp = fwd & ((kinds == "norm") | np.isin(names, UP_PROJECTIONS))
        b_scale = np.where(bwd & wgt, half, 1.0)
        w_scale = np.full(len(phase), half)
        if "attention_backward" in self.mechanisms:
            b_scale = np.where(bwd & (kinds == "attention"), b_scale * attention_backward_time_ratio(self.seq),
                               b_scale)
        if "wgrad_gemm" in self.mechanisms and self.quant.gemm_precision == "fp8":
            for kind, ratio in WGRAD_TIME_RATIO.items():
                w_scale = np.where(kinds == kind, w_scale * ratio, w_scale)
        one = np.ones(len(phase))
        return {"F": (fwd, one), "B": (bwd, b_scale), "R": (recomp, one), "W": (bwd & wgt, w_scale)}

    def _fp8_cast_s(self, tokens: float) -> dict | None:
        """{moe layer?: {phase: seconds}} of one layer's FP8 casts for ``tokens`` tokens (per device;
        routed rows: the balanced k per token), or None when the mechanism is off / GEMMs are not FP8."""
        if "fp8_cast" not in self.mechanisms or self.quant.gemm_precision != "fp8":
            return None
        b = FP8_CAST_BYTES
        out = {}
        for moe in (False, True):
            ins, outs = fp8_gemm_widths(self.cfg, moe)
            nbytes = {"F": ins * b["forward_input"], "B": outs * b["backward_grad"],
                      "W": ins * b["backward_input_transpose"]}
            out[moe] = {ph: roofline.op_time(costmodel.Op("fp8_cast", None, "elementwise", 0.0,
                                                          act_bytes_read=v * tokens), self.device).time_s
                        for ph, v in nbytes.items()}
        return out

    def _mtp_input_s(self, tokens: float) -> dict:
        """{phase: seconds} of one MTP depth's input block for ``tokens`` tokens: two RMSNorms over D
        and eh_proj ([T, 2D] x [2D, D], the weight from reference.params with the scenario's
        quantisation), costed by sim.roofline like the cost model's own ops; backward = 2x forward
        (norms in B; eh_proj half in B, half in W with the wgrad mechanism's ratio; its input cast
        with the fp8_cast mechanism)."""
        from dsref.reference.params import tensors
        from dsref.sim.quant import tensor_bytes
        cfg, q, dev = self.cfg, self.quant, self.device
        D, ab = cfg.hidden_size, q.act_bytes
        w = {t.rel: tensor_bytes(cfg, q, t) for t in tensors(cfg, mtp=True) if t.mtp}
        proj = costmodel.Op("eh_proj", None, "gemm", 2.0 * tokens * 2 * D * D, w.get("eh_proj.weight", 0.0),
                            tokens * 2 * D * ab, tokens * D * ab, precision=q.gemm_precision, gemm_rows=float(tokens),
                            gemm_matrix_bytes=w.get("eh_proj.weight") or None)
        norm = costmodel.Op("mtp_norms", None, "norm", 2.0 * tokens * D * costmodel.RMSNORM_FLOPS_PER_ELEM,
                            w.get("enorm.weight", 0.0) + w.get("hnorm.weight", 0.0), 2 * tokens * D * ab,
                            2 * tokens * D * ab, precision="fp32")
        tp, tn = roofline.op_time(proj, dev).time_s, roofline.op_time(norm, dev).time_s
        half = costmodel.BACKWARD_FLOPS_RATIO / 2.0
        wr = WGRAD_TIME_RATIO["gemm"] if "wgrad_gemm" in self.mechanisms and q.gemm_precision == "fp8" else 1.0
        out = {"F": tp + tn, "B": half * tp + costmodel.BACKWARD_FLOPS_RATIO * tn, "R": 0.0, "W": half * tp * wr}
        if "fp8_cast" in self.mechanisms and q.gemm_precision == "fp8":
            b = FP8_CAST_BYTES
            for ph, nbytes in (("F", 2 * D * b["forward_input"]), ("B", D * b["backward_grad"]),
                               ("W", 2 * D * b["backward_input_transpose"])):
                out[ph] += roofline.op_time(costmodel.Op("fp8_cast", None, "elementwise", 0.0,
                                                         act_bytes_read=nbytes * tokens), dev).time_s
        return out

    def _stage_times(self) -> list[StageTimes]:
        cfg, dev = self.cfg, self.device
        table = _table(cfg, self.quant, dev)
        rows = self._phase_rows(table)
        kinds = np.array(table.kinds)
        kind_names = sorted(set(table.kinds))
        x = uniform(self.mbs, self.seq, 0)  # one micro-batch, no prefix
        kw = dict(mla_form="naive", logits="all", node=self.node, latency_s=self.lat, table=table)
        L = cfg.num_hidden_layers

        memo: dict = {}

        def cost(lo, hi, ph, kind=None):
            # every dense layer has the same ops, and so has every MoE layer (costmodel.forward_ops
            # builds them from one shape): a range's cost depends only on how many of each it holds
            # and on whether it holds the embedding / the head
            n_moe = sum(cfg.is_moe_layer(i) for i in range(lo, hi))
            key = (hi - lo - n_moe, n_moe, lo == 0, hi == L, ph, kind)
            if key not in memo:
                memo[key] = _cost(lo, hi, ph, kind)
            return memo[key]

        def _cost(lo, hi, ph, kind):
            mask, scale = rows[ph]
            if kind is not None:
                mask = mask & (kinds == kind)
                if not mask.any():
                    return 0.0
            return StepCost(cfg, self.quant, dev, self.par, layers=(lo, hi), rows=mask, scale=scale,
                            **kw).replica_compute_s(x)

        cast = self._fp8_cast_s(x.tokens)
        mtp_in = self._mtp_input_s(x.tokens) if self.sc.mtp else None

        def parts(lo, hi) -> dict:
            """{phase: {op kind: seconds}} of layers [lo, hi) (embedding with 0, head with L)."""
            out = {ph: {k: v for k in kind_names if (v := cost(lo, hi, ph, k))} for ph in PHASES}
            if cast is not None:
                n_moe = sum(cfg.is_moe_layer(i) for i in range(lo, hi))
                for ph in ("F", "B", "W"):
                    out[ph]["fp8_cast"] = (hi - lo - n_moe) * cast[False][ph] + n_moe * cast[True][ph]
            if self.sc.mtp and hi == L:
                # each MTP depth (TR sec. 2.2, eq. 21): RMSNorm of the previous depth's hidden state and
                # of the next token's embedding, their concatenation projected 2D -> D (eh_proj), one
                # more decoder layer and the shared output head on every token: the last layer + head,
                # plus eh_proj and the two norms
                depth = cfg.num_nextn_predict_layers
                for ph in PHASES:
                    out[ph]["mtp"] = depth * (cost(L - 1, L, ph) + mtp_in[ph])
                    if cast is not None and ph != "R":
                        out[ph]["mtp"] += depth * cast[cfg.is_moe_layer(L - 1)][ph]
            return out

        def comm(lo, hi) -> float:
            sc_ = StepCost(cfg, self.quant, dev, self.par, layers=(lo, hi), rows=rows["F"][0], **kw)
            c = sc_.comm_s(x.tokens)
            if self.sc.mtp and hi == L:
                c += cfg.num_nextn_predict_layers * StepCost(cfg, self.quant, dev, self.par, layers=(L - 1, L),
                                                             rows=rows["F"][0], **kw).comm_s(x.tokens)
            return c

        if self.sc.stage_split == "balanced":
            # stage costs are sums over their layers (embedding with layer 0, head and MTP with layer L-1)
            costs = []
            for i in range(L):
                c = sum(cost(i, i + 1, ph) for ph in PHASES)
                if cast is not None:
                    c += sum(cast[cfg.is_moe_layer(i)][ph] for ph in ("F", "B", "W"))
                if self.sc.mtp and i == L - 1:
                    c = c * (1 + cfg.num_nextn_predict_layers) + cfg.num_nextn_predict_layers * sum(mtp_in.values())
                costs.append(c)
            self.ranges = balanced_ranges(costs, self.par.pp)
        cache: dict = {}
        self.parts = []
        out = []
        for lo, hi in self.ranges:
            key = (int(lo), int(hi))
            if key not in cache:
                p = parts(*key)
                t = {ph: sum(p[ph].values()) for ph in PHASES}
                m = comm(*key)
                cache[key] = (p, StageTimes(t["F"], m, t["B"] + t["R"], m, t["W"]))
            self.parts.append(cache[key][0])
            out.append(cache[key][1])
        ops = pp_comm(cfg, self.tokens_mb, 1, self.par.pp, self.quant.act_bytes)
        self.p2p_s = sum(roofline.comm_time(c, dev, node=self.node, latency_s=self.lat) for c in ops)
        self.params = [stage_params(cfg, lo, hi, lo == 0, hi == L, self.sc.mtp) for lo, hi in self.ranges]
        # busiest EP rank's routed rows / the mean, as sim.stepcost charges them (1.0 where that
        # version of the step cost assumes perfectly balanced experts)
        probe = StepCost(cfg, self.quant, dev, self.par, layers=(0, L), rows=rows["F"][0], **kw)
        ep_tokens = x.tokens * self.par.ep
        self.ep_load_factor = (probe.rank_tokens(ep_tokens) * self.par.ep / ep_tokens
                               if hasattr(probe, "rank_tokens") and self.par.ep > 1 else 1.0)
        return out

    def _compute_share(self) -> float:
        """Share of the device's cores left to compute while EP communication kernels run
        (DeepSeek-V3 reserves 20 of the H800's 132 SMs for them, tech report sec. 3.2.2)."""
        rc = self.sc.comm_reserved_cores
        return 1.0 if not rc else (self.device.cores - rc) / self.device.cores

    def _chunk(self, rank: int, task) -> float:
        return self._chunk_split(rank, task)[0]

    def _chunk_split(self, rank: int, task) -> tuple[float, list, float, float, bool]:
        """(seconds, [(stage, phases)] computed, compute c, all-to-all m, overlapped) of one chunk."""
        st = self.stages
        ov = self.sc.ep_overlap
        dual = self.sc.schedule == "dualpipe"

        def stage(p):
            return rank if p == 0 else self.par.pp - 1 - rank
        kind = task[0]
        if kind == "FB":
            sa, sb = stage(task[1][0]), stage(task[2][0])
            a, b = st[sa], st[sb]
            c, m = a.f_c + b.b_c + b.w_c, a.f_m + b.b_m
            work = [(sa, ("F",)), (sb, ("B", "R", "W"))]
            return (max(c / self._compute_share(), m) if ov else c + m), work, c, m, ov
        si = stage(task[1])
        s = st[si]
        if kind == "F":
            c, m, ph = s.f_c, s.f_m, ("F",)
        elif kind == "B":
            c, m, ph = s.b_c, s.b_m, ("B", "R")
        elif kind == "BW":
            c, m, ph = s.b_c + s.w_c, s.b_m, ("B", "R", "W")
        else:
            return s.w_c, [(si, ("W",))], s.w_c, 0.0, False
        hide = ov and not dual
        return (max(c / self._compute_share(), m) if hide else c + m), [(si, ph)], c, m, hide

    def _dp_tail(self, rank: int) -> dict:
        """ZeRO-1 reduce-scatter, AdamW on the shard, all-gather for this rank's parameters."""
        if self.fixed is not None:
            return {"reduce_scatter_s": 0.0, "optimizer_s": 0.0, "all_gather_s": 0.0}
        stages = [rank] + ([self.par.pp - 1 - rank] if self.sc.schedule == "dualpipe" else [])
        dense = sum(self.params[s][0] for s in stages) / self.par.tp
        expert = sum(self.params[s][1] for s in stages) / self.par.ep
        dp_exp = self.par.expert_dp
        comm = dp_zero1_comm(dense, self.par.dp) + dp_zero1_comm(expert, dp_exp)
        t = {"reduce_scatter_s": 0.0, "all_gather_s": 0.0}
        for c in comm:
            key = "reduce_scatter_s" if "reduce_scatter" in c.name else "all_gather_s"
            t[key] += roofline.comm_time(c, self.device, node=self.node, latency_s=self.lat)
        shard = dense / self.par.dp + expert / dp_exp
        adam = costmodel.Op("adamw", None, "elementwise", costmodel.ADAM_FLOPS_PER_PARAM * shard, 0.0,
                            shard * (costmodel.ADAM_STATE_BYTES + costmodel.ADAM_GRAD_BYTES),
                            shard * costmodel.ADAM_STATE_BYTES, precision="fp32", phase="optim")
        t["optimizer_s"] = roofline.op_time(adam, self.device).time_s
        return t

    # ---------------------------------------------------------- simulation
    def run(self) -> dict:
        wall0 = time.perf_counter()
        env = simpy.Environment()
        pp, m = self.par.pp, self.m
        sched = schedule_dualpipe if self.sc.schedule == "dualpipe" else schedule_1f1b
        orders = [sched(pp, r, m) for r in range(pp)]  # each rank's chunk order
        done: dict = {}
        spans: list = []
        busy = [0.0] * pp
        last_bwd_start = [0.0] * pp
        end = [0.0] * pp
        # per rank: micro-batch chunks run per (stage, phase), and how each chunk's all-to-all went
        acct = [{"work": {}, "sm_reserved_s": 0.0, "ep_comm_exposed_s": 0.0, "ep_comm_hidden_s": 0.0}
                for _ in range(pp)]

        def ev(key):
            e = done.get(key)
            if e is None:
                e = done[key] = env.event()
            return e

        def inputs(rank, kind, p, mb):
            """(event, send delay) this chunk waits for."""
            fwd_dir = 1 if p == 0 else -1  # direction-0 data flows rank 0 -> pp-1
            if kind == "F":
                prev = rank - fwd_dir
                return [(ev(("F", p, mb, prev)), self.p2p_s)] if 0 <= prev < pp else []
            if kind in ("B", "BW"):
                nxt = rank + fwd_dir
                if 0 <= nxt < pp:
                    return [(ev(("B", p, mb, nxt)), self.p2p_s)]
                return [(ev(("F", p, mb, rank)), 0.0)]
            return []

        def proc(rank):
            for task in orders[rank]:
                if task[0] == "FB":
                    parts = [("F",) + task[1], ("BW",) + task[2]]
                else:
                    parts = [task]
                for kind, p, mb in parts:
                    for e, delay in inputs(rank, kind, p, mb):
                        if not e.triggered:
                            yield e
                        t_ready = e.value + delay
                        if t_ready > env.now:
                            yield env.timeout(t_ready - env.now)
                dt, work, c, m_s, hidden = self._chunk_split(rank, task)
                a = acct[rank]
                for st_i, phs in work:
                    for ph in phs:
                        a["work"][(st_i, ph)] = a["work"].get((st_i, ph), 0) + 1
                # overlapped: compute stretched to c / share (the SMs the all-to-all holds), the
                # all-to-all exposed where it outlasts that; not overlapped: c + m
                a["sm_reserved_s"] += (dt - c - max(0.0, dt - c / self._compute_share())) if hidden else 0.0
                a["ep_comm_exposed_s"] += max(0.0, dt - c / self._compute_share()) if hidden else dt - c
                a["ep_comm_hidden_s"] += m_s - (max(0.0, dt - c / self._compute_share()) if hidden else dt - c)
                start = env.now
                if task[0] != "F":
                    last_bwd_start[rank] = start
                yield env.timeout(dt)
                busy[rank] += dt
                for kind, p, mb in parts:
                    if kind == "W":
                        continue
                    key = ("F" if kind == "F" else "B", p, mb, rank)
                    ev(key).succeed(env.now)
                if self.record:
                    spans.append((rank, _label(task), start, dt, "compute"))
            end[rank] = env.now

        for r in range(pp):
            env.process(proc(r))
        env.run()
        events = len(done) + sum(len(o) for o in orders)
        span = max(end)
        tails = []
        step = 0.0
        for r in range(pp):
            t = self._dp_tail(r)
            rs_start = last_bwd_start[r] if self.sc.dp_overlap else end[r]
            rs_end = max(end[r], rs_start + t["reduce_scatter_s"])
            fin = rs_end + t["optimizer_s"] + t["all_gather_s"]
            tails.append(dict(t, exposed_s=fin - end[r], finish_s=fin, reduce_scatter_exposed_s=rs_end - end[r]))
            step = max(step, fin)
            if self.record:
                for sp in ((r, "dp reduce-scatter", rs_start, t["reduce_scatter_s"], "dp comm"),
                           (r, "optimizer", rs_end, t["optimizer_s"], "compute"),
                           (r, "dp all-gather", rs_end + t["optimizer_s"], t["all_gather_s"], "dp comm")):
                    if sp[3] > 0:
                        spans.append(sp)
        bubble = 1.0 - sum(busy) / (pp * span) if span > 0 else 0.0
        self.spans = spans
        crit = max(range(pp), key=lambda r: tails[r]["finish_s"])
        att = self._attribution(crit, acct[crit], busy[crit], end[crit], tails[crit])
        return self._metrics(step, span, bubble, busy, tails, events, time.perf_counter() - wall0, att)

    def _attribution(self, rank: int, acct: dict, busy: float, end: float, tail: dict) -> dict:
        """The step time of ``rank`` (the one that finishes last) split into what it spent it on;
        the entries add up to its finish time (= the step time)."""
        kinds: dict = {}
        for (st_i, ph), n in acct["work"].items():
            if self.parts is None:  # fixed chunk times: phases only
                v = {"F": self.stages[st_i].f_c, "B": self.stages[st_i].b_c, "W": self.stages[st_i].w_c,
                     "R": 0.0}[ph]
                items = {f"phase_{ph}": v}.items()
            else:
                items = self.parts[st_i][ph].items()
            for k, v in items:
                key = "recompute" if ph == "R" else k
                kinds[key] = kinds.get(key, 0.0) + n * v
        compute = sum(kinds.values())
        out = {"rank": rank,
               "compute_by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
               "compute_s": compute,
               "sm_reserved_for_ep_s": acct["sm_reserved_s"],
               "ep_comm_exposed_s": acct["ep_comm_exposed_s"],
               "ep_comm_hidden_s": acct["ep_comm_hidden_s"],
               "pipeline_idle_s": end - busy,
               "dp_reduce_scatter_exposed_s": tail.get("reduce_scatter_exposed_s", 0.0),
               "optimizer_s": tail["optimizer_s"], "dp_all_gather_s": tail["all_gather_s"]}
        out["total_s"] = (compute + out["sm_reserved_for_ep_s"] + out["ep_comm_exposed_s"] + out["pipeline_idle_s"]
                          + out["dp_reduce_scatter_exposed_s"] + out["optimizer_s"] + out["dp_all_gather_s"])
        return out

    def dualpipe_bubble_formula_s(self) -> float | None:
        """DeepSeek-V3 TR sec. 3.2.1 (Table 2): DualPipe's bubble per rank (PP/2 - 1)(F&B + B - 3W),
        with this simulator's chunk times of a middle rank (F&B: an overlapped pair; B: a lone
        input-gradient chunk with its all-to-all; W: a weight-gradient chunk). None for 1F1B."""
        pp = self.par.pp
        if self.sc.schedule != "dualpipe":
            return None
        r = pp // 2 - 1
        fb = self._chunk(r, ("FB", (0, 0), (1, 0)))
        b = self._chunk(r, ("B", 1, 0))
        w = self._chunk(r, ("W", 1, 0))
        return (pp / 2 - 1) * (fb + b - 3 * w)

    def _metrics(self, step, span, bubble, busy, tails, events, wall, att) -> dict:
        sc, cfg, dev = self.sc, self.cfg, self.device
        tokens = sc.global_batch * self.seq
        flops_tok = costmodel.training_flops_per_token(cfg, self.seq, recompute="none")
        model_flops = flops_tok * tokens
        peaks = {p: dev.peak(p) for p in ("bf16", "fp8")}
        tok_s = tokens / step
        good = sc.goodput
        dev_hours = sc.token_budget / (tok_s * good) / SECONDS_PER_HOUR * self.n_dev
        price = dev.price_usd_per_hour
        st = self.stages
        return {
            "scenario": sc.name, "model": cfg.name, "device": dev.id, "devices": self.n_dev,
            "schedule": sc.schedule, "pp": self.par.pp, "dp": self.par.dp, "ep": self.par.ep, "tp": self.par.tp,
            "micro_batches_per_step": self.m, "micro_batch_sequences": self.mbs, "seq_len": self.seq,
            "tokens_per_step": tokens,
            "step_time_s": step, "pipeline_time_s": span, "bubble_fraction": bubble,
            "mfu": model_flops / (step * self.n_dev * peaks[DEFAULT_MFU_PRECISION]),
            "mfu_peak": f"{DEFAULT_MFU_PRECISION} dense peak of {dev.id} ({peaks['bf16'] / 1e12:.0f} TFLOP/s)",
            "mfu_vs_fp8_peak": model_flops / (step * self.n_dev * peaks["fp8"]),
            "model_flops_per_token": flops_tok,
            "model_flops_note": "costmodel.training_flops_per_token: 3x forward matmul FLOPs incl. causal attention, "
                                "no recomputation",
            "tokens_per_s": tok_s, "tokens_per_day": tok_s * good * SECONDS_PER_DAY, "goodput": good,
            "token_budget": sc.token_budget, "device_hours": dev_hours,
            "device_hours_at_full_goodput": dev_hours * good,
            "days": sc.token_budget / (tok_s * good) / SECONDS_PER_DAY,
            "compute_share_while_communicating": self._compute_share(), "mtp": sc.mtp,
            "cost_usd": dev_hours * price if price is not None else None,
            "breakdown": {
                "stage_forward_compute_s": [s.f_c for s in st], "stage_forward_comm_s": [s.f_m for s in st],
                "stage_backward_input_compute_s": [s.b_c for s in st],
                "stage_weight_grad_compute_s": [s.w_c for s in st],
                "p2p_send_s": self.p2p_s, "rank_busy_s": busy,
                "dp_tail_s": tails, "recompute": sc.recompute, "ep_overlap": sc.ep_overlap,
                "dp_overlap": sc.dp_overlap,
                "stage_layers": [[int(lo), int(hi)] for lo, hi in self.ranges],
                "stage_compute_by_kind_s": self.parts,
                "step_attribution": att,
                "dualpipe_bubble_formula_s": self.dualpipe_bubble_formula_s() if self.fixed is None else None,
                "ep_busiest_rank_load_factor": getattr(self, "ep_load_factor", 1.0),
                # TR sec. 3.2.1: cross-node EP makes computation : communication about 1:1 (forward chunk
                # of a middle stage, compute at all SMs)
                "middle_stage_forward_compute_to_all_to_all": (st[len(st) // 2].f_c / st[len(st) // 2].f_m
                                                               if st[len(st) // 2].f_m else None),
                "mechanisms": list(self.mechanisms),
                "mechanism_multipliers": {"attention_backward_time": attention_backward_time_ratio(self.seq),
                                          "wgrad_time_dense_fp8": WGRAD_TIME_RATIO["gemm"],
                                          "wgrad_time_grouped_fp8": WGRAD_TIME_RATIO["moe_gemm"]},
            },
            "events": events, "sim_wall_s": wall,
        }


def _label(task) -> str:
    if task[0] == "FB":
        return f"F{task[1][0]}#{task[1][1]}+B{task[2][0]}#{task[2][1]}"
    return f"{task[0]}{task[1]}#{task[2]}"


def simulate(sc: Scenario, **kw) -> dict:
    return TrainSim(sc, **kw).run()


def mechanism_effects(sc: Scenario, base: dict | None = None) -> dict:
    """Step time with every kernel mechanism, without each one in turn, and without any (the plain
    cost model): what each mechanism adds to the step (its removal's saving; they interact only
    through max() in the overlapped chunks and the pipeline, so the parts need not add up exactly)."""
    base = base if base is not None else simulate(sc)
    t0 = base["step_time_s"]
    out = {"step_time_s": t0, "added_s": {}, "added_fraction": {}}
    for name in MECHANISMS:
        t = simulate(sc, mechanisms=tuple(n for n in MECHANISMS if n != name))["step_time_s"]
        out["added_s"][name] = t0 - t
        out["added_fraction"][name] = (t0 - t) / t
    plain = simulate(sc, mechanisms=())["step_time_s"]
    out["plain_cost_model_step_time_s"] = plain
    out["all_added_fraction"] = (t0 - plain) / plain
    return out
