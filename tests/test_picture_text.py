"""The pictures' text as a reader meets it, read off the rendered pixels: colour-bar labels stay clear of the next
panel's, and the statistics' panel titles say what their colours mean (and are the colours they say)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from attnreg_lightning.regularize import regularize
from attnreg_lightning.viz import LFDR_TITLE, P_TITLE, Z_TITLE, evolution_picture, picture_row
from tests.test_pictures import BLACK, GRID, _colour, _panels, _sig

FONT = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), 11)


def _ink(a: np.ndarray) -> np.ndarray:
    return a.min(axis=2) < 245


def _label_band(pic: np.ndarray, box) -> tuple[int, int]:
    """The rows of a panel's colour-bar labels: from under the bar's frame (the first block of rows under the panel
    inked across its width) to the end of the labels' ink."""
    x0, x1, _, y1 = box
    across = [y for y in range(y1, min(y1 + 40, pic.shape[0])) if _ink(pic[y : y + 1, x0:x1]).mean() > 0.95]
    bar_end = across[0]
    while bar_end + 1 in across:
        bar_end += 1
    rows = [y for y in range(bar_end + 1, min(bar_end + 30, pic.shape[0])) if _ink(pic[y : y + 1, x0:x1]).any()]
    return bar_end + 1, rows[-1] + 1


def _white_run(column_ink: np.ndarray) -> int:
    """The longest run of columns without ink."""
    best = run = 0
    for inked in column_ink:
        run = 0 if inked else run + 1
        best = max(best, run)
    return best


def _assert_labels_clear(pic: np.ndarray, boxes) -> None:
    """Between every two neighbouring panels with colour bars, the labels' rows hold a white gap of at least 6 columns
    (so no label runs into the next panel's), and each bar carries at least two labels."""
    for left, right in zip(boxes, boxes[1:], strict=False):
        top, bottom = _label_band(pic, left)
        band = _ink(pic[top:bottom])
        between = band[:, left[1] : right[0]].any(axis=0)  # from the left panel's frame to the right one's
        assert _white_run(between) >= 6, (left, right, between.astype(int))
        for x0, x1, *_ in (left, right):
            under = band[:, x0:x1].any(axis=0)
            assert len([r for r in np.split(under, np.flatnonzero(np.diff(under)) + 1) if r[0]]) >= 2, (x0, x1)


@pytest.mark.parametrize(
    "scale", [(0.0144, 0.0168), (0.0148, 0.0160), (0.0, 123456.7), (-123456.7, 123456.7), (1.02e-7, 1.09e-7)]
)
def test_colour_bar_labels_never_touch_the_next_panels(scale):
    # a Hugging Face run's evolution picture read "0.01600.0148": each bar's end labels, centred on ticks at the bars'
    # ends, ran into each other across the gap. Long labels at both ends of every bar, side by side
    lo, hi = scale
    rng = np.random.default_rng(0)
    history = [(f"epoch{e}", rng.uniform(lo, hi, GRID), rng.uniform(lo, hi, GRID)) for e in range(3)]
    evo = evolution_picture(np.zeros((32, 32, 3), np.uint8), history, scale)
    top = evo[: evo.shape[0] // 2]
    _assert_labels_clear(top, _panels(top, 4)[1:])
    # a picture row: the attention panels on that scale beside z, -log10 p and the local FDR on their own
    raw = rng.uniform(lo, hi, 16)
    reg = regularize(torch.tensor(raw[None]), _sig(rng.normal(size=(1, 16)), rng.uniform(size=(1, 16)),
                                                   rng.uniform(size=(1, 16))), grid=GRID)  # fmt: skip
    pic = picture_row(BLACK, reg, 0, ["lfdr", "zreg"], scale=scale)
    _assert_labels_clear(pic, _panels(pic, 7)[1:])


def _title_lines(pic: np.ndarray, box) -> list[np.ndarray]:
    """The text lines drawn above a panel, each cropped to its ink (top to bottom; the picture's own title, where it
    reaches over the panel, first)."""
    x0, x1, y0, _ = box
    rows = np.flatnonzero(_ink(pic[: y0 - 1, x0:x1]).any(axis=1))
    lines = []
    for group in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1):
        area = pic[group[0] : group[-1] + 1, x0 - 9 : x1 + 9]
        ys, xs = np.nonzero(_ink(area))
        lines.append(area[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return lines


def _text(line: str) -> np.ndarray:
    """``line`` as the pictures draw titles (DejaVu Sans 11 on white), cropped to its ink."""
    image = Image.new("RGB", (400, 30), "white")
    ImageDraw.Draw(image).text((200, 20), line, fill=(0, 0, 0), font=FONT, anchor="md")
    a = np.array(image)
    ys, xs = np.nonzero(_ink(a))
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def test_statistics_panels_say_what_their_colours_mean_and_are_those_colours():
    # token 0: a strong token (z +2, the smallest p, lfdr 0); token 1: a null one (z -2, p 1, lfdr 1); the rest between
    z, p, lfdr = np.zeros((1, 16)), np.full((1, 16), 0.5), np.full((1, 16), 0.5)
    z[0, :2], p[0, :2], lfdr[0, :2] = (2.0, -2.0), (1 / 80, 1.0), (0.0, 1.0)  # 4 nulls: p >= 1 / (5 * 16)
    reg = regularize(torch.linspace(0.01, 0.16, 16)[None].double(), _sig(z, p, lfdr), grid=GRID)
    pic = picture_row(BLACK, reg, 0, [])
    boxes = _panels(pic, 5)  # input, raw, z, -log10 p, local FDR
    strong = {name: _colour(pic, boxes[i], (0, 0), GRID) for name, i in (("z", 2), ("p", 3), ("lfdr", 4))}
    null = {name: _colour(pic, boxes[i], (0, 1), GRID) for name, i in (("z", 2), ("p", 3), ("lfdr", 4))}
    # what each title says, drawn above its panel line for line
    for i, title in ((2, Z_TITLE), (3, P_TITLE), (4, LFDR_TITLE)):
        expected = [_text(line) for line in title.split("\n")]
        drawn = _title_lines(pic, boxes[i])[-len(expected) :]
        assert [d.shape for d in drawn] == [e.shape for e in expected], title
        assert all(np.array_equal(d, e) for d, e in zip(drawn, expected, strict=True)), title
    # ... is what the colours show: z of the log attention, red above the null; a small p bright; a low lfdr yellow
    assert Z_TITLE.startswith("z of log attention") and "red = above" in Z_TITLE
    r, g, b = strong["z"]
    assert r > 150 and r > b + 80 and null["z"][2] > null["z"][0] + 80  # red; the null token blue
    assert "bright = significant" in P_TITLE
    assert strong["p"].sum() > 500 and null["p"].sum() < 60  # near white-yellow against black
    assert "yellow = significant" in LFDR_TITLE
    r, g, b = strong["lfdr"]
    assert r > 200 and g > 200 and b < 100  # yellow
    assert null["lfdr"].sum() < 250  # dark purple
