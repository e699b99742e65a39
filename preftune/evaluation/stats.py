"""Small, dependency-free statistics for deciding between runs on the same held-out pairs (numpy + math only).

Two runs scored on the same pairs are *paired*: compare them with McNemar's exact test on the discordant pairs
(one run right, the other wrong), a paired bootstrap of the accuracy difference, and Connor's sample size.

    mcnemar_exact(b=3, c=12)           # 0.035: 3 pairs only A got right, 12 only B
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from ..core.intervals import wilson_interval  # noqa: F401  (the data audit needs it below evaluation)

ArrayLike = Sequence[float] | np.ndarray


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right) and c (only B right).

    Under H0 each discordant pair is A's with probability ½:  p = min(1, 2·P[X ≤ min(b, c)]),  X ~ Bin(b+c, ½).
    Computed exactly with integers; b = c = 0 gives 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


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


def seeds_needed(sd: float, diff: float, *, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds per side a two-sample test of seed means needs to detect ``diff`` with seed-to-seed std ``sd``:
    n = 2·((z_{1−α/2} + z_{power})·sd / diff)². None when diff or sd is 0."""
    if diff == 0 or sd <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return math.ceil(2 * (z * sd / abs(diff)) ** 2)


def _kappas(tables: np.ndarray) -> np.ndarray:
    """Cohen's kappa of (..., 3, 3) contingency counts; nan where chance agreement is total (p_e = 1)."""
    n = tables.sum(axis=(-2, -1))
    p_o = np.trace(tables, axis1=-2, axis2=-1) / n
    p_e = (tables.sum(axis=-1) * tables.sum(axis=-2)).sum(axis=-1) / n**2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_e < 1, (p_o - p_e) / (1 - p_e), np.nan)


def agreement(a: ArrayLike, b: ArrayLike, *, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """How two judges agree on the same prompts: the share with the same outcome (win 1 / tie 0.5 / loss 0) and
    Cohen's kappa κ = (p_o − p_e) / (1 − p_e), p_e = Σ_k p_a(k)·p_b(k), with a percentile bootstrap interval
    over prompts. Resampling prompts only matters through the 3×3 table of outcome pairs, so each replicate is
    one multinomial draw of it. κ is None when p_e = 1 (both judges always give the same single outcome).

        agreement([1, 1, 0, 0.5], [1, 0, 0, 0.5])   # {"n": 4, "agree": 0.75, "kappa": 0.636..., "kappa_ci": [...]}
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0 or not np.all(np.isin(np.concatenate([x, y]), (0, 0.5, 1))):
        raise ValueError("need two equal-length non-empty sequences of outcomes 0, 0.5 or 1")
    table = np.zeros((3, 3))
    np.add.at(table, ((x * 2).astype(int), (y * 2).astype(int)), 1)
    kappa = float(_kappas(table))
    boots = _kappas(np.random.default_rng(seed).multinomial(x.size, table.ravel() / x.size,
                                                            size=n_boot).reshape(n_boot, 3, 3))
    lo, hi = np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2]) if np.isfinite(boots).any() else (np.nan,) * 2
    ok = lambda v: float(v) if math.isfinite(v) else None  # noqa: E731  (strict JSON: no nan)
    return {"n": int(x.size), "agree": float(np.trace(table)) / x.size, "kappa": ok(kappa),
            "kappa_ci": [ok(lo), ok(hi)]}


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


def ranks(xs: ArrayLike) -> np.ndarray:
    """1-based ranks of ``xs``, ties sharing their average rank: ``ranks([3, 1, 3]) == [2.5, 1, 2.5]``."""
    _, group, counts = np.unique(np.asarray(xs, dtype=float), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                       # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2)[group]        # the group's average rank


def spearman(xs: ArrayLike, ys: ArrayLike) -> float:
    """Spearman's rank correlation (Pearson's r of the average ranks): one huge pair can't carry it."""
    return pearson(ranks(xs), ranks(ys))


def lc_win_rate(prefs: ArrayLike, len_policy: ArrayLike, len_ref: ArrayLike, *,
                ridge: float = 1e-4) -> tuple[float, float]:
    """Length-controlled win rate and its standard error: AlpacaEval's ``length_controlled_minimal``.

    Logistic regression with no intercept besides the model term θ:
        logit P(win) = θ + φ · tanh(Δᵢ / sd(Δ)),   Δᵢ = len_policyᵢ − len_refᵢ (scaled, not centred),
    fitted to the preferences prefᵢ ∈ [0, 1] (ties 0.5) as soft labels, i.e. the weighted log-likelihood
    Σ prefᵢ·log pᵢ + (1 − prefᵢ)·log(1 − pᵢ) that AlpacaEval gets by duplicating rows. LC = mean P(win | Δ = 0)
    = σ(θ). AlpacaEval's Δ is baseline − model; the sign only flips φ and leaves LC unchanged. It fits with an
    L1 penalty chosen by cross-validation; here the fit is maximum likelihood (Newton) with a tiny ridge that
    only keeps a perfectly separated fit finite. SE by the delta method, σ'(θ)·se(θ), with the sandwich
    covariance H⁻¹BH⁻¹ (soft labels are not Bernoulli draws, so the model-based H⁻¹ alone would be wrong).

        lc_win_rate([1, 1, 0, 1], [30, 40, 10, 35], [20, 20, 20, 20])
    """
    y = np.asarray(prefs, dtype=float)
    lp, lr = np.asarray(len_policy, dtype=float), np.asarray(len_ref, dtype=float)
    if not (y.shape == lp.shape == lr.shape) or y.ndim != 1 or y.size == 0:
        raise ValueError(f"need equal-length non-empty 1-d sequences, got {y.shape}, {lp.shape}, {lr.shape}")
    if np.any((y < 0) | (y > 1)) or not np.all(np.isfinite(lp - lr)):
        raise ValueError("preferences must lie in [0, 1] and lengths be finite")
    delta = lp - lr
    sd = float(delta.std(ddof=1)) if delta.size > 1 else 0.0  # pandas' .std(), as AlpacaEval uses
    feat = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    x = np.stack([np.ones_like(feat), feat], axis=1)  # (n, 2): model term, length term
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (y - p) - ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    p = 1 / (1 + np.exp(-(x @ w)))
    hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(2)
    meat = (x * ((y - p) ** 2)[:, None]).T @ x
    h_inv = np.linalg.inv(hess)
    var_theta = float((h_inv @ meat @ h_inv)[0, 0])
    lc = 1 / (1 + math.exp(-w[0]))
    return lc, lc * (1 - lc) * math.sqrt(max(var_theta, 0.0))


def tail(xs: Sequence[Any], share: float = 0.1) -> Sequence[Any]:
    """The last ``share`` of ``xs`` (at least one item): "the end of training" everywhere it is summarised."""
    return xs[-max(1, math.ceil(share * len(xs))):]


def head(xs: Sequence[Any], share: float = 0.1) -> Sequence[Any]:
    """The first ``share`` of ``xs`` (at least one item)."""
    return xs[:max(1, math.ceil(share * len(xs)))]


def length_bias(chosen: Sequence[float], rejected: Sequence[float],
                margins: Sequence[float] | None = None) -> dict[str, Any]:
    """How completion length relates to the label (and, given per-pair margins, to the margin).

    Shares of pairs whose chosen is shorter / longer / equal, mean lengths, the mean ratio chosen/rejected (kept
    for old readers of summary.json; a few very long chosen responses dominate it) and the median ratio (exp of
    the median log-ratio: robust, and 1 when chosen is as often shorter as longer), and Pearson r between
    (chosen − rejected) length and the margin (None when it is undefined).

        length_bias([3, 5], [4, 5])   # {"pairs": 2, "chosen_shorter": 0.5, "equal": 0.5, ...}
    """
    n = len(chosen)
    d = max(n, 1)
    diffs = [c - r for c, r in zip(chosen, rejected)]
    ratios = [c / r for c, r in zip(chosen, rejected) if r > 0]
    logs = [math.log(x) for x in ratios if x > 0]
    out: dict[str, Any] = {
        "pairs": n,
        "chosen_shorter": sum(x < 0 for x in diffs) / d,
        "chosen_longer": sum(x > 0 for x in diffs) / d,
        "equal": sum(x == 0 for x in diffs) / d,
        "mean_chosen_len": sum(chosen) / d,
        "mean_rejected_len": sum(rejected) / d,
        "mean_len_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
        "median_len_ratio": math.exp(float(np.median(logs))) if logs else math.nan,
    }
    if margins is not None:
        ok = all(math.isfinite(m) for m in margins) and len(set(diffs)) > 1 and len(set(margins)) > 1
        out["margin_length_corr"] = pearson(diffs, margins) if ok else None
    return out
