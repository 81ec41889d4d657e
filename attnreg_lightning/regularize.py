"""Threshold and shrinkage rules that turn raw attention and its significance into regularized maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnreg_lightning.stats import Significance

MAP_NAMES = ("zreg", "p", "lfdr", "pi0", "posterior", "q")


@dataclass(frozen=True)
class Thresholds:
    """Rule thresholds (reference defaults ``z_th=0, p_th=0.3, lfdr_th=0.3``; ``q_th`` is ours).

    ``p_th``, ``lfdr_th`` and ``q_th`` are probabilities in [0, 1]; ``z_th`` is a z-score (any finite value).
    """

    z_th: float = 0.0
    p_th: float = 0.3
    lfdr_th: float = 0.3
    q_th: float = 0.1

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.z_th)):
            raise ValueError(f"z_th must be a finite number, got {self.z_th!r}")
        for name in ("p_th", "lfdr_th", "q_th"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass
class RegularizedAttention:
    """Raw attention ``[B, T]``, its significance and the regularized maps (each ``[B, T]``).

    ``grid`` is the token grid ``(h, w)`` (``h * w == T``) when known, for drawing.
    """

    attention: Tensor
    significance: Significance
    maps: dict[str, Tensor]
    thresholds: Thresholds
    grid: tuple[int, int] | None = None

    @property
    def sparsity(self) -> dict[str, Tensor]:
        """Per map, per image: fraction of tokens set to zero."""
        return {k: (m == 0).to(m.dtype).mean(dim=1) for k, m in self.maps.items()}

    @property
    def retained_mass(self) -> dict[str, Tensor]:
        """Per map, per image: regularized mass over raw mass (1 - shrinkage)."""
        raw = self.attention.clamp_min(0).sum(dim=1)
        return {k: m.sum(dim=1) / raw.clamp_min(torch.finfo(raw.dtype).tiny) for k, m in self.maps.items()}

    def spatial(self, name: str) -> Tensor:
        """A map (``"raw"`` or a map name) reshaped to ``[B, h, w]``."""
        if self.grid is None:
            raise ValueError("grid is unknown: this RegularizedAttention carries no token grid shape")
        values = self.attention if name == "raw" else self.maps[name]
        return values.reshape(values.shape[0], *self.grid)


def _percentile(x: Tensor, q: Tensor) -> Tensor:
    """Per-row percentile with linear interpolation (numpy's default); ``x [B, T]``, ``q [B]`` in [0, 1]."""
    s = x.sort(dim=1).values
    pos = q.to(s.dtype) * (s.shape[1] - 1)
    lo = pos.floor().long().clamp(0, s.shape[1] - 1)
    hi = pos.ceil().long().clamp(0, s.shape[1] - 1)
    a = s.gather(1, lo[:, None])[:, 0]
    b = s.gather(1, hi[:, None])[:, 0]
    return a + (b - a) * (pos - lo.to(s.dtype))


def regularize(
    obs: Tensor,
    sig: Significance,
    z_th: float = 0.0,
    p_th: float = 0.3,
    lfdr_th: float = 0.3,
    q_th: float = 0.1,
    grid: tuple[int, int] | None = None,
) -> RegularizedAttention:
    """The maps of DESIGN.md step 8 from raw attention ``obs [B, T]`` and its significance.

    ``zreg = a [z >= z_th]``; ``p``, ``lfdr``, ``q`` keep ``zreg`` where the statistic is at most its threshold;
    ``pi0`` keeps ``zreg`` where p is at most the ``100 (1 - pi0)`` percentile of the image's p-values;
    ``posterior = a (1 - lfdr)``. Invalid images (``sig.valid`` False) get all-zero maps.
    """
    th = Thresholds(z_th=z_th, p_th=p_th, lfdr_th=lfdr_th, q_th=q_th)
    if obs.shape != sig.z.shape:
        raise ValueError(f"obs has shape {tuple(obs.shape)} but the significance is for {tuple(sig.z.shape)}")
    if grid is not None and grid[0] * grid[1] != obs.shape[1]:
        raise ValueError(f"grid={grid} does not hold T={obs.shape[1]} tokens")
    a = torch.where(sig.valid[:, None], obs.clamp_min(0), torch.zeros_like(obs))
    zreg = a * (sig.z >= th.z_th)
    pi0_cut = _percentile(sig.p, 1.0 - sig.pi0)
    maps = {
        "zreg": zreg,
        "p": zreg * (sig.p <= th.p_th),
        "lfdr": zreg * (sig.lfdr <= th.lfdr_th),
        "pi0": zreg * (sig.p <= pi0_cut[:, None]),
        "posterior": a * (1 - sig.lfdr),
        "q": zreg * (sig.q <= th.q_th),
    }
    return RegularizedAttention(attention=obs, significance=sig, maps=maps, thresholds=th, grid=grid)
