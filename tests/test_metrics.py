"""Every metric's value on small hand-made maps, with answers worked out by hand in the comments."""

import math

import pytest
import torch

from attnreg_lightning.metrics import (
    Counts,
    MeanScores,
    NullCalibration,
    RegionShares,
    TopKBaseline,
    entropy,
    gini,
    mean_percentile,
    precision_recall_f1,
    token_mask,
)
from attnreg_lightning.regularize import RegularizedAttention, Thresholds
from attnreg_lightning.stats import Significance

T = torch.tensor


def _reg(raw: torch.Tensor, maps: dict, valid=None) -> RegularizedAttention:
    b, t = raw.shape
    z = torch.zeros(b, t, dtype=torch.float64)
    valid = torch.ones(b, dtype=torch.bool) if valid is None else torch.as_tensor(valid)
    sig = Significance(z, z[:, None], z, z[:, 0], z, z, valid, valid, torch.zeros(b, dtype=torch.long))
    return RegularizedAttention(attention=raw, significance=sig, maps=maps, thresholds=Thresholds())


def test_gini_and_entropy():
    one_hot, flat = T([[1.0, 0, 0, 0]]), T([[0.25, 0.25, 0.25, 0.25]])
    assert gini(one_hot).item() == pytest.approx(3 / 4, abs=1e-5)  # (n - 1) / n
    assert gini(flat).item() == pytest.approx(0.0, abs=1e-7)
    assert entropy(T([[0.5, 0.5, 0, 0]])).item() == pytest.approx(math.log(2))
    assert entropy(flat).item() == pytest.approx(math.log(4))
    assert math.isnan(entropy(T([[0.0, 0, 0, 0]])).item())


def test_mean_percentile_gives_ties_their_mid_rank():
    x = T([[0.1, 0.2, 0.2, 0.5]])
    # each 0.2 has one value below it and one tie: (1 + 0.5) / 3 of the way up = 50
    assert mean_percentile(x, T([[False, True, True, False]])).item() == pytest.approx(50.0)
    assert mean_percentile(x, T([[False, False, False, True]])).item() == pytest.approx(100.0)
    assert mean_percentile(x, T([[True, False, False, False]])).item() == pytest.approx(0.0)


def test_precision_recall_f1_are_not_swapped():
    p, r, f1 = precision_recall_f1(T([[True, True, False, False]]), T([[True, False, False, False]]))
    assert (p.item(), r.item(), f1.item()) == pytest.approx((0.5, 1.0, 2 / 3))
    p, _, _ = precision_recall_f1(T([[False, False]]), T([[True, False]]))
    assert math.isnan(p.item())  # nothing selected: undefined, not 0


def test_token_mask_keeps_tokens_at_least_half_covered():
    mask = torch.zeros(1, 16, 16)
    mask[0, :4, :8] = 1  # token (0, 0): 32 of 64 pixels
    mask[0, :3, 8:] = 1
    mask[0, 3, 8:15] = 1  # token (0, 1): 31 of 64 pixels
    assert token_mask(mask, (2, 2)).tolist() == [[True, False, False, False]]


def test_region_shares_pooled_with_empty_maps_counted_alike():
    raw = T([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    lfdr = T([[0.5, 0, 0, 0], [0, 0, 0, 0], [0.4, 0.3, 0, 0]], dtype=torch.float64)  # image 2's map is empty
    roi = T([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    metric = RegionShares(["lfdr"])
    metric.update(_reg(raw, {"lfdr": lfdr}, valid=[True, True, False]), roi=roi)  # image 3 is invalid
    out = metric.compute()
    # raw on the ROI: 0.8 + 0.25 of 2; lfdr on the ROI: 0.5 of 0.5 kept; kept share: 0.5 of the raw 1.05
    assert out["raw/roi_mass"].item() == pytest.approx(1.05 / 2)
    assert out["lfdr/roi_mass"].item() == pytest.approx(1.0)
    assert out["lfdr/roi_kept"].item() == pytest.approx(0.5 / 1.05)
    assert not any(k.startswith(("raw/noise", "lfdr/noise")) for k in out)  # no noise masks seen: nothing


def test_region_kept_share_is_a_share_even_when_most_maps_are_empty():
    # The old noise "D" divided a mean over non-empty maps by a mean over all: here it would read 1.0
    raw = T([[0.6, 0.4], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    kept = torch.zeros_like(raw)
    kept[0, 0] = 0.6
    noise = T([[1, 0], [1, 0], [1, 0], [1, 0]], dtype=torch.bool)
    metric = RegionShares(["lfdr"])
    metric.update(_reg(raw, {"lfdr": kept}), noise=noise)
    assert metric.compute()["lfdr/noise_kept"].item() == pytest.approx(0.6 / 2.1)


def test_topk_baseline_reads_the_curve_at_the_reference_maps_kept_fraction():
    attention = T([[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)
    roi = T([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    reference = T([[0.5, 0, 0, 0], [0, 0.6, 0, 0]], dtype=torch.float64)  # keeps 1 of 4 tokens: a quarter
    metric = TopKBaseline(points=5)
    metric.update(attention, roi, reference)
    # top-1: image 1 hits (F1 = 2 / (1 + 2)), image 2 misses (F1 = 0)
    assert metric.compute().item() == pytest.approx((2 / 3 + 0) / 2)
    empty = TopKBaseline(points=5)
    empty.update(attention, torch.zeros_like(roi), reference)
    assert math.isnan(empty.compute().item())


def test_null_calibration_sign():
    small = NullCalibration()
    small.update(torch.rand(10_000, generator=torch.Generator().manual_seed(0)) ** 3)  # piled up near 0
    assert small.compute().item() > 0.1
    uniform = NullCalibration()
    uniform.update(torch.rand(100_000, generator=torch.Generator().manual_seed(0)))
    assert abs(uniform.compute().item()) < 0.01
    large = NullCalibration()
    large.update(1 - torch.rand(10_000, generator=torch.Generator().manual_seed(0)) ** 3)
    assert large.compute().item() < -0.1


def test_mean_scores_leave_undefined_images_out_of_sum_and_count():
    metric = MeanScores(["a", "b"])
    metric.update({"a": T([1.0, float("nan"), 3.0], dtype=torch.float64)})
    metric.update({"a": T([5.0], dtype=torch.float64), "b": T([float("nan")], dtype=torch.float64)})
    out = metric.compute()
    assert out["a"].item() == pytest.approx(3.0) and "b" not in out


def test_counts_sum():
    metric = Counts(["explained", "skipped_error"])
    metric.update(explained=3)
    metric.update(explained=2, skipped_error=4)
    assert {k: v.item() for k, v in metric.compute().items()} == {"explained": 5, "skipped_error": 4}
