"""The report's plots, SVG drawn by hand (no scripts, no network): margins over training, held-out lengths,
margin against length, generated-length histograms, accuracy intervals.

    margin_plot(load("runs/x"), "runs/x")     # one <svg>: training vs held-out margin per step
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..evaluation import stats
from ..evaluation.runlog import Log
from .markup import HELD_COLOR, TRAIN_COLOR, esc, num


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _span(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return lo - 1, hi + 1
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _axes(w: int, h: int, xr: tuple[float, float], yr: tuple[float, float], title: str, xlabel: str,
          ylabel: str, xticks: bool = True) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:
    """SVG opening, frame, ticks and labels; and the data-to-pixel maps."""
    left, right, top, bottom = 58, 10, 22, 34  # 58: the rotated y label clears tick labels like "-0.25"
    sx = lambda v: left + (v - xr[0]) / (xr[1] - xr[0]) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - yr[0]) / (yr[1] - yr[0]) * (h - top - bottom)  # noqa: E731
    out = [f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' aria-label='{esc(title)}'>",
           f"<title>{esc(title)}</title>",
           f"<rect x='{left}' y='{top}' width='{w - left - right}' height='{h - top - bottom}' fill='#fff' "
           f"stroke='#d1d5db'/>"]
    for t in _ticks(*xr) if xticks else []:
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{top}' y2='{h - bottom}' stroke='#f3f4f6'/>"
                   f"<text x='{sx(t):.1f}' y='{h - bottom + 13}' text-anchor='middle'>{num(t)}</text>")
    for t in _ticks(*yr):
        out.append(f"<line x1='{left}' x2='{w - right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#f3f4f6'/>"
                   f"<text x='{left - 4}' y='{sy(t) + 4:.1f}' text-anchor='end'>{num(t)}</text>")
    out.append(f"<text x='{(left + w - right) / 2}' y='{h - 4}' text-anchor='middle'>{esc(xlabel)}</text>"
               f"<text x='11' y='{(top + h - bottom) / 2}' text-anchor='middle' "
               f"transform='rotate(-90 11 {(top + h - bottom) / 2})'>{esc(ylabel)}</text>")
    return out, sx, sy


def _legend(items: list[tuple[str, str]], x: int, y: int = 14) -> str:
    out = []
    for label, color in items:
        out.append(f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{color}'/>"
                   f"<text x='{x + 14}' y='{y + 1}'>{esc(label)}</text>")
        x += 14 + 7 * len(label) + 12
    return "".join(out)


def margin_plot(log: Log, title: str, w: int = 360, h: int = 210) -> str:
    """Training margin per logged step and held-out margin per eval, against the step."""
    ts, tm = log.series("rewards/margins")
    es, em = log.series("eval_rewards/margins")
    if not tm and not em:
        return "<p class='meta'>no margins logged</p>"
    xr = _span(ts + es, 0.02)
    out, sx, sy = _axes(w, h, xr, _span(tm + em + [0.0]), f"margins: {title}", "step", "reward margin")
    out.append(f"<line x1='{sx(xr[0]):.1f}' x2='{sx(xr[1]):.1f}' y1='{sy(0):.1f}' y2='{sy(0):.1f}' "
               f"stroke='#9ca3af' stroke-dasharray='3 3'/>")
    pts = lambda xs, ys: " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))  # noqa: E731
    if tm:
        out.append(f"<polyline points='{pts(ts, tm)}' fill='none' stroke='{TRAIN_COLOR}' stroke-width='1.2' "
                   f"stroke-opacity='0.8'/>")
    if em:
        out.append(f"<polyline points='{pts(es, em)}' fill='none' stroke='{HELD_COLOR}' stroke-width='2'/>"
                   + "".join(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{HELD_COLOR}'/>"
                             for x, y in zip(es, em)))
    out.append(_legend([("training", TRAIN_COLOR), ("held-out", HELD_COLOR)], 50))
    return "".join(out) + "</svg>"


def lengths(log: Log) -> list[tuple[float, float, float]]:
    """(chosen tokens, rejected tokens, margin) of the held-out pairs that have all three, finite."""
    rows = [(p.get("chosen_tokens"), p.get("rejected_tokens"), p.get("margin")) for p in log.pairs or []]
    return [tuple(map(float, r)) for r in rows
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r)]


def scatter(log: Log, title: str, w: int = 300, h: int = 210) -> str:
    rows = lengths(log)
    if not rows:
        return ""
    xs, ys = [c - r for c, r, _ in rows], [m for _, _, m in rows]
    out, sx, sy = _axes(w, h, _span(xs + [0.0]), _span(ys + [0.0]), f"margin vs length: {title}",
                        "chosen − rejected tokens", "held-out margin")
    out.append(f"<line x1='{sx(0):.1f}' x2='{sx(0):.1f}' y1='22' y2='{h - 34}' stroke='#9ca3af' "
               f"stroke-dasharray='3 3'/><line x1='46' x2='{w - 10}' y1='{sy(0):.1f}' y2='{sy(0):.1f}' "
               f"stroke='#9ca3af' stroke-dasharray='3 3'/>")
    out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{HELD_COLOR}' fill-opacity='0.45'/>"
            for x, y in zip(xs, ys)]
    out.append(f"<text x='50' y='14'>r = {stats.pearson(xs, ys):.2f}, {len(rows)} pairs</text>")
    return "".join(out) + "</svg>"


def length_bars(log: Log, w: int = 260, h: int = 210) -> str:
    rows = lengths(log)
    if not rows:
        return ""
    bias = stats.length_bias([r[0] for r in rows], [r[1] for r in rows])
    chosen, rejected, shorter, longer = (bias[k] for k in ("mean_chosen_len", "mean_rejected_len", "chosen_shorter",
                                                           "chosen_longer"))
    out, _, sy = _axes(w, h, (0, 2), (0, max(chosen, rejected) * 1.15), "mean held-out lengths", "",
                       "mean tokens", xticks=False)
    for i, (label, value, color) in enumerate((("chosen", chosen, TRAIN_COLOR), ("rejected", rejected, HELD_COLOR))):
        x, bw = 46 + (w - 56) * (0.15 + 0.5 * i), (w - 56) * 0.3
        out.append(f"<rect x='{x:.1f}' y='{sy(value):.1f}' width='{bw:.1f}' height='{sy(0) - sy(value):.1f}' "
                   f"fill='{color}' fill-opacity='0.8'/><text x='{x + bw / 2:.1f}' y='{sy(value) - 4:.1f}' "
                   f"text-anchor='middle'>{value:.1f}</text><text x='{x + bw / 2:.1f}' y='{h - 21}' "
                   f"text-anchor='middle'>{label}</text>")
    out.append(f"<text x='50' y='14'>chosen shorter {shorter:.0%}, longer {longer:.0%}</text>")
    return "<div class='card'>" + "".join(out) + "</svg></div>"


def length_hist(rows: list[dict], w: int = 300, h: int = 170, bins: int = 10) -> str:
    """Histogram of generated token counts: the policy's bars over the reference's outline."""
    pol, ref = [r["policy_tokens"] for r in rows], [r["reference_tokens"] for r in rows]
    lo, hi = min(pol + ref), max(pol + ref) + 1
    width = max(1, math.ceil((hi - lo) / bins))
    count = lambda xs: [sum(lo + i * width <= x < lo + (i + 1) * width for x in xs) for i in range(bins)]  # noqa: E731
    cp, cr = count(pol), count(ref)
    out, sx, sy = _axes(w, h, (lo, lo + bins * width), (0, max(cp + cr) * 1.15), "generated lengths", "tokens",
                        "prompts")
    for i, (a, b) in enumerate(zip(cp, cr)):
        x0, x1 = sx(lo + i * width), sx(lo + (i + 1) * width)
        out.append(f"<rect x='{x0:.1f}' y='{sy(a):.1f}' width='{x1 - x0 - 1:.1f}' height='{sy(0) - sy(a):.1f}' "
                   f"fill='{TRAIN_COLOR}' fill-opacity='0.6'/><rect x='{x0:.1f}' y='{sy(b):.1f}' "
                   f"width='{x1 - x0 - 1:.1f}' height='{sy(0) - sy(b):.1f}' fill='none' stroke='{HELD_COLOR}'/>")
    out.append(_legend([("policy", TRAIN_COLOR), ("reference", HELD_COLOR)], 50))
    return "".join(out) + "</svg>"


def interval_plot(rows: list[tuple[str, float, float, float, bool]]) -> str:
    """Held-out accuracy per cell, 95% Wilson interval as a bar, chance as a dashed line."""
    if not rows:
        return "<p class='meta'>no finished cells</p>"
    label_w, w, row_h = 12 + 6.5 * min(48, max(len(r[0]) for r in rows)), 900, 24
    top = 30  # a band above the first row holds the "chance" label, so no interval bar runs through it
    h = top + 18 + row_h * len(rows)
    lo = min(0.4, math.floor(min(r[2] for r in rows) * 10) / 10)
    sx = lambda v: label_w + (v - lo) / (1 - lo) * (w - label_w - 170)  # noqa: E731  (170 px for the numbers)
    out = [f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' aria-label='held-out accuracy'>"
           "<title>held-out accuracy with 95% intervals</title>"]
    for t in _ticks(lo, 1.0, 6):
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{top - 8}' y2='{h - 22}' stroke='#f3f4f6'/>"
                   f"<text x='{sx(t):.1f}' y='{h - 8}' text-anchor='middle'>{num(t)}</text>")
    out.append(f"<line x1='{sx(0.5):.1f}' x2='{sx(0.5):.1f}' y1='{top - 8}' y2='{h - 22}' stroke='#9ca3af' "
               f"stroke-dasharray='4 3'/><text x='{sx(0.5):.1f}' y='{top - 12}' text-anchor='middle'>chance</text>")
    for i, (name, acc, a, b, rec) in enumerate(rows):
        y = top + 8 + i * row_h
        color = TRAIN_COLOR if rec else "#4b5563"
        clipped = name if len(name) <= 48 else name[:47] + "…"
        out.append(f"<text x='{label_w - 8}' y='{y + 4}' text-anchor='end'>{esc(clipped)}</text>"
                   f"<line x1='{sx(a):.1f}' x2='{sx(b):.1f}' y1='{y}' y2='{y}' stroke='{color}' stroke-width='3'/>"
                   f"<circle cx='{sx(acc):.1f}' cy='{y}' r='5' fill='{color}'/>"
                   f"<text x='{sx(1) + 14:.1f}' y='{y + 4}'>{acc:.3f} [{a:.3f}, {b:.3f}]</text>")
    return "".join(out) + "</svg>"


def length_ratio_plot(hist: dict, w: int = 420, h: int = 210) -> str:
    """The data audit's length-bias histogram: training pairs by log2 of the chosen/rejected length ratio; bars
    left of 0 are pairs whose chosen is shorter."""
    edges, counts = hist["edges"], hist["counts"]
    out, sx, sy = _axes(w, h, (edges[0], edges[-1]), (0, max(counts + [1]) * 1.15), "length bias of the training "
                        "pairs", "log2 (chosen + 1) / (rejected + 1), characters", "pairs")
    for a, b, n in zip(edges, edges[1:], counts):
        color = TRAIN_COLOR if b <= 0 else HELD_COLOR
        out.append(f"<rect x='{sx(a):.1f}' y='{sy(n):.1f}' width='{sx(b) - sx(a) - 1:.1f}' "
                   f"height='{sy(0) - sy(n):.1f}' fill='{color}' fill-opacity='0.7'/>")
    out.append(f"<line x1='{sx(0):.1f}' x2='{sx(0):.1f}' y1='22' y2='{h - 34}' stroke='#9ca3af' "
               f"stroke-dasharray='3 3'/>")
    out.append(_legend([("chosen shorter", TRAIN_COLOR), ("chosen as long or longer", HELD_COLOR)], 50))
    return "".join(out) + "</svg>"
