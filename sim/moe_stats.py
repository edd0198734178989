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

import functools
import math

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


# Blom (1958) plotting position for the expected maximum of n i.i.d. standard normals:
# E[max] ~= Phi^-1((n - alpha) / (n - 2 alpha + 1)) with alpha = 0.375 (within ~1% for n <= 1000).
_BLOM_ALPHA = 0.375


@functools.lru_cache(maxsize=1024)
def expected_max_std_normal(n: int) -> float:
    """E[max of n i.i.d. N(0, 1)] by Blom's approximation (0 for n <= 1)."""
    if n <= 1:
        return 0.0
    from statistics import NormalDist
    return NormalDist().inv_cdf((n - _BLOM_ALPHA) / (n - 2 * _BLOM_ALPHA + 1))


def rank_load_moments(num_experts: int, k: int, ep: int, shares: np.ndarray | None = None,
                      balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per token: (mean, variance) of the (token, expert) assignments landing on each of ``ep``
    ranks, each rank holding a contiguous block of E/ep experts.

    Uniform routing (``shares`` None): a token's k distinct experts are a uniform k-subset, so
    the count on a rank holding s = E/ep experts is hypergeometric: mean k s/E, variance
    k (s/E)(1 - s/E)(E - k)/(E - 1). Skewed routing: expert e is picked by a token with
    probability p_e = min(1, c * share_e), c set so that sum p_e = k (a top-k pick holds each
    expert at most once), the picks counted as independent Bernoullis: rank mean sum p_e,
    variance sum p_e (1 - p_e). ``balanced`` (EPLB with redundant experts): replicas of the hot
    experts even out the *means* (every rank k/ep), the per-token variance stays the uniform one."""
    E = num_experts
    if shares is None or balanced:
        f = 1.0 / ep  # each rank holds 1/ep of the expert slots (E/ep experts when ep divides E)
        var = k * f * (1 - f) * (E - k) / (E - 1) if E > 1 else 0.0
        return np.full(ep, k * f), np.full(ep, var)
    if E % ep:
        raise ValueError(f"EP degree {ep} must divide the number of experts {E} for a skewed placement")
    s = E // ep
    p = capped_pick_probabilities(shares, k)
    return p.reshape(ep, s).sum(axis=1), (p * (1 - p)).reshape(ep, s).sum(axis=1)


def capped_pick_probabilities(shares: np.ndarray, k: int) -> np.ndarray:
    """p_e = min(1, c * share_e) with c such that sum_e p_e = k (water-filling: experts whose
    share would exceed 1/k are picked by every token; the rest share what is left)."""
    sh = np.asarray(shares, float) / np.sum(shares)
    p = np.zeros_like(sh)
    capped = np.zeros(len(sh), bool)
    for _ in range(len(sh)):
        left = k - capped.sum()
        free = ~capped
        p[free] = sh[free] * left / sh[free].sum()
        p[capped] = 1.0
        over = free & (p > 1.0)
        if not over.any():
            break
        capped |= over
    return p


def expected_max_rank_load(n_tokens: float, num_experts: int, k: int, ep: int,
                           shares: np.ndarray | None = None, balanced: bool = False) -> float:
    """Expected assignments on the busiest of ``ep`` ranks when ``n_tokens`` tokens are routed:
    the slowest rank sets an EP step. Each rank's count is a sum of n i.i.d. per-token counts
    (``rank_load_moments``), taken as normal. Equal means: mean + sd * E[max of ep standard
    normals] (Blom); unequal means (skewed routing without EPLB): E[max] = lo + int_lo^inf
    (1 - prod_j Phi((x - mu_j) / sd_j)) dx on a grid. Clipped to [n k / ep, n k]; tests bound
    both against seeded Monte-Carlo."""
    n = float(n_tokens)
    if n <= 0 or ep <= 1:
        return n * k / max(ep, 1)
    if shares is None or balanced:  # equal means, in closed form (no arrays: called per simulated step)
        f = 1.0 / ep
        var = k * f * (1 - f) * (num_experts - k) / (num_experts - 1) if num_experts > 1 else 0.0
        top = n * (k * f) + math.sqrt(n * var) * expected_max_std_normal(ep)
        return float(min(n * k, max(top, n * k / ep)))
    mean, var = rank_load_moments(num_experts, k, ep, shares, balanced)
    mu, sd = n * mean, np.sqrt(n * var)
    if np.ptp(mu) <= 1e-12 * mu.max():
        top = mu[0] + sd[0] * expected_max_std_normal(ep)
    else:
        lo, hi = float(mu.min()), float((mu + 8 * sd).max())
        x = np.linspace(lo, hi, 801)
        z = (x[:, None] - mu[None, :]) / np.maximum(sd[None, :], 1e-12)
        p_le = np.prod(_std_normal_cdf(z), axis=1)
        top = lo + float(np.trapezoid(1.0 - p_le, x))
    return float(min(n * k, max(top, n * k / ep)))


def _std_normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z) through erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), vectorised."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)
