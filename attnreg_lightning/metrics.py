"""Sparsity, shrinkage, localisation and calibration of regularized attention, as torchmetrics.

Functional core first (per-image scores from a :class:`RegularizedAttention`), then three small ``Metric``
classes whose states reduce by sum, so a DDP run reports what one process over the same images would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from attnreg_lightning.regularize import RegularizedAttention

QUANTUS_EPS = 1e-7  # Quantus' Sparseness adds this before the Gini index


def token_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixel masks ``[B, H, W]`` (or ``[B, 1, H, W]``) to token masks ``[B, T]``: tokens at least half covered."""
    m = mask.float()
    if m.dim() == 4:
        m = m[:, 0]
    if m.dim() != 3:
        raise ValueError(f"masks must be [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    cover = torch.nn.functional.adaptive_avg_pool2d(m[:, None], grid)[:, 0]
    return (cover >= 0.5).flatten(1)


def gini(x: Tensor) -> Tensor:
    """Gini index per row (Quantus' Sparseness): 0 for a flat map, towards 1 for a single token."""
    a = (x.abs() + QUANTUS_EPS).sort(dim=1).values
    n = a.shape[1]
    weights = 2 * torch.arange(1, n + 1, device=a.device, dtype=a.dtype) - n - 1
    return (a * weights).sum(1) / (n * a.sum(1))


def entropy(x: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row normalized to sum one; NaN for an all-zero row."""
    p = x.clamp_min(0) / x.clamp_min(0).sum(1, keepdim=True)
    return -(p * p.clamp_min(1e-30).log()).sum(1)


def mean_percentile(x: Tensor, region: Tensor) -> Tensor:
    """Mean percentile (0-100, mid-rank for ties) of the region's tokens among all tokens; NaN if no region."""
    ordered, order = x.sort(dim=1)
    n = x.shape[1]
    position = torch.arange(n, device=x.device).expand_as(ordered)
    # each sorted value's run of equal values: tokens below it = the run's start, its ties = the run's length - 1
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    below = torch.where(starts, position, 0).cummax(1).values
    last = torch.where(ends, position, n - 1).flip(1).cummin(1).values.flip(1)
    sorted_pct = 100 * (below + 0.5 * (last - below)).to(x.dtype) / max(n - 1, 1)
    pct = torch.empty_like(sorted_pct).scatter_(1, order, sorted_pct)
    return (pct * region).sum(1) / region.sum(1)


def precision_recall_f1(selected: Tensor, region: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Of boolean ``[B, T]`` selections against a region; NaN where undefined: for an image without region tokens
    (all three: it has no region to find) and, for precision, where nothing is selected."""
    hit = (selected & region).sum(1).to(torch.float64)
    undefined = torch.where(region.any(1), 0.0, float("nan")).to(hit)
    precision = hit / selected.sum(1) + undefined
    recall = hit / region.sum(1) + undefined
    f1 = 2 * hit / (selected.sum(1) + region.sum(1)) + undefined
    return precision, recall, f1


def topk_f1_curve(x: Tensor, region: Tensor, points: int) -> Tensor:
    """F1 against ``region`` of each image's top-k tokens, for ``k = round(f T)``, ``f`` on ``points`` fractions."""
    t = x.shape[1]
    ranked = region.gather(1, x.argsort(dim=1, descending=True)).to(torch.float64)
    hits = torch.cat([torch.zeros_like(ranked[:, :1]), ranked.cumsum(1)], 1)  # hits among the top-k, k = 0..T
    k = torch.linspace(0, 1, points, device=x.device, dtype=torch.float64).mul(t).round().long()
    return 2 * hits[:, k] / (k.to(torch.float64)[None] + region.sum(1, keepdim=True))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean token sets; 1 when both are empty (they agree)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their mean rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    s = x[order]
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant (no ranking to compare)."""
    ra, rb = average_ranks(a) - (a.size + 1) / 2, average_ranks(b) - (b.size + 1) / 2
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float("nan") if denom == 0 else float((ra * rb).sum() / denom)


def score_keys(maps: Sequence[str]) -> list[str]:
    """Every key :func:`image_scores` can return for these maps (fixed, so all ranks hold the same states)."""
    keys = ["pi0", "discoveries", "raw/gini", "raw/entropy", "raw/roi_percentile", "raw/noise_percentile"]
    for m in maps:
        keys += [f"{m}/sparsity", f"{m}/retained_mass", f"{m}/gini", f"{m}/entropy"]
        keys += [f"{m}/roi_precision", f"{m}/roi_recall", f"{m}/roi_f1", f"{m}/roi_percentile", f"{m}/noise_percentile"]
    return keys


def head_score_keys(heads: int) -> list[str]:
    """The per-head keys :func:`head_scores` returns."""
    return [f"head{h}/{k}" for h in range(heads) for k in ("discoveries", "lfdr/sparsity")]


def head_scores(reg: RegularizedAttention, heads: int) -> dict[str, Tensor]:
    """Per head, per valid image: the fraction of tokens with lfdr <= lfdr_th and the lfdr map's sparsity,
    from ``reg.per_head`` (``B * heads`` rows, image-major)."""
    per = reg.per_head
    b = reg.attention.shape[0]
    discoveries = (per.significance.lfdr <= per.thresholds.lfdr_th).to(torch.float64).mean(1).view(b, heads)
    sparsity = (per.maps["lfdr"] == 0).to(torch.float64).mean(1).view(b, heads)
    valid = per.significance.valid.view(b, heads).all(1) & reg.significance.valid
    out = {}
    for h in range(heads):
        out[f"head{h}/discoveries"] = discoveries[valid, h]
        out[f"head{h}/lfdr/sparsity"] = sparsity[valid, h]
    return out


def image_scores(
    reg: RegularizedAttention, maps: Sequence[str], roi: Tensor | None = None, noise: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-image scores ``[B]`` of valid images; ``roi``/``noise`` are token masks ``[B, T]`` when known."""
    raw = reg.attention
    out = {
        "pi0": reg.significance.pi0,
        "discoveries": (reg.significance.lfdr <= reg.thresholds.lfdr_th).to(raw.dtype).mean(1),
        "raw/gini": gini(raw),
        "raw/entropy": entropy(raw),
    }
    for name, region in (("roi", roi), ("noise", noise)):
        if region is not None:
            out[f"raw/{name}_percentile"] = mean_percentile(raw, region)
    sparsity, retained = reg.sparsity, reg.retained_mass
    for m in maps:
        values = reg.maps[m]
        out[f"{m}/sparsity"] = sparsity[m]
        out[f"{m}/retained_mass"] = retained[m]
        out[f"{m}/gini"] = gini(values)
        out[f"{m}/entropy"] = entropy(values)
        if roi is not None:
            p, r, f1 = precision_recall_f1(values > 0, roi)
            out.update({f"{m}/roi_precision": p, f"{m}/roi_recall": r, f"{m}/roi_f1": f1})
            out[f"{m}/roi_percentile"] = mean_percentile(values, roi)
        if noise is not None:
            out[f"{m}/noise_percentile"] = mean_percentile(values, noise)
    valid = reg.significance.valid
    return {k: v.to(torch.float64)[valid] for k, v in out.items()}


class MeanScores(Metric):
    """Mean over images of each named per-image score; NaN scores (undefined for that image) are left out."""

    full_state_update = False

    def __init__(self, keys: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.add_state("total", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: dict[str, Tensor]) -> None:
        for key, values in scores.items():
            finite = values[torch.isfinite(values)]
            i = self._index[key]
            self.total[i] += finite.sum()
            self.count[i] += finite.numel()

    def compute(self) -> dict[str, Tensor]:
        return {k: self.total[i] / self.count[i] for i, k in enumerate(self.keys) if self.count[i] > 0}


class Counts(Metric):
    """Named counts summed over batches and ranks (images explained, skipped as degenerate, failed, ...)."""

    full_state_update = False

    def __init__(self, keys: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self.add_state("counts", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, **counts: int) -> None:
        for key, n in counts.items():
            self.counts[self.keys.index(key)] += n

    def compute(self) -> dict[str, Tensor]:
        return dict(zip(self.keys, self.counts, strict=True))


class RegionShares(Metric):
    """Where the attention lies and how much of it a map keeps, pooled over images (sums, so DDP-exact).

    For the raw map and each regularized map ``m``, over every region (``roi``, ``noise``) seen, over the
    valid images that have region tokens:

    - ``<m>/<region>_mass``: ``sum(m on region) / sum(m)``, the share of the map's attention on the region;
    - ``<m>/<region>_kept`` (regularized maps): ``sum(m on region) / sum(raw on region)``, the share of the raw
      attention on the region that the map keeps, in [0, 1] since every map is at most the raw one.

    Pooled, an image whose map is empty adds nothing to either sum, for the raw map and the regularized one
    alike; raw attention sums to one per image, so its pooled share is also its mean share per image.
    """

    full_state_update = False
    REGIONS = ("roi", "noise")

    def __init__(self, maps: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.maps = ["raw", *maps]
        shape = (len(self.maps), len(self.REGIONS))
        self.add_state("on_region", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(len(self.REGIONS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reg: RegularizedAttention, roi: Tensor | None = None, noise: Tensor | None = None) -> None:
        # every map at once, [M, B, T]: one pass per region, not one per map and region
        stacked = torch.stack([reg.attention, *(reg.maps[m] for m in self.maps[1:])]).clamp_min(0).to(torch.float64)
        for j, region in enumerate((roi, noise)):
            if region is None:
                continue
            # an image without region tokens (no mask, or an object under half a token) has nothing to share
            rows = reg.significance.valid & region.any(1)
            values = stacked[:, rows]
            self.seen[j] += values.shape[1]
            self.on_region[:, j] += (values * region[rows]).sum((1, 2))
            self.total[:, j] += values.sum((1, 2))

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for j, region in enumerate(self.REGIONS):
            if self.seen[j] == 0:
                continue
            for i, m in enumerate(self.maps):
                out[f"{m}/{region}_mass"] = self.on_region[i, j] / self.total[i, j]
                if m != "raw":
                    out[f"{m}/{region}_kept"] = self.on_region[i, j] / self.on_region[0, j]
        return out


class NullCalibration(Metric):
    """Signed RMSD of null-image p-values from Uniform(0, 1) (the paper's sRMSD), from a binned ECDF.

    ``sign(sum D) * sqrt(mean D^2)`` with ``D = ECDF(u) - u`` at the inner bin edges: positive when the
    null p-values pile up small (anti-conservative), negative when they are too large (conservative).
    """

    full_state_update = False

    def __init__(self, bins: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        self.add_state("hist", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pvalues: Tensor) -> None:
        idx = (pvalues.flatten() * self.bins).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).to(self.hist)

    def compute(self) -> Tensor:
        total = self.hist.sum()
        if total == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.hist.device)
        ecdf = self.hist.cumsum(0)[:-1] / total
        u = torch.arange(1, self.bins, device=ecdf.device, dtype=ecdf.dtype) / self.bins
        d = ecdf - u
        return torch.sign(d.sum()) * d.square().mean().sqrt()


def curve_at(curve: Tensor, fraction: float | Tensor) -> Tensor:
    """Linear interpolation of a curve sampled on evenly spaced fractions 0..1 at ``fraction``."""
    points = curve.shape[0]
    pos = min(max(float(fraction), 0.0), 1.0) * (points - 1)
    lo = min(int(pos), points - 2)
    return curve[lo] + (curve[lo + 1] - curve[lo]) * (pos - lo)


class TopKBaseline(Metric):
    """F1 against the ROI of a fixed global top-k with the mean sparsity of a reference map (the ``lfdr`` map):
    the honest baseline for the method's per-image choice of k.

    Holds the mean top-k F1 curve over images with an ROI, on ``points`` kept fractions, and the reference
    map's mean kept fraction over the same images; ``compute`` reads the curve there (NaN without an ROI).
    """

    full_state_update = False

    def __init__(self, points: int = 201, **kwargs) -> None:
        super().__init__(**kwargs)
        self.points = points
        self.add_state("curve", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, attention: Tensor, roi: Tensor, reference_map: Tensor) -> None:
        has_roi = roi.any(1)
        self.curve += topk_f1_curve(attention[has_roi], roi[has_roi], self.points).sum(0)
        self.kept += (reference_map[has_roi] > 0).to(torch.float64).mean(1).sum()
        self.count += has_roi.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.curve.device)
        return curve_at(self.curve / self.count, self.kept / self.count)
