"""Confidence intervals every stage needs: the data audit (data/) as much as the verdict (evaluation/stats.py).

    wilson_interval(7, 10)             # (0.397, 0.892): 7 of 10 pairs right, 95% interval
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927).

    p̂ = k/n,  centre = (p̂ + z²/2n) / (1 + z²/n),  half = z/(1 + z²/n) · √(p̂(1−p̂)/n + z²/4n²).
    n = 0 gives (0, 1). k may be fractional (ties counted one half).
    """
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z, p = NormalDist().inv_cdf(0.5 + level / 2), k / n  # P(|Z| ≤ z) = level
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
