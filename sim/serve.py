"""Discrete-event simulation (SimPy) of LLM serving: prefill/decode instances, continuous batching.

Model
  * Requests are lightweight records (rows of NumPy arrays indexed by request id),
    never SimPy processes. Arrivals (Poisson / constant / JSONL trace) are drawn up
    front from the scenario's seed with one ``numpy.random.Generator`` per stream
    (arrivals, prompt lengths, output lengths).
  * Each instance (prefill, decode, or aggregated) is one SimPy process that runs
    *steps*; a step is one ``env.timeout(step_time)``. Events scale with steps,
    not tokens: a decode step advances every running request by 1 + acceptance
    tokens (MTP). Prefill instances pull from a global FIFO queue of arrived
    requests (a pointer into the time-sorted arrival arrays; the batch's step
    features are O(1) prefix-sum differences). An idle instance sleeps and is
    woken by the arrival process at the next arrival (so at low load every
    arrival is an event, at high load none is needed).
  * Step time: ``sim.stepcost`` (the cost model's ops + sim.roofline), per device
    under DP attention (per-device share = ceil(n/dp)/n of the batch: the busiest
    rank sets the step), EP dispatch/combine from sim.comm; two-micro-batch
    overlap gives max(2*compute(half batch), comm); MTP verifies 1 draft token per
    sequence (2 tokens through the model, plus one extra layer + head for the MTP
    module) and yields 1 + acceptance tokens per step on average.
  * KV cache: capacity per instance = (device memory - weights per device -
    activation reserve) / latent KV bytes per token x DP ranks (sim.deployment).
    DeepSeek-V4: bytes per token of its compressed entries, and every request also
    books ``kv_fixed_tokens`` for its sliding windows (sim.deployment._kv_capacity).
    A decode instance admits a request only when its prompt fits; generation
    grows the cache; when it overflows the newest requests are preempted
    (recompute: back to the prefill queue with prompt + generated tokens).
  * Disaggregated: the prompt's KV (sim.comm.kv_transfer_bytes; V4: the booked
    windows + compressed entries) crosses the
    network after prefill over the prefill instance's NICs, one FIFO lane per
    device (exactly a simpy.Resource(capacity=devices) with FIFO service,
    computed without a process per transfer); the request is assigned to the
    least-loaded decode instance. TTFT = arrival -> prefill done + KV transferred
    (the first token is sampled by prefill and streamed from the decode side).
  * Aggregated: each step mixes the running decode batch with prefill of queued
    requests up to the token budget (chunked prefill without splitting a prompt);
    the step time is prefill time + decode time (weight reads not shared: a
    conservative simplification).
"""

from __future__ import annotations

from array import array
import gc
import math
from bisect import bisect_right
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from dsref.sim import roofline
from dsref.sim.comm import CommOp, kv_transfer_bytes
from dsref.sim.scenario import Scenario, ScenarioError
from dsref.sim.deployment import Deployment, mtp_depths, mtp_tokens_per_step, resolve
from dsref.sim.serve_workload import Workload, make_workload, read_trace  # noqa: F401 (re-exported)
from dsref.sim.stepcost import RequestTable, StepFeatures, feature_key, request, uniform, zero

PROGRESS_MIN_WALL_S = 2.0  # show a progress bar only for runs expected to take longer
MAX_TRACE_EVENTS = 200_000
DISPATCH_MIN_CHUNK = 32  # a prefill batch is split over at most len(batch) / 32 decode instances
NEVER = 1 << 62  # a step number no run reaches


# ---------------------------------------------------------------- the model
@dataclass
class Recorder:
    """Optional timeline for traces and plots (bounded)."""

    on: bool = False
    spans: list = field(default_factory=list)     # (pid, tid, name, start, dur, args)
    counters: list = field(default_factory=list)  # (name, t, values)

    def span(self, pid, tid, name, start, dur, args=None):
        if self.on and len(self.spans) < MAX_TRACE_EVENTS:
            self.spans.append((pid, tid, name, start, dur, args or {}))


def _fin_steps(remaining: np.ndarray, tps: float) -> np.ndarray:
    """Decode steps until a request with ``remaining`` tokens to generate finishes (vectorised
    ``_fin_step``: the same float operations, so the same integers)."""
    return np.where(remaining > tps, np.ceil(remaining / tps - 1e-9), 1).astype(np.int64)


def _fin_step(remaining: int, tps: float) -> int:
    return math.ceil(remaining / tps - 1e-9) if remaining > tps else 1


class _Shared:
    """State shared by the processes of one run (no module-level state)."""

    def __init__(self, env, wl: Workload, tps: float, topk: int | None = None):
        """tps: tokens per decode step of the decoding role (all its instances alike); topk: the
        model's index_topk (DeepSeek-V3.2 sparse attention), None for dense attention."""
        self.env = env
        self.wl = wl
        n = wl.n
        self.head = 0                       # next never-prefilled request
        self.retry: deque = deque()         # preempted: (id, prompt incl. generated, cached, generated)
        self.idle: list = []                # idle pulling instances (wake events)
        self.first = np.full(n, np.nan)     # first-token time
        self.done = np.full(n, np.nan)      # set at prefill for 1-token outputs, else by finish_times()
        # each request's latest decode join: the instance (-1: none, or preempted since) and the
        # step at whose end it finishes there; done times are resolved from these and each
        # instance's step end times once, at the end (finish_times)
        self.join_inst = np.full(n, -1, np.int32)
        self.join_fin = np.zeros(n, np.int64)
        self.preemptions = 0
        self.kv_blocked_steps = 0   # steps at which the head of a queue waited for KV-cache space
        self.rejected = 0           # requests larger than an empty instance's KV cache
        self.features = RequestTable(wl.prompt - wl.cached, wl.cached, topk)  # fresh prompts, arrival order
        self.cum_new = np.concatenate([[0.0], np.cumsum(wl.prompt - wl.cached)]).astype(float)
        # prompt tokens and 1-token outputs as integer prefix sums: a batch's total (exact in any
        # order) and "any request of this batch done at prefill?" in O(1)
        self.cum_prompt = np.concatenate([[0], np.cumsum(wl.prompt)])
        # prompts as floats (exact: integers < 2**53): a decode request's context, so that
        # admission's context - tps * step is float - float (int64 - float casts, several x slower)
        self.prompt_f = wl.prompt.astype(np.float64)
        self.cum_one = np.concatenate([[0], np.cumsum(wl.output <= 1)])
        self.fin_fresh = _fin_steps(wl.output - 1, tps)  # decode steps of each fresh request
        # finish buckets are a ring indexed by step: longer than any request's decode steps
        self.fin_ring = 1 << (int((int(wl.output.max()) if n else 1) / tps) + 2).bit_length()
        self.tokens_in = 0.0

        self.tokens_out = 0.0

    def arrived(self) -> int:
        return int(self.wl.t.searchsorted(self.env.now, "right"))

    def queued(self) -> int:
        return self.arrived() - self.head + len(self.retry)


class _Chunk:
    """Requests handed to one decode instance together (one prefill step's share; in aggregated
    mode one step's prefilled requests), in the order they become ready (KV transferred), ties
    by id. Ready times as a Python list (bisect); contexts, finish offsets and ids as NumPy
    arrays: the admission copies a cohort's slice out with tolist() when it needs Python numbers
    (fresh objects, in cache; per-request Python objects made at dispatch were cold by then)."""

    __slots__ = ("pos", "t", "ctx", "fin", "fin_min", "fin_max", "gen", "ids")

    def __init__(self, t, ctx, fin, gen, ids, fin_min=None, fin_max=None):
        self.pos = 0                # requests before pos have moved to the waiting queue
        self.t = t                  # ready times (sorted list); None: all ready
        self.ctx = ctx              # context at join (prompt + generated tokens), float64 (integers)
        self.fin = fin              # decode steps until the request finishes, int64
        self.fin_min = int(fin.min()) if fin_min is None else fin_min
        self.fin_max = int(fin.max()) if fin_max is None else fin_max
        self.gen = gen              # tokens generated before joining; None: 1 each (fresh requests)
        self.ids = ids              # request ids, int64


class Instance:
    """One instance: role 'prefill', 'decode' or 'aggregated'.

    Decode bookkeeping, per step and per cohort of requests, never per token: requests
    arrive in chunks (_Chunk; ``ready`` while their KV is in transfer), move to the FIFO
    ``waiting`` queue (segments [chunk, from, to]) when ready, and join when KV space and
    a slot allow. A request's finish step is fixed when it joins (every step advances
    every request by ``tps`` tokens): the ring ``_fin_n`` / ``_fin_c`` (indexed by step
    mod its length) holds how many finish at each step and the sum of their s0 terms, so
    retiring is O(1) per step; the summed context is s0 + n * tps * step (s0 = sum of
    context at join - tps * join step). A cohort that fits with room to spare (the usual
    case) joins without touching the ring: its bucket terms wait in ``_pend_*`` and are added
    in join order with np.add.at (``_flush``) no later than the step its first request
    finishes; every bucket gets the same sequential sum as with per-request updates, and
    s0 and the free room are still summed request by request, so every float is the same
    (``fast_admission = False`` keeps the per-request path as the reference; near the KV
    capacity that path is taken anyway). Which requests finished when is not needed during
    the run: each request's join (instance, finish step) is recorded (_Shared.join_inst /
    join_fin, written with the buckets) and resolved into done times with the instance's step
    end times (``step_end``) once at the end. ``order`` lists the
    cohorts [chunk, lo, top, join step, last finish step] in join order for
    LIFO preemption (from ``top`` down; finished requests skipped, finished cohorts pruned
    now and then).
    """

    # False: admit one request at a time, finish buckets written at once (the reference the fast
    # path must match bit for bit; tests/test_sim_serve.py)
    fast_admission = True

    def __init__(self, sim: "ServeSim", role: str, idx: int):
        self.sim, self.role, self.idx = sim, role, idx
        sc = sim.sc
        r = sc.instance(role)
        self.par = sim.dep.par[role]
        self.name = f"{role}-{idx}"
        self.busy_s = 0.0
        self.compute_s = 0.0
        self.steps = 0
        self.kv_cap = sim.capacity[role]["kv_tokens_per_instance"]
        self.kv_fixed = sim.capacity[role]["kv_fixed_tokens"]  # booked per running request (V4: windows)
        self.budget = r.token_budget_per_device * self.par.dp
        self.max_req = r.max_requests_per_step or 10**12
        self.max_batch = r.max_batch_per_device * self.par.dp
        self.mtp_depth = len(mtp_depths(r))  # draft tokens per step (0: MTP off)
        self.tps = mtp_tokens_per_step(mtp_depths(r))
        self.mtp = self.mtp_depth > 0
        self.two_mb = r.two_microbatch_overlap
        self.ready: list = []          # chunks in KV transfer
        self.waiting: deque = deque()  # [chunk, from, to]: ready, waiting for KV space / a slot
        self.n_run = 0
        self.order: list = []
        self._prune_at = 4096
        self.pending = 0               # requests in transfer or waiting
        self.step_end: list = []       # end time of each decode step (finish_times)
        self.step_idx = 0
        self.s0 = 0.0
        self.wake = sim.env.event()
        self.sleep_until = math.inf
        self.lanes = np.zeros(self.par.devices)  # NIC lanes: time each becomes free (disaggregated prefill)
        self.lane_i = 0
        # decode step times by (busiest rank's batch, mean context): one cache per role, shared by
        # its instances (same step cost, layout and MTP), so a step time computed by one is a hit
        # for the others
        self._dcache: dict = sim.decode_caches.setdefault(role, {})

    # ------------------------------------------------------------ step times
    def prefill_time(self, x: StepFeatures) -> tuple[float, float]:
        """Step time of prefilling the batch ``x`` (the whole instance's requests)."""
        fixed = self.sim.prefill_service
        if fixed is not None:
            t = fixed(x)
            return t, t
        cost = self.sim.cost[self.role]
        tot, comp, _ = cost["prefill"].prefill(x, two_microbatch=self.two_mb)
        mha = cost.get("prefill_mha")  # V3.2: the masked-MHA mode when it is cheaper (short prompts)
        if mha is not None:
            t2, c2, _ = mha.prefill(x, two_microbatch=self.two_mb)
            if t2 < tot:
                tot, comp = t2, c2
        return tot, comp

    def decode_time(self, n: int, ctx_sum: float) -> tuple[float, float]:
        """Step time for n running sequences with summed context ctx_sum (busiest DP rank)."""
        per = -(-n // self.par.dp)
        q = self.sim.ctx_quantum
        mean_ctx = ctx_sum / n
        if q:
            mean_ctx = round(mean_ctx / q) * q
        key = (per, mean_ctx)
        hit = self._dcache.get(key)
        if hit is not None:
            return hit
        d = self.mtp_depth
        T = 1.0 + d  # MTP: the d draft tokens are verified with the next one in one step
        cost = self.sim.cost[self.role]
        tot, comp, _ = cost["decode"].decode(uniform(per, T, mean_ctx, self.sim.topk), two_microbatch=self.two_mb)
        if self.mtp:  # drafting: the MTP module (one layer + head) runs d times on one token per sequence
            extra = d * cost["mtp"].decode_compute_s(uniform(per, 1.0, mean_ctx, self.sim.topk))
            tot += extra
            comp += extra
        out = (tot, comp)
        if len(self._dcache) < 500_000:
            self._dcache[key] = out
        return out

    # ------------------------------------------------------------ prefill batching
    def take_prefill(self, budget: float, kv_free: float | None):
        """Pop queued requests up to the token budget (retries first, then fresh ones in arrival order).

        Returns (retries [(id, prompt, cached, generated)], fresh range (a, b), features, new tokens).
        """
        sh = self.sim.sh
        retries: list = []
        x = zero(self.sim.topk)
        fx = self.sim.capacity[self.role]["kv_fixed_tokens"]
        used = 0.0
        while sh.retry and len(retries) < self.max_req:
            rid, prompt, cached, gen = sh.retry[0]
            new = prompt - cached
            if retries and used + new > budget:
                break
            if kv_free is not None and prompt + fx > kv_free:
                break
            sh.retry.popleft()
            retries.append((rid, prompt, cached, gen))
            x = x + request(new, cached, self.sim.topk)
            used += new
            if kv_free is not None:
                kv_free -= prompt + fx
        a = b = sh.head
        b_max = sh.arrived()
        if a < b_max and len(retries) < self.max_req and (used < budget or not retries):
            cum = sh.cum_new
            b = int(cum.searchsorted(cum[a] + (budget - used), "right")) - 1
            b = min(max(b, a + (0 if retries else 1)), b_max, a + self.max_req - len(retries))
            if kv_free is not None and b > a:  # aggregated: the prompts must fit in the KV cache
                csum = np.cumsum(self.sim.wl.prompt[a:b] + fx if fx else self.sim.wl.prompt[a:b])
                b = a + int(np.searchsorted(csum, kv_free, side="right"))
            if b > a:
                span = sh.features.span(a, b)
                x = x + span if retries else span  # 0.0 + v == v: the same features
                used += float(cum[b] - cum[a])
                sh.head = b
        return retries, (a, b), x, used

    # ------------------------------------------------------------ processes
    def run_prefill(self):
        sim, env, sh, wl = self.sim, self.sim.env, self.sim.sh, self.sim.wl
        L = len(self.lanes)
        perm = (np.arange(L) + np.arange(L)[:, None]) % L  # perm[i]: lanes i, i+1, ... (mod L)
        dec_tps = sim.decoders[0].tps
        rec = sim.rec
        while True:
            retries, (a, b), x, used = self.take_prefill(self.budget, None)
            if not retries and b == a:
                yield from self._sleep_until_arrival()
                continue
            dt, comp = self.prefill_time(x)
            start = env.now
            yield env.timeout(dt)
            nr = len(retries)
            n_req = nr + b - a
            self.busy_s += dt  # _account, inlined
            self.compute_s += comp
            self.steps += 1
            if rec.on:
                rec.span(self.role, self.name, "prefill", start, dt, {"requests": n_req, "new_tokens": used})
            now = env.now
            # prompt tokens are integers: the prefix-sum difference is the exact sum
            fresh_in = float(sh.cum_prompt[b] - sh.cum_prompt[a])
            sh.tokens_in += fresh_in + sum(r[1] - r[3] + 1 for r in retries) if nr else fresh_in
            prompts = sh.prompt_f[a:b]
            if nr:
                prompts = np.concatenate([np.array([r[1] for r in retries], np.float64), prompts])
            dur = prompts * sim.kv_s_per_token + sim.kv_latency_s
            # KV transfer: request j goes out on NIC lane (lane_i + j) % L, FIFO per lane: grid
            # [rows, L], request j in row j // L, column j % L; a lane's transfers end at
            # max(lane free, now) + the running sum of its column
            idx = perm[self.lane_i]
            base = np.maximum(self.lanes[idx], now)
            if n_req <= L:
                t_done = base[:n_req] + dur
                self.lanes[idx[:n_req]] = t_done
            else:
                rows = -(-n_req // L)
                pad = np.zeros(rows * L)
                pad[:n_req] = dur
                ends = base + pad.reshape(rows, L).cumsum(axis=0)
                t_done = ends.ravel()[:n_req]
                self.lanes[idx] = ends[-1]
            self.lane_i = (self.lane_i + n_req) % L
            n_one = 0
            if b > a:
                fresh_t = t_done[nr:]
                sh.first[a:b] = fresh_t
                sh.tokens_out += b - a
                n_one = sh.cum_one[b] - sh.cum_one[a]
                if n_one:  # requests whose only output token came from prefill are done
                    one = wl.output[a:b] <= 1
                    sh.done[a:b][one] = fresh_t[one]
            if not nr and not n_one:  # the usual batch: fresh requests only, all go on to decode
                self._dispatch(t_done, None, prompts, sh.fin_fresh[a:b], None, a)
                continue
            keep = np.flatnonzero(wl.output[a:b] > 1)
            r_ids = np.array([r[0] for r in retries], np.int64)
            self._dispatch(np.concatenate([t_done[:nr], t_done[nr:][keep]]),
                           np.concatenate([r_ids, keep + a]),
                           np.concatenate([prompts[:nr], sh.prompt_f[a:b][keep]]),
                           np.array([_fin_step(int(wl.output[r[0]]) - r[3], dec_tps) for r in retries]
                                    + sh.fin_fresh[a:b][keep].tolist(), np.int64),
                           [r[3] for r in retries] + [1] * len(keep) if nr else None, a)

    def _dispatch(self, t, ids, ctx, fin, gen, a):
        """Assign transferred requests to decode instances: ready times ``t``, ids (None: a, a+1, ...),
        contexts, finish offsets (arrays), generated tokens (list; None: 1 each). Round-robin over
        the least-loaded instances (as many as give chunks of at least DISPATCH_MIN_CHUNK requests),
        each instance's chunk sorted by ready time then id; wake sleeping ones at their first ready time."""
        m = len(t)
        if not m:
            return
        env = self.sim.env
        decs = self.sim.decoders
        k = max(1, min(len(decs), m // DISPATCH_MIN_CHUNK))
        # the k least loaded, ties by position: sorted(decs, key=Instance.load)[:k] (as heapq.nsmallest),
        # from one list of loads (no Python call per instance)
        loads = [d.n_run + d.pending for d in decs]
        if k == 1:
            decs = [decs[loads.index(min(loads))]]
        elif k <= 8:  # k C-level scans instead of a sort: the first of the least loaded, k times
            pick = []
            for _ in range(k):
                j = loads.index(min(loads))
                pick.append(decs[j])
                loads[j] = math.inf
            decs = pick
        else:
            decs = [decs[j] for j in sorted(range(len(decs)), key=loads.__getitem__)[:k]]
        # positions in (ready time, id) order, and with k > 1 grouped by position % k first (chunk
        # i takes positions i, i + k, ...); ids increase with position when not given, so a stable
        # sort by time breaks ties by id
        if k == 1:
            o = np.argsort(t, kind="stable") if ids is None else np.lexsort((ids, t))
        else:
            mod = self.sim.position_mod(k, m)
            o = np.lexsort((t, mod)) if ids is None else np.lexsort((ids, t, mod))
        ids = o + a if ids is None else ids[o]
        fs, cn = fin[o], ctx[o]
        ts = t[o].tolist()
        gs = [gen[j] for j in o.tolist()] if gen is not None else None
        if k == 1:
            bounds = [0, m]
        else:  # chunk i holds (m - i + k - 1) // k requests
            bounds = [0]
            for i in range(k):
                bounds.append(bounds[-1] + (m - i + k - 1) // k)
        starts = bounds[:-1]
        f_min = np.minimum.reduceat(fs, starts).tolist()
        f_max = np.maximum.reduceat(fs, starts).tolist()
        for i, d in enumerate(decs):
            lo, hi = bounds[i], bounds[i + 1]
            if k == 1:
                ch = _Chunk(ts, cn, fs, gs, ids, f_min[0], f_max[0])
            else:
                ch = _Chunk(ts[lo:hi], cn[lo:hi], fs[lo:hi], gs[lo:hi] if gs is not None else None, ids[lo:hi],
                            f_min[i], f_max[i])
            d.ready.append(ch)
            d.pending += hi - lo
            t0 = ch.t[0]
            if t0 < d.sleep_until and not d.wake.triggered:
                d.sleep_until = t0
                env.process(_wake_at(env, d, t0))

    def load(self) -> int:
        return self.n_run + self.pending

    def next_ready(self) -> float:
        return min((c.t[c.pos] for c in self.ready), default=math.inf)

    def _sleep_until_arrival(self):
        sh = self.sim.sh
        ev = self.sim.env.event()
        sh.idle.append(ev)
        if not self.sim.arrival_wake.triggered:
            self.sim.arrival_wake.succeed()
        yield ev

    def _admit(self):
        """Move transferred requests to the waiting queue; admit them FIFO while KV space and slots allow."""
        waiting = self.waiting
        if self.ready:
            now = self.sim.env.now
            keep = []
            for ch in self.ready:
                pos = ch.pos
                k = bisect_right(ch.t, now, pos)
                if k > pos:
                    waiting.append([ch, pos, k])
                    ch.pos = k
                if k < len(ch.t):
                    keep.append(ch)
            self.ready = keep
        if not waiting:
            return
        tps, step = self.tps, self.step_idx
        n = self.n_run
        s0 = self.s0
        fx = self.kv_fixed
        room = self.kv_cap - (s0 + n * tps * step) - n * fx  # KV tokens still free
        slots = self.max_batch - n
        tps_step = tps * step
        sh = self.sim.sh
        joined = 0
        while waiting and slots > 0:
            seg = waiting[0]
            ch, i, end = seg
            lo = i
            stop = min(end, i + slots)
            blocked = False
            cn = ch.ctx[i:stop]
            part = cn.tolist()
            # Fast path: the whole cohort fits with a margin far above the rounding of the running
            # room (|error| <= a few ulps of it), so every per-request check below would pass.
            # Only the float chains s0 and room are still walked request by request (the same
            # operations in the same order); the finish buckets are added later, in join order
            # (_flush, np.add.at), which gives every bucket the same sequential sum.
            if self.fast_admission and room - sum(part) - len(part) * fx >= 1.0 + 1e-6 * abs(room):
                for ctx in part:
                    s0 += ctx - tps_step
                    room -= ctx + fx
                i = stop
                self._pend_c.append(cn)  # contexts: _flush subtracts tps * step, as here
                self._pend_f.append(ch.fin[lo:i])
                self._pend_ids.append(ch.ids[lo:i])
                self._pend_step.append(step)
                self._pend_ts.append(tps_step)
                first = step + ch.fin_min  # no earlier than this cohort's first finish: flush then
                if first < self._due:
                    self._due = first
            else:  # near the KV capacity: one request at a time, buckets written directly
                self._flush()
                fin_n, fin_c, mask = self._fin_n, self._fin_c, self._mask
                ctxs, fins = ch.ctx.tolist(), ch.fin.tolist()
                while i < stop:  # one request: the same float operations, in the same order, as ever
                    ctx = ctxs[i]
                    if ctx + fx + 1 > room:
                        if n + joined + i - lo == 0:  # can never fit on this instance
                            sh.rejected += 1
                            self.pending -= 1
                            i = lo = i + 1
                            stop = min(end, i + slots)
                            continue
                        blocked = True
                        break
                    c = ctx - tps_step
                    f = (step + fins[i]) & mask
                    fin_n[f] += 1
                    fin_c[f] += c
                    s0 += c
                    room -= ctx + fx
                    i += 1
                if i > lo:
                    ids = ch.ids[lo:i]
                    sh.join_fin[ids] = ch.fin[lo:i] + step
                    sh.join_inst[ids] = self.idx
            if i > lo:  # a cohort joined: record it (the chunk's last finish bounds the cohort's)
                self.order.append([ch, lo, i, step, step + ch.fin_max])
                slots -= i - lo
                joined += i - lo
            if i == end:
                waiting.popleft()
            else:
                seg[1] = i
            if blocked:
                sh.kv_blocked_steps += 1
                break
        self.s0 = s0
        self.n_run = n + joined
        self.pending -= joined

    def _flush(self):
        """Add the finish-bucket contributions of the cohorts admitted on the fast path, in join
        order (np.add.at adds element by element, so each bucket gets the same sequential sum as
        adding them one request at a time at admission). Called before a bucket is read or
        written directly: at the first step one of them finishes, before preempting, and before
        an admission one request at a time."""
        if not self._pend_f:
            return
        pf = self._pend_f
        size = [len(x) for x in pf]
        f = np.concatenate(pf)
        f += np.repeat(np.array(self._pend_step, np.int64), size)
        ids = np.concatenate(self._pend_ids)
        sh = self.sim.sh
        sh.join_fin[ids] = f
        sh.join_inst[ids] = self.idx
        f &= self._mask
        c = np.concatenate(self._pend_c)  # c = ctx - tps * join step, element by element as at admission
        c -= np.repeat(np.array(self._pend_ts), size)
        np.add.at(self._fin_c_np, f, c)
        np.add.at(self._fin_n_np, f, 1)
        self._pend_c, self._pend_f, self._pend_step, self._pend_ts, self._pend_ids = [], [], [], [], []
        self._due = NEVER

    def _preempt_if_full(self):
        tps, step = self.tps, self.step_idx
        fx = self.kv_fixed
        used = self.s0 + self.n_run * (tps * step + 1.0 + fx)  # + the tokens the next step writes
        sh, wl, order = self.sim.sh, self.sim.wl, self.order
        self._flush()
        while self.n_run > 1 and used > self.kv_cap:
            e = order[-1]  # newest first (LIFO, as vLLM)
            ch, lo, top, join = e[:4]
            if top == lo:
                order.pop()
                continue
            top = e[2] = top - 1
            fs = join + int(ch.fin[top])
            if fs <= step:
                continue  # already finished
            ctx = int(ch.ctx[top])
            gen = ch.gen[top] if ch.gen is not None else 1
            rid = int(ch.ids[top])
            c = ctx - tps * join
            self._fin_n[fs & self._mask] -= 1
            self._fin_c[fs & self._mask] -= c
            g = math.floor(gen + tps * (step - join))
            self.s0 -= c
            used -= ctx + tps * (step - join) + 1.0 + fx
            self.n_run -= 1
            sh.preemptions += 1
            sh.join_inst[rid] = -1  # this join will not finish (a rejoin records anew)
            prompt = int(wl.prompt[rid]) + g - 1  # recompute preemption: everything but the last token
            sh.retry.append((rid, prompt, int(wl.cached[rid]), g))
            if sh.idle:
                sh.idle.pop().succeed()

    def _retire(self):
        """Advance the step counter; retire the requests whose finish step this is."""
        step = self.step_idx = self.step_idx + 1
        self.step_end.append(self.sim.env.now)
        if step >= self._due:
            self._flush()
        j = step & self._mask
        c = self._fin_c[j]
        k = self._fin_n[j]
        if k or c:
            self.s0 -= c
            self.n_run -= k
            self._fin_n[j] = 0
            self._fin_c[j] = 0.0
        if len(self.order) > self._prune_at:
            self._prune(step)

    def _prune(self, step: int):
        """Drop cohorts whose requests have all finished from ``order``."""
        self.order = [e for e in self.order if e[4] > step]
        self._prune_at = 2 * len(self.order) + 4096

    def _start_decoding(self):
        """The finish-bucket ring (allocated when the run starts: an instance built only for its
        step times has none)."""
        ring = self.sim.sh.fin_ring
        self._mask = ring - 1
        self._fin_n = array("q", bytes(8 * ring))  # step % ring -> requests finishing then
        self._fin_c = array("d", bytes(8 * ring))  # step % ring -> sum of their s0 terms (contiguous
        # doubles: the same values as a list of floats, without a float object per bucket)
        self._fin_n_np = np.frombuffer(self._fin_n, np.int64)  # the same memory, for _flush
        self._fin_c_np = np.frombuffer(self._fin_c, np.float64)
        # fast-path cohorts not yet in the buckets: their contexts, finish offsets and ids (arrays),
        # join steps and tps * join step
        self._pend_c, self._pend_f, self._pend_step, self._pend_ts, self._pend_ids = [], [], [], [], []
        self._due = NEVER            # no later than the earliest finish step among them

    def run_decode(self):
        """Decode steps while requests run. The step-time cache lookup (decode_time) and the
        retirement (_retire) are inlined: they run at every decode step (the most frequent event)."""
        self._start_decoding()
        env, sh = self.sim.env, self.sim.sh
        rec = self.sim.rec
        tps, kv_cap, fx = self.tps, self.kv_cap, self.kv_fixed
        timeout, decode_time, admit = env.timeout, self.decode_time, self._admit
        dcache_get, dp, q = self._dcache.get, self.par.dp, self.sim.ctx_quantum
        step_end = self.step_end
        fin_n, fin_c, mask = self._fin_n, self._fin_c, self._mask
        while True:
            if self.ready or self.waiting:
                admit()
            n = self.n_run
            if n == 0:
                nxt = self.next_ready()
                self.wake = env.event()
                self.sleep_until = nxt
                if nxt < math.inf:
                    env.process(_wake_at(env, self, nxt))
                yield self.wake
                self.sleep_until = math.inf
                continue
            ctx_sum = self.s0 + n * tps * self.step_idx
            mean_ctx = ctx_sum / n  # decode_time's cache key, computed as there
            if q:
                mean_ctx = round(mean_ctx / q) * q
            hit = dcache_get((-(-n // dp), mean_ctx))
            dt, comp = hit if hit is not None else decode_time(n, ctx_sum)
            start = env.now
            yield timeout(dt)
            self.busy_s += dt
            self.compute_s += comp
            self.steps += 1
            if rec.on:
                rec.span(self.role, self.name, "decode", start, dt, {"batch": n})
            sh.tokens_out += n * tps
            # _retire, inlined
            step = self.step_idx = self.step_idx + 1
            step_end.append(env.now)
            if step >= self._due:
                self._flush()
            j = step & mask
            c = fin_c[j]
            k = fin_n[j]
            if k or c:
                self.s0 -= c
                self.n_run -= k
                fin_n[j] = 0
                fin_c[j] = 0.0
            if len(self.order) > self._prune_at:
                self._prune(step)
            if self.s0 + self.n_run * (tps * step + 1.0 + fx) > kv_cap:
                self._preempt_if_full()

    def run_aggregated(self):
        self._start_decoding()
        env, sh, wl = self.sim.env, self.sim.sh, self.sim.wl
        while True:
            self._admit()
            n = self.n_run
            used = self.s0 + n * self.tps * self.step_idx
            budget = self.budget - n * self.tps
            retries, (a, b) = [], (sh.head, sh.head)
            x = None
            if budget > 0:
                retries, (a, b), x, _ = self.take_prefill(budget, self.kv_cap - used - n * (1.0 + self.kv_fixed))
            n_pre = len(retries) + b - a
            if n == 0 and n_pre == 0:
                if sh.head < sh.arrived():  # the head prompt exceeds an empty instance's KV cache
                    sh.head += 1
                    sh.rejected += 1
                    continue
                yield from self._sleep_until_arrival()
                continue
            dt = comp = 0.0
            if n_pre:
                dt, comp = self.prefill_time(x)
            if n:
                d2, c2 = self.decode_time(n, used)
                dt, comp = dt + d2, comp + c2
            start = env.now
            yield env.timeout(dt)
            self._account(start, dt, comp, "step", {"prefill": n_pre, "decode": n})
            if n:
                sh.tokens_out += n * self.tps
                self._retire()
            now = env.now
            sh.tokens_in += float(sh.cum_prompt[b] - sh.cum_prompt[a]) + sum(r[1] - r[3] + 1 for r in retries)
            keep = np.zeros(0, np.int64)
            if b > a:
                sh.first[a:b] = now
                sh.tokens_out += b - a
                out = wl.output[a:b]
                one = out <= 1
                sh.done[a:b][one] = now
                keep = np.flatnonzero(~one)
            m = len(retries) + len(keep)
            if m:  # prefilled requests wait for a decode slot, retries first
                fin = [_fin_step(int(wl.output[r[0]]) - r[3], self.tps) for r in retries] \
                    + sh.fin_fresh[a:b][keep].tolist()
                ch = _Chunk(None, np.concatenate([np.array([r[1] for r in retries], np.float64),
                                                  sh.prompt_f[a:b][keep]]),
                            np.array(fin, np.int64),
                            [r[3] for r in retries] + [1] * len(keep) if retries else None,
                            np.concatenate([np.array([r[0] for r in retries], np.int64), keep + a]))
                self.waiting.append([ch, 0, m])
                self.pending += m
            self._preempt_if_full()

    def _account(self, start, dt, comp, label, args):
        self.busy_s += dt
        self.compute_s += comp
        self.steps += 1
        if self.sim.rec.on:
            self.sim.rec.span(self.role, self.name, label, start, dt, args)


def _wake_at(env, inst, t):
    yield env.timeout(max(0.0, t - env.now))
    if not inst.wake.triggered and inst.sleep_until <= env.now + 1e-12:
        inst.wake.succeed()


def finish_times(sh: _Shared, decoders: list) -> None:
    """Fill ``sh.done`` for the requests that joined a decode batch: a request whose latest join
    (not preempted since) is on instance i with finish step f is done at the end of that
    instance's step f, if it ran that far within the window. Vectorised over all requests."""
    for d in decoders:
        if hasattr(d, "_pend_f"):
            d._flush()  # the joins not yet written (their buckets too: the run is over)
    ids = np.flatnonzero(sh.join_inst >= 0)
    if not len(ids):
        return
    inst = sh.join_inst[ids]
    fs = sh.join_fin[ids]
    n_steps = np.array([len(d.step_end) for d in decoders])
    valid = fs <= n_steps[inst]
    ends = np.concatenate([np.asarray(d.step_end, float) for d in decoders])
    first_end = np.concatenate([[0], np.cumsum(n_steps)[:-1]])
    sh.done[ids[valid]] = ends[(first_end[inst] + fs - 1)[valid]]


class ServeSim:
    """One serving run. ``run()`` returns the metrics dict."""

    def __init__(self, sc: Scenario | Deployment, *, duration_s: float | None = None, seed: int | None = None,
                 record: bool = False, progress: bool = False,
                 prefill_service: Callable[[StepFeatures], float] | None = None):
        """prefill_service: seconds of a prefill step from its features, replacing the step cost
        (queueing-theory tests: a deterministic server)."""
        self.dep = sc if isinstance(sc, Deployment) else resolve(sc)
        sc = self.dep.sc
        if sc.kind != "serve":
            raise ScenarioError(f"{sc.source}: field 'kind': expected a serve scenario, got {sc.kind!r}")
        self.sc = sc
        self.duration = float(duration_s if duration_s is not None else sc.duration_s)
        if not (math.isfinite(self.duration) and self.duration > 0):  # nan fails every comparison
            raise ScenarioError(f"{sc.source}: field 'duration_s': must be finite and > 0, got {self.duration}")
        self.seed = int(seed if seed is not None else sc.seed)
        self.progress = progress
        self.prefill_service = prefill_service
        self.rec = Recorder(record)
        self._mods: dict = {}
        self.decode_caches: dict = {}  # role -> Instance._dcache
        dep = self.dep
        self.cfg, self.quant, self.node, self.device = dep.cfg, dep.quant, dep.node, dep.device
        # V3.2: step features past the top-k; V4: its own features (sim.stepcost.V4Features)
        self.topk = feature_key(self.cfg)
        link_node, lat = dep.link_node, dep.latency_s
        self.ctx_quantum = sc.ctx_quantum_tokens
        self.capacity = dep.capacity
        self.cost = {r: dep.step_costs(r) for r in dep.roles}
        # KV transfer link: seconds per prompt token and per-transfer latency (sim.comm + sim.roofline)
        # V4: the compressed entries per token, and the windows (kv_fixed_tokens of them) per transfer
        v4 = self.cfg.arch == "deepseek_v4"
        per_tok = (self.cfg.kv_cache_bytes_per_token(self.quant.kv_bytes) if v4 else
                   kv_transfer_bytes(self.cfg, 1, self.quant.kv_bytes))
        big = 1e6
        t_big = roofline.comm_time(CommOp("kv_transfer", per_tok * big, "inter", "p2p"), self.device,
                                   node=link_node, latency_s=lat)
        t_one = roofline.comm_time(CommOp("kv_transfer", per_tok, "inter", "p2p"), self.device,
                                   node=link_node, latency_s=lat)
        self.kv_s_per_token = (t_big - t_one) / (big - 1)
        self.kv_latency_s = t_one - self.kv_s_per_token
        if v4:
            self.kv_latency_s += self.cfg.kv_window_bytes(self.quant.kv_bytes) / per_tok * self.kv_s_per_token
        if sc.mode == "aggregated":
            self.kv_s_per_token = self.kv_latency_s = 0.0

    def position_mod(self, k: int, m: int) -> np.ndarray:
        """[0, 1, ..., m - 1] % k (cached: _dispatch groups every batch by it)."""
        a = self._mods.get(k)
        if a is None or len(a) < m:
            a = self._mods[k] = np.arange(max(m, 4096)) % k
        return a[:m]

    def _arrivals(self):
        """Wake idle pulling instances at arrival times (only while some instance is idle)."""
        env, sh, t = self.env, self.sh, self.wl.t
        while True:
            if not sh.idle:
                self.arrival_wake = env.event()
                yield self.arrival_wake
                continue
            if sh.retry:
                sh.idle.pop().succeed()
                continue
            nxt_i = max(sh.head, sh.arrived())
            if sh.head < sh.arrived():
                sh.idle.pop().succeed()
                yield env.timeout(0)
                continue
            if nxt_i >= self.wl.n:
                self.arrival_wake = env.event()
                yield self.arrival_wake
                continue
            yield env.timeout(max(0.0, t[nxt_i] - env.now))
            if sh.idle:
                sh.idle.pop().succeed()

    def _sampler(self, interval):
        env, sh = self.env, self.sh
        while True:
            q = sh.queued()
            run = sum(d.n_run for d in self.decoders)
            dq = sum(d.load() for d in self.decoders) - run
            self.samples.append((env.now, q, dq, run))
            if self.rec.on:
                self.rec.counters.append(("queues", env.now, {"prefill_queue": q, "decode_waiting": dq,
                                                             "running": run}))
            yield env.timeout(interval)

    def run(self) -> dict:
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        sc = self.sc
        self.wl = make_workload(sc, self.duration, self.seed)
        self.env = env = simpy.Environment()
        tps = mtp_tokens_per_step(mtp_depths(sc.instance("decode" if sc.mode == "disaggregated" else "aggregated")))
        self.sh = _Shared(env, self.wl, tps, self.topk)
        self.arrival_wake = env.event()
        self.instances = []
        if sc.mode == "disaggregated":
            self.prefills = [Instance(self, "prefill", i) for i in range(sc.prefill.instances)]
            self.decoders = [Instance(self, "decode", i) for i in range(sc.decode.instances)]
            for p in self.prefills:
                env.process(p.run_prefill())
            for d in self.decoders:
                env.process(d.run_decode())
            self.instances = self.prefills + self.decoders
        else:
            self.prefills = []
            self.decoders = [Instance(self, "aggregated", i) for i in range(sc.aggregated.instances)]
            for d in self.decoders:
                env.process(d.run_aggregated())
            self.instances = list(self.decoders)
        env.process(self._arrivals())
        self.samples = []
        interval = sc.sample_interval_s or self.duration / 200
        env.process(self._sampler(interval))
        # The run allocates millions of long-lived objects (chunks, cohort records, step times) and no
        # reference cycles worth collecting: the cyclic GC's full passes over them cost ~15% of
        # a long run (measured: 900 s of day-6, 11.5-12.4 s CPU with it, 9.9-10.1 s without).
        # Paused for the run only; objects freed by reference counting are freed as ever.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            events = self._drive(env)
            finish_times(self.sh, self.decoders)
        finally:
            if gc_was_on:
                gc.enable()
        wall = time.perf_counter() - wall0
        out = self.metrics()
        out["events"] = events
        out["sim_wall_s"] = wall
        out["sim_cpu_s"] = time.process_time() - cpu0  # CPU time of this process: robust to a busy machine
        out["events_per_s"] = events / wall if wall > 0 else None
        return out

    def _drive(self, env) -> int:
        """Step the event loop to the end of the window, counting events; optional tqdm on stderr."""
        until = self.duration
        events = 0
        bar = None
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=round(until), unit="sim-s", file=sys.stderr, leave=False)
        last = 0
        step = env.step
        peek = env.peek
        while peek() < until:
            step()
            events += 1
            if bar is not None and (events & 4095) == 0:
                now = int(env.now)
                if now > last:
                    bar.update(now - last)
                    last = now
        if bar is not None:
            bar.close()
        return events

    # ------------------------------------------------------------ metrics
    def metrics(self) -> dict:
        """The result dict of the finished run (sim.serve_metrics)."""
        from dsref.sim.serve_metrics import run_metrics
        return run_metrics(self)


def simulate(sc: Scenario, **kw) -> dict:
    """Run one serving scenario; keyword arguments as ServeSim."""
    return ServeSim(sc, **kw).run()


def scaled(sc: Scenario, factor: int) -> Scenario:
    """The deployment and its load multiplied by ``factor`` (instances and request rate)."""
    over = {r: {"instances": sc.instance(r).instances * factor} for r in sc.roles}
    over["workload"] = {"rate_per_s": sc.workload.rate_per_s * factor}
    return sc.with_overrides(over)


#: Load factors of ``sweep`` (multiples of the scenario's request rate), run one after another.
SWEEP_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def sweep(sc: Scenario, factors=SWEEP_FACTORS, **kw) -> list[dict]:
    """Load sweep: the scenario at rate x factor (Poisson/constant arrivals)."""
    out = []
    base = sc.workload.rate_per_s
    for f in factors:
        s2 = sc.with_overrides({"workload": {"rate_per_s": base * f}})
        r = simulate(s2, **kw)
        r["rate_factor"] = f
        r["rate_per_s"] = base * f
        out.append(r)
    return out
