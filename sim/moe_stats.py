"""MoE routing statistics: distinct experts touched by a batch, per-device load under EP.

Model: each of n tokens picks k of E routed experts. Under uniform routing a token
touches expert e with probability exactly 1 - C(E-1,k)/C(E,k) = k/E, so the
expected number of distinct experts touched by n independent tokens is
E * (1 - (1 - k/E)^n). For skewed routing the share of assignments that go to
expert e is share_e (sum 1); a token touches e with probability
p_e = min(1, k * share_e) (top-k approximated by k independent picks), and the
expected distinct count is sum_e 1 - (1 - p_e)^n.

Expert parallelism: E experts spread over ``ep`` devices (contiguous blocks of
E/ep, as DeepSeek's deployment lays them out). The n*k assignments are treated as
a multinomial over devices with probabilities q_j = sum of the shares of the
experts on device j; the expected maximum device load uses independent binomial
marginals Binomial(n*k, q_j): E[max] = sum_{m>=0} (1 - prod_j P(X_j <= m)).
(Multinomial counts are negatively correlated, so this slightly overestimates the
max; tests bound the error against a seeded Monte-Carlo.)
"""

from __future__ import annotations

import numpy as np


def expected_distinct_uniform(num_experts: int, k: int, n_tokens: float) -> float:
    """E * (1 - (1 - k/E)^n): expected distinct experts touched by n tokens choosing k of E."""
    if n_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - k / num_experts) ** n_tokens)


def zipf_shares(num_experts: int, exponent: float) -> np.ndarray:
    """Assignment share of each expert under Zipf(s) over expert rank: share_e ∝ (e+1)^-s."""
    w = np.arange(1, num_experts + 1, dtype=float) ** (-float(exponent))
    return w / w.sum()


def touch_probabilities(shares: np.ndarray, k: int) -> np.ndarray:
    """Probability a token selects each expert: min(1, k * share_e)."""
    return np.minimum(1.0, k * np.asarray(shares, float))


def expected_distinct(shares: np.ndarray | None, num_experts: int, k: int, n_tokens: float) -> float:
    """Expected distinct experts touched (uniform when ``shares`` is None)."""
    if shares is None:
        return expected_distinct_uniform(num_experts, k, n_tokens)
    if n_tokens <= 0:
        return 0.0
    p = touch_probabilities(shares, k)
    return float(np.sum(1.0 - (1.0 - p) ** n_tokens))


def device_shares(shares: np.ndarray | None, num_experts: int, ep: int) -> np.ndarray:
    """Share of assignments landing on each of ``ep`` devices (contiguous blocks of E/ep experts)."""
    if num_experts % ep:
        raise ValueError(f"EP degree {ep} must divide the number of experts {num_experts}")
    s = np.full(num_experts, 1.0 / num_experts) if shares is None else np.asarray(shares, float)
    return s.reshape(ep, num_experts // ep).sum(axis=1)


def _binom_cdf_table(n: int, q: np.ndarray) -> np.ndarray:
    """[len(q), n+1] CDF of Binomial(n, q_j) (log-space pmf, exact factorials)."""
    m = np.arange(n + 1)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    logc = logfact[n] - logfact[m] - logfact[n - m]
    q = np.clip(np.asarray(q, float), 1e-300, 1 - 1e-16)[:, None]
    logpmf = logc[None, :] + m[None, :] * np.log(q) + (n - m)[None, :] * np.log1p(-q)
    return np.minimum(1.0, np.cumsum(np.exp(logpmf), axis=1))


def expected_max_load(n_tokens: int, k: int, dev_shares: np.ndarray) -> float:
    """Expected maximum number of (token, expert) assignments on one device."""
    n_assign = int(n_tokens) * k
    if n_assign == 0:
        return 0.0
    cdf = _binom_cdf_table(n_assign, dev_shares)
    p_all_le = np.prod(cdf, axis=0)  # P(max <= m), m = 0..n_assign
    return float(np.sum(1.0 - p_all_le))


def ep_load(num_experts: int, k: int, n_tokens: int, ep: int, shares: np.ndarray | None = None) -> dict:
    """Per-device load under expert parallelism.

    Returns mean and expected max assignments per device, the imbalance factor
    (max/mean: the slowest device sets the step time), and the expected distinct
    experts touched per device (its weight reads in a decode step).
    """
    q = device_shares(shares, num_experts, ep)
    mean = n_tokens * k / ep
    mx = expected_max_load(n_tokens, k, q)
    per_dev_experts = num_experts // ep
    s = np.full(num_experts, 1.0 / num_experts) if shares is None else np.asarray(shares, float)
    p = touch_probabilities(s, k).reshape(ep, per_dev_experts)
    distinct = np.sum(1.0 - (1.0 - p) ** n_tokens, axis=1)
    return {"mean_load": mean, "expected_max_load": mx, "imbalance": mx / mean if mean else 1.0,
            "distinct_experts_per_device_mean": float(distinct.mean()),
            "distinct_experts_per_device_max": float(distinct.max())}


def monte_carlo(num_experts: int, k: int, n_tokens: int, ep: int, trials: int, rng: np.random.Generator,
                shares: np.ndarray | None = None) -> dict:
    """Sampled distinct-expert count and max device load (k distinct experts per token).

    Uniform: k distinct experts uniformly at random. Skewed: k distinct experts
    drawn without replacement with probabilities ``shares``.
    """
    distinct, max_load = [], []
    per_dev = num_experts // ep
    for _ in range(trials):
        if shares is None:
            ids = np.argsort(rng.random((n_tokens, num_experts)), axis=1)[:, :k]
        else:
            ids = np.stack([rng.choice(num_experts, size=k, replace=False, p=shares) for _ in range(n_tokens)])
        counts = np.bincount(ids.ravel(), minlength=num_experts)
        distinct.append(np.count_nonzero(counts))
        max_load.append(counts.reshape(ep, per_dev).sum(axis=1).max())
    return {"distinct": float(np.mean(distinct)), "max_load": float(np.mean(max_load))}
