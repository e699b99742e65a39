"""Small, dependency-free statistics for deciding between runs on the same held-out pairs (numpy + math only).

Two runs scored on the same pairs are *paired*: compare them with McNemar's exact test on the discordant pairs
(one run right, the other wrong), a paired bootstrap of the accuracy difference, and Connor's sample size.

    mcnemar_exact(b=3, c=12)           # 0.035: 3 pairs only A got right, 12 only B
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _z(level: float) -> float:
    """Two-sided standard-normal quantile z with P(|Z| ≤ z) = level."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927).

    p̂ = k/n,  centre = (p̂ + z²/2n) / (1 + z²/n),  half = z/(1 + z²/n) · √(p̂(1−p̂)/n + z²/4n²).
    n = 0 gives (0, 1). k may be fractional (ties counted one half).
    """
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z, p = _z(level), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right) and c (only B right).

    Under H0 each discordant pair is A's with probability ½:  p = min(1, 2·P[X ≤ min(b, c)]),  X ~ Bin(b+c, ½).
    Computed exactly with integers (C(n, i+1) = C(n, i)·(n−i)/(i+1)); b = c = 0 gives 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    term = total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def paired_bootstrap(correct_a: ArrayLike, correct_b: ArrayLike, *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy difference mean(a) − mean(b) and its percentile bootstrap interval, resampling *pairs*.

    Resampling the n pairs with replacement only matters through how often each distinct per-pair difference
    dᵢ = aᵢ − bᵢ is drawn, so each replicate is one multinomial draw of those counts:
    diff* = Σ_v count*(v)·v / n. Same distribution as resampling indices, O(n_boot · distinct values).
    Returns (diff, lo, hi); reproducible for a given seed.
    """
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-d sequences, got {a.shape} and {b.shape}")
    n = a.size
    values, counts = np.unique(a - b, return_counts=True)
    rng = np.random.default_rng(seed)
    step = max(1, 2**22 // values.size)  # bounded memory even when every difference is distinct
    boots = np.concatenate([rng.multinomial(n, counts / n, size=min(step, n_boot - i)) @ values
                            for i in range(0, n_boot, step)]) / n
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean(a - b)), float(lo), float(hi)


def pairs_needed(acc_a: float, acc_b: float, discordant: float, *, alpha: float = 0.05,
                 power: float = 0.8) -> int | None:
    """Held-out pairs McNemar's test needs to detect acc_a − acc_b at level alpha with the given power.

    Connor (1987), normal approximation, with δ = acc_a − acc_b and ψ = ``discordant``, the fraction of pairs on
    which exactly one run is right (ψ ≥ |δ|; raised to |δ| if smaller):

        n = (z_{1−α/2}·√ψ + z_{power}·√(ψ − δ²))² / δ²

    None when δ = 0 or ψ = 0 (no difference to detect).
    """
    delta = abs(acc_a - acc_b)
    if delta == 0 or discordant <= 0:
        return None
    psi = max(discordant, delta)
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    return math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(psi - delta * delta, 0.0))) ** 2 / delta**2)


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile: exact for df 1 and 2, Cornish–Fisher in z above (0.12% low at df 3)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def mean_ci(x: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval: x̄ ± t_{(1+level)/2, n−1} · s/√n (t → normal as n grows).

    One value gives (x̄, nan, nan): there is no spread to estimate, and nan compares False either way.
    """
    arr = np.asarray(x, dtype=float)
    if arr.size == 0:
        raise ValueError("mean_ci of an empty sequence")
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan, math.nan
    half = _t_quantile((1 + level) / 2, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half, mean + half


def slope(xs: ArrayLike, ys: ArrayLike) -> float:
    """Least-squares slope Σ(x−x̄)(y−ȳ) / Σ(x−x̄)²; 0 with fewer than 2 points or constant x."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.size < 2:
        return 0.0
    dx = x - x.mean()
    sxx = float(dx @ dx)
    return float(dx @ (y - y.mean())) / sxx if sxx > 0 else 0.0


def pearson(xs: ArrayLike, ys: ArrayLike) -> float:
    """Pearson correlation Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)²·Σ(y−ȳ)²); 0 with fewer than 2 points or a constant side."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.size < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else 0.0
