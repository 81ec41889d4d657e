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

    ``grid`` is the token grid ``(h, w)`` (``h * w == T``) when known, for drawing. ``per_head``, when the
    engine tested each head (``heads="all"``), holds the same for every head: ``B * H`` rows, image-major.
    ``logits``, when the engine was asked for them (``classify=True``), are the model's class logits of the
    images ``[B, classes]``, from the forward that read their attention (NaN rows where ``attention`` is NaN).
    """

    attention: Tensor
    significance: Significance
    maps: dict[str, Tensor]
    thresholds: Thresholds
    grid: tuple[int, int] | None = None
    per_head: RegularizedAttention | None = None
    logits: Tensor | None = None

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


def pi0_cut(p: Tensor, pi0: Tensor, pixels_per_token: int = 1) -> Tensor:
    """The reference's pi0 threshold ``np.percentile(p_pixels, 100 (1 - pi0))`` per image, in float64.

    The reference takes the percentile over the nearest-upsampled pixels, each token's p-value repeated
    ``pixels_per_token`` (``r``) times: with ``s`` the sorted token p-values, the sorted pixels are
    ``s[j // r]``, so the ``r T`` pixels are never formed. numpy's steps are kept exactly: ``q`` is the
    percentile divided by 100, the virtual index ``(r T - 1) q``, and its two-sided linear interpolation.
    ``p [B, T]``, ``pi0 [B]``; ``[B]``.
    """
    s = p.to(torch.float64).sort(dim=1).values
    n = pixels_per_token * s.shape[1]
    q = (100 * (1 - pi0.to(torch.float64))) / 100
    virtual = (n - 1) * q
    below = virtual.floor().clamp(0, n - 1)
    gamma = (virtual - below)[:, None]
    lo = below.long()[:, None]
    hi = (lo + 1).clamp(max=n - 1)
    a, b = s.gather(1, lo // pixels_per_token), s.gather(1, hi // pixels_per_token)
    diff = b - a
    # numpy's _lerp: from the nearer end, so the result is exact at gamma = 0 and 1
    return torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)[:, 0]


def regularize(
    obs: Tensor,
    sig: Significance,
    z_th: float = 0.0,
    p_th: float = 0.3,
    lfdr_th: float = 0.3,
    q_th: float = 0.1,
    grid: tuple[int, int] | None = None,
    pixels_per_token: int = 1,
) -> RegularizedAttention:
    """The maps of docs/method.md step 8 from raw attention ``obs [B, T]`` and its significance.

    ``zreg = a [z >= z_th]``; ``p``, ``lfdr``, ``q`` keep ``zreg`` where the statistic is at most its threshold;
    ``pi0`` keeps ``zreg`` where p is at most the ``100 (1 - pi0)`` percentile of the image's p-values over
    its pixels, as the reference takes it (``pixels_per_token``: the patch area, each token's p-value counted
    that often; ``1``: over tokens);
    ``posterior = a (1 - lfdr)``. Invalid images (``sig.valid`` False) get all-zero maps.
    """
    th = Thresholds(z_th=z_th, p_th=p_th, lfdr_th=lfdr_th, q_th=q_th)
    if obs.shape != sig.z.shape:
        raise ValueError(f"obs has shape {tuple(obs.shape)} but the significance is for {tuple(sig.z.shape)}")
    if grid is not None and grid[0] * grid[1] != obs.shape[1]:
        raise ValueError(f"grid={grid} does not hold T={obs.shape[1]} tokens")
    if isinstance(pixels_per_token, bool) or not isinstance(pixels_per_token, int) or pixels_per_token < 1:
        raise ValueError(f"pixels_per_token must be an int >= 1, got {pixels_per_token!r}")
    a = torch.where(sig.valid[:, None], obs.clamp_min(0), torch.zeros_like(obs))
    zreg = a * (sig.z >= th.z_th)
    cut = pi0_cut(sig.p, sig.pi0, pixels_per_token)
    maps = {
        "zreg": zreg,
        "p": zreg * (sig.p <= th.p_th),
        "lfdr": zreg * (sig.lfdr <= th.lfdr_th),
        "pi0": zreg * (sig.p.to(torch.float64) <= cut[:, None]),
        "posterior": a * (1 - sig.lfdr),
        "q": zreg * (sig.q <= th.q_th),
    }
    return RegularizedAttention(attention=obs, significance=sig, maps=maps, thresholds=th, grid=grid)
