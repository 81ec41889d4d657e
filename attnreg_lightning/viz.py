"""Pictures of regularized attention as uint8 arrays; no knowledge of any logger.

A row per explained image: the input, then each map as a colour overlay on a grey copy of it. Attention
panels (raw and regularized) share the raw map's colour scale (its min to its max), so what regularization
removed or shrank shows as dark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from torch import Tensor

from attnreg_lightning.regularize import RegularizedAttention

GAP = 2  # white pixels between panels


def to_display(image: Tensor) -> np.ndarray:
    """A normalized ``[C, H, W]`` image as float ``[H, W, 3]`` in [0, 1] (min-max per image)."""
    x = image.detach().float().cpu().numpy()
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    x = x.transpose(1, 2, 0)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.nan_to_num((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x))


def overlay(
    base: np.ndarray, token_map: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno", alpha: float = 0.6
) -> np.ndarray:
    """Colour a ``[h, w]`` token map (nearest-upsampled) over the grey of ``base [H, W, 3]``; float in [0, 1]."""
    big_h, big_w = base.shape[:2]
    h, w = token_map.shape
    up = np.kron(token_map, np.ones((big_h // h, big_w // w)))
    scaled = np.clip((up - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(up), 0, 1)
    colour = colormaps[cmap](np.nan_to_num(scaled))[..., :3]
    grey = base.mean(axis=2, keepdims=True)
    return (1 - alpha) * grey + alpha * colour


def panels(image: Tensor, reg: RegularizedAttention, index: int, maps: Sequence[str]) -> dict[str, np.ndarray]:
    """Named float ``[H, W, 3]`` panels for image ``index`` of ``reg``."""
    if reg.grid is None:
        raise ValueError("reg has no token grid: it can't be drawn")
    base = to_display(image)
    sig = reg.significance

    def grid(values: Tensor) -> np.ndarray:
        return values[index].detach().float().cpu().numpy().reshape(reg.grid)

    raw = grid(reg.attention)
    finite = np.isfinite(raw).any()
    bottom, top = (float(np.nanmin(raw)), float(np.nanmax(raw))) if finite else (0.0, 1.0)
    pool = 1 + sig.z_null.shape[1]  # p >= 1 / (T (N + 1)) unless a token beats the whole pool
    z = grid(sig.z)
    zmax = max(float(np.abs(z).max()), 1e-6)
    out = {
        "input": base,
        "raw": overlay(base, raw, bottom, top),
        "z": overlay(base, z, -zmax, zmax, cmap="coolwarm"),
        "-log10 p": overlay(base, -np.log10(np.clip(grid(sig.p), 1e-12, 1)), 0.0, np.log10(pool * raw.size)),
        "lfdr": overlay(base, grid(sig.lfdr), 0.0, 1.0, cmap="viridis_r"),
    }
    for name in maps:
        out[f"{name} map"] = overlay(base, grid(reg.maps[name]), bottom, top)
    return out


def picture_row(image: Tensor, reg: RegularizedAttention, index: int, maps: Sequence[str]) -> tuple[np.ndarray, str]:
    """One uint8 ``[H, W', 3]`` strip of panels for image ``index``, and a caption naming them left to right."""
    named = panels(image, reg, index, maps)
    tiles = list(named.values())
    h = tiles[0].shape[0]
    gap = np.ones((h, GAP, 3))
    strip = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
    return (np.clip(strip, 0, 1) * 255).round().astype(np.uint8), " | ".join(named)
