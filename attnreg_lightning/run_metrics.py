"""Every metric of one explained validation run, updated from each result and computed by name.

The states live in torchmetrics objects that reduce by sum, so ``compute`` gives on every rank what one
process over all ranks' images would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from attnreg_lightning.faithfulness import faithfulness_keys
from attnreg_lightning.metrics import (
    Counts,
    MeanScores,
    NullCalibration,
    RegionShares,
    TopKBaseline,
    head_score_keys,
    head_scores,
    image_scores,
    score_keys,
    token_mask,
)
from attnreg_lightning.probes import STABILITY_KEYS
from attnreg_lightning.regularize import RegularizedAttention
from attnreg_lightning.stats import null_pvalues

COUNT_KEYS = (
    "explained",
    "skipped_degenerate",
    "skipped_nonfinite_attention",
    "skipped_error",
    "lfdr_fit_failed",
    "clamped_tokens",
)
"""``skipped_degenerate``: images whose pixels are constant or non-finite, or whose null images' attention is not finite
or does not vary (no null distribution to test against); ``skipped_nonfinite_attention``: images whose pixels are
finite and not constant but whose attention is not finite (the model's numerics: NaN or inf weights or activations)."""


class RunMetrics:
    """Scores, region shares, null calibration, the top-k baseline, counts, probe stability, faithfulness (keys
    of :func:`faithfulness_keys`) and, once :meth:`follow_heads` is called, per-head scores."""

    def __init__(
        self,
        maps: Sequence[str],
        faithfulness: str = "off",
        faithfulness_maps: Sequence[str] = (),
        faithfulness_regions: Sequence[str] = (),
    ) -> None:
        self.maps = list(maps)
        faithful, undefined = faithfulness_keys(faithfulness, faithfulness_maps, faithfulness_regions)
        self.faithfulness = MeanScores(faithful)
        self.undefined = Counts(undefined)
        # each faithfulness map's kept fraction over the run's images: the k of its fixed-k baseline (not logged:
        # it is 1 - the map's sparsity)
        self.kept = MeanScores([f"{m}/kept_fraction" for m in faithfulness_maps] if faithfulness != "off" else [])
        self.scores = MeanScores(score_keys(self.maps))
        self.regions = RegionShares(self.maps)
        self.calibration = NullCalibration()
        self.topk = TopKBaseline()
        self.counts = Counts(COUNT_KEYS)
        self.stability = MeanScores(STABILITY_KEYS)
        self.heads: int | None = None
        self.head_scores: MeanScores | None = None

    def drop_faithfulness(self) -> None:
        """No faithfulness states (a model without a classification head): none of its keys is logged."""
        self.faithfulness, self.undefined, self.kept = MeanScores([]), Counts([]), MeanScores([])

    def follow_heads(self, heads: int) -> None:
        # keys fixed before any batch, so every rank holds the same states
        self.heads = heads
        self.head_scores = MeanScores(head_score_keys(heads))

    def _all(self) -> tuple[Metric, ...]:
        heads = () if self.head_scores is None else (self.head_scores,)
        return (
            self.scores,
            self.regions,
            self.calibration,
            self.topk,
            self.counts,
            self.stability,
            self.faithfulness,
            self.undefined,
            *heads,
        )

    def reset(self, device: torch.device | str) -> None:
        for metric in (*self._all(), self.kept):
            metric.to(device).reset()

    def count_failed(self, images: int) -> None:
        self.counts.update(skipped_error=images)

    def update(
        self,
        reg: RegularizedAttention,
        roi: Tensor | None = None,
        noise: Tensor | None = None,
        shortcut: Tensor | None = None,
        usable: Tensor | None = None,
    ) -> dict[str, Tensor] | None:
        """Count the result's images and score its valid ones; ``roi``/``noise``/``shortcut`` are the images' pixel
        masks, ``usable`` which images' pixels are finite and not constant
        (:func:`~attnreg_lightning.engine.usable_images`): an invalid one
        among them whose attention is not finite is the model's failure, not the image's (:data:`COUNT_KEYS`;
        without ``usable``, every invalid image counts as degenerate).

        Returns the per-image scores of the valid images, or None when none is valid.
        """
        sig = reg.significance
        valid = sig.valid
        device = reg.attention.device
        # the masks first: a failure here leaves nothing counted, so the images are counted once, as failed
        roi, noise, shortcut = (_token_mask(m, reg.grid, device) for m in (roi, noise, shortcut))
        bad = int((~valid).sum())
        if bad:
            nonfinite = int(nonfinite_attention(reg, usable).sum())
            self.counts.update(skipped_degenerate=bad - nonfinite, skipped_nonfinite_attention=nonfinite)
        self.counts.update(
            explained=valid.numel() - bad,
            lfdr_fit_failed=int((valid & ~sig.fit_ok).sum()),
            clamped_tokens=int(sig.clamped[valid].sum()),
        )
        if not bool(valid.any()):
            return None
        scores = image_scores(reg, self.maps, roi, noise, shortcut)
        self.scores.update(scores)
        self.regions.update(reg, roi, noise, shortcut)
        self.calibration.update(null_pvalues(sig)[valid])
        if roi is not None:
            self.topk.update(reg.attention[valid], roi[valid], reg.maps["lfdr"][valid])
        if reg.per_head is not None and self.head_scores is not None:
            self.head_scores.update(head_scores(reg, self.heads))
        return scores

    def update_faithfulness(self, scores: dict[str, Tensor], undefined: dict[str, int]) -> None:
        """Per-image faithfulness scores of valid images (NaN where undefined: left out of the means) and, per
        map, how many images were undefined (``k = 0`` or ``k = T``)."""
        device = self.faithfulness.total.device
        self.faithfulness.update({k: v.to(device, torch.float64) for k, v in scores.items()})
        self.undefined.update(**{f"{m}/faithfulness_undefined": n for m, n in undefined.items()})

    def update_kept(self, maps: dict[str, Tensor]) -> None:
        """The kept fraction of each faithfulness map ``[B, T]`` of valid images (tokens the map keeps, per image)."""
        device = self.kept.total.device
        self.kept.update({f"{m}/kept_fraction": (v > 0).to(device, torch.float64).mean(dim=1) for m, v in maps.items()})

    def kept_fractions(self, device: torch.device | str) -> dict[str, float]:
        """Each faithfulness map's mean kept fraction over the run's images on every rank, for the maps some rank
        explained (a collective: every rank calls it, whatever it explained)."""
        values = quiet_compute(self.kept.to(device))
        return {k.split("/")[0]: float(v) for k, v in values.items() if torch.isfinite(v)}

    def update_stability(self, moved: dict[str, list[float]]) -> None:
        """The probes' stability scores against their earlier runs (the probe book compares, across runs)."""
        device = self.stability.total.device
        self.stability.update({k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in moved.items()})

    def compute(self, device: torch.device | str) -> dict[str, Tensor]:
        """The run's finite results by name (a collective: every rank calls it, whatever it explained); their 95%
        intervals over images are computed with them, for :meth:`intervals`."""
        metrics = [m.to(device) for m in self._all()]
        results = [quiet_compute(m) for m in metrics]
        scores, regions, srmsd, topk_f1, counts, stability, faithful, undefined, *heads = results
        values = {**scores, **regions, "null_srmsd": srmsd, "topk/roi_f1": topk_f1, **counts, **stability}
        values.update({**faithful, **undefined})
        for per_head in heads:
            values.update(per_head)
        finite = {k: v for k, v in values.items() if torch.isfinite(v)}
        self._intervals = self._compute_intervals(finite)
        return finite

    def intervals(self) -> dict[str, tuple[float, float]]:
        """The last :meth:`compute`'s 95% intervals over images, ``(lo, hi)`` by name, for its values that have one
        (not the counts; a value over fewer than two images has none). Computed by ``compute`` on every rank, so
        this is no collective: any rank may call it, any number of times. Definitions: :mod:`metrics`."""
        return dict(getattr(self, "_intervals", {}))

    def _compute_intervals(self, values: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
        # a collective: every rank asks the same metrics in the same order (each syncs its states once)
        single = {id(self.calibration): "null_srmsd", id(self.topk): "topk/roi_f1"}
        bounds: dict[str, Tensor] = {}
        for metric in self._all():
            if isinstance(metric, (MeanScores, RegionShares)):
                bounds.update(metric.intervals())
            elif id(metric) in single:
                bounds[single[id(metric)]] = metric.interval()
        keys = [k for k in bounds if k in values]
        if not keys:
            return {}
        listed = torch.stack([bounds[k] for k in keys]).tolist()  # one device-to-host copy
        return {k: (lo, hi) for k, (lo, hi) in zip(keys, listed, strict=True) if math.isfinite(lo + hi)}


def nonfinite_attention(reg: RegularizedAttention, usable: Tensor | None) -> Tensor:
    """``[B]`` bool: the images skipped because the model's attention on them is not finite while their pixels are
    usable (:func:`~attnreg_lightning.engine.usable_images`; none without ``usable``)."""
    valid = reg.significance.valid
    if usable is None:
        return torch.zeros_like(valid)
    return ~valid & usable.to(valid.device) & ~torch.isfinite(reg.attention).all(1)


def image_rows(scores: dict[str, Tensor], ids: list[int]) -> list[dict]:
    """One row per valid image: its id and its scores, ``ids`` those of the valid images in order."""
    # one device-to-host copy per score, not one per image and score
    listed = {k: v.tolist() for k, v in scores.items()}
    return [{"id": i, **{k: v[j] for k, v in listed.items()}} for j, i in enumerate(ids)]


def _token_mask(masks: Tensor | None, grid, device) -> Tensor | None:
    # without a known token grid (a model that only offers get_last_selfattention) masks can't be mapped
    return None if masks is None or grid is None else token_mask(masks.to(device), grid)


def quiet_compute(metric: Metric):
    """``metric.compute()``; a rank that explained nothing still takes part in the sync, without a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return metric.compute()
