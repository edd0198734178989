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
    activation reserve) / latent KV bytes per token x DP ranks (sim.scenario).
    A decode instance admits a request only when its prompt fits; generation
    grows the cache; when it overflows the newest requests are preempted
    (recompute: back to the prefill queue with prompt + generated tokens).
  * Disaggregated: the prompt's KV (sim.comm.kv_transfer_bytes) crosses the
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

import heapq
import json
import math
from bisect import bisect_right
from operator import itemgetter
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from dsref.sim import roofline
from dsref.sim.comm import CommOp, kv_transfer_bytes
from dsref.sim.scenario import Length, Scenario, ScenarioError
from dsref.sim.deployment import Deployment, resolve
from dsref.sim.stepcost import RequestTable, StepFeatures, request, uniform

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MILLION = 1e6
PROGRESS_MIN_WALL_S = 2.0  # show a progress bar only for runs expected to take longer
MAX_TRACE_EVENTS = 200_000
_ready_time = itemgetter(0)
DISPATCH_MIN_CHUNK = 32  # a prefill batch is split over at most len(batch) / 32 decode instances


# ---------------------------------------------------------------- workload
@dataclass
class Workload:
    """Requests sorted by arrival time. cached: prompt tokens served by the prefix cache."""

    t: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    cached: np.ndarray

    @property
    def n(self) -> int:
        return len(self.t)


def _lengths(spec: Length, n: int, rng: np.random.Generator) -> np.ndarray:
    mean, cv = spec.mean, spec.cv
    d = spec.dist
    if d == "fixed" or cv == 0:
        x = np.full(n, mean)
    elif d == "lognormal":
        s2 = math.log1p(cv * cv)
        x = rng.lognormal(math.log(mean) - s2 / 2, math.sqrt(s2), n)
    elif d == "exponential":
        x = rng.exponential(mean, n)
    else:  # uniform with the given mean and coefficient of variation
        half = min(mean, mean * cv * math.sqrt(3.0))
        x = rng.uniform(mean - half, mean + half, n)
    return np.clip(np.rint(x), spec.min, spec.max).astype(np.int64)


def make_workload(sc: Scenario, duration_s: float, seed: int) -> Workload:
    """Arrivals in [0, duration) with independent seeded streams per quantity."""
    w = sc.workload
    if w.arrival == "trace":
        return read_trace(sc.trace_path(), duration_s)
    ss = np.random.SeedSequence(seed)
    r_arr, r_in, r_out = (np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(3))
    rate = w.rate_per_s
    if w.arrival == "constant":
        t = np.arange(0.0, duration_s, 1.0 / rate)
    else:
        expect = rate * duration_s
        n_draw = int(expect + 10 * math.sqrt(expect) + 10)
        t = np.cumsum(r_arr.exponential(1.0 / rate, n_draw))
        while t[-1] < duration_s:  # practically never: top up
            t = np.concatenate([t, t[-1] + np.cumsum(r_arr.exponential(1.0 / rate, n_draw))])
        t = t[t < duration_s]
    n = len(t)
    prompt = _lengths(w.prompt_tokens, n, r_in)
    output = _lengths(w.output_tokens, n, r_out)
    cached = np.minimum(np.floor(prompt * w.prefix_cache_hit_rate).astype(np.int64), prompt - 1)
    return Workload(t, prompt, output, cached)


def read_trace(path, duration_s: float) -> Workload:
    """JSONL, one request per line: {"t": arrival s, "prompt_tokens", "output_tokens", "cached_tokens"}."""
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((float(r["t"]), int(r["prompt_tokens"]), int(r["output_tokens"]),
                             int(r.get("cached_tokens", 0))))
            except (ValueError, KeyError, TypeError) as e:
                raise ScenarioError(f"{path}: field 'line {i}': bad trace record ({e})") from None
            if rows[-1][1] < 1 or rows[-1][2] < 1 or rows[-1][3] < 0 or rows[-1][0] < 0:
                raise ScenarioError(f"{path}: field 'line {i}': tokens must be >= 1, cached >= 0, t >= 0")
    rows.sort()
    a = np.array([r for r in rows if r[0] < duration_s], float).reshape(-1, 4)
    prompt = a[:, 1].astype(np.int64)
    return Workload(a[:, 0], prompt, a[:, 2].astype(np.int64), np.minimum(a[:, 3].astype(np.int64), prompt - 1))


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


class _Shared:
    """State shared by the processes of one run (no module-level state)."""

    def __init__(self, env, wl: Workload):
        self.env = env
        self.wl = wl
        n = wl.n
        self.head = 0                       # next never-prefilled request
        self.retry: deque = deque()         # preempted: (id, prompt incl. generated, cached, generated)
        self.idle: list = []                # idle pulling instances (wake events)
        self.first = np.full(n, np.nan)     # first-token time
        self.done = np.full(n, np.nan)
        self.preemptions = 0
        self.kv_blocked_steps = 0   # steps at which the head of a queue waited for KV-cache space
        self.rejected = 0           # requests larger than an empty instance's KV cache
        self.features = RequestTable(wl.prompt - wl.cached, wl.cached)  # fresh prompts, arrival order
        self.cum_new = np.concatenate([[0.0], np.cumsum(wl.prompt - wl.cached)]).astype(float)
        self.tokens_in = 0.0

        self.tokens_out = 0.0

    def arrived(self) -> int:
        return int(np.searchsorted(self.wl.t, self.env.now, side="right"))

    def queued(self) -> int:
        return self.arrived() - self.head + len(self.retry)


class Instance:
    """One instance: role 'prefill', 'decode' or 'aggregated'.

    Decode bookkeeping: requests arrive in *chunks* (what one prefill step hands to
    this instance: a list of (ready time, id, context, generated, remaining) sorted
    by ready time). A request's finish step is fixed when it joins (every step
    advances every request by ``tps`` tokens): ``finish[step]`` holds the ids that
    finish then and the sum of their s0 terms, so retiring is one dictionary pop per
    step with no per-request work; the summed context is s0 + n * tps * step (s0 = sum
    of context at join - tps * join step). ``order`` lists (id, join step, finish step,
    context, generated) in join order for LIFO preemption (finished entries skipped,
    pruned now and then).
    Plain Python containers: a decode step joins/retires only a few requests, where
    NumPy's per-call overhead would dominate.
    """

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
        self.budget = r.token_budget_per_device * self.par.dp
        self.max_req = r.max_requests_per_step or 10**12
        self.max_batch = r.max_batch_per_device * self.par.dp
        self.tps = 1.0 + r.mtp_acceptance
        self.mtp = r.mtp_acceptance > 0
        self.two_mb = r.two_microbatch_overlap
        self.ready: list = []          # chunks in KV transfer: [position, list of tuples]
        self.waiting: deque = deque()  # (ready time, id, context, generated, remaining) waiting for KV / a slot
        self.n_run = 0
        self.order: list = []
        self.pending = 0               # requests in transfer or waiting
        self.finish: dict = {}         # step -> [ids]
        self.step_idx = 0
        self.s0 = 0.0
        self.wake = sim.env.event()
        self.sleep_until = math.inf
        self.lanes = np.zeros(self.par.devices)  # NIC lanes: time each becomes free (disaggregated prefill)
        self.lane_i = 0
        self._dcache: dict = {}

    # ------------------------------------------------------------ step times
    def prefill_time(self, x: StepFeatures) -> tuple[float, float]:
        """Step time of prefilling the batch ``x`` (the whole instance's requests)."""
        fixed = self.sim.prefill_service
        if fixed is not None:
            t = fixed(x)
            return t, t
        tot, comp, _ = self.sim.cost[self.role]["prefill"].prefill(x, two_microbatch=self.two_mb)
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
        T = 2.0 if self.mtp else 1.0  # MTP: the draft token is verified with the next one
        cost = self.sim.cost[self.role]
        tot, comp, _ = cost["decode"].decode(uniform(per, T, mean_ctx), two_microbatch=self.two_mb)
        if self.mtp:  # the MTP module: one more layer + head on one token per sequence
            extra = cost["mtp"].decode_compute_s(uniform(per, 1.0, mean_ctx))
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
        x = StepFeatures()
        used = 0.0
        while sh.retry and len(retries) < self.max_req:
            rid, prompt, cached, gen = sh.retry[0]
            new = prompt - cached
            if retries and used + new > budget:
                break
            if kv_free is not None and prompt > kv_free:
                break
            sh.retry.popleft()
            retries.append((rid, prompt, cached, gen))
            x = x + request(new, cached)
            used += new
            if kv_free is not None:
                kv_free -= prompt
        a = b = sh.head
        b_max = sh.arrived()
        if a < b_max and len(retries) < self.max_req and (used < budget or not retries):
            cum = sh.cum_new
            b = int(np.searchsorted(cum, cum[a] + (budget - used), side="right")) - 1
            b = min(max(b, a + (0 if retries else 1)), b_max, a + self.max_req - len(retries))
            if kv_free is not None and b > a:  # aggregated: the prompts must fit in the KV cache
                csum = np.cumsum(self.sim.wl.prompt[a:b])
                b = a + int(np.searchsorted(csum, kv_free, side="right"))
            if b > a:
                x = x + sh.features.span(a, b)
                used += float(cum[b] - cum[a])
                sh.head = b
        return retries, (a, b), x, used

    # ------------------------------------------------------------ processes
    def run_prefill(self):
        sim, env, sh, wl = self.sim, self.sim.env, self.sim.sh, self.sim.wl
        L = len(self.lanes)
        while True:
            retries, (a, b), x, used = self.take_prefill(self.budget, None)
            if not retries and b == a:
                yield from self._sleep_until_arrival()
                continue
            dt, comp = self.prefill_time(x)
            start = env.now
            yield env.timeout(dt)
            n_req = len(retries) + b - a
            self._account(start, dt, comp, "prefill", {"requests": n_req, "new_tokens": used})
            now = env.now
            # KV transfer: request j goes out on NIC lane (lane_i + j) % L, FIFO per lane
            prompts = np.concatenate([np.array([r[1] for r in retries], float), wl.prompt[a:b].astype(float)])
            sh.tokens_in += float(prompts[len(retries):].sum()) + sum(r[1] - r[3] + 1 for r in retries)
            dur = sim.kv_s_per_token * prompts + sim.kv_latency_s
            # grid [rows, L]: request j in row j // L, column j % L = lane (lane_i + j) % L
            rows = -(-n_req // L)
            pad = np.zeros(rows * L)
            pad[:n_req] = dur
            lanes_r = np.roll(self.lanes, -self.lane_i)
            ends = np.maximum(lanes_r, now) + np.cumsum(pad.reshape(rows, L), axis=0)
            t_done = ends.ravel()[:n_req]
            cols = min(n_req, L)
            lanes_r[:cols] = ends[-1, :cols]
            self.lanes = np.roll(lanes_r, self.lane_i)
            self.lane_i = (self.lane_i + n_req) % L
            nr = len(retries)
            if b > a:
                fresh_t = t_done[nr:]
                sh.first[a:b] = fresh_t
                sh.tokens_out += b - a
                out = wl.output[a:b]
                one = out <= 1
                if one.any():
                    sh.done[a:b][one] = fresh_t[one]
            items = [(float(t_done[j]), r[0], r[1], r[3], int(wl.output[r[0]]) - r[3])
                     for j, r in enumerate(retries)]
            if b > a:
                keep = np.flatnonzero(~one)
                items += zip(fresh_t[keep].tolist(), (keep + a).tolist(), wl.prompt[a:b][keep].tolist(),
                             [1] * len(keep), (out[keep] - 1).tolist())
            self._dispatch(items)

    def _dispatch(self, items: list):
        """Assign transferred requests [(ready time, id, context, generated, remaining)] to decode
        instances: round-robin over the least-loaded instances (as many as give chunks of at least
        DISPATCH_MIN_CHUNK requests); wake sleeping ones at their first ready time."""
        if not items:
            return
        env = self.sim.env
        decs = self.sim.decoders
        k = max(1, min(len(decs), len(items) // DISPATCH_MIN_CHUNK))
        decs = heapq.nsmallest(k, decs, key=Instance.load) if k < len(decs) else sorted(decs, key=Instance.load)
        for i, d in enumerate(decs):
            ch = sorted(items[i::k])
            if not ch:
                continue
            d.ready.append([0, ch])
            d.pending += len(ch)
            t0 = ch[0][0]
            if t0 < d.sleep_until and not d.wake.triggered:
                d.sleep_until = t0
                env.process(_wake_at(env, d, t0))

    def load(self) -> int:
        return self.n_run + self.pending

    def next_ready(self) -> float:
        return min((c[1][c[0]][0] for c in self.ready), default=math.inf)

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
            for c in self.ready:
                pos, ch = c
                n = len(ch)
                k = bisect_right(ch, now, lo=pos, key=_ready_time)
                if k > pos:
                    waiting.extend(ch[pos:k])
                    pos = k
                if pos < n:
                    c[0] = pos
                    keep.append(c)
            self.ready = keep
        if not waiting:
            return
        finish, tps, step = self.finish, self.tps, self.step_idx
        n = self.n_run
        s0 = self.s0
        room = self.kv_cap - (s0 + n * tps * step)  # KV tokens still free
        slots = self.max_batch - n
        ceil = math.ceil
        popleft = waiting.popleft
        order = self.order
        joined = 0
        while waiting and slots > 0:
            _t, rid, ctx, gen, remaining = item = popleft()
            if ctx + 1 > room:
                if n + joined == 0:  # can never fit on this instance
                    self.sim.sh.rejected += 1
                    self.pending -= 1
                    continue
                waiting.appendleft(item)
                self.sim.sh.kv_blocked_steps += 1
                break
            fs = step + (ceil(remaining / tps - 1e-9) if remaining > tps else 1)
            c = ctx - tps * step
            b = finish.get(fs)
            if b is None:
                finish[fs] = [[rid], c]
            else:
                b[0].append(rid)
                b[1] += c
            order.append((rid, step, fs, ctx, gen))
            s0 += c
            room -= ctx
            slots -= 1
            joined += 1
        self.s0 = s0
        self.n_run = n + joined
        self.pending -= joined

    def _preempt_if_full(self):
        tps, step = self.tps, self.step_idx
        used = self.s0 + self.n_run * (tps * step + 1.0)  # + the tokens the next step writes
        sh, wl, order = self.sim.sh, self.sim.wl, self.order
        while self.n_run > 1 and used > self.kv_cap:
            rid, join, fs, ctx, gen = order.pop()  # newest first (LIFO, as vLLM)
            if fs <= step:
                continue  # already finished
            c = ctx - tps * join
            b = self.finish[fs]
            b[0].remove(rid)
            b[1] -= c
            g = math.floor(gen + tps * (step - join))
            self.s0 -= c
            used -= ctx + tps * (step - join) + 1.0
            self.n_run -= 1
            sh.preemptions += 1
            prompt = int(wl.prompt[rid]) + g - 1  # recompute preemption: everything but the last token
            sh.retry.append((rid, prompt, int(wl.cached[rid]), g))
            if sh.idle:
                sh.idle.pop().succeed()

    def _retire(self):
        """Advance the step counter; retire the requests whose finish step this is."""
        self.step_idx += 1
        b = self.finish.pop(self.step_idx, None)
        if b is None:
            return
        ids, c = b
        self.s0 -= c
        self.n_run -= len(ids)
        self.sim.sh.done[ids] = self.sim.env.now
        if len(self.order) > 2 * self.n_run + 4096:  # drop finished entries
            step = self.step_idx
            self.order = [e for e in self.order if e[2] > step]

    def run_decode(self):
        env, sh = self.sim.env, self.sim.sh
        rec = self.sim.rec
        tps, kv_cap = self.tps, self.kv_cap
        timeout, decode_time, admit, retire = env.timeout, self.decode_time, self._admit, self._retire
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
            dt, comp = decode_time(n, self.s0 + n * tps * self.step_idx)
            start = env.now
            yield timeout(dt)
            self.busy_s += dt
            self.compute_s += comp
            self.steps += 1
            if rec.on:
                rec.span(self.role, self.name, "decode", start, dt, {"batch": n})
            sh.tokens_out += n * tps
            retire()
            if self.s0 + self.n_run * (tps * self.step_idx + 1.0) > kv_cap:
                self._preempt_if_full()

    def run_aggregated(self):
        env, sh, wl = self.sim.env, self.sim.sh, self.sim.wl
        while True:
            self._admit()
            n = self.n_run
            used = self.s0 + n * self.tps * self.step_idx
            budget = self.budget - n * self.tps
            retries, (a, b) = [], (sh.head, sh.head)
            x = None
            if budget > 0:
                retries, (a, b), x, _ = self.take_prefill(budget, self.kv_cap - used - n)
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
            sh.tokens_in += float(wl.prompt[a:b].sum()) + sum(r[1] - r[3] + 1 for r in retries)
            for r in retries:
                self.waiting.append((now, r[0], r[1], r[3], int(wl.output[r[0]]) - r[3]))
                self.pending += 1
            if b > a:
                sh.first[a:b] = now
                sh.tokens_out += b - a
                out = wl.output[a:b]
                one = out <= 1
                sh.done[a:b][one] = now
                keep = np.flatnonzero(~one)
                self.pending += len(keep)
                self.waiting.extend(zip([now] * len(keep), (keep + a).tolist(), wl.prompt[a:b][keep].tolist(),
                                        [1] * len(keep),
                                        (out[keep] - 1).tolist()))
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
        dep = self.dep
        self.cfg, self.quant, self.node, self.device = dep.cfg, dep.quant, dep.node, dep.device
        link_node, lat = dep.link_node, dep.latency_s
        self.ctx_quantum = sc.ctx_quantum_tokens
        self.capacity = dep.capacity
        self.cost = {r: dep.step_costs(r) for r in dep.roles}
        # KV transfer link: seconds per prompt token and per-transfer latency (sim.comm + sim.roofline)
        per_tok = kv_transfer_bytes(self.cfg, 1, self.quant.kv_bytes)
        big = 1e6
        t_big = roofline.comm_time(CommOp("kv_transfer", per_tok * big, "inter", "p2p"), self.device,
                                   node=link_node, latency_s=lat)
        t_one = roofline.comm_time(CommOp("kv_transfer", per_tok, "inter", "p2p"), self.device,
                                   node=link_node, latency_s=lat)
        self.kv_s_per_token = (t_big - t_one) / (big - 1)
        self.kv_latency_s = t_one - self.kv_s_per_token
        if sc.mode == "aggregated":
            self.kv_s_per_token = self.kv_latency_s = 0.0

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
        self.sh = _Shared(env, self.wl)
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
        events = self._drive(env)
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
        sc, sh, wl = self.sc, self.sh, self.wl
        D = self.duration
        node_devs = self.node.devices_per_node * sc.device_split
        roles = {}
        for inst in self.instances:
            r = roles.setdefault(inst.role, {"instances": 0, "devices": 0, "busy_s": 0.0, "compute_s": 0.0,
                                             "steps": 0})
            r["instances"] += 1
            r["devices"] += inst.par.devices
            r["busy_s"] += inst.busy_s
            r["compute_s"] += inst.compute_s
            r["steps"] += inst.steps
        for name, r in roles.items():
            r["nodes"] = r["devices"] / node_devs
            r["utilization"] = r["busy_s"] / (r["instances"] * D)
            r["compute_fraction_of_busy"] = r["compute_s"] / r["busy_s"] if r["busy_s"] else 0.0
            r["kv_tokens_per_instance"] = self.capacity[name]["kv_tokens_per_instance"]
            r["weight_bytes_per_device"] = self.capacity[name]["weight_bytes_per_device"]
        devices = sum(r["devices"] for r in roles.values())
        nodes = devices / node_devs
        in_nodes = roles.get("prefill", roles.get("aggregated"))["nodes"]
        out_nodes = roles.get("decode", roles.get("aggregated"))["nodes"]
        in_rate = sh.tokens_in / D
        out_rate = sh.tokens_out / D
        started = ~np.isnan(sh.first)
        ttft = (sh.first - wl.t)[started]
        fin = ~np.isnan(sh.done) & (wl.output > 1)
        tpot = ((sh.done - sh.first) / np.maximum(wl.output - 1, 1))[fin]

        def pct(a, q):
            return float(np.percentile(a, q)) if len(a) else None
        price = self.device.price_usd_per_hour
        power = self.device.power_w
        dev_hours = devices * D / SECONDS_PER_HOUR
        out_tokens = sh.tokens_out
        cost = price * dev_hours if price is not None else None
        q = np.array(self.samples) if self.samples else np.zeros((0, 4))
        res = {
            "scenario": sc.name, "mode": sc.mode, "model": self.cfg.name, "device": self.device.id,
            "seed": self.seed, "duration_s": D, "requests_arrived": int(wl.n),
            "requests_started": int(started.sum()), "requests_finished": int((~np.isnan(sh.done)).sum()),
            "devices": devices, "nodes": nodes,
            "input_tokens_per_s": in_rate, "output_tokens_per_s": out_rate,
            "input_tokens_per_s_per_device": in_rate / devices, "output_tokens_per_s_per_device": out_rate / devices,
            "input_tokens_per_s_per_node": in_rate / in_nodes, "output_tokens_per_s_per_node": out_rate / out_nodes,
            "input_tokens_per_s_per_node_all": in_rate / nodes, "output_tokens_per_s_per_node_all": out_rate / nodes,
            "device_split": sc.device_split,
            "input_tokens_per_s_per_package": in_rate / devices * sc.device_split,
            "output_tokens_per_s_per_package": out_rate / devices * sc.device_split,
            "offered_input_tokens_per_s": float(wl.prompt.sum()) / D,
            "offered_output_tokens_per_s": float(wl.output.sum()) / D,
            "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
            "tpot_p50_s": pct(tpot, 50), "tpot_p90_s": pct(tpot, 90), "tpot_p99_s": pct(tpot, 99),
            "preemptions": sh.preemptions, "kv_blocked_steps": sh.kv_blocked_steps,
            "rejected": sh.rejected,
            "queue_prefill_mean": float(q[:, 1].mean()) if len(q) else 0.0,
            "queue_prefill_max": int(q[:, 1].max()) if len(q) else 0,
            "queue_decode_waiting_mean": float(q[:, 2].mean()) if len(q) else 0.0,
            "running_mean": float(q[:, 3].mean()) if len(q) else 0.0,
            "queue_samples": [list(map(float, r)) for r in q[:: max(1, len(q) // 200)]],
            "roles": roles,
            "device_hours": dev_hours,
            "cost_usd": cost,
            "cost_usd_per_day": price * devices * 24 if price is not None else None,
            "cost_usd_per_million_output_tokens": (cost / (out_tokens / TOKENS_PER_MILLION)
                                                   if cost is not None and out_tokens else None),
            "price_source": f"hwmodels catalog: {self.device.id} price_usd_per_hour = {price}",
            "energy_j_per_output_token": (power * devices * D / out_tokens if power and out_tokens else None),
            "energy_note": "device board power x devices x wall time / output tokens (all devices at TDP)",
        }
        return res


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
