"""Pictures of regularized attention as uint8 arrays, titled and with colour bars; no knowledge of any logger.

A row per explained image: the input, raw attention, z, -log10 p, lfdr, then each regularized map. Every
panel carries its title and a colour bar, so the picture reads without a caption. Attention panels (raw and
regularized) share one scale per image (``scale``: kept fixed across epochs by the callback, so change is
visible); a token a map removed is drawn in :data:`REMOVED_COLOUR`, apart from a kept token of low attention.

Panels are composed on a fixed grid of pixels (colour maps by lookup table, text by Pillow in matplotlib's own
DejaVu Sans), not laid out by a figure engine: a row takes milliseconds, so drawing does not slow validation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import Colormap
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from attnreg_lightning.regularize import RegularizedAttention

REMOVED_COLOUR = "#7fd4ff"  # light cyan: not in inferno, viridis or coolwarm
PANEL_PX = 150  # panel height; token maps are drawn over the image's extent, so width follows its aspect
MASK_CLASSES = {0: "removed by p and lfdr", 1: "kept by p only", 2: "kept by lfdr only", 3: "kept by p and lfdr"}
_GAP, _MARGIN, _SUPTITLE = 18, 8, 22
_TITLE_LINE, _TITLE_PAD = 13, 3  # a panel title's line height and its space above the panel
_BAR_PAD, _BAR, _TICK, _TICK_TEXT = 5, 8, 3, 12
_BAR_BLOCK = _BAR_PAD + _BAR + _TICK + _TICK_TEXT
# what each statistic's colours mean, said in its panel's title (the colour maps are in picture_row)
Z_TITLE = "z of log attention\n(red = above the null)"  # coolwarm over +-max |z|
P_TITLE = "-log10 p\n(bright = significant)"  # magma from 0 up
LFDR_TITLE = "local FDR\n(yellow = significant)"  # viridis_r: lfdr 0 is viridis' top, yellow
_LABEL_SEP = 8  # the least white between two panels' colour-bar labels
_ARROW = 6  # the pointed end of a colour bar whose panel holds values beyond its scale
_FRAME = (40, 40, 40)


def to_display(image: Tensor) -> np.ndarray:
    """A normalized ``[C, H, W]`` image as float ``[H, W, 3]`` in [0, 1] (min-max per image)."""
    x = image.detach().float().cpu().numpy()
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    x = x.transpose(1, 2, 0)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.nan_to_num((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x))


def attention_scale(raw: np.ndarray) -> tuple[float, float]:
    """The colour scale of an image's attention panels: its raw map's min to max."""
    finite = raw[np.isfinite(raw)]
    if finite.size == 0 or finite.max() <= finite.min():
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


@dataclass
class _Panel:
    """One panel: its pixels (drawn nearest-upsampled to the panel's box), its title, and its colour bar's
    ``(colormap, vmin, vmax, extend)`` where it has one (``extend``: which ends hold values beyond the scale)."""

    rgb: np.ndarray  # uint8 [h, w, 3]
    title: str
    bar: tuple[Colormap, float, float, str] | None = None


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), size)


def _removed_cmap(name: str) -> Colormap:
    return matplotlib.colormaps[name].with_extremes(bad=REMOVED_COLOUR)


def _coloured(values: np.ndarray, cmap: Colormap, vmin: float, vmax: float) -> np.ndarray:
    """uint8 ``[h, w, 3]`` colours of ``values`` (masked or non-finite: the map's "bad" colour over white)."""
    values = np.ma.masked_invalid(values)
    scaled = (values - vmin) / (vmax - vmin) if vmax > vmin else values * 0.0
    rgba = cmap(scaled, bytes=True).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _map_panel(values: np.ndarray, title: str, cmap: Colormap | str, vmin: float, vmax: float) -> _Panel:
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    shown = np.ma.compressed(np.ma.masked_invalid(values))
    low, high = bool(shown.size and shown.min() < vmin), bool(shown.size and shown.max() > vmax)
    extend = "both" if low and high else "min" if low else "max" if high else "neither"
    return _Panel(_coloured(values, cmap, vmin, vmax), title, (cmap, vmin, vmax, extend))


def _ticks(vmin: float, vmax: float) -> list[tuple[float, str]]:
    """At most 4 round values in ``[vmin, vmax]`` and their labels, with the decimals their spacing needs."""
    if not vmax > vmin:
        return [(vmin, f"{vmin:.3g}")]
    values = [v for v in MaxNLocator(4).tick_values(vmin, vmax) if vmin - 1e-9 * (vmax - vmin) <= v <= vmax]
    step = values[1] - values[0] if len(values) > 1 else vmax - vmin
    decimals = max(0, -int(np.floor(np.log10(step))))
    while decimals < 12 and any(abs(round(v, decimals) - v) > step * 1e-6 for v in values):  # 0.25, not 0.2
        decimals += 1
    if decimals <= 6:
        fmt = f"{{:.{decimals}f}}"
    else:  # tiny values: as many significant digits as the spacing needs
        digits = max(1, decimals + int(np.floor(np.log10(max(abs(v) for v in values)))))
        fmt = f"{{:.{digits}e}}"
    return [(v, fmt.format(0.0 if abs(v) < step * 1e-6 else v)) for v in values]


def _box(rgb: np.ndarray, height: int) -> tuple[int, int]:
    return height, max(1, round(height * rgb.shape[1] / rgb.shape[0]))


@functools.lru_cache(maxsize=64)
def _strip(name: str, width: int) -> np.ndarray:
    """A colour bar's strip: the named colour map from its low end to its high end (whatever values it stands
    for; a map's "bad" colour, the only thing :func:`_removed_cmap` changes, is not on it)."""
    return _coloured(np.linspace(0.0, 1.0, width)[None].repeat(_BAR, 0), matplotlib.colormaps[name], 0.0, 1.0)


def _bar_labels(bar, width: int) -> list[tuple[float, float | None, str]]:
    """A colour bar's ticks as ``(tick x, label's left x, label)`` from the bar's left end, each label centred on its
    tick (its left x None where it would crowd the label before it: left out, its tick kept)."""
    _, vmin, vmax, _ = bar
    font, right, ticks = _font(9), -math.inf, []
    for value, label in _ticks(vmin, vmax):
        tx = (value - vmin) / (vmax - vmin) * (width - 1) if vmax > vmin else 0.0
        length = font.getlength(label)
        left = tx - length / 2
        ticks.append((tx, None if left < right + 3 else left, label))
        right = right if left < right + 3 else left + length
    return ticks


def _overhangs(panel: _Panel, width: int) -> tuple[float, float]:
    """How far a panel's colour-bar labels reach beyond its left and its right edge."""
    if panel.bar is None:
        return 0.0, 0.0
    font, labels = _font(9), _bar_labels(panel.bar, width)
    drawn = [(left, left + font.getlength(label)) for _, left, label in labels if left is not None]
    return max([0.0, *(-a for a, _ in drawn)]), max([0.0, *(b - width for _, b in drawn)])


def _draw_bar_marks(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, bar, strip: np.ndarray) -> None:
    """A colour bar's frame, pointed ends and ticks around its ``strip`` at ``(x, y)``."""
    extend = bar[3]
    draw.rectangle([x - 1, y - 1, x + width, y + _BAR], outline=_FRAME)
    for side, edge, tip in (("min", x - 1, x - 1 - _ARROW), ("max", x + width, x + width + _ARROW)):
        if extend in (side, "both"):
            colour = tuple(int(c) for c in strip[0, 0 if side == "min" else -1])
            draw.polygon([(edge, y - 1), (edge, y + _BAR), (tip, y + _BAR // 2)], fill=colour, outline=_FRAME)
    for tx, left, label in _bar_labels(bar, width):
        draw.line([(x + tx, y + _BAR), (x + tx, y + _BAR + _TICK - 1)], fill=_FRAME)
        if left is not None:
            draw.text((x + left, y + _BAR + _TICK), label, fill=(0, 0, 0), font=_font(9), anchor="la")


def _title_lines(title: str, width: int) -> list[str]:
    """A panel title's lines: its own line breaks, and words wrapped to the panel's width (a title wider than its
    panel would run into the next one's)."""
    font, lines = _font(11), []
    for paragraph in title.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            longer = f"{line} {word}" if line else word
            if line and font.getlength(longer) > width:
                lines.append(line)
                line = word
            else:
                line = longer
        lines.append(line)
    return lines


def _compose(rows: Sequence[Sequence[_Panel]], title: str) -> np.ndarray:
    """Rows of panels on white: each panel titled above, framed, with its colour bar (if any) below it, and the
    picture's title on top. The pixels (panels, bar strips) go into the array first, then every line and text
    is drawn around them, outside their boxes."""
    boxes = [[_box(p.rgb, PANEL_PX) for p in row] for row in rows]
    titles = [[_title_lines(p.title, w) for p, (_, w) in zip(row, row_boxes, strict=True)]
              for row, row_boxes in zip(rows, boxes, strict=True)]  # fmt: skip
    title_height = _TITLE_PAD + _TITLE_LINE * max(len(lines) for row in titles for lines in row)
    row_height = title_height + PANEL_PX + _BAR_BLOCK
    # each panel's left x: the gap to the one before leaves room for both colour bars' labels (centred on their end
    # ticks they reach beyond their bars) and white between them, so no label runs into the next panel's
    lefts, ends = [], []
    for row, row_boxes in zip(rows, boxes, strict=True):
        hangs = [_overhangs(p, w) for p, (_, w) in zip(row, row_boxes, strict=True)]
        x, xs = _MARGIN + math.ceil(hangs[0][0]), []
        for j, (_, w) in enumerate(row_boxes):
            xs.append(x)
            if j + 1 < len(row):
                x += w + max(_GAP, math.ceil(hangs[j][1] + hangs[j + 1][0]) + _LABEL_SEP)
        lefts.append(xs)
        ends.append(xs[-1] + row_boxes[-1][1] + max(_ARROW + 1, math.ceil(hangs[-1][1])) + _MARGIN)
    width = max([*ends, int(_font(12).getlength(title)) + 2 + 2 * _MARGIN])
    canvas = np.full((_SUPTITLE + row_height * len(rows) + _MARGIN, width, 3), 255, np.uint8)
    marks = []
    for r, (row, row_boxes) in enumerate(zip(rows, boxes, strict=True)):
        y = _SUPTITLE + r * row_height + title_height
        for panel, (h, w), lines, x in zip(row, row_boxes, titles[r], lefts[r], strict=True):
            src_h, src_w = panel.rgb.shape[:2]
            # nearest upsampling: each token (or pixel) a block of whole panel pixels
            canvas[y : y + h, x : x + w] = panel.rgb[(np.arange(h) * src_h) // h][:, (np.arange(w) * src_w) // w]
            strip = None
            if panel.bar is not None:
                strip = _strip(panel.bar[0].name, w)
                canvas[y + h + _BAR_PAD : y + h + _BAR_PAD + _BAR, x : x + w] = strip
            marks.append((x, y, h, w, panel, strip, lines))
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, _SUPTITLE - 6), title, fill=(0, 0, 0), font=_font(12), anchor="md")
    for x, y, h, w, panel, strip, lines in marks:
        for i, line in enumerate(reversed(lines)):  # the last line just above the panel
            draw.text((x + w / 2, y - _TITLE_PAD - i * _TITLE_LINE), line, fill=(0, 0, 0), font=_font(11), anchor="md")
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=_FRAME)
        if strip is not None:
            _draw_bar_marks(draw, x, y + h + _BAR_PAD, w, panel.bar, strip)
    return np.array(image)


def picture_row(
    image: Tensor,
    reg: RegularizedAttention,
    index: int,
    maps: Sequence[str],
    title: str = "",
    scale: tuple[float, float] | None = None,
) -> np.ndarray:
    """One uint8 ``[H, W, 3]`` picture of image ``index``: titled panels with colour bars.

    ``scale`` is the attention panels' colour range (default: this raw map's :func:`attention_scale`);
    values beyond it are clipped, the colour bar saying so by its pointed end.
    """
    if reg.grid is None:
        raise ValueError("reg has no token grid: it can't be drawn")
    sig = reg.significance

    def grid(values: Tensor) -> np.ndarray:
        return values[index].detach().double().cpu().numpy().reshape(reg.grid)

    raw = grid(reg.attention)
    lo, hi = scale if scale is not None else attention_scale(raw)
    pool = (1 + sig.z_null.shape[1]) * raw.size  # p >= 1 / pool unless a token beats the whole pool
    top = float(np.log10(pool))
    p = grid(sig.p)
    # p is a multiple of 1 / pool: one that rounded a hair below 1 / pool (1 - count / pool in float32) is at the
    # bar's top, not beyond it (no pointed end); p = 0, a token that beats the whole pool, is beyond it
    minus_log_p = -np.log10(np.clip(p, 1e-300, 1))
    minus_log_p = np.where(p * pool >= 0.5, np.minimum(minus_log_p, top), minus_log_p)
    z = grid(sig.z)
    zmax = max(float(np.abs(z).max()), 1e-6)
    panels = [
        _input(image),
        _map_panel(raw, "raw attention", "inferno", lo, hi),
        _map_panel(z, Z_TITLE, "coolwarm", -zmax, zmax),
        _map_panel(minus_log_p, P_TITLE, "magma", 0.0, top),
        _map_panel(grid(sig.lfdr), LFDR_TITLE, "viridis_r", 0.0, 1.0),
    ]
    removed = _removed_cmap("inferno")
    for name in maps:
        kept = grid(reg.maps[name])
        # removed: the "bad" colour, not the low end of the scale
        panels.append(_map_panel(np.ma.masked_where(kept <= 0, kept), f"{name} map", removed, lo, hi))
    return _compose([panels], f"{title}{' · ' if title else ''}cyan: token removed by the map")


def _input(image: Tensor | np.ndarray) -> _Panel:
    base = image if isinstance(image, np.ndarray) else (to_display(image) * 255).round().astype(np.uint8)
    return _Panel(base, "input")


def mask_classes(reg: RegularizedAttention, index: int, size: tuple[int, int]) -> np.ndarray:
    """Integer ``[H, W]`` classes of :data:`MASK_CLASSES` for image ``index`` (tokens nearest-upsampled)."""
    if reg.grid is None:
        raise ValueError("reg has no token grid: it can't be drawn")
    p_kept = (reg.significance.p[index] <= reg.thresholds.p_th) & (reg.significance.z[index] >= reg.thresholds.z_th)
    lfdr_kept = reg.maps["lfdr"][index] > 0
    classes = (p_kept.long() + 2 * lfdr_kept.long()).cpu().numpy().reshape(reg.grid).astype(np.uint8)
    return np.kron(classes, np.ones((size[0] // reg.grid[0], size[1] // reg.grid[1]), dtype=np.uint8))


def display_uint8(image: Tensor, min_size: int = 128) -> np.ndarray:
    """The input as uint8 ``[H', W', 3]``, nearest-upsampled by a whole factor to at least ``min_size`` px."""
    base = to_display(image)
    k = max(1, -(-min_size // min(base.shape[:2])))
    return (np.kron(base, np.ones((k, k, 1))) * 255).round().astype(np.uint8)


def evolution_picture(
    base: np.ndarray,
    history: Sequence[tuple[str, np.ndarray, np.ndarray]],
    scale: tuple[float, float],
    title: str = "",
) -> np.ndarray:
    """How one image's maps moved over training: its raw (top) and lfdr (bottom) maps at every explained
    run side by side, titled by run (``history``: ``(label, raw [h, w], lfdr map [h, w])``), one colour
    scale; ``base`` is the input as drawn (:func:`display_uint8`)."""
    removed = _removed_cmap("inferno")
    top, bottom = [_input(base)], [_input(base)]
    for label, raw, lfdr_map in history:
        top.append(_map_panel(raw, f"raw, {label}", "inferno", *scale))
        bottom.append(_map_panel(np.ma.masked_where(lfdr_map <= 0, lfdr_map), f"lfdr map, {label}", removed, *scale))
    return _compose([top, bottom], f"{title}{' · ' if title else ''}cyan: token removed by the lfdr map")


def heads_picture(image: Tensor, per_head: RegularizedAttention, index: int, heads: int) -> np.ndarray:
    """Each head's lfdr map of image ``index`` (``per_head`` holds ``B * heads`` rows), one scale: the range
    of the image's per-head raw attention."""
    rows = range(index * heads, (index + 1) * heads)
    raw = per_head.attention[list(rows)].detach().double().cpu().numpy()
    lo, hi = attention_scale(raw)
    removed = _removed_cmap("inferno")
    panels = [_input(image)]
    for h, row in enumerate(rows):
        kept = per_head.maps["lfdr"][row].detach().double().cpu().numpy().reshape(per_head.grid)
        title = f"head {h} lfdr map ({int((kept > 0).sum())} kept)"
        panels.append(_map_panel(np.ma.masked_where(kept <= 0, kept), title, removed, lo, hi))
    return _compose([panels], "each head tested against its own null attention · cyan: removed")


def stack(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Two uint8 pictures one above the other, the narrower padded white on the right."""
    width = max(top.shape[1], bottom.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(top), pad(bottom)])
