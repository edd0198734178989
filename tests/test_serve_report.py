"""sim/serve_report.py: MSER-5 on series with a known transient, windowed figures in closed form,
every branch of the binding-resource rule, and the report text."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsref.sim.serve_report import (KV_BLOCKED_SHARE, KV_FULL_UTILIZATION, MIN_BATCHES, MSER_BATCH,
                                    SATURATED_UTILIZATION, binding_resource, fill_time, format_report, mser,
                                    steady_state, steady_metrics, windowed)

SEEDS = range(5)


# ---------------------------------------------------------------- MSER-5
def test_mser_statistic_matches_its_definition():
    """The vectorised statistic equals sum_{j>d} (z_j - mean)^2 / (k - d)^2 over batch means of 5."""
    x = np.random.default_rng(0).normal(size=103)  # 20 batches, 3 values dropped
    d, stat = mser(x)
    z = x[:100].reshape(20, 5).mean(axis=1)
    want = [((z[i:] - z[i:].mean()) ** 2).sum() / (20 - i) ** 2 for i in range(len(stat))]
    assert len(stat) == 20 - 5 + 1  # no point leaving fewer than 5 batches is a candidate
    np.testing.assert_allclose(stat, want, rtol=1e-9, atol=1e-15)
    assert d == int(np.argmin(want))
    # with 200 batches, none leaving fewer than 10% of them (20)
    assert len(mser(np.random.default_rng(1).normal(size=1000))[1]) == 200 - 20 + 1


def test_end_effect_of_batched_requests_is_ignored():
    """Per-request TTFTs come in runs of nearly equal values (one prefill batch): a stationary
    series of such runs, whose last 40 values are one run, is steady from the start."""
    rng = np.random.default_rng(5)
    level = np.repeat(rng.normal(1.0, 0.2, 500), 40)   # 500 prefill batches of 40 requests
    x = level + rng.normal(0, 1e-4, len(level))
    s = steady_state(np.arange(len(x)) * 0.025, x)
    assert s.reached and s.start_s < 0.5 * 500


@pytest.mark.parametrize("seed", SEEDS)
def test_exponential_transient_ends_near_its_known_end(seed):
    """5 exp(-t/10) + N(0, 0.3): the transient sinks into the noise at t = 10 ln(5/0.3) = 28.1 s."""
    amp, tau, sd = 5.0, 10.0, 0.3
    t = np.arange(2000) * 0.1
    x = amp * np.exp(-t / tau) + np.random.default_rng(seed).normal(0, sd, len(t))
    s = steady_state(t, x)
    end = tau * math.log(amp / sd)
    assert s.reached and s.method == "MSER-5"
    assert 0.8 * end <= s.start_s <= 1.8 * end, s
    assert s.truncated == int(np.searchsorted(t, s.start_s))
    # what is kept is the stationary part: its mean is the true one (0) within noise
    assert abs(x[s.truncated:].mean()) < 0.05
    assert abs(x.mean()) > 0.2  # while the whole run's mean is biased by the warm-up


@pytest.mark.parametrize("seed", SEEDS)
def test_stationary_series_starts_near_zero(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    t = np.arange(n) * 0.1
    white = rng.normal(3.0, 1.0, n)
    e = rng.normal(size=n)
    ar = np.empty(n)  # AR(1), phi 0.8: correlated like queue lengths
    ar[0] = e[0]
    for i in range(1, n):
        ar[i] = 0.8 * ar[i - 1] + e[i]
    for x in (white, ar):
        s = steady_state(t, x)
        assert s.reached
        assert s.start_s <= 0.05 * t[-1], s


def test_too_short_is_not_reached_and_says_how_long():
    t = np.arange(MIN_BATCHES * MSER_BATCH - 1) * 2.0  # one observation short, over 98 s
    s = steady_state(t, np.ones_like(t))
    assert not s.reached and s.points == len(t)
    assert "fewer than the 50 MSER-5 needs" in s.note
    # 49 per 98 s -> 50 in 100 s, x2 for the warm-up half = 200 s
    assert "--duration 200" in s.note
    assert not steady_state([], []).reached


def test_drift_to_the_end_is_not_reached():
    """A queue growing for the whole run (load beyond capacity): the best truncation point is late."""
    t = np.arange(4000) * 0.25
    x = 0.01 * t + np.random.default_rng(1).normal(0, 0.1, len(t))
    s = steady_state(t, x)
    assert not s.reached
    assert s.start_s > 0.5 * t[-1]
    assert "warm-up not over" in s.note and "load exceeds capacity" in s.note
    assert "--duration" in s.note


def test_min_fraction_moves_the_limit():
    """A transient ending near 30% of the run: reached with the default half, not when the
    point must fall in the first 20% (min_fraction 0.8)."""
    t = np.arange(5000) * 0.1
    x = np.where(t < 150, 5.0 - t / 30, 0.0) + np.random.default_rng(2).normal(0, 0.2, len(t))
    assert steady_state(t, x).reached
    s = steady_state(t, x, min_fraction=0.8)
    assert not s.reached and "last 80%" in s.note


@pytest.mark.parametrize("seed", SEEDS)
def test_tolerance_accepts_a_late_drift_too_small_to_matter(seed):
    """Warm-up to 100, then a +0.5% step at 70% of the run: MSER's best point is the step (late),
    but the earlier point moves the kept mean by < 1%: reached with the default tolerance, not
    with tolerance 0 (White's rule alone); a +3% step is not accepted."""
    n = 20000
    t = np.arange(n) * 0.01
    x = 100 + 10 * np.exp(-t / 5) + np.random.default_rng(seed).normal(0, 0.1, n)
    x[int(0.7 * n):] += 0.5
    s = steady_state(t, x)
    assert s.reached and 5 < s.start_s < 40 and "tolerance" in s.note
    strict = steady_state(t, x, tolerance=0)
    assert not strict.reached and strict.start_s == pytest.approx(140.0, abs=0.1)
    x[int(0.7 * n):] += 2.5
    assert not steady_state(t, x).reached


def test_unsorted_and_nan_inputs():
    """NaN values (unfinished requests) are dropped; times need not be sorted."""
    t = np.arange(2000) * 0.1
    x = 5 * np.exp(-t / 10) + np.random.default_rng(3).normal(0, 0.3, len(t))
    ref = steady_state(t, x)
    x2 = x.copy()
    x2[1::7] = np.nan
    keep = ~np.isnan(x2)
    assert steady_state(t, x2).points == keep.sum()
    perm = np.random.default_rng(4).permutation(len(t))
    assert steady_state(t[perm], x[perm]) == ref


def test_steady_state_bad_input():
    with pytest.raises(ValueError, match="field 'values'"):
        steady_state([0, 1, 2], [1, 2])
    with pytest.raises(ValueError, match="field 'min_fraction'"):
        steady_state([0, 1], [1, 2], min_fraction=1.0)
    with pytest.raises(ValueError, match="field 'span'"):
        steady_state([0, 1], [1, 2], span=(5, 5))
    with pytest.raises(ValueError, match="field 'tolerance'"):
        steady_state([0, 1], [1, 2], tolerance=-0.1)


# ---------------------------------------------------------------- windowed
def _requests():
    """201 requests arriving at t = 0..200 s, 100-token prompts, 11-token outputs. Before 100 s:
    TTFT 150 s, TPOT 5 ms. From 100 s (i = 0..100): TTFT 1 + 0.01 i s, TPOT 20 + i ms; requests
    at 150..159 s unfinished, and the one at 160 s has a 1-token output (no TPOT)."""
    t = np.arange(201.0)
    i = t - 100
    ttft = np.where(t < 100, 150.0, 1 + 0.01 * i)
    tpot = np.where(t < 100, 0.005, 0.020 + 0.001 * i)
    out = np.full(201, 11)
    out[160] = 1
    first = t + ttft
    done = first + tpot * (out - 1)
    done[150:160] = np.nan
    return t, np.full(201, 100), out, first, done


def test_windowed_closed_forms():
    t, prompt, out, first, done = _requests()
    w = windowed(t, prompt, out, first, done, 100.0, 300.0)
    # TTFT over the 101 requests from 100 s: 1.00, 1.01, ..., 2.00 s (linear-interpolated percentiles)
    assert w["steady_requests_arrived"] == 101 and w["steady_requests_started"] == 101
    assert w["steady_requests_finished"] == 91
    assert w["steady_ttft_mean_s"] == pytest.approx(1.5)
    assert w["steady_ttft_p50_s"] == pytest.approx(1.5)
    assert w["steady_ttft_p90_s"] == pytest.approx(1.9)
    assert w["steady_ttft_p99_s"] == pytest.approx(1.99)
    # TPOT: i = 0..100 less the 10 unfinished (50..59) and the 1-token one (60): 90 values
    i = np.setdiff1d(np.arange(101), np.arange(50, 61))
    tp = 0.020 + 0.001 * i
    assert w["steady_tpot_mean_s"] == pytest.approx(tp.mean())
    # sorted: positions 0..49 hold i = 0..49, 50..89 hold i = 61..100; percentile q sits at
    # position q/100 x 89, interpolated: p50 at 44.5 -> i 44.5; p90 at 80.1 -> i 91.1; p99 at 88.11 -> 99.11
    assert w["steady_tpot_p50_s"] == pytest.approx(0.020 + 0.001 * 44.5)
    assert w["steady_tpot_p90_s"] == pytest.approx(0.020 + 0.001 * 91.1)
    assert w["steady_tpot_p99_s"] == pytest.approx(0.020 + 0.001 * 99.11)
    # tokens in [100, 300]: every first token (early requests at 150..249 s, late ones at
    # 101..202 s), so every prompt; every output token: the finished ones are done by
    # 202 + 0.12 x 10 = 203.2 s, the ten unfinished run at the median TPOT (64.5 ms) from
    # ~151..161 s, their 10 tokens done within a second: 200 x 11 + the 1-token request
    assert np.nanmax(first) <= 300 and np.nanmax(done) <= 300
    assert w["steady_input_tokens_per_s"] == pytest.approx(201 * 100 / 200)
    assert w["steady_output_tokens_per_s"] == pytest.approx((200 * 11 + 1) / 200)
    assert w["steady_window_s"] == 200.0 and w["steady_start_s"] == 100.0
    # the window is closed at its start: the request at 100 s is in at 100 s, out at 100.5 s
    later = windowed(t, prompt, out, first, done, 100.5, 300.0)
    assert later["steady_requests_arrived"] == 100
    assert later["steady_ttft_p50_s"] == pytest.approx(1.505)  # 1.01 .. 2.00


def _tokens_in(first, done, out, s, e, tpot):
    """The documented rule, one request at a time: first token at `first`, the rest evenly over
    (first, done], an unfinished request at `tpot` s/token from its first token."""
    total = 0.0
    for f, d, o in zip(first, done, out):
        if math.isnan(f):
            continue
        total += s <= f <= e
        if o <= 1:
            continue
        if math.isnan(d):
            d = f + (o - 1) * tpot
        total += (o - 1) * max(0.0, min(d, e) - max(f, s)) / (d - f)
    return total


def test_windowed_counts_tokens_generated_in_the_window():
    """A narrower window [100, 150.3]: prompts of the requests whose first token came in it (of
    the early ones only t = 0, at 150 s; the late ones t = 100 + i, first token at 101 + 1.01 i s,
    for i = 0..48), and output tokens generated in it, requests in flight at an edge in part."""
    t, prompt, out, first, done = _requests()
    done[120] = np.nan  # in flight at the end: generating at the median TPOT since 121.2 s
    w = windowed(t, prompt, out, first, done, 100.0, 150.3)
    n_in = int(((first >= 100) & (first <= 150.3)).sum())
    assert n_in == 1 + 49
    assert w["steady_input_tokens_per_s"] == pytest.approx(n_in * 100 / 50.3)
    want = _tokens_in(first, done, out, 100.0, 150.3, w["steady_tpot_p50_s"])
    assert w["steady_output_tokens_per_s"] == pytest.approx(want / 50.3, rel=1e-12)
    # a window ending before any first token: nothing produced
    none = windowed(t, prompt, out, first, done, 0.0, 100.5)
    assert none["steady_output_tokens_per_s"] == 0.0 and none["steady_input_tokens_per_s"] == 0.0


def test_windowed_edges_by_hand():
    """Window [15, 30]. A (first token 10 s, done 20 s, 11 tokens): 5 of its 10 later tokens fall
    after 15 s. C (first 16 s, done 26 s): all 11. B (first 17 s, 101 tokens, unfinished):
    its first token + 13 s at the median TPOT of 1 s/token = 14. 30 tokens in 15 s."""
    t = np.array([0.0, 15.0, 16.0])           # A, C, B
    first = np.array([10.0, 16.0, 17.0])
    done = np.array([20.0, 26.0, np.nan])
    out = np.array([11, 11, 101])
    w = windowed(t, np.array([7, 30, 500]), out, first, done, 15.0, 30.0)
    assert w["steady_output_tokens_per_s"] == pytest.approx(30 / 15)
    assert w["steady_input_tokens_per_s"] == pytest.approx(530 / 15)
    assert w["steady_tpot_p50_s"] == pytest.approx(1.0)
    # no finished request arrived after the start: B runs at the run's median TPOT (A's and C's
    # 1 s/token): A 3.5, C 9.5 (its first token at 16 s is before the window), B 1 + 13
    w = windowed(t, np.array([7, 30, 500]), out, first, done, 16.5, 30.0)
    assert w["steady_tpot_p50_s"] is None
    assert w["steady_output_tokens_per_s"] == pytest.approx((3.5 + 9.5 + 14) / 13.5)
    # no finished request at all: only B's first token
    w = windowed(t, np.array([7, 30, 500]), out, first, np.full(3, np.nan), 16.5, 30.0)
    assert w["steady_output_tokens_per_s"] == pytest.approx(1 / 13.5)
    assert fill_time(first, np.full(3, np.nan), out, None) == 0.0  # no decode time known


def test_windowed_from_the_start_is_the_whole_run_definition():
    """start_s before every arrival: TTFT/TPOT as ServeSim.metrics() computes them."""
    t, prompt, out, first, done = _requests()
    w = windowed(t, prompt, out, first, done, -1.0, 300.0)
    ttft = first - t
    fin = ~np.isnan(done) & (out > 1)
    tpot = ((done - first) / np.maximum(out - 1, 1))[fin]
    assert w["steady_ttft_p99_s"] == pytest.approx(np.percentile(ttft, 99))
    assert w["steady_tpot_p90_s"] == pytest.approx(np.percentile(tpot, 90))
    assert w["steady_tpot_mean_s"] == pytest.approx(tpot.mean())


def test_windowed_empty_and_bad_input():
    t, prompt, out, first, done = _requests()
    w = windowed(t, prompt, out, first, done, 250.0, 300.0)  # nobody arrived after 250 s
    assert w["steady_requests_arrived"] == 0 and w["steady_ttft_p50_s"] is None
    assert w["steady_tpot_mean_s"] is None
    with pytest.raises(ValueError, match="field 'first'"):
        windowed(t, prompt, out, first[:-1], done, 0.0, 10.0)
    with pytest.raises(ValueError, match="field 'start_s'"):
        windowed(t, prompt, out, first, done, 10.0, 10.0)
    with pytest.raises(ValueError, match="field 'start_s'"):
        windowed(t, prompt, out, first, done, math.nan, 10.0)


# ---------------------------------------------------------------- binding resource
def _role(compute=0.0, memory=0.0, comm=0.0, floor=0.0, idle=0.0, blocked=0, steps=1000, kv=0.3, util=None):
    busy = compute + memory + comm + floor
    if util is None:
        util = busy / (busy + idle) if busy + idle else 0.0
    return {"compute_s": compute, "memory_s": memory, "comm_s": comm, "floor_s": floor, "idle_s": idle,
            "kv_blocked_steps": blocked, "steps": steps, "kv_utilization": kv, "utilization": util}


@pytest.mark.parametrize("part,name", [("compute", "compute"), ("memory", "memory bandwidth"),
                                       ("comm", "network"), ("floor", "latency floor")])
def test_largest_share_of_a_saturated_role_binds(part, name):
    kw = {"compute": 10.0, "memory": 10.0, "comm": 10.0, "floor": 10.0, "idle": 2.0}
    kw[part] = 40.0
    got, sh = binding_resource({"decode": _role(**kw)})
    assert got == name and sh["role"] == "decode"
    s = sh["roles"]["decode"]
    assert s[name] == pytest.approx(40.0 / 72.0)
    assert s["idle"] == pytest.approx(2.0 / 72.0)
    assert sum(s[k] for k in ("compute", "memory bandwidth", "network", "latency floor", "idle")) \
        == pytest.approx(1.0)


def test_ties_go_in_the_documented_order():
    assert binding_resource({"d": _role(compute=5, memory=5, comm=5, floor=5)})[0] == "compute"
    assert binding_resource({"d": _role(memory=5, comm=5, floor=5)})[0] == "memory bandwidth"


def test_busiest_role_is_the_one_judged():
    roles = {"prefill": _role(compute=95, memory=1, idle=4),     # 96% busy, compute-bound
             "decode": _role(compute=1, memory=91, idle=8)}      # 92% busy, memory-bound
    name, sh = binding_resource(roles)
    assert (name, sh["role"]) == ("compute", "prefill")
    roles["decode"]["utilization"] = 0.99
    assert binding_resource(roles)[0] == "memory bandwidth"


def test_offered_load_below_saturation():
    name, sh = binding_resource({"prefill": _role(compute=50, idle=50), "decode": _role(memory=80, idle=20)})
    assert name == "offered load" and sh["role"] == "decode"
    assert "80%" in sh["reason"]
    # the threshold itself counts as saturated
    at = _role(memory=1, util=SATURATED_UTILIZATION)
    assert binding_resource({"decode": at})[0] == "memory bandwidth"


@pytest.mark.parametrize("kw", [{"kv": KV_FULL_UTILIZATION}, {"kv": 0.99},
                                {"blocked": int(KV_BLOCKED_SHARE * 1000), "kv": 0.5}])
def test_kv_capacity_binds_first(kw):
    """KV full or KV-blocked binds even on an unsaturated role (the batch cannot grow)."""
    roles = {"prefill": _role(compute=99, idle=1), "decode": _role(memory=50, idle=50, **kw)}
    name, sh = binding_resource(roles)
    assert name == "KV capacity" and sh["role"] == "decode"
    assert sh["roles"]["decode"]["kv_blocked_share"] == pytest.approx(kw.get("blocked", 0) / 1000)


def test_kv_just_below_thresholds_does_not_bind():
    roles = {"decode": _role(memory=99, idle=1, kv=KV_FULL_UTILIZATION - 1e-9,
                             blocked=int(KV_BLOCKED_SHARE * 1000) - 1)}
    assert binding_resource(roles)[0] == "memory bandwidth"


def test_kv_picks_the_fuller_role():
    roles = {"a": _role(memory=1, kv=0.96), "b": _role(memory=1, kv=0.5, blocked=100)}  # 10% blocked
    assert binding_resource(roles)[1]["role"] == "b"


def test_zero_time_role():
    name, sh = binding_resource({"decode": _role(steps=0)})
    assert name == "offered load"
    assert sh["roles"]["decode"]["compute"] == 0.0 and sh["roles"]["decode"]["kv_blocked_share"] == 0.0


@pytest.mark.parametrize("bad,match", [
    ({}, "field 'roles'"),
    ({"decode": 3}, "field 'decode'"),
    ({"decode": {k: v for k, v in _role().items() if k != "floor_s"}}, "field 'decode.floor_s': missing"),
    ({"decode": {**_role(), "comm_s": -1.0}}, "field 'decode.comm_s'"),
    ({"decode": {**_role(), "steps": True}}, "field 'decode.steps'"),
    ({"decode": {**_role(), "idle_s": math.inf}}, "field 'decode.idle_s'"),
    ({"decode": {**_role(), "utilization": "high"}}, "field 'decode.utilization'"),
])
def test_binding_resource_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        binding_resource(bad)


# ---------------------------------------------------------------- the report
def _poisson_run(seed, overload=False):
    """Per-request arrays of a synthetic run: 600 s, 20 requests/s; TTFT warms up from 3 s to
    0.3 s over ~60 s (or, overloaded, grows with the backlog), TPOT 20 ms."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / 20, 12000))
    t = t[t < 600]
    n = len(t)
    ttft = (0.01 * t if overload else 0.3 + 2.7 * np.exp(-t / 15)) + rng.exponential(0.05, n)
    out = rng.integers(2, 200, n)
    first = t + ttft
    done = first + (0.02 + rng.normal(0, 0.001, n)) * (out - 1)
    done[done > 600] = np.nan
    first[first > 600] = np.nan
    return t, rng.integers(100, 2000, n), out, first, done


@pytest.mark.parametrize("seed", SEEDS)
def test_steady_metrics_on_a_warming_run(seed):
    t, prompt, out, first, done = _poisson_run(seed)
    r = steady_metrics(t, prompt, out, first, done, 600.0)
    assert r["steady_state_reached"]
    # the TTFT transient (2.7 exp(-t/15) s) sinks under its noise (50 ms) at 15 ln 54 = 60 s;
    # the output tokens/s series (3 s intervals of Poisson work) may cut later, within the first half
    assert 0.8 * 15 * math.log(2.7 / 0.05) < r["steady_start_s"] < 300
    # after the warm-up TTFT is the steady 0.3 s + Exp(50 ms): p50 0.3 + 0.05 ln 2
    assert r["steady_ttft_p50_s"] == pytest.approx(0.3 + 0.05 * math.log(2), abs=0.01)
    lines = format_report(r)
    assert lines[0].startswith("  steady     reached (MSER-5 + batch fill)")
    assert "warm-up figures" not in lines[1]


def test_steady_metrics_overloaded_run_and_binding():
    t, prompt, out, first, done = _poisson_run(0, overload=True)
    roles = {"decode": _role(memory=90, comm=5, idle=5)}
    r = steady_metrics(t, prompt, out, first, done, 600.0, roles=roles)
    assert not r["steady_state_reached"]
    assert r["steady_state_note"].startswith("TTFT: warm-up not over")
    assert r["binding_resource"] == "memory bandwidth" and r["binding_role"] == "decode"
    text = "\n".join(format_report(r))
    assert "NOT reached" in text and "(warm-up figures, not steady)" in text
    assert "bound by   memory bandwidth" in text and "memory 90%" in text


def test_steady_metrics_waits_for_the_batch_to_fill():
    """Flat TTFT and TPOT, but 10,000-token answers at 20 ms/token run 200 s each: output tokens/s
    ramps for 200 s while the batch fills, and the steady window starts after it."""
    rng = np.random.default_rng(7)
    t = np.cumsum(rng.exponential(1 / 2, 2000))
    t = t[t < 1000]
    n = len(t)
    out = np.full(n, 10_000)
    first = t + 0.3 + rng.exponential(0.05, n)
    done = first + (0.02 + rng.normal(0, 0.0005, n)) * (out - 1)
    done[done > 1000] = np.nan
    r = steady_metrics(t, np.full(n, 1000), out, first, done, 1000.0)
    assert r["steady_state_reached"]
    assert r["steady_state_note"].startswith("output tokens/s")
    # the batch is full once the first requests end: 200 s (+ their ~0.35 s TTFT, + the noise
    # of the longest decode times, 0.5 ms x 9,999 x ~3 sd)
    assert 199 < r["steady_start_s"] < 216
    # steady: 2 requests/s x 10,000 tokens: the requests in flight over the window, counted
    rate = 10_000 * ((t >= r["steady_start_s"] - 200) & (t < 1000 - 200)).sum() / (1000 - r["steady_start_s"])
    assert r["steady_output_tokens_per_s"] == pytest.approx(rate, rel=0.01)
    # the whole run (the same count from 0 s) carries the 200 s ramp: ~10% lower
    whole = windowed(t, np.full(n, 1000), out, first, done, 0.0, 1000.0)["steady_output_tokens_per_s"]
    assert whole < 0.93 * r["steady_output_tokens_per_s"]


def test_fill_time_closed_forms():
    """E[(S - T)+] / E[S] <= 1%: S all equal -> T = S; S = 1 (x 99) and 100 (x 1): the one long
    request holds 100/199 of the work, so T must be within 1.99 of 100 -> the largest S."""
    f = np.zeros(100)
    assert fill_time(f, f + 30.0, np.full(100, 11.0), None) == 30.0
    done = np.r_[np.ones(99), 100.0]
    assert fill_time(f, done, np.full(100, 11.0), None) == 100.0
    # a looser deficit: T = 1 leaves 99/199 = 49.7% missing; at T = S[i] the deficit is only
    # evaluated at the observed values, so a 50% bound is met at T = 1
    assert fill_time(f, done, np.full(100, 11.0), None, deficit=0.5) == 1.0
    # unfinished requests decode at the given TPOT: (output - 1) x tpot = 10 x 3 s
    assert fill_time(f, np.full(100, np.nan), np.full(100, 11.0), 3.0) == 30.0
    # 1-token outputs do not decode; none at all: 0
    assert fill_time(f, f, np.ones(100), None) == 0.0


def test_batch_still_filling_is_not_reached():
    """Answers that decode for 600 s in a 1,000 s run: the batch is not full before 600 s, past
    the first half: not steady, and the advice is a run of at least 2 x 600 s -> 2,000 s."""
    rng = np.random.default_rng(8)
    t = np.cumsum(rng.exponential(1 / 5, 6000))
    t = t[t < 1000]
    n = len(t)
    out = np.full(n, 30_001)
    first = t + 0.3 + rng.exponential(0.05, n)
    done = first + 0.02 * (out - 1)
    done[done > 1000] = np.nan
    r = steady_metrics(t, np.full(n, 1000), out, first, done, 1000.0)
    assert not r["steady_state_reached"]
    assert r["steady_state_note"].startswith("output tokens/s: not steady before")
    assert "--duration 2000" in r["steady_state_note"]
    assert "(warm-up figures, not steady)" in format_report(r)[1]


def test_one_token_answers_have_no_tpot_to_wait_for():
    """Every answer one token long (done at the first token): TTFT alone decides."""
    rng = np.random.default_rng(9)
    t = np.cumsum(rng.exponential(1 / 20, 6000))
    t = t[t < 300]
    first = t + 0.2 + rng.exponential(0.02, len(t))
    r = steady_metrics(t, np.full(len(t), 100), np.ones(len(t)), first, first.copy(), 300.0)
    assert r["steady_state_reached"] and r["steady_state_note"].startswith("TTFT")
    assert r["steady_tpot_p50_s"] is None
    # output tokens/s: one per request, at its first-token time
    n = ((first >= r["steady_start_s"]) & (first <= 300)).sum()
    assert r["steady_output_tokens_per_s"] == pytest.approx(n / (300 - r["steady_start_s"]))
