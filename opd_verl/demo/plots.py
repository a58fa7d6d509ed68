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


def plot_panels(panels, path: str | os.PathLike, title: str) -> str:
    """PNG of stacked line-chart panels sharing the step axis. Each panel is (name, series, yrange, references):
    series = [(label, [(step, value), ...], (r, g, b))]; yrange = (lo, hi) or None (from 0 to a round top);
    references = {label: value} drawn as dashed horizontal lines, or None."""
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
    all_steps = [s for _, series, _, _ in panels for _, pts, _ in series for s, _ in pts] or [0, 1]
    x0, x1 = min(all_steps), max(max(all_steps), min(all_steps) + 1)
    panel_h = (height - 60) // len(panels)
    for index, (name, series, yrange, refs) in enumerate(panels):
        top = 50 + index * panel_h + 20
        bottom = top + panel_h - 70
        left, right = margin, width - 30
        values = [v for _, pts, _ in series for _, v in pts]
        if yrange is None:
            lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
            lo = min(lo, 0.0)
            hi = _nice_ceil(max(hi, lo + 1e-6) * 1.02)
        else:
            lo, hi = yrange
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 20), name, fill="black", font=font)
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - frac * (bottom - top)
            value = lo + frac * (hi - lo)
            draw.line([left - 4, y, left, y], fill="black")
            if 0 < frac < 1:
                draw.line([left + 1, y, right - 1, y], fill=(225, 225, 225))
            draw.text((5, y - 8), f"{value:.2f}", fill="black", font=font)
        for i in range(6):
            step = x0 + (x1 - x0) * i / 5
            x = left + (step - x0) / (x1 - x0) * (right - left)
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x - 8, bottom + 6), f"{step:.0f}", fill="black", font=font)
        draw.text(((left + right) // 2 - 15, bottom + 24), "step", fill="black", font=font)
        legend_x = left + int(draw.textlength(name, font=font)) + 40  # legend on the panel's title line
        for label, value in (refs or {}).items():
            if lo <= value <= hi:
                y = bottom - (value - lo) / (hi - lo) * (bottom - top)
                for xs in range(left, right, 12):
                    draw.line([xs, y, min(xs + 6, right), y], fill=(120, 120, 120), width=2)
                draw.text((right - 10 - draw.textlength(label, font=font), y + 4), label, fill=(90, 90, 90), font=font)
        for label, pts, color in series:
            xy = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
                  for s, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.line([legend_x, top - 11, legend_x + 20, top - 11], fill=color, width=3)
            draw.text((legend_x + 25, top - 20), label, fill="black", font=font)
            legend_x += 40 + int(draw.textlength(label, font=font))
    path = os.fspath(path)
    image.save(path)
    return path
