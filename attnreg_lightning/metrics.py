"""Sparsity, shrinkage, localisation and calibration of regularized attention, as torchmetrics.

Functional core first (per-image scores from a :class:`RegularizedAttention`, and 95% intervals from sums),
then small ``Metric`` classes whose states reduce by sum, so a DDP run reports what one process over the same
images would, intervals included.

Intervals (``intervals()``/``interval()`` of the metrics, each ``[lo, hi]``, over images, ``n`` the images that
have the value, ``t`` the two-sided 95% Student-t value with ``n - 1`` degrees of freedom; none for ``n < 2``):

- a mean of per-image values (:class:`MeanScores`): ``mean +- t s / sqrt(n)``, ``s`` the sample standard deviation
  (:func:`mean_interval`, from the sum, the sum of squares and the count);
- a ratio of sums pooled over images, ``R = sum y / sum x`` (:class:`RegionShares`): the delta method (the ratio
  estimator's linearization), ``R +- t sqrt(sum (y_i - R x_i)^2 / (n (n - 1))) / mean x``, from the sums of
  ``y^2``, ``x^2`` and ``x y`` (:func:`ratio_interval`); a share's interval is clipped to [0, 1];
- the top-k baseline's F1 (:class:`TopKBaseline`): the mean interval of the images' F1 at the curve's point
  (linear interpolation of two points: sums of squares and of neighbouring products), ``k`` held at the run's
  value (:func:`curve_interval`);
- the null calibration's sRMSD (:class:`NullCalibration`): the delta method on the pooled ECDF (a vector ratio of
  sums over images) with the sign held, from the per-image ECDF counts' sums of outer products
  (:func:`signed_rmsd_interval`); rough near 0, where the RMSD, a norm, is not smooth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from attnreg_lightning.batch import REGIONS
from attnreg_lightning.regularize import RegularizedAttention

QUANTUS_EPS = 1e-7  # Quantus' Sparseness adds this before the Gini index
LEVEL = 0.95  # the intervals' coverage


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
    keys = ["pi0", "discoveries", "raw/gini", "raw/entropy", *(f"raw/{r}_percentile" for r in REGIONS)]
    for m in maps:
        keys += [f"{m}/sparsity", f"{m}/retained_mass", f"{m}/gini", f"{m}/entropy"]
        keys += [f"{m}/roi_precision", f"{m}/roi_recall", f"{m}/roi_f1", *(f"{m}/{r}_percentile" for r in REGIONS)]
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
    reg: RegularizedAttention,
    maps: Sequence[str],
    roi: Tensor | None = None,
    noise: Tensor | None = None,
    shortcut: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-image scores ``[B]`` of valid images; ``roi``/``noise``/``shortcut`` are token masks ``[B, T]`` when
    known."""
    regions = {name: region for name, region in zip(REGIONS, (roi, noise, shortcut), strict=True) if region is not None}
    raw = reg.attention
    out = {
        "pi0": reg.significance.pi0,
        "discoveries": (reg.significance.lfdr <= reg.thresholds.lfdr_th).to(raw.dtype).mean(1),
        "raw/gini": gini(raw),
        "raw/entropy": entropy(raw),
    }
    for name, region in regions.items():
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
        for name, region in regions.items():
            out[f"{m}/{name}_percentile"] = mean_percentile(values, region)
    valid = reg.significance.valid
    return {k: v.to(torch.float64)[valid] for k, v in out.items()}


def _t_within(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, finite series)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2 4 / (3 5) cos^4 + ...)), df - 2 powers of cos
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * 2 * k / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1 3 / (2 4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


@functools.lru_cache(maxsize=4096)
def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student-t value ``t`` with ``P(|T| <= t) = level`` for ``df >= 1`` degrees of freedom (the
    ``(1 + level) / 2`` quantile): bisection on the exact series for ``df <= 1000``, Cornish-Fisher's expansion in
    ``1 / df`` (Abramowitz & Stegun 26.7.5, error below 1e-12 there) above."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    x = NormalDist().inv_cdf((1 + level) / 2)
    if df > 1000:
        g = (
            (x**3 + x) / 4,
            (5 * x**5 + 16 * x**3 + 3 * x) / 96,
            (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384,
            (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160,
        )
        return x + sum(gi / df ** (i + 1) for i, gi in enumerate(g))
    lo, hi = 0.0, max(2 * x, 1.0)
    while _t_within(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _t_values(count: Tensor, level: float) -> Tensor:
    """``t_quantile(n - 1)`` for each count ``n`` (NaN where ``n < 2``), like ``count``."""
    t = [t_quantile(round(n) - 1, level) if n >= 2 else math.nan for n in count.flatten().tolist()]
    return torch.tensor(t, dtype=torch.float64, device=count.device).view(count.shape)


def _bounds(value: Tensor, half: Tensor) -> Tensor:
    """``[..., 2]``: ``value - half``, ``value + half``."""
    return torch.stack([value - half, value + half], -1)


def mean_interval(total: Tensor, squares: Tensor, count: Tensor, level: float = LEVEL) -> Tensor:
    """Student-t interval ``[..., 2]`` of a mean from sums over ``n = count`` values: ``mean +- t s / sqrt(n)``,
    ``s^2 = (sum x^2 - (sum x)^2 / n) / (n - 1)``; NaN where ``n < 2``."""
    total, squares, count = (v.to(torch.float64) for v in (total, squares, count))
    mean = total / count
    var = ((squares - total * mean) / (count - 1)).clamp_min(0)
    return _bounds(mean, _t_values(count, level) * (var / count).sqrt())


def ratio_interval(
    num: Tensor, den: Tensor, num_sq: Tensor, den_sq: Tensor, cross: Tensor, count: Tensor, level: float = LEVEL
) -> Tensor:
    """Delta-method interval ``[..., 2]`` of a ratio of sums ``R = sum y / sum x`` over ``n = count`` images, from
    ``num = sum y``, ``den = sum x``, ``num_sq = sum y^2``, ``den_sq = sum x^2``, ``cross = sum x y``:
    ``R +- t sqrt(sum (y_i - R x_i)^2 / (n (n - 1))) / (sum x / n)``; NaN where ``n < 2``."""
    r = num / den
    residual = (num_sq - 2 * r * cross + r.square() * den_sq).clamp_min(0)
    se = (residual / (count * (count - 1))).sqrt() / (den / count)
    return _bounds(r, _t_values(count, level) * se)


def signed_rmsd(hist: Tensor) -> Tensor:
    """``sign(sum D) sqrt(mean D^2)``, ``D = ECDF(u) - u`` at the histogram's inner bin edges (NaN if empty)."""
    total = hist.sum()
    if total == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=hist.device)
    d = hist.cumsum(0)[:-1] / total - torch.arange(1, hist.numel(), device=hist.device, dtype=hist.dtype) / hist.numel()
    return torch.sign(d.sum()) * d.square().mean().sqrt()


def signed_rmsd_interval(
    hist: Tensor, outer: Tensor, cross: Tensor, n_sq: Tensor, images: Tensor, level: float = LEVEL
) -> Tensor:
    """Delta-method interval ``[2]`` of :func:`signed_rmsd` over images: the pooled ECDF ``F = sum h_i / sum n_i``
    (``h_i`` an image's counts at or below each inner edge, ``n_i`` its count) is a vector ratio estimator, and
    ``g(F) = sqrt(mean (F - u)^2)`` has gradient ``(F - u) / (J g)`` (``J`` inner edges); with ``psi_i = grad .
    (h_i - F n_i) / mean n``, ``se^2 = sum psi_i^2 / (n (n - 1))``, from ``outer = sum h_i h_i^T``, ``cross =
    sum n_i h_i`` and ``n_sq = sum n_i^2``. The sign is held at the estimate's; NaN where undefined (``n < 2``,
    ``g = 0``)."""
    value = signed_rmsd(hist)
    total = hist.sum()
    f = hist.cumsum(0)[:-1] / total
    d = f - torch.arange(1, hist.numel(), device=hist.device, dtype=hist.dtype) / hist.numel()
    grad = d / (d.numel() * d.square().mean().sqrt())
    gf = grad @ f
    squares = (grad @ outer @ grad - 2 * gf * (grad @ cross) + gf.square() * n_sq).clamp_min(0)
    se = (squares / (images * (images - 1))).sqrt() / (total / images)
    return _bounds(value, _t_values(images, level) * se)


def _curve_position(points: int, fraction: float | Tensor) -> tuple[int, float]:
    """The sample left of ``fraction`` on ``points`` evenly spaced fractions 0..1, and the weight of the next one."""
    pos = min(max(float(fraction), 0.0), 1.0) * (points - 1)
    lo = min(int(pos), points - 2)
    return lo, pos - lo


def curve_interval(
    curve: Tensor, squares: Tensor, next_products: Tensor, count: Tensor, fraction: float, level: float = LEVEL
) -> Tensor:
    """Interval ``[2]`` of the mean over ``count`` images of their curves read at ``fraction`` (linear
    interpolation, as :func:`curve_at`), from the curves' sums ``curve``, sums of squares ``squares`` and sums of
    the products of neighbouring points ``next_products`` (``sum f_j f_{j+1}``): the interpolated value
    ``(1 - w) f_j + w f_{j+1}`` of each image has an exact sum and sum of squares."""
    j, w = _curve_position(curve.shape[0], fraction)
    total = (1 - w) * curve[j] + w * curve[j + 1]
    sq = (1 - w) ** 2 * squares[j] + 2 * w * (1 - w) * next_products[j] + w**2 * squares[j + 1]
    return mean_interval(total, sq, count, level)


def synced(metric: Metric):
    """A context in which the metric's states are reduced over ranks, as ``compute`` sees them (restored after):
    a collective, so every rank enters it."""
    return metric.sync_context(
        dist_sync_fn=metric.dist_sync_fn, should_sync=metric._to_sync, should_unsync=metric._should_unsync
    )


class MeanScores(Metric):
    """Mean over images of each named per-image score; NaN scores (undefined for that image) are left out.
    :meth:`intervals`: each mean's Student-t 95% interval (:func:`mean_interval`), over the same images."""

    full_state_update = False

    def __init__(self, keys: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.add_state("total", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: dict[str, Tensor]) -> None:
        for key, values in scores.items():
            finite = values[torch.isfinite(values)]
            i = self._index[key]
            self.total[i] += finite.sum()
            self.squares[i] += finite.square().sum()
            self.count[i] += finite.numel()

    def compute(self) -> dict[str, Tensor]:
        return {k: self.total[i] / self.count[i] for i, k in enumerate(self.keys) if self.count[i] > 0}

    def intervals(self, level: float = LEVEL) -> dict[str, Tensor]:
        """``[lo, hi]`` of each mean over at least two images, over all ranks' images (a collective)."""
        with synced(self):
            bounds = mean_interval(self.total, self.squares, self.count, level)
            return {k: bounds[i] for i, k in enumerate(self.keys) if self.count[i] >= 2}


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

    :meth:`intervals`: each share's 95% interval over images by the delta method for a ratio of sums
    (:func:`ratio_interval`; per-image sums of squares and cross-products are kept), clipped to [0, 1].
    """

    full_state_update = False

    def __init__(self, maps: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.maps = ["raw", *maps]
        shape = (len(self.maps), len(REGIONS))
        self.add_state("on_region", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(len(REGIONS), dtype=torch.float64), dist_reduce_fx="sum")
        # per image i, y = the map on the region, x = the map in all (mass) or raw on the region (kept): sums of
        # y^2, x^2 and x y for the intervals
        for name in ("on_region_sq", "total_sq", "on_region_total", "on_region_raw"):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        reg: RegularizedAttention,
        roi: Tensor | None = None,
        noise: Tensor | None = None,
        shortcut: Tensor | None = None,
    ) -> None:
        # every map at once, [M, B, T]: one pass per region, not one per map and region
        stacked = torch.stack([reg.attention, *(reg.maps[m] for m in self.maps[1:])]).clamp_min(0).to(torch.float64)
        for j, region in enumerate((roi, noise, shortcut)):
            if region is None:
                continue
            # an image without region tokens (no mask, or an object under half a token) has nothing to share
            rows = reg.significance.valid & region.any(1)
            values = stacked[:, rows]
            on, total = (values * region[rows]).sum(2), values.sum(2)  # per map and image, [M, B]
            self.seen[j] += values.shape[1]
            self.on_region[:, j] += on.sum(1)
            self.total[:, j] += total.sum(1)
            self.on_region_sq[:, j] += on.square().sum(1)
            self.total_sq[:, j] += total.square().sum(1)
            self.on_region_total[:, j] += (on * total).sum(1)
            self.on_region_raw[:, j] += (on * on[:1]).sum(1)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for j, region in enumerate(REGIONS):
            if self.seen[j] == 0:
                continue
            for i, m in enumerate(self.maps):
                out[f"{m}/{region}_mass"] = self.on_region[i, j] / self.total[i, j]
                if m != "raw":
                    out[f"{m}/{region}_kept"] = self.on_region[i, j] / self.on_region[0, j]
        return out

    def intervals(self, level: float = LEVEL) -> dict[str, Tensor]:
        """``[lo, hi]`` of each share over at least two images, over all ranks' images (a collective)."""
        out = {}
        with synced(self):
            y, n = self.on_region, self.seen.expand_as(self.on_region)
            mass = ratio_interval(y, self.total, self.on_region_sq, self.total_sq, self.on_region_total, n, level)
            raw, raw_sq = self.on_region[:1].expand_as(y), self.on_region_sq[:1].expand_as(y)
            kept = ratio_interval(y, raw, self.on_region_sq, raw_sq, self.on_region_raw, n, level)
            for j, region in enumerate(REGIONS):
                if self.seen[j] < 2:
                    continue
                for i, m in enumerate(self.maps):
                    out[f"{m}/{region}_mass"] = mass[i, j].clamp(0, 1)
                    if m != "raw":
                        out[f"{m}/{region}_kept"] = kept[i, j].clamp(0, 1)
        return out


class NullCalibration(Metric):
    """Signed RMSD of null-image p-values from Uniform(0, 1) (the paper's sRMSD), from a binned ECDF.

    ``sign(sum D) * sqrt(mean D^2)`` with ``D = ECDF(u) - u`` at the inner bin edges: positive when the
    null p-values pile up small (anti-conservative), negative when they are too large (conservative).

    ``update`` takes ``[B, K]``, one row of null p-values per image (a 1-D tensor is one image);
    :meth:`interval`: the 95% interval over images by the delta method (:func:`signed_rmsd_interval`).
    """

    full_state_update = False

    def __init__(self, bins: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        self.add_state("hist", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        # per image i, h_i = its counts at or below each inner edge, n_i = its count: for the interval
        self.add_state("outer", torch.zeros(bins - 1, bins - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cross", torch.zeros(bins - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pvalues: Tensor) -> None:
        rows = pvalues.reshape(1, -1) if pvalues.dim() <= 1 else pvalues.flatten(1)
        idx = (rows * self.bins).long().clamp(0, self.bins - 1).to(self.hist.device)
        per_image = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=self.hist.device)
        per_image.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64, device=idx.device))
        below, n = per_image.cumsum(1)[:, :-1], per_image.sum(1)
        self.hist += per_image.sum(0)
        self.outer += below.T @ below
        self.cross += n @ below
        self.n_sq += n.square().sum()
        self.images += rows.shape[0]

    def compute(self) -> Tensor:
        return signed_rmsd(self.hist)

    def interval(self, level: float = LEVEL) -> Tensor:
        """``[lo, hi]`` over all ranks' images (a collective); NaN with fewer than two images."""
        with synced(self):
            return signed_rmsd_interval(self.hist, self.outer, self.cross, self.n_sq, self.images, level)


def curve_at(curve: Tensor, fraction: float | Tensor) -> Tensor:
    """Linear interpolation of a curve sampled on evenly spaced fractions 0..1 at ``fraction``."""
    lo, w = _curve_position(curve.shape[0], fraction)
    return curve[lo] + (curve[lo + 1] - curve[lo]) * w


class TopKBaseline(Metric):
    """F1 against the ROI of a fixed global top-k with the mean sparsity of a reference map (the ``lfdr`` map):
    the honest baseline for the method's per-image choice of k.

    Holds the mean top-k F1 curve over images with an ROI, on ``points`` kept fractions, and the reference
    map's mean kept fraction over the same images; ``compute`` reads the curve there (NaN without an ROI).
    :meth:`interval`: the 95% interval of that mean F1 over the images (:func:`curve_interval`), the kept fraction
    held at the run's value (it defines the baseline's k).
    """

    full_state_update = False

    def __init__(self, points: int = 201, **kwargs) -> None:
        super().__init__(**kwargs)
        self.points = points
        self.add_state("curve", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("curve_sq", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("curve_next", torch.zeros(points - 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, attention: Tensor, roi: Tensor, reference_map: Tensor) -> None:
        has_roi = roi.any(1)
        curves = topk_f1_curve(attention[has_roi], roi[has_roi], self.points)
        self.curve += curves.sum(0)
        self.curve_sq += curves.square().sum(0)
        self.curve_next += (curves[:, :-1] * curves[:, 1:]).sum(0)
        self.kept += (reference_map[has_roi] > 0).to(torch.float64).mean(1).sum()
        self.count += has_roi.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.curve.device)
        return curve_at(self.curve / self.count, self.kept / self.count)

    def interval(self, level: float = LEVEL) -> Tensor:
        """``[lo, hi]`` over all ranks' images with an ROI (a collective); NaN with fewer than two."""
        with synced(self):
            fraction = float(self.kept / self.count) if self.count > 0 else 0.0
            return curve_interval(self.curve, self.curve_sq, self.curve_next, self.count, fraction, level)
