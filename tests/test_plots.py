"""opd_verl.demo.plots.plot_panels: where points land on linear and log axes, dashed series, empty input.

Geometry of one panel (900 x 360 image): the frame spans x 70..870 and y 70..300; the first checks confirm it so a
layout change fails clearly here rather than as a wrong position further down.
"""

from __future__ import annotations

import itertools
import math

from PIL import Image

from opd_verl.demo.plots import _log_ticks, plot_panels

LEFT, RIGHT, TOP, BOTTOM = 70, 870, 70, 300
RED, BLUE = (200, 0, 0), (0, 0, 200)
BLACK, GRID = (0, 0, 0), (225, 225, 225)


def _draw(tmp_path, panels, **kwargs) -> Image.Image:
    path = plot_panels(panels, tmp_path / "p.png", "t", **kwargs)
    assert path == str(tmp_path / "p.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.convert("RGB")


def _frame_ok(image: Image.Image) -> None:
    mid_x, mid_y = (LEFT + RIGHT) // 2, (TOP + BOTTOM) // 2
    assert image.getpixel((LEFT, mid_y)) == BLACK and image.getpixel((RIGHT, mid_y)) == BLACK
    assert image.getpixel((mid_x + 123, TOP)) == BLACK and image.getpixel((mid_x + 123, BOTTOM)) == BLACK


def _x_log(x, lo, hi):
    return LEFT + math.log10(x / lo) / math.log10(hi / lo) * (RIGHT - LEFT)


def _y_log(v, lo, hi):
    return BOTTOM - math.log10(v / lo) / math.log10(hi / lo) * (BOTTOM - TOP)


def test_linear_axes_put_a_point_where_expected(tmp_path):
    image = _draw(tmp_path, [("p", [("a", [(0, 0.0), (5, 0.5), (10, 1.0)], RED)], (0.0, 1.0), None)])
    assert image.size == (900, 360)
    _frame_ok(image)
    x, y = LEFT + 0.5 * (RIGHT - LEFT), BOTTOM - 0.5 * (BOTTOM - TOP)
    assert image.getpixel((round(x), round(y))) == RED


def test_log_axes_put_points_at_their_log_positions(tmp_path):
    pts = [(10, 1.0), (100, 10.0), (300, 40.0), (1000, 1000.0)]
    image = _draw(tmp_path, [("p", [("a", pts, RED)], (1.0, 1000.0), None)], logx=True, logy=True, xlabel="T")
    _frame_ok(image)
    for x, v in pts[1:-1]:
        px, py = _x_log(x, 10, 1000), _y_log(v, 1.0, 1000.0)
        assert image.getpixel((round(px), round(py))) == RED, (x, v)
    # (100, 10) sits mid-way in x and a third up in y; on linear axes it would be near the bottom left
    assert image.getpixel((round(LEFT + 90 / 990 * 800), round(BOTTOM - 9 / 999 * 230))) != RED
    # grid lines at the 1-2-5 ticks in data units: 10 and 100 are a third and two thirds up
    for v in (10.0, 100.0):
        y = _y_log(v, 1.0, 1000.0)
        rows = [image.getpixel((LEFT + 700, yy)) for yy in (math.floor(y), math.ceil(y))]
        assert GRID in rows, (v, rows)


def test_log_y_range_from_the_data_and_explicit_x_ticks(tmp_path):
    pts = [(256, 1900.0), (1024, 7570.0), (8192, 60600.0)]
    image = _draw(tmp_path, [("p", [("a", pts, RED)], None, None)], logx=True, logy=True, xticks=[256, 1024, 2048, 8192])
    _frame_ok(image)
    # y range 1000 .. 100000 (the 1, 2, 5 x 10^k around the data)
    for x, v in pts:
        assert image.getpixel((round(_x_log(x, 256, 8192)), round(_y_log(v, 1000.0, 100000.0)))) == RED, (x, v)
    # tick marks below the frame at the given x ticks only (500 would be an automatic log tick)
    for t in (1024, 2048):
        assert image.getpixel((round(_x_log(t, 256, 8192)), BOTTOM + 2)) == BLACK, t
    assert image.getpixel((round(_x_log(500, 256, 8192)), BOTTOM + 2)) != BLACK


def test_dashed_series_has_gaps_and_solid_does_not(tmp_path):
    y = 0.5
    panels = [("p", [("solid", [(0, 0.25), (10, 0.25)], BLUE), ("dashed", [(0, y), (10, y)], RED, "dashed")],
               (0.0, 1.0), None)]
    image = _draw(tmp_path, panels)
    row = {"dashed": round(BOTTOM - y * (BOTTOM - TOP)), "solid": round(BOTTOM - 0.25 * (BOTTOM - TOP))}

    def runs(name, color):
        on = [any(image.getpixel((x, r)) == color for r in (row[name] - 1, row[name], row[name] + 1))
              for x in range(LEFT + 10, RIGHT - 10)]
        return sum(on) / len(on), sum(1 for a, b in itertools.pairwise(on) if a and not b)

    frac, dashes = runs("dashed", RED)
    assert 0.35 < frac < 0.8 and dashes > 30, (frac, dashes)
    frac, dashes = runs("solid", BLUE)
    assert frac == 1.0 and dashes == 0, (frac, dashes)


def test_empty_and_non_positive_series_do_not_crash(tmp_path):
    panels = [("empty", [("a", [], RED)], None, {"ref": 0.5}), ("none", [], None, None)]
    assert _draw(tmp_path, panels).size == (900, 720)
    # points <= 0 cannot go on a log axis: they are left out, the rest is drawn
    panels = [("p", [("a", [(0, 5.0), (10, -1.0)], RED), ("b", [(10, 1.0), (100, 10.0)], BLUE)], None, None)]
    image = _draw(tmp_path, panels, logx=True, logy=True)
    assert image.getpixel((RIGHT, TOP)) == BLUE  # (100, 10): the top right corner of the data's range
    assert _draw(tmp_path, [("p", [("a", [(0, 0.0)], RED)], None, None)], logx=True, logy=True).size == (900, 360)


def test_log_ticks():
    assert _log_ticks(1000, 100000) == [1000, 2000, 5000, 10000, 20000, 50000, 100000]
    assert _log_ticks(1, 1e6) == [1, 10, 100, 1000, 10000, 100000, 1000000]  # only decades over > 3 decades
    assert _log_ticks(300, 400) == [300, 400]  # no 1-2-5 tick inside: the ends
