"""Workloads of the serving simulator (sim.serve): requests drawn from a scenario's distributions
with a seed, or read from a JSONL trace. Requests are rows of NumPy arrays sorted by arrival time
(one ``numpy.random.Generator`` per stream: arrivals, prompt lengths, output lengths).

Split out of sim/serve.py (which re-exports these names) to keep that file under 1,000 lines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from dsref.sim.scenario import Length, Scenario, ScenarioError


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
    if x.dtype == np.float64:  # in place: the same values without two more n-sized temporaries
        np.rint(x, out=x)
        np.clip(x, spec.min, spec.max, out=x)
        return x.astype(np.int64)
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
