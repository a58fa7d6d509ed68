"""Line charts of per-step metrics (the demo's plot, the benchmarks' curves)."""

from __future__ import annotations

import os

from opd_verl.demo.runs import val_accuracy_key


def _nice_ceil(value: float) -> float:
    """The smallest of 1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8 (x 10^k) that is >= value: axis tops with round quarters."""
    import math

    scale = 10 ** math.floor(math.log10(value))
    for mantissa in (1.0, 1.2, 1.6, 2.0, 2.4, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if mantissa * scale >= value - 1e-12:
            return mantissa * scale
    return 10 * scale


def plot_metrics(metrics: dict[int, dict[str, float]], path: str | os.PathLike, title: str = "OPD demo",
                 references: dict[str, float] | None = None) -> str:
    """PNG with two panels: per-token KL (opd/kl_per_token) and accuracy (training samples, val greedy), with
    `references` ({label: accuracy}, e.g. the teacher's) as dashed horizontal lines in the accuracy panel."""
    kl = sorted((s, m["opd/kl_per_token"]) for s, m in metrics.items() if "opd/kl_per_token" in m)
    train_acc = sorted((s, m["critic/score/mean"]) for s, m in metrics.items() if "critic/score/mean" in m)
    vkey = val_accuracy_key(metrics)
    val_acc = sorted((s, m[vkey]) for s, m in metrics.items() if vkey and vkey in m)
    panels = [
        ("reverse KL per token (opd/kl_per_token)", [("kl/token", kl, (200, 60, 40))], None, None),
        ("accuracy", [("sampled (train, T=1)", train_acc, (40, 110, 200)),
                      ("greedy (val)", val_acc, (30, 150, 60))], (0.0, 1.0), references),
    ]
    return plot_panels(panels, path, title)


def _round125(value: float, up: bool) -> float:
    """The nearest of 1, 2, 5 (x 10^k) at or above (up) / at or below value > 0: the ends of a log axis."""
    import math

    k = math.floor(math.log10(value))
    grid = [m * 10.0 ** e for e in (k - 1, k, k + 1) for m in (1.0, 2.0, 5.0)]
    return min(g for g in grid if g >= value * (1 - 1e-12)) if up else max(g for g in grid if g <= value * (1 + 1e-12))


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis from lo to hi: 1, 2, 5 x 10^k (only 10^k over more than 3 decades), or the two ends
    when fewer than two of those fall inside."""
    import math

    mantissas = (1.0,) if math.log10(hi / lo) > 3 else (1.0, 2.0, 5.0)
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in mantissas]
    ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else [lo, hi]


def _tick_label(value: float) -> str:
    """A log axis' tick in the data's units: 256, 1000, 20000, 0.05."""
    return f"{value:.0f}" if value >= 1 and abs(value - round(value)) < 1e-6 * value else f"{value:g}"


def _dashed(draw, xy, fill, width: int, dash: int = 6, gap: int = 6) -> None:
    """A dashed polyline through the points xy; the dash pattern runs on across its corners."""
    import itertools
    import math

    on, rest = True, float(dash)  # drawing a dash or skipping a gap, and how much of it is left
    for (xa, ya), (xb, yb) in itertools.pairwise(xy):
        length, done = math.hypot(xb - xa, yb - ya), 0.0
        while done < length - 1e-9:
            step = min(rest, length - done)
            if on:
                f0, f1 = done / length, (done + step) / length
                draw.line([xa + f0 * (xb - xa), ya + f0 * (yb - ya), xa + f1 * (xb - xa), ya + f1 * (yb - ya)],
                          fill=fill, width=width)
            done, rest = done + step, rest - step
            if rest <= 1e-9:
                on = not on
                rest = float(dash if on else gap)


def _line(draw, xy, fill, width: int, dashed: bool) -> None:
    if dashed:
        _dashed(draw, xy, fill, width, dash=8, gap=6)
    else:
        draw.line(xy, fill=fill, width=width)


def plot_panels(panels, path: str | os.PathLike, title: str, xlabel: str = "step", logx: bool = False,
                logy: bool = False, xticks=None) -> str:
    """PNG of stacked line-chart panels sharing the x axis (labelled `xlabel`). Each panel is
    (name, series, yrange, references): series = [(label, [(x, value), ...], (r, g, b))], a 4th item "dashed"
    making that line dashed; yrange = (lo, hi) or None (linear: from 0 to a round top; log: between the nearest
    1, 2, 5 x 10^k around the data); references = {label: value} drawn as dashed horizontal lines, or None.
    logx / logy put that axis on a log scale, its ticks labelled in the data's units (1, 2, 5 x 10^k, or the
    values `xticks` on x); points <= 0 on a log axis are left out."""
    import functools
    import math

    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 900, 360 * len(panels), 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
        big = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()
    draw.text((margin, 12), title, fill="black", font=big)
    fx = math.log10 if logx else float  # data -> drawn coordinate
    fy = math.log10 if logy else float
    panels = [(name, [(label, [(s, v) for s, v in pts if (s > 0 or not logx) and (v > 0 or not logy)], *style)
                      for label, pts, *style in series], yrange, refs) for name, series, yrange, refs in panels]
    all_x = [fx(s) for _, series, _, _ in panels for _, pts, *_ in series for s, _ in pts] or [0.0, 1.0]
    x0, x1 = min(all_x), max(max(all_x), min(all_x) + 1)
    left, right = margin, width - 30
    panel_h = (height - 60) // len(panels)

    def px(s):
        return left + (fx(s) - x0) / (x1 - x0) * (right - left)

    def to_y(v, lo, hi, top, bottom):
        return bottom - (fy(v) - fy(lo)) / (fy(hi) - fy(lo)) * (bottom - top)

    for index, (name, series, yrange, refs) in enumerate(panels):
        top = 50 + index * panel_h + 20
        bottom = top + panel_h - 70
        values = [v for _, pts, *_ in series for _, v in pts]
        if yrange is not None:
            lo, hi = yrange
        elif logy:
            lo, hi = (_round125(min(values), up=False), _round125(max(values), up=True)) if values else (1.0, 10.0)
            hi = max(hi, 2 * lo)
        else:
            lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
            lo = min(lo, 0.0)
            hi = _nice_ceil(max(hi, lo + 1e-6) * 1.02)
        py = functools.partial(to_y, lo=lo, hi=hi, top=top, bottom=bottom)
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 20), name, fill="black", font=font)
        for value in _log_ticks(lo, hi) if logy else [lo + frac * (hi - lo) for frac in (0.0, 0.25, 0.5, 0.75, 1.0)]:
            y = py(value)
            draw.line([left - 4, y, left, y], fill="black")
            if top + 1 < y < bottom - 1:
                draw.line([left + 1, y, right - 1, y], fill=(225, 225, 225))
            draw.text((5, y - 8), _tick_label(value) if logy else f"{value:.2f}", fill="black", font=font)
        if xticks is None:
            xticks = _log_ticks(10 ** x0, 10 ** x1) if logx else [x0 + (x1 - x0) * i / 5 for i in range(6)]
        for step in xticks:
            x = px(step)
            label = _tick_label(step) if logx else f"{step:.0f}"
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x - draw.textlength(label, font=font) / 2, bottom + 6), label, fill="black", font=font)
        draw.text(((left + right - draw.textlength(xlabel, font=font)) / 2, bottom + 24), xlabel, fill="black", font=font)
        legend_x = left + int(draw.textlength(name, font=font)) + 40  # legend on the panel's title line
        for label, value in (refs or {}).items():
            if lo <= value <= hi:
                y = py(value)
                _dashed(draw, [(left, y), (right, y)], (120, 120, 120), 2)
                draw.text((right - 10 - draw.textlength(label, font=font), y + 4), label, fill=(90, 90, 90), font=font)
        for label, pts, color, *style in series:
            xy = [(px(s), py(v)) for s, v in pts]
            if len(xy) > 1:
                _line(draw, xy, color, 2, "dashed" in style)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            _line(draw, [(legend_x, top - 11), (legend_x + 20, top - 11)], color, 3, "dashed" in style)
            draw.text((legend_x + 25, top - 20), label, fill="black", font=font)
            legend_x += 40 + int(draw.textlength(label, font=font))
    path = os.fspath(path)
    image.save(path)
    return path
