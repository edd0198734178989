"""Steady-state serving report: where the warm-up ends, figures over the steady part, what binds.

``ServeSim.metrics()`` averages over the whole run, warm-up included: the first requests meet
empty queues and a half-full decode batch, so a short run reports a TTFT that is too good and a
throughput that is too low. This module (docs/serve-report.md) adds:

* ``steady_state(times, values)``: the end of the warm-up transient of a series (per-request
  TTFT or TPOT in arrival order, or per-interval tokens/s from ``generated``) by MSER-5, and
  whether the run was long enough for that end to be trusted.
* ``fill_time(...)``: how long the decode batch takes to fill (output tokens/s ramps for as long
  as the longest outputs run, often after TTFT and TPOT have settled).
* ``windowed(...)``: TTFT/TPOT percentiles and tokens/s over the part of the run after a start
  time, under ServeSim.metrics()'s key names with a ``steady_`` prefix.
* ``binding_resource(roles)``: which resource limits the deployment (compute, memory bandwidth,
  network, latency floor, KV capacity), or that none does (offered load).

``steady_metrics`` and ``format_report`` put them together for the CLI. Inputs are plain
arrays (no simulator state), so a trace or another simulator's output can be read the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsref.sim.scenario import MAX_DURATION_S

MSER_BATCH = 5          # MSER-5: batch means of 5 observations (White, Cobb & Spratt 2000)
# Fewest batches for a truncation point to mean anything: with fewer, one batch decides it.
# Ours (assumption): 10 batches = 50 observations; MSER papers test on runs of hundreds.
MIN_BATCHES = 10
# The candidate truncation points stop this many batches, and at least this share of them,
# before the end: the marginal standard error of the last few batches is an estimate from a
# few numbers and can be spuriously small (the "end effect" MSER is known for). Per-request
# series make it worse: requests prefilled in one batch have nearly equal TTFTs, so at 1,600
# requests/s the last 5 batches (25 requests, 16 ms) look perfectly steady (day-6, 300 s,
# seed 1: a minimum at the very last candidate). Dropping the last 10% costs nothing: a point
# there would be in the last half and fail anyway. Ours (assumption).
MIN_TAIL_BATCHES = 5
TAIL_FRACTION = 0.1
# binding_resource: a role below this utilisation has idle time to spare (not saturated).
SATURATED_UTILIZATION = 0.9
# ... and KV capacity binds when the mean KV occupancy is this high or this share of steps had
# a request at the head of a queue waiting for KV space. Ours (assumption): at 95% occupancy
# the next long prompt does not fit; a 1% blocked share is well past a transient burst.
KV_FULL_UTILIZATION = 0.95
KV_BLOCKED_SHARE = 0.01

PERCENTILES = (50, 90, 99)
# fill_time: the decode batch counts as full when the work still missing from it is at most
# this share of its steady amount (ours, assumption: the same 1% as steady_state's tolerance)
FILL_DEFICIT = 0.01
BUSY_PARTS = (("compute_s", "compute"), ("memory_s", "memory bandwidth"), ("comm_s", "network"),
              ("floor_s", "latency floor"))
ROLE_FIELDS = ("compute_s", "memory_s", "comm_s", "floor_s", "idle_s", "kv_blocked_steps", "steps",
               "kv_utilization", "utilization")


# ---------------------------------------------------------------- steady state (MSER-5)
@dataclass(frozen=True)
class SteadyState:
    """Where the warm-up ends. start_s: time of the first observation kept (the run's first
    observation when nothing is truncated); reached: whether the truncation point is trustworthy
    (False: the run is too short, or the load exceeds capacity and the series never settles);
    note: one line for the user (how long to run when not reached)."""

    start_s: float
    reached: bool
    method: str
    note: str
    truncated: int = 0   # observations dropped as warm-up
    points: int = 0      # finite observations in the series


def _nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= x (durations a person would type)."""
    if x <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(x))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= x * (1 - 1e-12))


def _advice(want_s: float) -> str:
    if want_s > MAX_DURATION_S:
        return (f"a run of {want_s:,.0f} s would be needed, over the {MAX_DURATION_S:,.0f} s limit: "
                "lower the load (it may exceed capacity)")
    return f"run at least --duration {_nice_ceil(want_s):g}"


def mser(values: np.ndarray, batch: int = MSER_BATCH) -> tuple[int, np.ndarray]:
    """MSER-m over a series: (truncated batches d*, the MSER statistic for the candidates
    d = 0 .. k - max(MIN_TAIL_BATCHES, ceil(TAIL_FRACTION k))).

    Batch means z_1..z_k of ``batch`` consecutive values (a trailing partial batch is dropped);
    MSER(d) = sum_{j>d} (z_j - mean(z_{d+1..k}))^2 / (k - d)^2, the squared marginal standard
    error of the mean of what is kept; d* minimises it (first minimum on ties)."""
    k = len(values) // batch
    z = values[:k * batch].reshape(k, batch).mean(axis=1)
    z = z - z.mean()  # centred: the running sums below then lose no precision to a large mean
    s1 = np.cumsum(z[::-1])[::-1]          # s1[d] = sum_{j >= d} z_j (0-based)
    s2 = np.cumsum((z * z)[::-1])[::-1]
    m = np.arange(k, 0, -1, dtype=float)   # batches kept when d are dropped
    stat = np.maximum(s2 - s1 * s1 / m, 0.0) / (m * m)
    stat = stat[:k - max(MIN_TAIL_BATCHES, math.ceil(TAIL_FRACTION * k)) + 1]
    return int(np.argmin(stat)), stat


def steady_state(times, values, *, min_fraction: float = 0.5, span: tuple[float, float] | None = None,
                 tolerance: float = 0.01, tail_s: float = 0.0) -> SteadyState:
    """End of the warm-up transient of ``values`` observed at ``times``, by MSER-5.

    MSER-5 (K. P. White Jr. 1997, "An effective truncation heuristic for bias reduction in
    simulation output", Simulation 69(6):323-334, doi:10.1177/003754979706900601; batch size 5
    as in K. P. White Jr., M. J. Cobb, S. C. Spratt 2000, "A comparison of five steady-state
    truncation heuristics for simulation", Proc. Winter Simulation Conference, 755-760,
    doi:10.1109/WSC.2000.899870): average the series in batches of 5, and drop the d leading
    batches that minimise the squared standard error of the mean of the rest,
    sum_{j>d} (z_j - zbar_d)^2 / (k - d)^2. Dropping a transient lowers the variance faster
    than it shrinks the sample; dropping stationary data only shrinks the sample.

    A truncation point in the late part of the run is read as a run too short (the series is
    still drifting: a warm-up longer than the run, or a load beyond capacity whose queues keep
    growing), as is the practice with MSER (openkim/kim-convergence, kim_convergence/ucl/
    mser_m.py, rejects points past half the data; see also W. W. Franklin, K. P. White Jr. 2008,
    "Stationarity tests and MSER-5", Proc. Winter Simulation Conference, 541-546): ``reached``
    is False when the point falls in the last ``min_fraction`` of the run's time span, or when
    there are fewer than MIN_BATCHES x 5 finite observations; the note then says how long to
    run. Candidate points stop MIN_TAIL_BATCHES batches, and at least TAIL_FRACTION of them,
    before the end (the end effect: a handful of batches can show a spuriously small error;
    kim-convergence ignores min(5, k/4) end batches for the same reason).

    One addition of ours, for long runs: when the best point is late but the best point in the
    allowed first part gives a kept mean within ``tolerance`` (relative, default 1%) of the
    late one's, the drift is real but too small to matter and the earlier point is returned
    with ``reached`` True (tolerance=0: White's rule alone).

    times: observation times (e.g. arrival times of requests); values: the series (NaN and inf
    are dropped, so per-request arrays with unfinished requests can be passed as they are);
    span: (start, end) of the run, default (first, last) time; the point's position is measured
    in it (pass the run's duration: per-request series end before the run does); tail_s: seconds
    the run goes on after span's end (a series cut before the run's end), added to the advice.
    """
    t = np.asarray(times, dtype=float).ravel()
    v = np.asarray(values, dtype=float).ravel()
    if t.shape != v.shape:
        raise ValueError(f"steady_state: field 'values': {len(v)} values for {len(t)} times")
    if not 0.0 < min_fraction < 1.0:
        raise ValueError(f"steady_state: field 'min_fraction': must be in (0, 1), got {min_fraction}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"steady_state: field 'tolerance': must be in [0, 1), got {tolerance}")
    ok = np.isfinite(t) & np.isfinite(v)
    t, v = t[ok], v[ok]
    if len(t) > 1 and not (t[1:] >= t[:-1]).all():  # arrival order is usually given: no sort
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
    n = len(t)
    if span is not None:
        t0, t1 = float(span[0]), float(span[1])
        if not t1 > t0:
            raise ValueError(f"steady_state: field 'span': end {t1} must be after start {t0}")
    else:
        t0, t1 = (float(t[0]), float(t[-1])) if n else (0.0, 0.0)
    method = f"MSER-{MSER_BATCH}"
    need = MIN_BATCHES * MSER_BATCH
    if n < need:
        length = t1 - t0
        if n and length > 0:  # observations come at about n / length per second: scale up, x2 for the warm-up half
            tip = _advice(length * need / n / (1 - min_fraction) + tail_s)
        else:
            tip = "run longer or at a higher load"
        return SteadyState(t0, False, method, f"{n} observations, fewer than the {need} {method} needs: {tip}",
                           0, n)
    d, stat = mser(v)
    limit = t0 + (1.0 - min_fraction) * (t1 - t0)

    def at(d):
        return float(t[d * MSER_BATCH]) if d else t0
    start = at(d)
    if start <= limit:
        cut = d * MSER_BATCH
        note = (f"steady from {start:,.4g} s ({method} drops the first {cut:,} of {n:,} observations)" if cut
                else f"steady from the start ({method} drops nothing of {n:,} observations)")
        return SteadyState(start, True, method, note, cut, n)
    # The best point is late. With ~1e5-1e6 requests any drift is significant, however small: a
    # slow fluctuation of the running batch moves per-request TPOT by 0.3% for minutes (the
    # day-6 scenario, docs/serve-report.md). Accept the best point in the allowed part when
    # the later one changes the kept mean by at most ``tolerance`` of it.
    allowed = int(np.searchsorted(t[::MSER_BATCH][:len(stat)], limit, side="right"))
    if allowed > 0 and tolerance > 0:
        d2 = int(np.argmin(stat[:allowed]))
        late, early = float(v[d * MSER_BATCH:].mean()), float(v[d2 * MSER_BATCH:].mean())
        shift = abs(early - late) / abs(late) if late else math.inf
        if shift <= tolerance:
            cut = d2 * MSER_BATCH
            note = (f"steady from {at(d2):,.4g} s ({method} drops the first {cut:,} of {n:,} observations; its "
                    f"best point, {start:,.4g} s, is in the last {min_fraction:.0%} of the run but moves the mean "
                    f"by only {shift:.2%}, within the {tolerance:.0%} tolerance)")
            return SteadyState(at(d2), True, method, note, cut, n)
    # the warm-up lasted at least start - t0 and must fit in the first (1 - min_fraction)
    # of the run; x2 because a point this late is a lower bound (the series may still drift)
    want = 2.0 * (start - t0) / (1.0 - min_fraction) + tail_s
    judged = f"a {t1 - t0:,.4g} s run" if not tail_s else \
        f"the first {t1 - t0:,.4g} s of arrivals (later ones are cut: only quick requests finish)"
    note = (f"warm-up not over: {method} truncates at {start - t0:,.4g} s of {judged}, in the last "
            f"{min_fraction:.0%}; {_advice(want)}, or the load exceeds capacity if the values keep rising")
    return SteadyState(start, False, method, note, d * MSER_BATCH, n)


# ---------------------------------------------------------------- windowed figures
def generated(first, done, output, tpot: float | None, x, side: str = "left") -> np.ndarray:
    """Output tokens generated before each time in ``x`` (sorted), summed over requests: each
    request's first token at its first-token time (side 'left': one at exactly x is not yet
    counted; 'right': it is), its other output - 1 evenly over (first, done] (a request's decode
    steps take about the same time). A request still running at the end (no done time)
    generates at ``tpot`` s/token from its first token, capped at its output (tpot None: only
    its first token counts).

    The ramps sum to x * sum(r) - sum(r c) over the breakpoints c <= x (+r at first, -r at
    done, r = tokens / (done - first)): binned onto the grid, no sort of the requests."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    first, done, output = (np.asarray(a, dtype=float) for a in (first, done, output))
    m = len(x)
    started = ~np.isnan(first)
    f = first[started]
    n = np.maximum(output[started] - 1, 0.0)
    d = done[started].copy()
    run = np.isnan(d) & (n > 0)
    if tpot:
        d[run] = f[run] + n[run] * tpot
    else:
        n = np.where(run, 0.0, n)
    ramp = (n > 0) & (d > f)
    # tokens at the first-token time: the first, plus the rest when they came with it (done ==
    # first: not in ServeSim for outputs > 1; kept exact anyway)
    at_first = 1.0 + np.where(ramp, 0.0, n)
    k = np.searchsorted(x, f, side="right" if side == "left" else "left")  # counted from grid point k on
    out = np.cumsum(np.bincount(k, at_first, minlength=m + 1))[:m]
    r = n[ramp] / (d[ramp] - f[ramp])
    c = np.concatenate([f[ramp], d[ramp]])
    w = np.concatenate([r, -r])
    kc = np.searchsorted(x, c, side="left")  # c <= x_j from j = kc on
    W = np.cumsum(np.bincount(kc, w, minlength=m + 1))[:m]
    WC = np.cumsum(np.bincount(kc, w * c, minlength=m + 1))[:m]
    return out + x * W - WC


def _generated_at(first, done, output, tpot: float | None, points) -> list[float]:
    """``generated(first, done, output, tpot, x, side)[0]`` for each (x, side) of ``points``, the
    same floats: the per-request arrays are built once (they are most of the cost on millions of
    requests), and each point's sums are the same sequential bincount sums over the same requests
    in the same order (on a one-point grid, searchsorted's bin 0 is the comparison below)."""
    first = np.asarray(first, dtype=float)
    started = ~np.isnan(first)
    f = first[started]
    n = np.asarray(output, dtype=float)[started]
    n -= 1.0
    np.maximum(n, 0.0, out=n)
    d = np.asarray(done, dtype=float)[started]
    run = np.isnan(d) & (n > 0)
    if tpot:
        d[run] = f[run] + n[run] * tpot
    else:
        n[run] = 0.0
    ramp = (n > 0) & (d > f)
    at_first = np.where(ramp, 0.0, n)
    at_first += 1.0
    fr, dr = f[ramp], d[ramp]
    r = n[ramp] / (dr - fr)
    c = np.concatenate([fr, dr])
    w = np.concatenate([r, -r])
    wc = w * c
    out = []
    for x, side in points:
        x = float(x)
        # generated: k = searchsorted([x], f, "right" for side 'left' else "left"); bin 0 = f < x
        # (side 'left') or f <= x (side 'right'); kc = searchsorted([x], c, "left"); bin 0 = c <= x
        k = ((f >= x) if side == "left" else (f > x)).view(np.int8)
        kc = (c > x).astype(np.intp)  # bincount's index type: converted once for two sums
        s1 = np.bincount(k, at_first, minlength=2)[0]
        s2 = np.bincount(kc, w, minlength=2)[0]
        s3 = np.bincount(kc, wc, minlength=2)[0]
        out.append(float(s1 + x * s2 - s3))
    return out


def _pct(a: np.ndarray, q: float):
    return float(np.percentile(a, q)) if len(a) else None


def _pcts(a: np.ndarray, qs) -> list:
    """_pct for each of qs, from one np.percentile call (one partition of ``a`` instead of one per
    quantile; each quantile is interpolated from the same order statistics, so the same floats)."""
    return [float(v) for v in np.percentile(a, list(qs))] if len(a) else [None] * len(qs)


def windowed(arrival, prompt, output, first, done, start_s: float, end_s: float) -> dict:
    """Figures over the steady part [start_s, end_s] of a run, ServeSim.metrics() key names with a
    ``steady_`` prefix.

    TTFT and TPOT as metrics() defines them (TTFT = first token - arrival over requests that got
    one; TPOT = (done - first) / (output - 1) over finished requests with output > 1), restricted
    to requests that arrived at or after start_s.

    Throughput counts the tokens produced inside the window, over end_s - start_s, whoever they
    belong to: the prompt tokens of requests whose first token came (prefill done) in it, and
    output tokens as generated: each request's first token at its first-token time, its other
    output - 1 evenly over (first, done] (decode steps of one request take about the same time),
    the part inside the window counted. A request still running at end_s has no done time: it is
    taken to generate at the window's median TPOT (the run's, if none finished in the window)
    since its first token, capped at its output.
    Counting only the requests that arrived after start_s (or only completions) would miss the
    work in flight at an edge of the window: a bias of about request latency / window, large when
    outputs are long (a 5,000-token answer at 80 ms/token runs 400 s). Like metrics() this counts
    tokens as generated, but each request's own tokens once (metrics() also counts re-prefills of
    preempted requests).

    arrival, prompt, output, first, done: per request (ServeSim: wl.t, wl.prompt, wl.output,
    sh.first, sh.done; NaN where not reached).
    """
    a = np.asarray(arrival, dtype=float)
    arrays = {"prompt": prompt, "output": output, "first": first, "done": done}
    arrays = {k: np.asarray(x, dtype=float) for k, x in arrays.items()}
    for k, x in arrays.items():
        if x.shape != a.shape:
            raise ValueError(f"windowed: field '{k}': {x.shape} entries for {a.shape} arrivals")
    p, o, f, dn = arrays["prompt"], arrays["output"], arrays["first"], arrays["done"]
    if not (math.isfinite(start_s) and math.isfinite(end_s) and end_s > start_s):
        raise ValueError(f"windowed: field 'start_s': window [{start_s}, {end_s}] is empty or not finite")
    inside = a >= start_s
    started = inside & ~np.isnan(f)
    ttft = (f - a)[started]
    fin = inside & ~np.isnan(dn) & (o > 1)
    tpot = ((dn - f) / np.maximum(o - 1, 1))[fin]
    width = end_s - start_s
    with np.errstate(invalid="ignore"):  # NaN compares False: not reached, not counted
        in_win = (f >= start_s) & (f <= end_s)
        tok_in = float(p[in_win].sum())
    qs = (50,) + tuple(q for q in PERCENTILES if q != 50)
    tpot_q = dict(zip(qs, _pcts(tpot, qs)))
    fill = tpot_q[50]
    if fill is None:  # nobody that arrived in the window finished (a short window): the run's median
        every = ~np.isnan(dn) & (o > 1)
        fill = _pct(((dn - f) / np.maximum(o - 1, 1))[every], 50)
    at_end, at_start = _generated_at(f, dn, o, fill, ((end_s, "right"), (start_s, "left")))
    tok_out = float(at_end - at_start)
    res = {"steady_start_s": float(start_s), "steady_window_s": width,
           "steady_requests_arrived": int(inside.sum()), "steady_requests_started": int(started.sum()),
           "steady_requests_finished": int((inside & ~np.isnan(dn)).sum()),
           "steady_input_tokens_per_s": tok_in / width, "steady_output_tokens_per_s": tok_out / width,
           "steady_ttft_mean_s": float(ttft.mean()) if len(ttft) else None}
    res.update({f"steady_ttft_p{q}_s": v for q, v in zip(PERCENTILES, _pcts(ttft, PERCENTILES))})
    res["steady_tpot_mean_s"] = float(tpot.mean()) if len(tpot) else None
    res.update({f"steady_tpot_p{q}_s": tpot_q[q] for q in PERCENTILES})
    return res


# ---------------------------------------------------------------- binding resource
def _role_shares(role: str, r: dict) -> dict:
    for k in ROLE_FIELDS:
        if k not in r:
            raise ValueError(f"binding_resource: field '{role}.{k}': missing")
        x = r[k]
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(x) \
                or x < 0:
            raise ValueError(f"binding_resource: field '{role}.{k}': must be a finite number >= 0, got {x!r}")
    total = sum(float(r[k]) for k, _ in BUSY_PARTS) + float(r["idle_s"])
    out = {name: (float(r[k]) / total if total else 0.0) for k, name in BUSY_PARTS}
    out["idle"] = float(r["idle_s"]) / total if total else 0.0
    out["utilization"] = float(r["utilization"])
    out["kv_utilization"] = float(r["kv_utilization"])
    out["kv_blocked_share"] = float(r["kv_blocked_steps"]) / r["steps"] if r["steps"] else 0.0
    return out


def binding_resource(role_breakdown: dict) -> tuple[str, dict]:
    """What limits the deployment, and the shares behind the verdict.

    role_breakdown: per role ("prefill", "decode", "aggregated"), the role's instance time in
    seconds split as compute_s (time of ops bound by compute), memory_s (ops bound by memory
    bandwidth), comm_s (exposed communication: EP all-to-all, TP all-reduce not hidden by
    overlap), floor_s (fixed latency: kernel launch floors and per-step host overhead, as
    sim.stepcost's breakdown() gives them), idle_s (no step running), plus kv_blocked_steps and
    steps (steps at which a request waited for KV space, of all steps), kv_utilization (mean
    occupied share of the KV cache) and utilization (how much of the role's capacity the load
    uses, 0..1). For prefill that is the busy share of instances x duration. A decode (or
    aggregated) instance steps whenever one request runs, so its busy share is ~1 at any load;
    its utilization should be the mean running batch over the largest batch it may hold
    (max_batch_per_device x DP ranks), KV space being judged by kv_utilization. Shares are of
    the five times' sum, so they add up to 1 per role.

    The rule, first match wins:
      1. "KV capacity": some role's KV cache is full (kv_utilization >= 0.95) or blocks
         admissions (kv_blocked_steps >= 1% of its steps): the batch cannot grow, whatever
         the step time (of several such roles, the fuller one).
      2. "offered load": the busiest role (highest utilization) is below 90% busy: every role
         has idle time, the deployment is not saturated and more load would be served.
      3. otherwise, on the busiest role, the largest of compute, memory bandwidth, network and
         latency floor (ties in that order).

    Returns (name, {"role": the role the verdict is about, "reason": one line,
    "roles": {role: {"compute", "memory bandwidth", "network", "latency floor", "idle" (shares),
    "utilization", "kv_utilization", "kv_blocked_share"}}}).
    """
    if not isinstance(role_breakdown, dict) or not role_breakdown:
        raise ValueError("binding_resource: field 'roles': need a non-empty dict of role -> time split")
    roles = {}
    for role, r in role_breakdown.items():
        if not isinstance(r, dict):
            raise ValueError(f"binding_resource: field '{role}': must be a dict, got {type(r).__name__}")
        roles[role] = _role_shares(role, r)
    kv = [(max(s["kv_utilization"] / KV_FULL_UTILIZATION, s["kv_blocked_share"] / KV_BLOCKED_SHARE), role)
          for role, s in roles.items()
          if s["kv_utilization"] >= KV_FULL_UTILIZATION or s["kv_blocked_share"] >= KV_BLOCKED_SHARE]
    if kv:
        role = max(kv, key=lambda x: x[0])[1]  # max keeps the first of equals: dict order
        s = roles[role]
        return "KV capacity", {"role": role, "roles": roles, "reason": (
            f"{role}: KV cache {s['kv_utilization']:.0%} full on average, requests waited for KV space at "
            f"{s['kv_blocked_share']:.1%} of steps")}
    role = max(roles, key=lambda k: roles[k]["utilization"])
    s = roles[role]
    if s["utilization"] < SATURATED_UTILIZATION:
        return "offered load", {"role": role, "roles": roles, "reason": (
            f"the most utilized role, {role}, is at {s['utilization']:.0%} (< {SATURATED_UTILIZATION:.0%}): "
            "not saturated, more load would be served")}
    name = max((n for _, n in BUSY_PARTS), key=lambda n: s[n])
    return name, {"role": role, "roles": roles, "reason": (
        f"{role} is at {s['utilization']:.0%} utilization and {name} is the largest share of its time ({s[name]:.0%})")}


# ---------------------------------------------------------------- the report
def _settled(arrival, series, latency, duration_s: float, min_fraction: float) -> SteadyState:
    """steady_state of a per-request series in arrival order, cut where it stops being fair:
    near the end only requests quick enough to be done are in it (short outputs for TPOT, which
    run at a slightly different TPOT; short waits for TTFT), a drift MSER would take for warm-up.
    The cut is the run's end minus the 99th percentile of the observed latency (arrival to the
    observation); the position of the truncation point is judged within [0, cut]."""
    seen = latency[np.isfinite(latency)]
    cut = duration_s - float(np.percentile(seen, 99)) if len(seen) else duration_s
    if cut <= 0:  # requests take about as long as the run: nothing is fair, use it all (and fail)
        cut = duration_s
    keep = arrival <= cut
    return steady_state(arrival[keep], series[keep], min_fraction=min_fraction, span=(0.0, cut),
                        tail_s=duration_s - cut)


def fill_time(first, done, output, tpot: float | None, deficit: float = FILL_DEFICIT) -> float:
    """Seconds after which the decode batch holds all but ``deficit`` of its steady work.

    With requests entering decode at a steady rate, each decoding for S seconds, the work in
    flight at time T after the start falls short of the steady amount by E[(S - T)+] / E[S]
    (the requests that would still be running had they arrived before the start: an M/G/inf
    count). Output tokens/s therefore ramps for as long as the longest outputs run, which can be
    minutes after TTFT and TPOT have settled. S per request: done - first when finished, else
    (output - 1) x ``tpot`` (the steady median); 1-token outputs do not decode."""
    n = np.maximum(np.asarray(output, dtype=float) - 1, 0.0)
    with np.errstate(invalid="ignore"):
        S = np.where(np.isnan(done), n * tpot if tpot else np.nan, done - first)  # no tpot: unknown
    S = np.sort(S[(n > 0) & np.isfinite(S)])
    total = S.sum()
    if not len(S) or total <= 0:
        return 0.0
    tail = np.cumsum(S[::-1])[::-1]            # tail[i] = sum of S[i:]
    above = len(S) - np.arange(len(S))         # how many of S are >= S[i]
    short = (tail - S * above) / total         # E[(S - T)+] / E[S] at T = S[i]
    return float(S[int(np.argmax(short <= deficit))])


def steady_metrics(arrival, prompt, output, first, done, duration_s: float, *, roles: dict | None = None,
                   min_fraction: float = 0.5) -> dict:
    """Where the run is steady, the figures over that part, and (with ``roles``) what binds.

    Steady means: per-request TTFT and TPOT (in arrival order) have settled (steady_state, MSER-5),
    and the decode batch has filled (fill_time, counted from where TTFT settled: requests enter
    decode at a steady rate from there). The latest of the three starts the window; it must fall
    in the first 1 - min_fraction of the run. Keys: steady_state_reached, steady_state_method,
    steady_state_note, the windowed() keys, and binding_resource / binding_role / binding_reason /
    binding_shares.

    Why not MSER on output tokens/s per interval: the series is correlated over a request's
    lifetime (tens of intervals when outputs are long), and MSER-5 then truncates at slow
    fluctuations: on synthetic runs with 40 s lifetimes, 3 of 8 seeds were called not steady at
    truncation points past 85% of the run (docs/serve-report.md)."""
    a = np.asarray(arrival, dtype=float)
    f, dn = np.asarray(first, dtype=float), np.asarray(done, dtype=float)
    o = np.asarray(output, dtype=float)
    D = float(duration_s)
    multi = o > 1
    with np.errstate(invalid="ignore", divide="ignore"):
        # np.where(multi, (dn - f) / np.maximum(o - 1, 1), nan), in place (the same floats)
        tpot = dn - f
        den = o - 1
        np.maximum(den, 1, out=den)
        tpot /= den
        tpot[~multi] = np.nan
    ttft = f - a  # the series and its latency (one array: _settled does not modify it)
    series = [("TTFT", ttft, ttft)] + ([("TPOT", tpot, dn - a)] if multi.any() else [])  # 1-token answers: no TPOT
    found = [(name, _settled(a, x, latency, D, min_fraction)) for name, x, latency in series]
    late = max(found, key=lambda x: (not x[1].reached, x[1].start_s))  # a failure first, else the later start
    name, st = late
    reached = all(s.reached for _, s in found)
    note, start = f"{name}: {st.note}", st.start_s
    fill = fill_time(f, dn, o, _pct(tpot[np.isfinite(tpot)], 50))
    batch_full = found[0][1].start_s + fill
    if reached and batch_full > start:
        start = batch_full
        limit = (1.0 - min_fraction) * D
        why = (f"the decode batch fills {fill:,.4g} s after TTFT settles at {found[0][1].start_s:,.4g} s "
               f"(requests decode that long: all but {FILL_DEFICIT:.0%} of the steady work in flight)")
        if start <= limit:
            note = f"output tokens/s: steady from {start:,.4g} s: {why}"
        else:
            reached = False
            note = (f"output tokens/s: not steady before {start:,.4g} s, in the last {min_fraction:.0%} of the "
                    f"run: {why}; {_advice(start / (1.0 - min_fraction))}")
    res = {"steady_state_reached": reached, "steady_state_method": f"{st.method} + batch fill",
           "steady_state_note": note}
    # a window even when not reached: from the found start, or (later than the run allows) over the
    # last min_fraction of the run -- warm-up figures, labelled as such, never an empty window
    res.update(windowed(a, prompt, o, f, dn, start if reached else min(start, (1.0 - min_fraction) * D), D))
    if roles is not None:
        name, sh = binding_resource(roles)
        res.update({"binding_resource": name, "binding_role": sh["role"], "binding_reason": sh["reason"],
                    "binding_shares": sh["roles"]})
    return res


def _ms(x, digits=1) -> str:
    return "n/a" if x is None else f"{x * 1e3:,.{digits}f} ms"


INDENT = " " * 13  # the value column of `dsref sim serve`'s text output ("  requests   ...")


def format_report(r: dict) -> list[str]:
    """Lines for `dsref sim serve`'s text output (after the whole-run figures), from a dict with
    the steady_metrics() keys."""
    ok = r["steady_state_reached"]
    lines = [f"  steady     {'reached' if ok else 'NOT reached'} ({r['steady_state_method']}): "
             f"{r['steady_state_note']}"]
    when = f"from {r['steady_start_s']:,.0f} s" + ("" if ok else " (warm-up figures, not steady)")
    lines.append(f"{INDENT}{when}: output {r['steady_output_tokens_per_s']:,.0f} tok/s, input "
                 f"{r['steady_input_tokens_per_s']:,.0f} tok/s; TTFT p50 {_ms(r['steady_ttft_p50_s'])} "
                 f"p99 {_ms(r['steady_ttft_p99_s'])}; TPOT p50 {_ms(r['steady_tpot_p50_s'], 2)} "
                 f"p99 {_ms(r['steady_tpot_p99_s'], 2)}")
    if "binding_resource" in r:
        lines.append(f"  bound by   {r['binding_resource']}: {r['binding_reason']}")
        for role, s in r["binding_shares"].items():
            lines.append(f"{INDENT}{role}: compute {s['compute']:.0%}, memory {s['memory bandwidth']:.0%}, "
                         f"network {s['network']:.0%}, floor {s['latency floor']:.0%}, idle {s['idle']:.0%}; "
                         f"KV {s['kv_utilization']:.0%} full, blocked at {s['kv_blocked_share']:.1%} of steps")
    return lines
