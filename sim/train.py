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
from dsref.sim.stepcost import OpTable, StepCost, StepFeatures, uniform

SECONDS_PER_DAY = 86400.0
SECONDS_PER_HOUR = 3600.0
UP_PROJECTIONS = ("q_b_proj", "kv_b_expand")  # MLA up-projections (naive/training form), DeepSeek-V3 sec. 3.2.3
DEFAULT_MFU_PRECISION = "bf16"


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
    the most expensive stage (linear partition by dynamic programming; ties: the earliest split).
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
            a = int(np.argmin(v))
            best[k, j], cut[k, j] = v[a], i[a]
    out, j = [], n
    for k in range(pp, 0, -1):
        out.append((int(cut[k, j]), j))
        j = cut[k, j]
    return out[::-1]


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
                 p2p_s: float = 0.0):
        """fixed: the same chunk times on every stage, with sends of ``p2p_s`` and no DP traffic,
        replacing the cost model (tests of the schedules' closed forms)."""
        dep = sc if isinstance(sc, Deployment) else resolve(sc)
        sc = dep.sc
        if sc.kind != "train":
            raise ScenarioError(f"{sc.source}: field 'kind': expected a train scenario, got {sc.kind!r}")
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
        if fixed is not None:
            self.p2p_s = p2p_s
            self.stages = [fixed] * self.par.pp
        else:
            self.stages = self._stage_times()

    # ---------------------------------------------------------- chunk costs
    def _stage_times(self) -> list[StageTimes]:
        cfg, dev = self.cfg, self.device
        table = OpTable.build(cfg, self.quant, dev, mla_form="naive", logits="all", training=True)
        phase = np.array(table.phase)
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
            recomp = fwd & ((np.array(table.kinds) == "norm") | np.isin(names, UP_PROJECTIONS))
        par = self.par
        x = uniform(self.mbs, self.seq, 0)  # one micro-batch, no prefix
        kw = dict(mla_form="naive", logits="all", node=self.node, latency_s=self.lat, table=table)
        L = cfg.num_hidden_layers

        mtp = self._mtp_times(table, x, kw) if self.sc.mtp else None  # once: the balanced split needs it too

        def times(lo, hi):
            f = StepCost(cfg, self.quant, dev, par, layers=(lo, hi), rows=fwd, **kw)
            b_scale = np.where(bwd & wgt, half, 1.0)
            b = StepCost(cfg, self.quant, dev, par, layers=(lo, hi), rows=bwd, scale=b_scale, **kw)
            w = StepCost(cfg, self.quant, dev, par, layers=(lo, hi), rows=bwd & wgt, scale=np.full(len(phase), half),
                         **kw)
            r = StepCost(cfg, self.quant, dev, par, layers=(lo, hi), rows=recomp, **kw)
            f_c = f.replica_compute_s(x)
            b_c = b.replica_compute_s(x) + r.replica_compute_s(x)
            w_c = w.replica_compute_s(x)
            comm = f.comm_s(x.tokens)
            if mtp is not None and hi == L:
                f_c, b_c, w_c, comm = (v + e for v, e in zip((f_c, b_c, w_c, comm), mtp))
            return StageTimes(f_c, comm, b_c, comm, w_c)

        if self.sc.stage_split == "balanced":
            # stage costs are sums over their layers (embedding with layer 0, head and MTP with layer L-1)
            costs = [t.f_c + t.b_c + t.w_c for t in (times(i, i + 1) for i in range(L))]
            self.ranges = balanced_ranges(costs, self.par.pp)
        out = [times(lo, hi) for lo, hi in self.ranges]
        ops = pp_comm(cfg, self.tokens_mb, 1, self.par.pp, self.quant.act_bytes)
        self.p2p_s = sum(roofline.comm_time(c, dev, node=self.node, latency_s=self.lat) for c in ops)
        self.params = [stage_params(cfg, lo, hi, lo == 0, hi == L, self.sc.mtp) for lo, hi in self.ranges]
        return out

    def _mtp_times(self, table: OpTable, x: StepFeatures, kw: dict) -> tuple[float, float, float, float]:
        """(F, B, W compute, EP comm) of the MTP module(s) on the last stage, per micro-batch.

        Each MTP depth is one more transformer layer plus the shared output head on every
        token (tech report sec. 2.2), costed as the model's last layer + head; its eh_proj
        (2D x D per token, ~8% of the module's FLOPs for V3) and two RMSNorms are not counted.
        """
        cfg, par = self.cfg, self.par
        L, depth = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        phase = np.array(table.phase)
        fwd, bwd = phase == "fwd", phase == "bwd"
        half = 1.0 / costmodel.BACKWARD_FLOPS_RATIO
        last = (L - 1, L)
        f = StepCost(cfg, self.quant, self.device, par, layers=last, rows=fwd, **kw)
        b = StepCost(cfg, self.quant, self.device, par, layers=last, rows=bwd,
                     scale=np.where(bwd & table.has_weight_grad, half, 1.0), **kw)
        w = StepCost(cfg, self.quant, self.device, par, layers=last, rows=bwd & table.has_weight_grad,
                     scale=np.full(len(phase), half), **kw)
        return (depth * f.replica_compute_s(x), depth * b.replica_compute_s(x),
                depth * w.replica_compute_s(x), depth * f.comm_s(x.tokens))

    def _compute_share(self) -> float:
        """Share of the device's cores left to compute while EP communication kernels run
        (DeepSeek-V3 reserves 20 of the H800's 132 SMs for them, tech report sec. 3.2.2)."""
        rc = self.sc.comm_reserved_cores
        return 1.0 if not rc else (self.device.cores - rc) / self.device.cores

    def _chunk(self, rank: int, task) -> float:
        st = self.stages
        ov = self.sc.ep_overlap
        dual = self.sc.schedule == "dualpipe"

        def stage(p):
            return rank if p == 0 else self.par.pp - 1 - rank
        kind = task[0]
        if kind == "FB":
            a, b = st[stage(task[1][0])], st[stage(task[2][0])]
            c, m = a.f_c + b.b_c + b.w_c, a.f_m + b.b_m
            return max(c / self._compute_share(), m) if ov else c + m
        s = st[stage(task[1])]
        if kind == "F":
            c, m = s.f_c, s.f_m
        elif kind == "B":
            c, m = s.b_c, s.b_m
        elif kind == "BW":
            c, m = s.b_c + s.w_c, s.b_m
        else:
            return s.w_c
        return max(c / self._compute_share(), m) if (ov and not dual) else c + m

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
                dt = self._chunk(rank, task)
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
            tails.append(dict(t, exposed_s=fin - end[r], finish_s=fin))
            step = max(step, fin)
            if self.record:
                for sp in ((r, "dp reduce-scatter", rs_start, t["reduce_scatter_s"], "dp comm"),
                           (r, "optimizer", rs_end, t["optimizer_s"], "compute"),
                           (r, "dp all-gather", rs_end + t["optimizer_s"], t["all_gather_s"], "dp comm")):
                    if sp[3] > 0:
                        spans.append(sp)
        bubble = 1.0 - sum(busy) / (pp * span) if span > 0 else 0.0
        self.spans = spans
        return self._metrics(step, span, bubble, busy, tails, events, time.perf_counter() - wall0)

    def _metrics(self, step, span, bubble, busy, tails, events, wall) -> dict:
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
            },
            "events": events, "sim_wall_s": wall,
        }


def _label(task) -> str:
    if task[0] == "FB":
        return f"F{task[1][0]}#{task[1][1]}+B{task[2][0]}#{task[2][1]}"
    return f"{task[0]}{task[1]}#{task[2]}"


def simulate(sc: Scenario, **kw) -> dict:
    return TrainSim(sc, **kw).run()
