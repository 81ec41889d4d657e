"""95% intervals over images: each kind against an independent numpy/scipy computation, their reduction over
ranks (states summed = one process over all images), the callback's history, and the report's plots."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.container import ErrorbarContainer
from scipy import stats

from attnreg_lightning import AttentionRegularizationCallback
from attnreg_lightning.metrics import (
    MeanScores,
    NullCalibration,
    RegionShares,
    TopKBaseline,
    t_quantile,
    token_mask,
)
from attnreg_lightning.report import HEADLINE, headline_summary, metric_plots, write_report
from attnreg_lightning.run_metrics import COUNT_KEYS, RunMetrics
from tests.helpers import tiny_data, tiny_module
from tests.test_metrics import _reg

T = torch.tensor


def _t_interval(values) -> list[float]:
    """scipy's Student-t 95% interval of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    return list(stats.t.interval(0.95, v.size - 1, loc=v.mean(), scale=stats.sem(v)))


def _delta_ratio(y: np.ndarray, x: np.ndarray) -> list[float]:
    """The ratio estimator's delta-method interval, image by image."""
    n, r = y.size, y.sum() / x.sum()
    se = np.sqrt(((y - r * x) ** 2).sum() / (n * (n - 1))) / x.mean()
    t = stats.t.ppf(0.975, n - 1)
    return [r - t * se, r + t * se]


def _fake_two_ranks(metric, other) -> None:
    """Make ``metric`` sync as rank 0 of a world of two whose rank 1 holds ``other``'s states (sum reductions run
    on the gathered pair, as under DDP)."""

    def gather(tensor, group=None):
        (name,) = [n for n in metric._reductions if getattr(metric, n) is tensor]
        return [tensor, getattr(other, name)]

    metric.dist_sync_fn = gather
    metric.distributed_available_fn = lambda: True


def test_t_quantile_is_scipys():
    for df in [*range(1, 80), 200, 999, 1000, 1001, 5000, 10**6]:
        for level in (0.95, 0.9, 0.99):
            assert t_quantile(df, level) == pytest.approx(stats.t.ppf((1 + level) / 2, df), abs=1e-9), (df, level)


def test_mean_scores_interval_is_students_t_over_the_images():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.1, 23)
    a[[3, 11]] = np.nan  # undefined for two images: left out, as from the mean
    metric = MeanScores(["a", "one", "none"])
    metric.update({"a": torch.from_numpy(a[:10]), "one": T([0.5], dtype=torch.float64)})
    metric.update({"a": torch.from_numpy(a[10:]), "one": T([float("nan")], dtype=torch.float64)})
    got = metric.intervals()
    assert got["a"].tolist() == pytest.approx(_t_interval(a[np.isfinite(a)]), rel=1e-10)
    assert set(got) == {"a"}  # one image: no interval; none: none


def test_region_share_intervals_are_the_ratio_estimators_delta_method():
    rng = np.random.default_rng(1)
    b, t = 60, 16
    raw = rng.gamma(0.5, size=(b, t))
    raw /= raw.sum(1, keepdims=True)
    lfdr = raw * (rng.random((b, t)) < rng.uniform(0.2, 0.9, (b, 1)))
    roi = rng.random((b, t)) < 0.3
    roi[:3] = False  # no region tokens: not in the shares
    noise = rng.random((b, t)) < 0.2
    valid = np.ones(b, dtype=bool)
    valid[5] = False
    metric = RegionShares(["lfdr"])
    for rows in (slice(0, 25), slice(25, b)):  # two batches
        tt = {k: torch.from_numpy(v[rows]) for k, v in {"raw": raw, "lfdr": lfdr, "roi": roi, "noise": noise}.items()}
        metric.update(_reg(tt["raw"], {"lfdr": tt["lfdr"]}, valid[rows]), roi=tt["roi"], noise=tt["noise"])
    got = {k: v.tolist() for k, v in metric.intervals().items()}
    assert set(got) == {f"{m}/{r}_{w}" for r in ("roi", "noise") for m, w in [("raw", "mass"), *[("lfdr", "mass"),
                                                                                  ("lfdr", "kept")]]}  # fmt: skip
    for name, region in (("roi", roi), ("noise", noise)):
        rows = valid & region.any(1)
        on = {m: (v * region).sum(1)[rows] for m, v in {"raw": raw, "lfdr": lfdr}.items()}
        assert got[f"lfdr/{name}_kept"] == pytest.approx(_delta_ratio(on["lfdr"], on["raw"]), rel=1e-9)
        assert got[f"lfdr/{name}_mass"] == pytest.approx(_delta_ratio(on["lfdr"], lfdr.sum(1)[rows]), rel=1e-9)
        # raw attention sums to one per image: its pooled share is a mean of per-image shares, with its t interval
        assert got[f"raw/{name}_mass"] == pytest.approx(_t_interval(on["raw"]), rel=1e-9)
        # the delta method is the jackknife's first-order twin: their standard errors agree at this n
        y, x = on["lfdr"], on["raw"]
        n = y.size
        loo = (y.sum() - y) / (x.sum() - x)
        se_jackknife = np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
        lo, hi = got[f"lfdr/{name}_kept"]
        assert (hi - lo) / 2 / stats.t.ppf(0.975, n - 1) == pytest.approx(se_jackknife, rel=0.1)


def test_a_share_interval_is_clipped_to_its_range():
    raw = torch.full((6, 4), 0.25, dtype=torch.float64)
    kept = raw.clone()
    kept[0, 0] = 0.05  # the map keeps all of the ROI's raw attention but in one image
    roi = torch.zeros(6, 4, dtype=torch.bool)
    roi[:, :2] = True
    metric = RegionShares(["lfdr"])
    metric.update(_reg(raw, {"lfdr": kept}), roi=roi)
    share = metric.compute()["lfdr/roi_kept"].item()
    lo, hi = metric.intervals()["lfdr/roi_kept"].tolist()
    y, x = (kept * roi).sum(1).numpy(), (raw * roi).sum(1).numpy()
    unclipped = _delta_ratio(y, x)
    assert unclipped[1] > 1 and hi == 1.0 and lo == pytest.approx(unclipped[0]) and lo < share < hi


def test_topk_baseline_interval_is_the_mean_interval_of_the_images_f1_at_the_runs_k():
    rng = np.random.default_rng(2)
    b, t, points = 14, 8, 5  # curve points at k = 0, 2, 4, 6, 8
    attention = torch.from_numpy(rng.random((b, t)))
    roi = torch.from_numpy(rng.random((b, t)) < 0.4)
    roi[0] = False  # no ROI: not in the baseline
    roi[1, 0] = True
    reference = torch.zeros(b, t, dtype=torch.float64)
    reference[:, :2] = 1.0  # keeps 2 of 8 ...
    reference[:7, 2] = 1.0  # ... or 3 of 8: the mean kept fraction over images with an ROI is 0.3 (k = 2.4)
    metric = TopKBaseline(points=points)
    metric.update(attention[:6], roi[:6], reference[:6])
    metric.update(attention[6:], roi[6:], reference[6:])
    has = roi.any(1).numpy()
    kappa = (reference.numpy()[has] > 0).mean()
    pos = kappa * (points - 1)
    j, w = int(pos), pos - int(pos)
    per_image = []
    for a, r in zip(attention.numpy()[has], roi.numpy()[has], strict=True):
        order = np.argsort(-a)

        def f1(k, order=order, r=r):
            return 2 * r[order[:k]].sum() / (k + r.sum())

        per_image.append((1 - w) * f1(2 * j) + w * f1(2 * (j + 1)))
    assert metric.compute().item() == pytest.approx(np.mean(per_image), rel=1e-12)
    assert metric.interval().tolist() == pytest.approx(_t_interval(per_image), rel=1e-9)


def _srmsd(hists: np.ndarray) -> float:
    f = hists.sum(0).cumsum()[:-1] / hists.sum()
    d = f - np.arange(1, hists.shape[1]) / hists.shape[1]
    return float(np.sign(d.sum()) * np.sqrt((d**2).mean()))


def test_null_srmsd_interval_is_the_delta_method_on_the_pooled_ecdf():
    rng = np.random.default_rng(3)
    metric, groups = NullCalibration(), []
    for size in (150, 250, 200):  # images with different numbers of null p-values
        p = rng.random((20, size)) ** rng.uniform(1.0, 1.6, (20, 1))  # anti-conservative, by image
        metric.update(torch.from_numpy(p))
        groups.append(p)
    hists = np.concatenate(
        [np.stack([np.bincount(np.clip((row * 100).astype(int), 0, 99), minlength=100) for row in p]) for p in groups]
    ).astype(np.float64)
    n = hists.shape[0]
    below, count = hists.cumsum(1)[:, :-1], hists.sum(1)
    f = below.sum(0) / count.sum()
    d = f - np.arange(1, 100) / 100
    g = np.sqrt((d**2).mean())
    grad = d / (d.size * g)
    psi = (below - np.outer(count, f)) @ grad / count.mean()  # each image's linearized influence
    se = np.sqrt((psi**2).sum() / (n * (n - 1)))
    value = _srmsd(hists)
    half = stats.t.ppf(0.975, n - 1) * se
    assert metric.compute().item() == pytest.approx(value, rel=1e-12)
    assert metric.interval().tolist() == pytest.approx([value - half, value + half], rel=1e-9)
    loo = np.array([_srmsd(np.delete(hists, i, 0)) for i in range(n)])
    se_jackknife = np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    assert se == pytest.approx(se_jackknife, rel=0.1)


def _filled(kind: str, rows: slice):
    """A metric of ``kind`` updated with ``rows`` of fixed random images."""
    rng = np.random.default_rng(4)
    b, t = 24, 12
    raw = rng.gamma(0.5, size=(b, t))
    raw /= raw.sum(1, keepdims=True)
    kept = raw * (rng.random((b, t)) < 0.5)
    roi = rng.random((b, t)) < 0.4
    raw, kept, roi = (torch.from_numpy(v[rows]) for v in (raw, kept, roi))
    if kind == "means":
        metric = MeanScores(["a", "b"])
        metric.update({"a": raw[:, 0], "b": kept[:, 1]})
    elif kind == "shares":
        metric = RegionShares(["lfdr"])
        metric.update(_reg(raw, {"lfdr": kept}), roi=roi)
    elif kind == "topk":
        metric = TopKBaseline(points=7)
        metric.update(raw, roi, kept)
    else:
        metric = NullCalibration()
        metric.update(raw.sqrt())
    return metric


def _bounds(metric) -> dict:
    got = metric.intervals() if hasattr(metric, "intervals") else {"": metric.interval()}
    return {k: v.tolist() for k, v in got.items()}


@pytest.mark.parametrize("kind", ["means", "shares", "topk", "srmsd"])
def test_two_ranks_summed_states_give_the_one_process_interval(kind):
    whole = _filled(kind, slice(None))
    rank0, rank1 = _filled(kind, slice(0, 9)), _filled(kind, slice(9, None))
    local = {n: getattr(rank0, n).clone() for n in rank0._reductions}
    _fake_two_ranks(rank0, rank1)
    expected = _bounds(whole)
    assert expected and all(math.isfinite(b) for v in expected.values() for b in v)
    got = _bounds(rank0)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # the rank's own states are back after the interval's sync (its run can go on)
    assert all(torch.equal(getattr(rank0, n), v) for n, v in local.items())
    assert not all(torch.equal(getattr(whole, n), v) for n, v in local.items())  # the rank alone had less


class _Recording(AttentionRegularizationCallback):
    """The callback, keeping each explained batch's masks and result by epoch."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.seen: dict[int, list] = {}

    def _record(self, trainer, job, reg):
        self.seen.setdefault(trainer.current_epoch, []).append((job.masks, job.noise_masks, reg))
        return super()._record(trainer, job, reg)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Three explained runs of a tiny fit (planted objects and noise squares; faithfulness scored)."""
    tmp = tmp_path_factory.mktemp("fit")
    cb = _Recording(n_bootstrap=4, num_images=16, log_images=2, sanity_check=False)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp, name="csv"),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp,
        limit_train_batches=2,
    )
    trainer.fit(tiny_module(), tiny_data(val_size=16, noise_squares=2))
    return cb, tmp


def test_the_history_holds_each_runs_intervals_as_computed_from_its_images(fitted):
    cb, _ = fitted
    assert len(cb.history) == 3
    run = cb.history[-1]
    intervals = run["intervals"]
    # means of per-image values, against scipy over the last run's per-image rows (NaN: undefined, left out)
    for key in ("discoveries", "pi0", "lfdr/sparsity", "lfdr/roi_f1", "lfdr/comprehensiveness", "lfdr/sufficiency"):
        values = [row[key] for row in cb.image_stats if math.isfinite(row[key])]
        assert len(values) >= 8, key
        assert intervals[f"attnreg/{key}"] == pytest.approx(_t_interval(values), rel=1e-8, abs=1e-12), key
    # pooled shares, against the delta method over the run's images
    for epoch, row in enumerate(cb.history):
        y, x = [], []
        for masks, _, reg in cb.seen[epoch]:
            roi = token_mask(masks, reg.grid)
            valid = reg.significance.valid & roi.any(1)
            y += (reg.maps["lfdr"].double() * roi).sum(1)[valid].tolist()
            x += (reg.attention.double() * roi).sum(1)[valid].tolist()
        expected = np.clip(_delta_ratio(np.array(y), np.array(x)), 0, 1).tolist()
        assert row["intervals"]["attnreg/lfdr/roi_kept"] == pytest.approx(expected, rel=1e-8, abs=1e-12)
    # every headline value has one (but the counts and the fit's-end sanity check), and holds its value
    for key in HEADLINE:
        name = f"attnreg/{key}"
        if key in COUNT_KEYS or key.startswith("sanity/") or name not in run:
            continue
        lo, hi = intervals[name]
        assert lo <= run[name] + 1e-6 and run[name] - 1e-6 <= hi, name  # (the value is logged in float32)
    expected_keys = {"lfdr/noise_kept", "topk/roi_f1", "null_srmsd", "stability/lfdr_iou", "stability/z_spearman"}
    assert {f"attnreg/{k}" for k in expected_keys} <= intervals.keys()
    assert not {f"attnreg/{k}" for k in COUNT_KEYS} & intervals.keys()
    assert "attnreg/stability/lfdr_iou" not in cb.history[0]["intervals"]  # no earlier run to compare with


def test_run_metrics_intervals_are_over_every_ranks_images(fitted):
    cb, _ = fitted
    batches = cb.seen[1]
    whole, rank0, rank1 = (RunMetrics(cb.config.maps) for _ in range(3))
    for metrics, part in ((whole, batches), (rank0, batches[:1]), (rank1, batches[1:])):
        metrics.reset("cpu")
        for masks, noise, reg in part:
            metrics.update(reg, masks, noise)
    for mine, theirs in zip(rank0._all(), rank1._all(), strict=True):
        _fake_two_ranks(mine, theirs)
    values, expected = whole.compute("cpu"), whole.intervals()
    assert rank0.compute("cpu").keys() == values.keys()
    got = rank0.intervals()
    assert got.keys() == expected.keys() and len(got) > 20
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    assert rank0.intervals() == got  # no collective: asked again, the same


def test_history_rows_with_their_intervals_survive_a_checkpoint(fitted, tmp_path):
    cb, _ = fitted
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    resumed = AttentionRegularizationCallback(n_bootstrap=4, num_images=16)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.history == cb.history
    assert (
        resumed.history[-1]["intervals"]["attnreg/lfdr/sparsity"]
        == cb.history[-1]["intervals"]["attnreg/lfdr/sparsity"]
    )
    # a row of an older checkpoint has no intervals: the report still reads it
    old = [{k: v for k, v in row.items() if k != "intervals"} for row in cb.history[:1]]
    page = write_report(tmp_path / "r.html", old + cb.history[1:], [], {}).read_text()
    value, (lo, hi) = cb.history[-1]["attnreg/lfdr/sparsity"], cb.history[-1]["intervals"]["attnreg/lfdr/sparsity"]
    assert f"<td>{value:.4g}</td><td>[{lo:.4g}, {hi:.4g}]</td>" in page  # the value, then its interval


def _axes(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_report_plots_draw_the_intervals_and_never_zoom_below_them():
    history = [
        {
            "stage": "epoch0",
            "attnreg/lfdr/sparsity": 0.5,
            "attnreg/pi0": 0.7,
            "attnreg/raw/roi_mass": 0.3,
            "intervals": {"attnreg/lfdr/sparsity": [0.47, 0.53], "attnreg/raw/roi_mass": [0.2, 0.4]},
        },
        {  # an older row: no intervals
            "stage": "epoch1",
            "attnreg/lfdr/sparsity": 0.5001,
            "attnreg/pi0": 0.7001,
            "attnreg/raw/roi_mass": 0.33,
        },
        {
            "stage": "epoch2",
            "attnreg/lfdr/sparsity": 0.5,
            "attnreg/pi0": 0.7,
            "attnreg/raw/roi_mass": 0.5,
            "intervals": {"attnreg/lfdr/sparsity": [0.49, 0.51], "attnreg/raw/roi_mass": [0.45, 0.56]},
        },
    ]
    axes = _axes(metric_plots(history, ["attnreg/lfdr/sparsity", "attnreg/pi0", "attnreg/raw/roi_mass"]))
    for key, union in (("attnreg/lfdr/sparsity", (0.47, 0.53)), ("attnreg/raw/roi_mass", (0.2, 0.56))):
        ax = axes[key]
        lo, hi = ax.get_ylim()
        assert lo <= union[0] and hi >= union[1], key  # every interval is inside, so the span is at least theirs
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        segments = sorted((s[0, 0], s[0, 1], s[1, 1]) for s in bars.lines[2][0].get_segments())
        expected = [(x, *row["intervals"][key]) for x, row in enumerate(history) if "intervals" in row]
        assert np.allclose(segments, expected), key  # one bar per run with an interval, from lo to hi
    # a change in the 4th decimal inside wide intervals is not a cliff: it spans a tiny share of the axis
    lo, hi = axes["attnreg/lfdr/sparsity"].get_ylim()
    assert 1e-4 / (hi - lo) < 0.01
    # no interval at all: the axis spans at least a share of the metric's natural range (0..1)
    pi0 = axes["attnreg/pi0"]
    lo, hi = pi0.get_ylim()
    assert hi - lo >= 0.05 and 1e-4 / (hi - lo) < 0.01
    assert not [c for c in pi0.containers if isinstance(c, ErrorbarContainer)]


def test_headline_summary_carries_the_values_and_their_intervals():
    row = {
        "stage": "validate",
        "attnreg/lfdr/sparsity": 0.6,
        "attnreg/explained": 16.0,
        "intervals": {"attnreg/lfdr/sparsity": [0.5, 0.7]},
    }
    summary = headline_summary(row)
    assert summary["attnreg/lfdr/sparsity"]["value"] == 0.6
    assert summary["attnreg/lfdr/sparsity"]["ci95"] == [0.5, 0.7]
    assert summary["attnreg/explained"]["ci95"] is None
    assert set(summary) == {"attnreg/lfdr/sparsity", "attnreg/explained"}
