"""Pictures of regularized attention as uint8 arrays, titled and with colour bars; no knowledge of any logger.

A row per explained image: the input, raw attention, z, -log10 p, lfdr, then each regularized map. Every
panel carries its title and a colour bar, so the picture reads without a caption. Attention panels (raw and
regularized) share one scale per image (``scale``: kept fixed across epochs by the callback, so change is
visible); a token a map removed is drawn in :data:`REMOVED_COLOUR`, apart from a kept token of low attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from attnreg_lightning.regularize import RegularizedAttention

REMOVED_COLOUR = "#7fd4ff"  # light cyan: not in inferno, viridis or coolwarm
PANEL_INCHES = 1.9
DPI = 100  # panels of ~150 px whatever the image size
_BAR = {"orientation": "horizontal", "fraction": 0.06, "pad": 0.02, "aspect": 25}
MASK_CLASSES = {0: "removed by p and lfdr", 1: "kept by p only", 2: "kept by lfdr only", 3: "kept by p and lfdr"}


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


def _render(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _removed_cmap(name: str) -> matplotlib.colors.Colormap:
    return matplotlib.colormaps[name].with_extremes(bad=REMOVED_COLOUR)


def _input_panel(fig: Figure, ax, base: np.ndarray) -> None:
    ax.imshow(base, interpolation="nearest")
    ax.set_title("input", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    # an empty colour bar keeps the input panel the size of the others
    fig.colorbar(ScalarMappable(cmap=ListedColormap(["white"])), ax=ax, **_BAR).ax.set_visible(False)


def _panel(fig: Figure, ax, values: np.ndarray, title: str, cmap, vmin: float, vmax: float, extent) -> None:
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", extent=extent)
    shown = np.ma.compressed(np.ma.masked_invalid(values))
    low, high = bool(shown.size and shown.min() < vmin), bool(shown.size and shown.max() > vmax)
    extend = "both" if low and high else "min" if low else "max" if high else "neither"
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(im, ax=ax, extend=extend, **_BAR)  # a pointed end: values beyond the scale, clipped
    bar.ax.xaxis.set_major_locator(MaxNLocator(4))  # narrow ranges would crowd the labels into each other
    bar.ax.tick_params(labelsize=6)
    bar.ax.xaxis.get_offset_text().set_fontsize(6)


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
    z = grid(sig.z)
    zmax = max(float(np.abs(z).max()), 1e-6)
    base = to_display(image)
    extent = (0, base.shape[1], base.shape[0], 0)  # token maps drawn over the image's pixels
    inferno_removed = _removed_cmap("inferno")
    panels = [
        ("raw attention", raw, "inferno", lo, hi),
        ("z (log scale)", z, "coolwarm", -zmax, zmax),
        ("-log10 p", -np.log10(np.clip(grid(sig.p), 1e-300, 1)), "magma", 0.0, float(np.log10(pool))),
        ("local FDR", grid(sig.lfdr), "viridis_r", 0.0, 1.0),
    ]
    for name in maps:
        kept = grid(reg.maps[name])
        shown = np.ma.masked_where(kept <= 0, kept)  # removed: the "bad" colour, not the low end of the scale
        panels.append((f"{name} map", shown, inferno_removed, lo, hi))
    fig = Figure(figsize=(PANEL_INCHES * (1 + len(panels)), PANEL_INCHES * 1.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 1 + len(panels))
    _input_panel(fig, axes[0], base)
    for ax, (title_, values, cmap, vmin, vmax) in zip(axes[1:], panels, strict=True):
        _panel(fig, ax, values, title_, cmap, vmin, vmax, extent)
    fig.suptitle(f"{title}{' · ' if title else ''}cyan: token removed by the map", fontsize=9)
    return _render(fig)


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
    extent = (0, base.shape[1], base.shape[0], 0)
    cols = len(history)
    fig = Figure(figsize=(PANEL_INCHES * (1 + cols), PANEL_INCHES * 2.5), dpi=DPI, layout="constrained")
    axes = np.asarray(fig.subplots(2, 1 + cols)).reshape(2, 1 + cols)
    for row in range(2):
        _input_panel(fig, axes[row, 0], base)
    cmap = _removed_cmap("inferno")
    for j, (label, raw, lfdr_map) in enumerate(history, start=1):
        _panel(fig, axes[0, j], raw, f"raw, {label}", "inferno", *scale, extent)
        shown = np.ma.masked_where(lfdr_map <= 0, lfdr_map)
        _panel(fig, axes[1, j], shown, f"lfdr map, {label}", cmap, *scale, extent)
    fig.suptitle(f"{title}{' · ' if title else ''}cyan: token removed by the lfdr map", fontsize=9)
    return _render(fig)


def heads_picture(image: Tensor, per_head: RegularizedAttention, index: int, heads: int) -> np.ndarray:
    """Each head's lfdr map of image ``index`` (``per_head`` holds ``B * heads`` rows), one scale: the range
    of the image's per-head raw attention."""
    rows = range(index * heads, (index + 1) * heads)
    raw = per_head.attention[list(rows)].detach().double().cpu().numpy()
    lo, hi = attention_scale(raw)
    base = to_display(image)
    extent = (0, base.shape[1], base.shape[0], 0)
    fig = Figure(figsize=(PANEL_INCHES * (1 + heads), PANEL_INCHES * 1.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 1 + heads)
    _input_panel(fig, axes[0], base)
    cmap = _removed_cmap("inferno")
    for h, row in enumerate(rows):
        kept = per_head.maps["lfdr"][row].detach().double().cpu().numpy().reshape(per_head.grid)
        kept_n = int((kept > 0).sum())
        title = f"head {h} lfdr map ({kept_n} kept)"
        _panel(fig, axes[1 + h], np.ma.masked_where(kept <= 0, kept), title, cmap, lo, hi, extent)
    fig.suptitle("each head tested against its own null attention · cyan: removed", fontsize=9)
    return _render(fig)


def stack(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Two uint8 pictures one above the other, the narrower padded white on the right."""
    width = max(top.shape[1], bottom.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(top), pad(bottom)])
