"""Boundaries, pinned on crafted values: inclusive thresholds, Storey's strict lambda, numpy's histogram
edges, the seed of the engine's nulls without sample ids, every knob's validation edge and the direction of
the Optuna search (issue 20, items 9-11)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from attnreg_lightning import stats
from attnreg_lightning.config import AttnRegConfig, register_configs
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.regularize import regularize
from attnreg_lightning.stats import STOREY_LAMBDA, Significance, local_fdr, pooled_pvalues, storey_pi0

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


def _down(x: float) -> float:
    return math.nextafter(x, -math.inf)


def _sig(z, p, lfdr, q, pi0=0.5) -> Significance:
    """A hand-made Significance of one image (float64, so every crafted value is the value compared)."""
    z, p, lfdr, q = (torch.tensor([v], dtype=torch.float64) for v in (z, p, lfdr, q))
    b, t = z.shape
    return Significance(
        z=z,
        z_null=torch.zeros(b, 1, t, dtype=torch.float64),
        p=p,
        pi0=torch.full((b,), pi0, dtype=torch.float64),
        lfdr=lfdr,
        q=q,
        valid=torch.ones(b, dtype=torch.bool),
        fit_ok=torch.ones(b, dtype=torch.bool),
        clamped=torch.zeros(b, dtype=torch.long),
    )


# ----------------------------------------------------------------------------------------------------------
# Item 11: thresholds are inclusive, Storey's lambda is strict, the lfdr histogram is numpy's
# ----------------------------------------------------------------------------------------------------------

# token 0 sits exactly on every threshold, token 1 one ulp on the wrong side of it, token 2 well inside
Z_TH, P_TH, LFDR_TH, Q_TH = 0.5, 0.25, 0.375, 0.125


def test_z_threshold_is_inclusive():
    """``zreg = a [z >= z_th]``: z exactly at z_th is kept, one ulp below is not."""
    sig = _sig(z=[Z_TH, _down(Z_TH), 2.0], p=[0.0] * 3, lfdr=[0.0] * 3, q=[0.0] * 3)
    obs = torch.tensor([[0.5, 0.25, 0.125]], dtype=torch.float64)
    reg = regularize(obs, sig, z_th=Z_TH, p_th=P_TH, lfdr_th=LFDR_TH, q_th=Q_TH)
    assert reg.maps["zreg"].tolist() == [[0.5, 0.0, 0.125]]
    for name in ("p", "lfdr", "q"):  # every threshold map starts from zreg
        assert reg.maps[name].tolist() == [[0.5, 0.0, 0.125]], name


@pytest.mark.parametrize(
    ("name", "th"),
    [("p", P_TH), ("lfdr", LFDR_TH), ("q", Q_TH)],
)
def test_probability_thresholds_are_inclusive(name, th):
    """``p_map = zreg [p <= p_th]`` (and lfdr, q alike): a value exactly at the threshold is kept, one ulp
    above is not; the other two statistics are 0 so only this one decides."""
    values = {k: [0.0] * 3 for k in ("p", "lfdr", "q")}
    values[name] = [th, _up(th), th / 2]
    sig = _sig(z=[1.0] * 3, **values)
    obs = torch.tensor([[0.5, 0.25, 0.125]], dtype=torch.float64)
    reg = regularize(obs, sig, z_th=Z_TH, p_th=P_TH, lfdr_th=LFDR_TH, q_th=Q_TH)
    assert reg.maps[name].tolist() == [[0.5, 0.0, 0.125]]
    others = {"p", "lfdr", "q"} - {name}
    for other in others:
        assert reg.maps[other].tolist() == [[0.5, 0.25, 0.125]], other


def test_pi0_map_keeps_p_equal_to_its_percentile():
    """``pi0_map`` zeroes tokens whose p is *above* the ``100 (1 - pi0)`` percentile: a p equal to it stays.
    With T = 5 and pi0 = 0.5 numpy's virtual index is exactly 2, so the cut is the third p-value itself."""
    p = [0.125, 0.25, 0.5, 0.75, 1.0]
    assert np.percentile(np.array(p), 100 * (1 - 0.5)) == 0.5  # the cut lands on a token, no interpolation
    sig = _sig(z=[1.0] * 5, p=p, lfdr=[0.0] * 5, q=[0.0] * 5, pi0=0.5)
    obs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.03125]], dtype=torch.float64)
    reg = regularize(obs, sig, z_th=Z_TH, p_th=1.0, lfdr_th=LFDR_TH, q_th=Q_TH)
    assert reg.maps["pi0"].tolist() == [[0.5, 0.25, 0.125, 0.0, 0.0]]


def test_storey_lambda_is_strict_and_089_by_default():
    """``pi0 = min(1, #{p > lambda} / (T (1 - lambda)))``: p exactly at lambda is not counted, one ulp above is."""
    assert STOREY_LAMBDA == 0.89
    t = 100
    p = np.full(t, 0.125)
    p[:5] = 0.89  # exactly lambda: not counted
    p[5:8] = _up(0.89)  # just above: counted
    p[8:10] = 1.0
    expected = min(1.0, np.sum(p > 0.89) / (t * (1 - 0.89)))  # 5 / 11: well below the clip at 1
    assert expected == pytest.approx(5 / 11)
    got = storey_pi0(torch.tensor(p[None], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-15)
    # an explicit lambda, exactly representable in float32 too
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))  # one float32 ulp above 0.5
    p32 = torch.tensor([[0.5, 0.5, above, 1.0] + [0.0] * 12], dtype=torch.float32)
    assert storey_pi0(p32, lam=0.5).item() == pytest.approx(2 / (16 * 0.5))


def test_pooled_pvalue_counts_ties_as_at_most():
    """``p = 1 - #{pool <= |z|} / (T + N T)``: a null value equal to an observed |z| counts against it."""
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    z_null = torch.tensor([[[1.0, -2.0, 0.5], [-3.0, 4.0, -1.0]]], dtype=torch.float64)
    pool = np.abs(np.concatenate([z.numpy().ravel(), z_null.numpy().ravel()]))
    expected = [1 - np.sum(pool <= abs(v)) / pool.size for v in z.numpy().ravel()]
    assert expected == pytest.approx([1 - 4 / 9, 1 - 6 / 9, 1 - 8 / 9])
    assert pooled_pvalues(z, z_null)[0].tolist() == pytest.approx(expected, abs=1e-15)


def _histogram_rows(monkeypatch, z: torch.Tensor, nbins: int = 30) -> np.ndarray:
    """The counts local_fdr regresses on, per row: the Poisson fit is replaced by one that records them."""
    seen = []

    def record(x, y, start):
        seen.append(y.clone())
        return start

    monkeypatch.setattr(stats, "_poisson_irls", record)
    local_fdr(z, torch.ones(z.shape[0], dtype=torch.float64), nbins=nbins)
    (y,) = seen
    assert torch.all(y[:, nbins - 1 :] == 0)  # only zero-padding rows beyond the nbins - 1 bins
    return y[:, : nbins - 1].numpy()


def test_lfdr_histogram_is_numpys(monkeypatch):
    """Bins on ``linspace(min, max, 30)`` edges, bin i = ``[e_i, e_i+1)``, the last one closed: each value
    exactly on an edge, and one ulp below each, lands in the bin ``np.histogram`` puts it in. The edges of
    (-1.77, 1.44) are chosen so that ``floor((v - min) / step)`` alone misplaces values both ways."""
    lo, hi, nbins = -1.77, 1.44, 30
    edges = np.linspace(lo, hi, nbins)
    probes = np.concatenate([edges, np.nextafter(edges[1:], -np.inf)])
    truth = np.array([np.histogram([v], bins=edges)[0].argmax() for v in probes])
    naive = np.clip(np.floor((probes - lo) / ((hi - lo) / (nbins - 1))), 0, nbins - 2)
    assert (naive > truth).any() and (naive < truth).any()  # the crafted values do test the correction
    assert truth[nbins - 1] == nbins - 2  # the maximum is in the last bin (closed on the right)
    # one row per probe: min, max and the probe, so every row has the same edges
    rows = torch.tensor([[lo, hi, v] for v in probes], dtype=torch.float64)
    counts = _histogram_rows(monkeypatch, rows, nbins)
    expected = np.stack([np.histogram(row, bins=edges)[0] for row in rows.numpy()])
    np.testing.assert_array_equal(counts, expected)
    # and a whole image: the counts of np.histogram(z, bins=linspace(min, max, 30))
    z = np.concatenate([probes, [0.0, 0.5, -1.0]])
    whole = _histogram_rows(monkeypatch, torch.tensor(z[None]), nbins)
    np.testing.assert_array_equal(whole[0], np.histogram(z, bins=np.linspace(z.min(), z.max(), nbins))[0])


def test_lfdr_bin_centres_are_numpys(monkeypatch):
    """The regression's bin centres are those of ``np.linspace(min, max, 30)`` exactly, its last edge the
    maximum itself (for (-3, 0.7), ``min + 29 step`` is not the maximum and moves the last centre)."""
    lo, hi, nbins = -3.0, 0.7, 30
    edges = np.linspace(lo, hi, nbins)
    plain = np.arange(nbins) * ((hi - lo) / (nbins - 1)) + lo  # linspace without its last edge = stop
    assert (plain[-2] + plain[-1]) / 2 != (edges[-2] + edges[-1]) / 2  # the case where that rule matters
    seen = []
    vander = stats._vander

    def record(x, deg):
        seen.append(x.clone())
        return vander(x, deg)

    monkeypatch.setattr(stats, "_vander", record)
    local_fdr(torch.tensor([[lo, 0.25, hi, -1.0, 0.5]], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    np.testing.assert_array_equal(seen[0][0].numpy(), (edges[:-1] + edges[1:]) / 2)


# ----------------------------------------------------------------------------------------------------------
# Item 10: without sample ids the seed decides the nulls
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2, num_classes=0
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images


def test_seed_decides_the_nulls_without_sample_ids(tiny_vit):
    model, images = tiny_vit
    before = torch.get_rng_state()
    null_a = AttentionRegularizer(model, n_bootstrap=3, seed=1).observe(images)[1]
    null_a2 = AttentionRegularizer(model, n_bootstrap=3, seed=1).observe(images)[1]
    null_b = AttentionRegularizer(model, n_bootstrap=3, seed=2).observe(images)[1]
    assert null_a.shape == (2, 3, 16)
    assert torch.equal(null_a, null_a2)
    assert not torch.allclose(null_a, null_b)
    # the full call: the same seed gives the same statistics and maps, another seed other ones
    reg_a = AttentionRegularizer(model, n_bootstrap=3, seed=1)(images)
    reg_a2 = AttentionRegularizer(model, n_bootstrap=3, seed=1)(images)
    reg_b = AttentionRegularizer(model, n_bootstrap=3, seed=2)(images)
    assert torch.equal(reg_a.significance.z_null, reg_a2.significance.z_null)
    assert all(torch.equal(reg_a.maps[k], reg_a2.maps[k]) for k in reg_a.maps)
    assert not torch.allclose(reg_a.significance.z_null, reg_b.significance.z_null)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is not the source


def test_config_seed_reaches_the_engine(tiny_vit):
    model, images = tiny_vit

    def nulls(seed: int) -> torch.Tensor:
        kwargs = AttnRegConfig(seed=seed, n_bootstrap=3).engine_kwargs()
        return AttentionRegularizer(model, **kwargs).observe(images)[1]

    assert torch.equal(nulls(5), nulls(5))
    assert not torch.allclose(nulls(5), nulls(6))


# ----------------------------------------------------------------------------------------------------------
# Item 9: every validated knob of AttnRegConfig at its boundary; the Optuna search's direction
# ----------------------------------------------------------------------------------------------------------

EPS_BELOW_0, EPS_ABOVE_1 = _down(0.0), _up(1.0)
OK, BAD = True, False

KNOB_CASES = [
    ("method", "normal", OK),
    ("method", "patch", OK),
    ("method", "gaussian", BAD),
    ("n_bootstrap", 0, BAD),
    ("n_bootstrap", 1, OK),
    ("n_bootstrap", True, BAD),  # a bool is not a count
    ("n_bootstrap", 2.0, BAD),
    ("z_th", -1e300, OK),  # any finite z-score
    ("z_th", 1e300, OK),
    ("z_th", math.inf, BAD),
    ("z_th", -math.inf, BAD),
    ("z_th", math.nan, BAD),
    *[
        case
        for key in ("p_th", "lfdr_th", "q_th")
        for case in (
            (key, EPS_BELOW_0, BAD),
            (key, 0.0, OK),
            (key, 1.0, OK),
            (key, EPS_ABOVE_1, BAD),
            (key, math.nan, BAD),
        )
    ],
    ("pi0", None, OK),
    ("pi0", EPS_BELOW_0, BAD),
    ("pi0", 0.0, OK),
    ("pi0", 1.0, OK),
    ("pi0", EPS_ABOVE_1, BAD),
    ("pi0", math.nan, BAD),
    ("num_images", -1, BAD),
    ("num_images", 0, OK),
    ("num_images", 1.0, BAD),
    ("dataloader_idx", -1, BAD),
    ("dataloader_idx", 0, OK),
    ("dataloader_idx", 1.0, BAD),
    ("every_n_epochs", 0, BAD),
    ("every_n_epochs", 1, OK),
    ("every_n_epochs", 1.5, BAD),
    ("maps", ["zreg", "p", "lfdr", "pi0", "posterior", "q"], OK),
    ("maps", "lfdr", OK),
    ("maps", ["p", "fdr"], BAD),
    ("max_images_per_forward", 0, BAD),
    ("max_images_per_forward", None, OK),
    ("max_images_per_forward", 1, OK),
    ("autocast_dtype", None, OK),
    ("autocast_dtype", "auto", OK),
    ("autocast_dtype", "Auto", BAD),
    ("autocast_dtype", "bfloat16", OK),
    ("autocast_dtype", "float16", OK),
    ("autocast_dtype", "float32", BAD),
    ("seed", 0, OK),
    ("seed", 1.5, BAD),
    ("seed", False, BAD),
    ("log_images", -1, BAD),
    ("log_images", 0, OK),
    ("on_error", "warn", OK),
    ("on_error", "raise", OK),
    ("on_error", "ignore", BAD),
    ("std_factor", 0.0, BAD),
    ("std_factor", 5e-324, OK),  # the smallest float > 0
    ("std_factor", -1.0, BAD),
    ("std_factor", math.inf, BAD),
    ("std_factor", math.nan, BAD),
    ("patch_size", None, OK),
    ("patch_size", 0, BAD),
    ("patch_size", 1, OK),
    ("normalization", None, OK),
    ("normalization", "imagenet", OK),
    ("normalization", "clip", BAD),
    ("probe_ids", None, OK),
    ("probe_ids", [], BAD),
    ("probe_ids", [0], OK),
    ("probe_ids", [0, 1.5], BAD),
    ("heads", "mean", OK),
    ("heads", "all", OK),
    ("heads", "max", BAD),
    ("statistics", "auto", OK),
    ("statistics", "background", OK),
    ("statistics", "inline", OK),
    ("statistics", "gpu", BAD),
    ("faithfulness", "off", OK),
    ("faithfulness", "kept", OK),
    ("faithfulness", "curves", OK),
    ("faithfulness", "on", BAD),
    ("faithfulness_maps", ["lfdr"], OK),
    ("faithfulness_maps", ["p", "lfdr", "pi0", "q"], OK),
    ("faithfulness_maps", [], BAD),
    ("faithfulness_maps", ["posterior"], BAD),  # continuous: its curves come with faithfulness=curves
    ("faithfulness_steps", 1, OK),
    ("faithfulness_steps", 0, BAD),
    ("faithfulness_steps", 2.0, BAD),
    ("faithfulness_baseline", "mean", OK),
    ("faithfulness_baseline", "blur", OK),
    ("faithfulness_baseline", "zeros", OK),
    ("faithfulness_baseline", "drop", OK),
    ("faithfulness_baseline", "noise", BAD),
    ("faithfulness_prediction", "auto", OK),
    ("faithfulness_prediction", "module", OK),
    ("faithfulness_prediction", "vit", OK),
    ("faithfulness_prediction", "head", BAD),
    ("faithfulness_regions", [], OK),
    ("faithfulness_regions", ["roi", "noise", "shortcut"], OK),
    ("faithfulness_regions", "shortcut", OK),
    ("faithfulness_regions", ["background"], BAD),
    ("sanity_check", True, OK),
    ("sanity_check", False, OK),
    ("sanity_check", 1, BAD),
    ("sanity_draws", 1, OK),
    ("sanity_draws", 128, OK),
    ("sanity_draws", 0, BAD),
    ("sanity_draws", -1, BAD),
    ("sanity_draws", 2.0, BAD),
    ("sanity_draws", True, BAD),
    ("name", "attnreg", OK),
    ("name", "attnreg_pixel-2.b", OK),
    ("name", "", BAD),
    ("name", "attn reg", BAD),
    ("name", "attn/reg", BAD),
]


def test_knob_table_covers_every_field():
    """A knob added to AttnRegConfig must get its boundary rows here (all_channels is a plain bool)."""
    fields = set(AttnRegConfig.__dataclass_fields__)
    assert {key for key, _, _ in KNOB_CASES} == fields - {"all_channels"}


@pytest.mark.parametrize(("key", "value", "ok"), KNOB_CASES, ids=lambda v: repr(v))
def test_knob_boundary(key, value, ok):
    if ok:
        cfg = AttnRegConfig(**{key: value})
        got = getattr(cfg, key)
        listed = key in ("maps", "faithfulness_regions") and isinstance(value, str)
        assert got == ([value] if listed else value)
    else:
        with pytest.raises(ValueError, match=rf"^attnreg\.{key}\b"):
            AttnRegConfig(**{key: value})


# Which way each metric a search may optimize improves, from its definition in the README.
METRIC_DIRECTION = {
    "attnreg/lfdr/roi_f1": "maximize",  # F1 of kept tokens vs. the object's tokens: 1 is a perfect map
    "attnreg/p/roi_f1": "maximize",  # the same for the p map
    "attnreg/lfdr/roi_precision": "maximize",  # share of kept tokens on the object
    "attnreg/lfdr/roi_mass": "maximize",  # share of the map's attention on the object
    "attnreg/lfdr/noise_kept": "minimize",  # share of the noise squares' attention that survives
    "attnreg/null_srmsd": "minimize",  # distance of the null p-values from uniform (miscalibration)
    "val/acc": "maximize",  # accuracy
    "val/loss": "minimize",  # a loss
}


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_search_direction_matches_its_metric(option):
    cfg = _compose(f"hparams_search={option}")
    metric = cfg.optimized_metric
    assert metric in METRIC_DIRECTION, f"{option}: add {metric!r} and the way it improves to METRIC_DIRECTION"
    direction = cfg.hydra.sweeper.direction
    direction = direction if isinstance(direction, str) else (list(direction)[0] if len(direction) == 1 else None)
    assert direction == METRIC_DIRECTION[metric], f"{option} optimizes {metric} in direction {direction}"


def test_checkpoint_mode_matches_its_monitor():
    cfg = _compose()
    assert cfg.checkpoint.mode == {"maximize": "max", "minimize": "min"}[METRIC_DIRECTION[cfg.checkpoint.monitor]]
