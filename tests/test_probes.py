"""Probe images and how their maps move: the same images every explained run, stability metrics, evolution."""

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from scipy import stats as sps

from attnreg_lightning.metrics import average_ranks, iou, spearman
from tests.helpers import OrderedData, RecordingCallback, tiny_data, tiny_module

STABILITY = ["attnreg/stability/lfdr_iou", "attnreg/stability/z_spearman", "attnreg/stability/lfdr_iou_first"]


def test_iou_and_spearman_by_hand_and_against_scipy():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1], bool)
    assert iou(a, b) == 2 / 4 and iou(a, a) == 1.0
    assert iou(np.zeros(5, bool), np.zeros(5, bool)) == 1.0  # both empty: they agree
    rng = np.random.default_rng(0)
    x, y = np.round(rng.normal(size=50), 1), np.round(rng.normal(size=50), 1)  # with ties
    np.testing.assert_array_equal(average_ranks(x), sps.rankdata(x))
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(50)))


def _fit(tmp_path, data, **knobs):
    logger = CSVLogger(tmp_path, name="csv")
    cb = RecordingCallback(n_bootstrap=3, num_images=6, log_images=2, **knobs)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        default_root_dir=tmp_path,
        callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "checkpoints")],
    )
    L.seed_everything(0)
    trainer.fit(tiny_module(), data)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("attnreg/explained")]
    return cb, rows, Path(logger.log_dir)


def test_shuffled_validation_explains_the_same_probe_ids_and_logs_how_their_maps_move(tmp_path):
    cb, rows, log_dir = _fit(tmp_path, OrderedData(shuffle_train=True, shuffle_val=True))
    first = cb.ids(0)
    assert len(first) == 6
    assert [sorted(cb.ids(e)) for e in range(3)] == [sorted(first)] * 3
    assert cb.ids(1) != first or cb.ids(2) != first  # the loader did shuffle them
    assert len(rows) == 3
    assert not any(rows[0].get(k) for k in STABILITY)  # nothing to compare with at the first run
    for r in rows[1:]:
        iou_prev, rho, iou_first = (float(r[k]) for k in STABILITY)
        assert 0 <= iou_prev <= 1 and 0 <= iou_first <= 1 and -1 <= rho <= 1
        assert rho > 0.3  # a tiny model trained two steps: its z ranking moves little
    assert float(rows[1]["attnreg/stability/lfdr_iou"]) == float(rows[1]["attnreg/stability/lfdr_iou_first"])
    assert sorted(p.name for p in (log_dir / "attnreg").glob("evolution*.png")) == [
        "evolution_image0.png",
        "evolution_image1.png",
    ]


def test_end_of_fit_report_beside_the_checkpoints(tmp_path):
    from attnreg_lightning.report import HEADLINE

    cb, rows, _ = _fit(tmp_path, tiny_data(noise_squares=1))
    page = (tmp_path / "checkpoints" / "attnreg_report.html").read_text()
    logged = {k for r in cb.history for k, v in r.items() if isinstance(v, float) and math.isfinite(v)}
    for key in HEADLINE:  # every headline metric the runs computed, named and defined; no row for the others
        assert (f"<code>attnreg/{key}</code>" in page) == (f"attnreg/{key}" in logged), key
    assert "<code>attnreg/shortcut/reliance</code>" not in page  # these data mark no shortcut
    # the plots by run, two evolution pictures and the two rows of the last run, embedded
    assert page.count("data:image/png;base64,") == 1 + 2 + 2
    assert "epoch0, epoch1, epoch2" in page and "&quot;n_bootstrap&quot;: 3" in page
    last = f"{float(rows[-1]['attnreg/lfdr/noise_kept']):.4g}"
    assert f"<td>{last}</td>" in page  # the last run's value, as logged


def test_explicit_probe_ids_are_found_wherever_they_are(tmp_path):
    data = OrderedData(shuffle_train=True, shuffle_val=True)
    data.setup()
    wanted = [int(data.inner.val_set[i][3]) for i in (20, 3, 11)]
    cb, rows, _ = _fit(tmp_path, data, probe_ids=wanted)
    assert [sorted(cb.ids(e)) for e in range(3)] == [sorted(wanted)] * 3
    assert all(float(r["attnreg/explained"]) == 3 for r in rows)


def test_stability_scores_are_what_the_maps_say(tmp_path):
    """The logged IoU and Spearman recomputed from the maps the engine gave at the two runs."""
    logger = CSVLogger(tmp_path, name="csv")
    cb = RecordingCallback(n_bootstrap=3, num_images=6, log_images=0)
    L.seed_everything(0)
    module = tiny_module()
    with torch.no_grad():  # sharper attention than a fresh model's near-uniform one
        for block in module.vit.blocks:
            block.attn.qkv.weight.mul_(4)
    L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=3,
        default_root_dir=tmp_path,  # the report goes there, not into the working directory
    ).fit(module, tiny_data())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("attnreg/explained")][-1]
    # per epoch and sample id: the tokens the lfdr map kept, and z
    maps = {
        epoch: {
            i: ((reg.maps["lfdr"][j] > 0).numpy(), reg.significance.z[j].double().numpy())
            for ids, reg in results
            for j, i in enumerate(ids)
        }
        for epoch, results in cb.seen.items()
    }

    def mean_iou(now, then):
        def one(a, b):
            union = np.logical_or(a, b).sum()
            return 1.0 if union == 0 else np.logical_and(a, b).sum() / union

        return np.mean([one(maps[now][i][0], maps[then][i][0]) for i in maps[0]])

    rhos = [sps.spearmanr(maps[2][i][1], maps[1][i][1]).statistic for i in maps[0]]
    assert float(last["attnreg/stability/lfdr_iou"]) == pytest.approx(mean_iou(2, 1), rel=1e-6)
    assert float(last["attnreg/stability/lfdr_iou_first"]) == pytest.approx(mean_iou(2, 0), rel=1e-6)
    assert float(last["attnreg/stability/z_spearman"]) == pytest.approx(np.mean(rhos), rel=1e-6)
    assert mean_iou(2, 1) != mean_iou(2, 0)  # the maps did move, and differently since the first run


def test_a_checkpoint_from_before_picked_ids_were_kept_still_loads_its_probes():
    # earlier versions saved the records alone, keyed by sample id: those ids are the probes
    from attnreg_lightning.probes import ProbeBook

    book = ProbeBook()
    book.observe(4, np.array([True, False]), np.zeros(2), (0.0, 1.0))
    book.pick([4, 9])
    book.end_run()
    state = book.state_dict()
    assert state["picked"] == [4, 9] and list(state["records"]) == [4]
    old = ProbeBook()
    old.load_state_dict(state["records"])
    assert old.picked == {4} and old.chosen and old.is_probe(4) and not old.is_probe(9)
    new = ProbeBook()
    new.load_state_dict(state)
    assert new.picked == {4, 9} and new.is_probe(9) and list(new.records) == [4]
