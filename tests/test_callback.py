import csv
import threading
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LambdaCallback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import ConcatDataset, DataLoader

from attnreg_lightning import AttentionRegularizationCallback, AttentionRegularizer, AttnRegConfig
from attnreg_lightning.callback import BatchView, default_batch_to_images
from attnreg_lightning.metrics import score_keys
from attnreg_lightning.regularize import regularize
from attnreg_lightning.run_metrics import RunMetrics
from attnreg_lightning.stats import significance
from tests.helpers import OrderedData, RecordingCallback, perturb, tiny_data, tiny_module
from tests.oracle import oracle_image, oracle_maps

MAPS = ["p", "lfdr", "pi0", "posterior"]


def _trainer(tmp_path, callbacks, logger=None, **kw):
    return L.Trainer(
        max_epochs=kw.pop("max_epochs", 2),
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else CSVLogger(tmp_path, name="csv"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path,
        **kw,
    )


class MappedVal(L.LightningDataModule):
    """The tiny shapes data with every validation batch passed through ``fn`` (spoiled, masks dropped, ...)."""

    def __init__(self, fn):
        super().__init__()
        self.inner, self.fn = tiny_data(), fn

    def setup(self, stage=None):
        self.inner.setup(stage)

    def train_dataloader(self):
        return self.inner.train_dataloader()

    def val_dataloader(self):
        return DataLoader([self.fn(b) for b in self.inner.val_dataloader()], batch_size=None)


def _read_csv(logger: CSVLogger) -> list[dict]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_logs_every_promised_metric(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=4, num_images=6, maps=MAPS, log_images=2)
    _trainer(tmp_path, [cb], logger).fit(tiny_module(), tiny_data(noise_squares=1, shortcut_size=8))
    rows = _read_csv(logger)
    logged = {k for r in rows for k, v in r.items() if v not in ("", None)}
    regions = {f"attnreg/{m}/{r}_{s}" for m in MAPS for r in ("roi", "noise", "shortcut") for s in ("mass", "kept")}
    promised = (
        {f"attnreg/{k}" for k in score_keys(MAPS)}
        | regions
        | {
            "attnreg/raw/roi_mass",
            "attnreg/raw/noise_mass",
            "attnreg/raw/shortcut_mass",
            "attnreg/shortcut/reliance",
            "attnreg/same_k_random@shortcut/reliance",
            "attnreg/null_srmsd",
            "attnreg/topk/roi_f1",
            "attnreg/explained",
            "attnreg/skipped_degenerate",
            "attnreg/skipped_error",
            "attnreg/lfdr_fit_failed",
            "attnreg/clamped_tokens",
        }
    )
    # precision is undefined for an image whose map keeps nothing; all else must be there
    assert promised - logged <= {f"attnreg/{m}/roi_precision" for m in MAPS}
    epochs = [r for r in rows if r.get("attnreg/explained")]
    assert len(epochs) == 2 and all(float(r["attnreg/explained"]) == 6 for r in epochs)
    assert all(0 <= float(r["attnreg/lfdr/sparsity"]) <= 1 for r in epochs)
    shares = [float(r[k]) for r in epochs for k in r if k.endswith(("_mass", "_kept")) and r[k]]
    assert shares and all(0 <= v <= 1 for v in shares)
    # CSV logger: pictures as PNG under the log dir, named by global step (8 batches an epoch) and stage
    pngs = sorted((Path(logger.log_dir) / "attnreg").glob("step*.png"))
    want = [f"step{8 * (e + 1):07d}_epoch{e}_image{i}.png" for e in range(2) for i in range(2)]
    assert [p.name for p in pngs] == want
    # and at the end of fit, how each pictured probe's maps moved
    evolution = sorted(p.name for p in (Path(logger.log_dir) / "attnreg").glob("evolution*.png"))
    assert evolution == ["evolution_image0.png", "evolution_image1.png"]
    assert cb.explained_total == 12


def test_training_is_unchanged_by_the_callback(tmp_path):
    def run(callbacks):
        L.seed_everything(7)
        module = tiny_module(seed_weights=3)
        _trainer(tmp_path, callbacks, logger=False, enable_checkpointing=False).fit(module, tiny_data())
        return [p.detach().clone() for p in module.parameters()]

    without = run([])
    with_cb = run([AttentionRegularizationCallback(n_bootstrap=3, num_images=8)])
    assert all(torch.equal(a, b) for a, b in zip(without, with_cb, strict=True))


def test_every_n_epochs_and_sanity_check_skip(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, every_n_epochs=2, log_images=0)
    _trainer(tmp_path, [cb], logger, max_epochs=3, num_sanity_val_steps=2).fit(tiny_module(), tiny_data())
    epochs = [int(r["epoch"]) for r in _read_csv(logger) if r.get("attnreg/explained")]
    assert epochs == [0, 2]
    assert cb.explained_total == 8


@pytest.mark.parametrize(
    ("trainer_kw", "every", "explained_at"),
    [
        # validation runs after epochs 1, 3, 5: the first and every 2nd run after it are explained
        ({"check_val_every_n_epoch": 2, "max_epochs": 6}, 2, [1, 5]),
        # two validation runs an epoch: every 2nd run is the first of each epoch
        ({"val_check_interval": 0.5, "max_epochs": 2}, 2, [0, 1]),
        ({"val_check_interval": 0.5, "max_epochs": 2}, 1, [0, 0, 1, 1]),
    ],
)
def test_every_n_epochs_counts_validation_runs(tmp_path, trainer_kw, every, explained_at):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=2, every_n_epochs=every, log_images=1)
    _trainer(tmp_path, [cb], logger, limit_train_batches=2, limit_val_batches=1, **trainer_kw).fit(
        tiny_module(), tiny_data()
    )
    epochs = [int(r["epoch"]) for r in _read_csv(logger) if r.get("attnreg/explained")]
    assert epochs == explained_at
    # pictures of every explained run survive: named by global step, none overwritten
    assert len(list((Path(logger.log_dir) / "attnreg").glob("step*.png"))) == len(explained_at)


def test_degenerate_images_are_skipped_and_counted(tmp_path):
    def spoil(batch):
        x = batch[0].clone()
        x[0] = 0.25  # constant image
        x[1, 0, 0, 0] = float("nan")
        return (x, *batch[1:])

    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=1)
    with pytest.warns(UserWarning, match="degenerate"):
        _trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=1).fit(tiny_module(), MappedVal(spoil))
    rows = [r for r in _read_csv(logger) if r.get("attnreg/explained")]
    assert float(rows[-1]["attnreg/skipped_degenerate"]) == 2 and float(rows[-1]["attnreg/explained"]) == 6
    assert float(rows[-1]["attnreg/skipped_error"]) == 0
    assert float(rows[-1]["attnreg/lfdr_fit_failed"]) == 0  # the degenerate images' fits are not failures

    raising = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, on_error="raise")
    with pytest.raises(ValueError, match="degenerate"):
        _trainer(tmp_path, [raising], False, max_epochs=1, limit_train_batches=1).fit(tiny_module(), MappedVal(spoil))


def test_engine_errors_are_reported_apart_with_their_message(tmp_path):
    def crop(batch):  # 44 px: not divisible by the 8-px patches, so the engine raises
        return BatchView(batch[0][..., :44, :44])

    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, batch_to_images=crop)
    with pytest.warns(UserWarning, match="could not explain 8 image.*not divisible by the patch size"):
        _trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=1).fit(tiny_module(), tiny_data())
    row = [r for r in _read_csv(logger) if r.get("attnreg/explained")][-1]
    assert float(row["attnreg/skipped_error"]) == 8
    assert float(row["attnreg/explained"]) == 0 and float(row["attnreg/skipped_degenerate"]) == 0


class Twice(L.LightningDataModule):
    """Every validation image yielded twice: in two batches (``batch_size=8``) or twice in one (16)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.inner, self.batch_size = tiny_data(val_size=8), batch_size

    def setup(self, stage=None):
        self.inner.setup(stage)

    def val_dataloader(self):
        return DataLoader(ConcatDataset([self.inner.val_set] * 2), self.batch_size)


@pytest.mark.parametrize("batch_size", [8, 16], ids=["two-batches", "one-batch"])
def test_an_image_yielded_twice_in_a_run_is_explained_once(tmp_path, batch_size):
    cb = RecordingCallback(n_bootstrap=2, num_images=12, log_images=1)
    trainer = _trainer(tmp_path, [cb], False)
    data = Twice(batch_size)
    for run in range(2):  # the first run picks the probes; the second finds them
        cb.seen.clear()
        trainer.validate(tiny_module(), data, verbose=False)
        ids = cb.ids(0)
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 8, run
        assert trainer.callback_metrics["attnreg/explained"] == 8


def test_any_exception_of_the_engine_is_warned_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    class Unexpected(Exception):
        pass

    def explode(self, images, sample_ids=None):
        raise Unexpected("the engine broke: 42")

    monkeypatch.setattr(AttentionRegularizer, "__call__", explode)
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, statistics="inline")
    trainer = _trainer(tmp_path, [cb], False)
    with pytest.warns(UserWarning, match="could not explain 8 image.*the engine broke: 42"):
        trainer.validate(tiny_module(), tiny_data(val_size=8), verbose=False)
    assert trainer.callback_metrics["attnreg/skipped_error"] == 8
    assert trainer.callback_metrics["attnreg/explained"] == 0


def test_region_metrics_use_only_images_with_region_tokens(tmp_path):
    """The same 8 images with their masks, then beside 8 more whose masks are empty: every region metric is the
    same (sample ids make each image's maps its own), while metrics over all images do move."""

    def validate(val_size, empty_from):
        def drop_masks(batch):
            masks = batch[2].clone()
            masks[batch[3] >= data.inner.val_set.id_offset + empty_from] = 0
            return (batch[0], batch[1], masks, batch[3])

        data = MappedVal(drop_masks)
        data.inner = tiny_data(val_size=val_size)
        cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=val_size, log_images=0)
        trainer = _trainer(tmp_path, [cb], False)
        trainer.validate(tiny_module(), data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    alone, beside = validate(8, 8), validate(16, 8)
    regional = [k for k in alone if "roi_" in k or "/roi" in k]
    assert len(regional) > 20 and "attnreg/lfdr/roi_precision" in regional
    for key in regional:
        assert beside[key] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), key
    assert beside["attnreg/explained"] == 16 and beside["attnreg/raw/gini"] != alone["attnreg/raw/gini"]


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_a_failure_before_or_after_the_engine_is_warned_and_counted_once_in_either_mode(
    tmp_path, monkeypatch, statistics
):
    def crop_masks(batch):  # [B, 47, 48] masks for 48-px images: pooled to the grid they would misplace regions
        return (batch[0], batch[1], batch[2][:, 1:], batch[3])

    def validate(data, **knobs):
        cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, statistics=statistics, **knobs)
        trainer = _trainer(tmp_path, [cb], False)
        trainer.validate(tiny_module(), data, verbose=False)
        return trainer.callback_metrics

    with pytest.warns(UserWarning, match=r"could not explain 8 image.*masks of shape \(8, 47, 48\) do not match"):
        logged = validate(MappedVal(crop_masks))
    assert (logged["attnreg/skipped_error"], logged["attnreg/explained"]) == (8, 0)
    with pytest.raises(ValueError, match=r"masks of shape \(8, 47, 48\)"):
        validate(MappedVal(crop_masks), on_error="raise")

    def broken(self, reg, *masks):  # after the engine, in the statistics' bookkeeping
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(RunMetrics, "update", broken)
    with pytest.warns(UserWarning, match="could not explain 8 image.*scoring broke"):
        logged = validate(tiny_data(val_size=8))
    assert (logged["attnreg/skipped_error"], logged["attnreg/explained"]) == (8, 0)


@pytest.mark.slow  # a fit or several: the whole suite runs it
def test_two_callbacks_in_one_fit_keep_their_keys_and_states_apart(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    normal = AttentionRegularizationCallback(n_bootstrap=2, num_images=2, log_images=1)
    pixel = AttentionRegularizationCallback(n_bootstrap=2, num_images=3, log_images=1, method="pixel", name="px")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [normal, pixel, ckpt], logger, max_epochs=1, limit_train_batches=1).fit(
        tiny_module(), tiny_data()
    )
    row = [r for r in _read_csv(logger) if r.get("attnreg/explained")][-1]
    assert float(row["attnreg/explained"]) == 2 and float(row["px/explained"]) == 3
    assert row["attnreg/lfdr/sparsity"] and row["px/lfdr/sparsity"]
    assert list((Path(logger.log_dir) / "px").glob("*.png"))
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    ours = {k: v for k, v in states.items() if "AttentionRegularizationCallback" in k}
    assert sorted(v["config"]["method"] for v in ours.values()) == ["normal", "pixel"]


def test_tensorboard_gets_images_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=2)
    _trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=2).fit(tiny_module(), tiny_data())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"attnreg/maps/0", "attnreg/maps/1"} <= set(tags["images"])
    assert {"attnreg/z_observed", "attnreg/z_null"} <= set(tags["histograms"])
    assert "attnreg/lfdr/sparsity" in tags["scalars"]


def test_unknown_logger_gets_scalars_and_one_warning(tmp_path):
    from lightning.pytorch.loggers import Logger

    class Plain(Logger):
        name, version = "plain", 0
        seen: list = []

        def log_metrics(self, metrics, step=None):
            self.seen.append(metrics)

        def log_hyperparams(self, *a, **k):
            pass

    plain = Plain()
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=2, log_images=1)
    with pytest.warns(UserWarning, match="scalars only") as record:
        _trainer(tmp_path, [cb], plain, max_epochs=2, limit_train_batches=1).fit(tiny_module(), tiny_data())
    assert sum("scalars only" in str(w.message) for w in record) == 1
    assert any("attnreg/lfdr/sparsity" in m for m in plain.seen)


def test_batch_readers():
    x = torch.zeros(2, 3, 8, 8)
    assert default_batch_to_images(x).images is x
    y, mask, noise, ids = torch.tensor([0, 1]), torch.ones(2, 8, 8), torch.zeros(2, 8, 8), torch.tensor([5, 6])
    assert default_batch_to_images([x, y]).masks is None
    v = default_batch_to_images((x, y, mask, ids))
    assert v.masks is mask and v.ids is ids and v.noise_masks is None
    v = default_batch_to_images((x, y, ids))  # (x, y, id): the ids are recognised, not read as masks
    assert v.ids is ids and v.masks is None
    v = default_batch_to_images([x, y, mask, ids, noise])
    assert v.images is x and v.masks is mask and v.ids is ids and v.noise_masks is noise
    v = default_batch_to_images((x, y, mask))
    assert v.masks is mask and v.ids is None
    for key in ("image", "images", "x"):
        for mkey in ("mask", "masks"):
            for ikey in ("id", "ids", "sample_id"):
                d = default_batch_to_images({key: x, mkey: mask, ikey: ids, "noise_mask": noise})
                assert d.images is x and d.masks is mask and d.ids is ids and d.noise_masks is noise
    d = default_batch_to_images({"image": x, "mask": torch.ones(2, 8, 8), "id": [1, 2]})
    assert d.masks is not None and d.ids == [1, 2]
    with pytest.raises(ValueError, match="image"):
        default_batch_to_images({"pixels": x})
    with pytest.raises(ValueError, match="batch_to_images"):
        default_batch_to_images("nope")
    cb = AttentionRegularizationCallback(batch_to_images=lambda b: BatchView(b["pixels"]))
    assert cb.batch_to_images({"pixels": x}).images is x


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"attnreg\.n_bootstrap"):
        AttentionRegularizationCallback(n_bootstrap=0)
    with pytest.raises(ValueError, match=r"attnreg\.p_th"):
        AttnRegConfig(p_th=2.0)
    with pytest.raises(ValueError, match=r"attnreg\.maps"):
        AttnRegConfig(maps=["lfdr", "nope"])
    with pytest.raises(ValueError, match=r"attnreg\.method"):
        AttnRegConfig(method="bogus")
    with pytest.raises(ValueError, match=r"attnreg\.on_error"):
        AttnRegConfig(on_error="ignore")
    with pytest.raises(TypeError):
        AttnRegConfig(n_bootstraps=3)
    with pytest.raises(ValueError, match=r"attnreg\.name"):
        AttnRegConfig(name="a/b")
    assert AttnRegConfig(maps="lfdr").maps == ["lfdr"]  # one name, not its letters


def test_batches_without_masks_log_no_roi_metrics_and_no_warning(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=1).fit(
            tiny_module(), MappedVal(lambda b: (b[0], b[1]))
        )
    assert not [w for w in caught if "before the ``update``" in str(w.message)]
    logged = {k for r in _read_csv(logger) for k, v in r.items() if v}
    assert "attnreg/lfdr/sparsity" in logged and "attnreg/null_srmsd" in logged
    assert not {k for k in logged if "roi" in k or "noise" in k}


def test_validate_after_fit_is_labelled_validate_not_a_phantom_epoch(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=2, log_images=1)
    trainer = _trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    module, data = tiny_module(), tiny_data()
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)
    names = sorted(p.name for p in (Path(logger.log_dir) / "attnreg").glob("step*.png"))
    assert names == ["step0000001_epoch0_image0.png", "step0000001_validate_image0.png"]


def _np_gini(x):
    a = np.sort(np.abs(x) + 1e-7)
    n = a.size
    return float(((2 * np.arange(1, n + 1) - n - 1) * a).sum() / (n * a.sum()))


def _np_entropy(x):
    p = x / x.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_logged_values_of_one_batch_match_an_independent_numpy_recomputation(tmp_path):
    module = tiny_module()
    perturb(module.vit, 3)
    with torch.no_grad():  # sharper attention than a fresh model's near-uniform one
        for block in module.vit.blocks:
            block.attn.qkv.weight.mul_(4)
    data = tiny_data()
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    cb = AttentionRegularizationCallback(n_bootstrap=5, num_images=8, maps=MAPS, log_images=0, lfdr_th=0.4, p_th=0.15)
    trainer = _trainer(tmp_path, [cb], logger=False)
    (logged,) = trainer.validate(module, DataLoader([batch], batch_size=None))

    # the same images and nulls, the statistics from the oracle, every metric from its written definition
    images, _, masks, ids = batch
    obs, null = cb.engine.observe(images, ids.tolist())
    obs, null = obs.double().numpy(), null.double().numpy()
    roi = torch.nn.functional.avg_pool2d(masks[:, None], 8)[:, 0].flatten(1).numpy() >= 0.5
    per_image = {
        k: []
        for k in (
            "pi0",
            "discoveries",
            "raw/gini",
            "lfdr/sparsity",
            "lfdr/gini",
            "lfdr/entropy",
            "lfdr/retained_mass",
            "p/roi_recall",
            "pi0/sparsity",
        )
    }
    on_roi = {"raw": 0.0, "lfdr": 0.0}
    total = {"raw": 0.0, "lfdr": 0.0}
    for i in range(8):
        st = oracle_image(obs[i], null[i])
        maps = oracle_maps(obs[i], st, lfdr_th=0.4, p_th=0.15)
        per_image["pi0"].append(st["pi0"])
        per_image["discoveries"].append(np.mean(st["lfdr"] <= 0.4))
        per_image["raw/gini"].append(_np_gini(obs[i]))
        per_image["lfdr/sparsity"].append(np.mean(maps["lfdr"] == 0))
        per_image["lfdr/gini"].append(_np_gini(maps["lfdr"]))
        if maps["lfdr"].sum() > 0:
            per_image["lfdr/entropy"].append(_np_entropy(maps["lfdr"]))
        per_image["lfdr/retained_mass"].append(maps["lfdr"].sum() / obs[i].sum())
        per_image["p/roi_recall"].append(((maps["p"] > 0) & roi[i]).sum() / roi[i].sum())
        per_image["pi0/sparsity"].append(np.mean(maps["pi0"] == 0))
        for name, m in (("raw", obs[i]), ("lfdr", maps["lfdr"])):
            on_roi[name] += m[roi[i]].sum()
            total[name] += m.sum()
    assert 0 < np.mean(per_image["discoveries"]) < 1 and len(per_image["lfdr/entropy"]) > 0
    for key, values in per_image.items():
        assert logged[f"attnreg/{key}"] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6), key
    expected = {
        "raw/roi_mass": on_roi["raw"] / total["raw"],
        "lfdr/roi_mass": on_roi["lfdr"] / total["lfdr"],
        "lfdr/roi_kept": on_roi["lfdr"] / on_roi["raw"],
    }
    for key, value in expected.items():
        assert logged[f"attnreg/{key}"] == pytest.approx(value, rel=1e-5), key
    assert logged["attnreg/explained"] == 8


@pytest.mark.slow  # a fit or several: the whole suite runs it
def test_fit_checkpoint_resume_gives_the_maps_of_an_uninterrupted_run(tmp_path):
    def run(root, ckpt_path=None, seed=3, interrupt=False):
        L.seed_everything(0)
        cb = RecordingCallback(n_bootstrap=3, num_images=8, every_n_epochs=2, seed=seed, log_images=0)
        callbacks = [cb, ModelCheckpoint(dirpath=root, save_last=True)]
        if interrupt:  # stopped after one epoch of a 3-epoch fit: the learning-rate schedule is the same
            callbacks.append(
                LambdaCallback(on_train_epoch_end=lambda trainer, _: setattr(trainer, "should_stop", True))
            )
        trainer = _trainer(root, callbacks, False, max_epochs=3)
        trainer.fit(tiny_module(), OrderedData(shuffle_train=False, shuffle_val=False), ckpt_path=ckpt_path)
        cb.logged = dict(trainer.callback_metrics)
        return cb

    whole = run(tmp_path / "whole")
    run(tmp_path / "first", interrupt=True)
    with pytest.warns(UserWarning, match="checkpoint's seed 3"):  # a different seed given: the checkpoint's wins
        resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "first" / "last.ckpt", seed=0)
    # explained at runs 1 and 3 (every 2nd): the resumed run counted the first run's validation
    assert sorted(whole.seen) == [0, 2] and sorted(resumed.seen) == [2]
    for (ids_a, a), (ids_b, b) in zip(whole.seen[2], resumed.seen[2], strict=True):
        assert ids_a == ids_b
        assert torch.equal(b.attention, a.attention)  # trained alike
        assert torch.equal(b.significance.z_null, a.significance.z_null)
        assert all(torch.equal(b.maps[name], a.maps[name]) for name in a.maps)
    # the probes' records came with the checkpoint: the resumed run compares with the first run's maps
    for key in ("attnreg/stability/lfdr_iou", "attnreg/stability/z_spearman", "attnreg/stability/lfdr_iou_first"):
        assert resumed.logged[key] == whole.logged[key], key
    # and the whole state is the uninterrupted run's: totals, run count, every run's logged values, probe records
    assert (resumed.explained_total, resumed.skipped_total) == (whole.explained_total, whole.skipped_total) == (16, 0)
    assert resumed.validation_runs == whole.validation_runs == 3
    assert len(whole.history) == 2 and resumed.history == whole.history
    state_whole, state_resumed = whole.probes.state_dict(), resumed.probes.state_dict()
    assert state_resumed["picked"] == state_whole["picked"] and len(state_whole["picked"]) == 8
    probes_whole, probes_resumed = state_whole["records"], state_resumed["records"]
    assert sorted(probes_resumed) == sorted(probes_whole) and len(probes_whole) == 8
    for i, record in probes_whole.items():
        again = probes_resumed[i]
        assert record["scale"] == again["scale"]
        for key in ("first_keep", "last_keep", "last_z"):
            assert torch.equal(record[key], again[key]), (i, key)
        assert record["image"] is again["image"] is None  # log_images=0: no pictures, so no images kept
        assert [label for label, *_ in record["history"]] == [label for label, *_ in again["history"]]
        for (_, raw_a, lfdr_a), (_, raw_b, lfdr_b) in zip(record["history"], again["history"], strict=True):
            assert torch.equal(raw_a, raw_b) and torch.equal(lfdr_a, lfdr_b)


def test_diverged_density_fits_and_clamped_values_are_counted(tmp_path):
    # attention whose z-scores are standardized Student-t rows: row 21's density fit diverges (tests/test_stats.py)
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=(32, 784))
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    obs = torch.from_numpy(np.exp(x[[20, 21]]))
    null = torch.from_numpy(np.exp(rng.standard_normal((2, 4, 784))))
    null[0, 0, :3] = 0.0  # three values to clamp

    class Crafted(AttentionRegularizationCallback):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            self.engine = lambda images, sample_ids=None: regularize(obs, significance(obs, null))

    cb = Crafted(n_bootstrap=4, num_images=2, log_images=0)
    data = [(torch.randn(2, 3, 48, 48), torch.zeros(2, dtype=torch.long))]
    with pytest.warns(UserWarning, match="density fit diverged for 1 image"):
        (logged,) = _trainer(tmp_path, [cb], False).validate(tiny_module(), DataLoader(data, batch_size=None))
    assert logged["attnreg/lfdr_fit_failed"] == 1 and logged["attnreg/clamped_tokens"] == 3
    assert logged["attnreg/explained"] == 2


@pytest.mark.slow  # a fit or several: the whole suite runs it
def test_per_head_metrics_and_pictures(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionRegularizationCallback(n_bootstrap=3, num_images=4, log_images=1, heads="all")
    plain = AttentionRegularizationCallback(n_bootstrap=3, num_images=4, log_images=1, name="plain")
    _trainer(tmp_path, [cb, plain], logger, max_epochs=1, limit_train_batches=1).fit(tiny_module(), tiny_data())
    (row,) = [r for r in _read_csv(logger) if r.get("attnreg/explained")]
    for h in range(3):  # the tiny model has 3 heads
        assert 0 <= float(row[f"attnreg/head{h}/discoveries"]) <= 1
        assert 0 <= float(row[f"attnreg/head{h}/lfdr/sparsity"]) <= 1
    assert not [k for k in row if k.startswith("plain/head")]
    # the mean path is what a heads="mean" callback reports
    assert float(row["attnreg/lfdr/sparsity"]) == float(row["plain/lfdr/sparsity"])
    from PIL import Image

    (with_heads,) = (Path(logger.log_dir) / "attnreg").glob("step*.png")
    (without,) = (Path(logger.log_dir) / "plain").glob("step*.png")
    assert Image.open(with_heads).height > 1.8 * Image.open(without).height  # a row of per-head lfdr maps added


@pytest.mark.slow  # a fit or several: the whole suite runs it
def test_background_statistics_log_and_record_exactly_what_inline_statistics_do(tmp_path):
    runs = {}
    for where in ("inline", "background"):
        # faithfulness off: its forwards run with the thread's one intra-op thread in the background, which may move
        # their last bits (test_faithfulness_callback checks both paths against the functional core)
        cb = RecordingCallback(
            n_bootstrap=3, num_images=12, log_images=1, statistics=where, heads="all", faithfulness="off"
        )
        trainer = _trainer(tmp_path / where, [cb], False, max_epochs=2, limit_train_batches=2)
        trainer.fit(perturb(tiny_module()), tiny_data(val_size=24, batch_size=4))
        runs[where] = (cb, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("attnreg/")})
    (inline, logged), (background, logged_bg) = runs["inline"], runs["background"]
    assert logged_bg == logged and logged["attnreg/explained"] == 12
    np.testing.assert_equal(background.image_stats, inline.image_stats)  # NaN scores (empty maps) equal too
    assert len(inline.image_stats) == 12
    for epoch in (0, 1):  # every batch recorded, in order, with the same maps
        assert background.ids(epoch) == inline.ids(epoch)
        for (_, a), (_, b) in zip(background.seen[epoch], inline.seen[epoch], strict=True):
            assert torch.equal(a.maps["lfdr"], b.maps["lfdr"]) and torch.equal(
                a.per_head.maps["lfdr"], b.per_head.maps["lfdr"]
            )
    assert [r.caption for r in background._last_rows] == [r.caption for r in inline._last_rows]
    assert background.history == inline.history


def test_background_statistics_leave_metrics_probes_and_pictures_to_the_statistics_thread(tmp_path, monkeypatch):
    # what follows the forwards must not run on the training thread: there it would hold up the next batch's
    # forwards (on a GPU, the device would sit idle while the host scores, sorts and draws)
    from attnreg_lightning import pictures as pictures_module

    where: dict[str, set[str]] = {"record": set(), "draw": set(), "batch hook": set()}
    drawn = pictures_module.picture_row

    def draw(*args, **kwargs):
        where["draw"].add(threading.current_thread().name)
        return drawn(*args, **kwargs)

    monkeypatch.setattr(pictures_module, "picture_row", draw)

    class Watched(AttentionRegularizationCallback):
        def _record(self, trainer, job, reg):
            where["record"].add(threading.current_thread().name)
            return super()._record(trainer, job, reg)

        def on_validation_batch_end(self, *args, **kwargs):
            where["batch hook"].add(threading.current_thread().name)
            super().on_validation_batch_end(*args, **kwargs)

    cb = Watched(n_bootstrap=2, num_images=8, log_images=3, statistics="background")
    (logged,) = _trainer(tmp_path, [cb]).validate(tiny_module(), tiny_data(val_size=8, batch_size=4))
    assert logged["attnreg/explained"] == 8 and len(cb._last_rows) == 3
    (training,) = where["batch hook"]
    assert where["record"] and where["draw"]
    assert all(name.startswith("attnreg-statistics") for name in where["record"] | where["draw"]), where
    assert training not in where["record"] | where["draw"]


class MCDropout(L.LightningModule):
    """A module that keeps one dropout in train mode during validation on purpose (Monte Carlo dropout), checking at
    every step that it still is: a forward in another thread that puts the model in eval mode and restores the modes
    it saw could leave the dropout in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = perturb(tiny_module().vit)
        self.dropout = self.vit.blocks[0].attn.attn_drop
        self.dropout.p = 0.1
        self.modes: list[bool] = []

    def forward(self, images):
        return self.vit(images)

    def validation_step(self, batch, batch_idx):
        self.modes.append(self.dropout.training)
        self.dropout.train()


def test_the_statistics_thread_never_runs_the_model(tmp_path):
    """Faithfulness forwards (kept and curves, with the fixed-k baseline) run on the training thread as the engine's
    do, whatever the statistics mode: never in the statistics thread, and never two forwards at once (no twice the
    memory of max_images_per_forward)."""
    module = MCDropout()
    threads: list[str] = []
    inside, most, lock = [0], [0], threading.Lock()

    def enter(_, args):
        with lock:
            threads.append(threading.current_thread().name)
            inside[0] += len(args[0])
            most[0] = max(most[0], inside[0])

    def leave(_, args, out):
        with lock:
            inside[0] -= len(args[0])

    module.vit.patch_embed.register_forward_pre_hook(enter)
    module.vit.patch_embed.register_forward_hook(leave)
    cb = AttentionRegularizationCallback(
        n_bootstrap=2, num_images=8, log_images=2, statistics="background", faithfulness="curves",
        max_images_per_forward=6, sanity_check=False,
    )  # fmt: skip
    (logged,) = _trainer(tmp_path, [cb]).validate(module, tiny_data(val_size=8, batch_size=4))
    assert logged["attnreg/explained"] == 8 and "attnreg/raw/deletion_auc" in logged
    assert threads and not [t for t in threads if t.startswith("attnreg-statistics")], set(threads)
    assert most[0] <= 6
    assert module.modes[1:] == [True] * (len(module.modes) - 1)  # the dropout kept as the module left it


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_an_exception_in_the_statistics_thread_is_warned_and_counted_or_raised(tmp_path, monkeypatch, on_error):
    def failing(*args, **kwargs):
        raise RuntimeError("statistics failed on purpose")

    monkeypatch.setattr("attnreg_lightning.engine.significance", failing)
    cb = AttentionRegularizationCallback(
        n_bootstrap=2, num_images=8, log_images=0, statistics="background", on_error=on_error
    )
    trainer = _trainer(tmp_path, [cb], False)
    data = tiny_data(val_size=8, batch_size=4)
    before = set(threading.enumerate())
    if on_error == "raise":
        with pytest.raises(RuntimeError, match="statistics failed on purpose"):
            trainer.validate(tiny_module(), data)
    else:
        with pytest.warns(UserWarning, match="could not explain 4 image.*statistics failed on purpose"):
            (logged,) = trainer.validate(tiny_module(), data)
        assert logged["attnreg/skipped_error"] == 8 and logged["attnreg/explained"] == 0
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]  # the thread ended either way


def test_a_checkpoint_of_another_version_resumes_taking_only_its_seed():
    saved = AttentionRegularizationCallback(seed=7, n_bootstrap=2).state_dict()
    saved["config"]["a_knob_of_a_later_version"] = 1
    del saved["config"]["heads"]  # and one an earlier version did not have
    cb = AttentionRegularizationCallback(seed=1, n_bootstrap=3)
    with pytest.warns(UserWarning, match="checkpoint's seed 7"):
        cb.load_state_dict(saved)
    assert (cb.config.seed, cb.config.n_bootstrap) == (7, 3)


@pytest.mark.parametrize(
    ("precision", "knob", "dtype"),
    [
        ("bf16-mixed", "auto", torch.bfloat16),
        ("32-true", "auto", None),
        ("bf16-mixed", None, None),  # an explicit float32 wins
        ("32-true", "bfloat16", torch.bfloat16),
    ],
)
def test_autocast_follows_the_trainers_precision_unless_set(tmp_path, precision, knob, dtype):
    cb = RecordingCallback(n_bootstrap=2, num_images=4, log_images=0, autocast_dtype=knob)
    trainer = _trainer(tmp_path, [cb], False, precision=precision)
    trainer.validate(tiny_module(), tiny_data(val_size=8), verbose=False)
    assert cb.engine.autocast_dtype == dtype
    ((_, reg),) = cb.seen[0]
    assert reg.attention.dtype == torch.float32 and reg.significance.valid.all()  # maps in float32 either way


def test_runs_not_explained_hold_no_attnreg_values_and_a_monitor_of_them_is_refused(tmp_path):
    seen = []

    def note(trainer, _):
        if not trainer.sanity_checking:
            seen.append(sorted(k for k in trainer.callback_metrics if k.startswith("attnreg/")))

    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, every_n_epochs=2)
    trainer = _trainer(tmp_path, [cb, LambdaCallback(on_validation_end=note)], False, max_epochs=3,
                       limit_train_batches=1, enable_checkpointing=False)  # fmt: skip
    trainer.fit(tiny_module(), tiny_data(val_size=8))
    assert [bool(keys) for keys in seen] == [True, False, True]  # explained at runs 1 and 3 only
    for monitor in (
        ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="attnreg/lfdr/sparsity"),
        EarlyStopping(monitor="attnreg/lfdr/sparsity"),
    ):
        cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, every_n_epochs=2)
        with pytest.raises(ValueError, match=rf"{type(monitor).__name__}\(monitor='attnreg/lfdr/sparsity'\).*"
                                             r"every_n_epochs=2.*set every_n_epochs=1"):  # fmt: skip
            _trainer(tmp_path, [cb, monitor], False, max_epochs=1).fit(tiny_module(), tiny_data(val_size=8))


def test_validate_from_an_earlier_checkpoint_after_fit_adds_to_the_record_instead_of_rewinding_it(tmp_path):
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = _trainer(tmp_path, [cb, ckpt], False, max_epochs=2, limit_train_batches=1)
    trainer.fit(tiny_module(), tiny_data(val_size=8))
    trainer.validate(ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", datamodule=tiny_data(val_size=8), verbose=False)
    assert [run["stage"] for run in cb.history] == ["epoch0", "epoch1", "validate"]
    assert (cb.explained_total, cb.validation_runs) == (12, 2)
    # a fresh callback (another process) takes the checkpoint's record and goes on from it
    fresh = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0)
    _trainer(tmp_path, [fresh], False).validate(
        tiny_module(), tiny_data(val_size=8), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", verbose=False
    )
    assert [run["stage"] for run in fresh.history] == ["epoch0", "validate"]


class TwoLoaders(L.LightningDataModule):
    """Two validation loaders numbered 0..7 alike, as datasets usually are, over different images."""

    def __init__(self):
        super().__init__()
        self.a, self.b = tiny_data(val_size=8), tiny_data(val_size=8, object_fraction=0.5)

    def setup(self, stage=None):
        self.a.setup(stage)
        self.b.setup(stage)

    def val_dataloader(self):
        return [DataLoader(self.a.val_set, 8), DataLoader(self.b.val_set, 8)]


def test_each_callback_explains_one_validation_loader(tmp_path):
    first = RecordingCallback(n_bootstrap=2, num_images=8, log_images=0)
    second = RecordingCallback(n_bootstrap=2, num_images=8, log_images=0, dataloader_idx=1, name="attnreg_b")
    trainer = _trainer(tmp_path, [first, second], False)
    module, data = tiny_module(), TwoLoaders()
    for _ in range(2):  # the second run explains the same probes, one loader each
        trainer.validate(module, data, verbose=False)
    data.setup()
    for cb, dataset in ((first, data.a.val_set), (second, data.b.val_set)):
        runs = cb.seen[0]
        assert len(runs) == 2 and all(ids == runs[0][0] and len(ids) == 8 for ids, _ in runs)
        images = torch.stack([dataset[i][0] for i in range(8)])
        with torch.no_grad():
            want = AttentionRegularizer(module, n_bootstrap=2).observe(images, runs[0][0])[0]
        for _, reg in runs:
            torch.testing.assert_close(reg.attention, want)  # this loader's images, not the other's
    logged = trainer.callback_metrics
    assert logged["attnreg/explained"] == logged["attnreg_b/explained"] == 8
    assert logged["attnreg/stability/lfdr_iou"] == 1 and logged["attnreg_b/stability/lfdr_iou"] == 1
    beyond = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, dataloader_idx=2)
    with pytest.raises(ValueError, match=r"attnreg\.dataloader_idx=2, but this validation has 2 loader"):
        _trainer(tmp_path, [beyond], False).validate(module, data, verbose=False)


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_a_degenerate_probe_is_counted_at_every_run_not_only_the_first(tmp_path, statistics):
    # the probes are the images the first run picked, valid or not: a constant image is skipped (and counted)
    # at every run, so explained + skipped adds up to the images picked at every run
    from tests.helpers import IMAGE_SIZE

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            x = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(i))
            return (torch.zeros_like(x) if i in (3, 10) else x), i % 4, i

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(Images(), batch_size=4)

        def val_dataloader(self):
            return DataLoader(Images(), batch_size=4)

    cb = AttentionRegularizationCallback(
        n_bootstrap=2, num_images=12, log_images=0, statistics=statistics, faithfulness="off", sanity_check=False
    )
    _trainer(tmp_path, [cb], False, max_epochs=3, limit_train_batches=1).fit(tiny_module(), Data())
    assert len(cb.history) == 3
    for run in cb.history:
        assert (run["attnreg/explained"], run["attnreg/skipped_degenerate"]) == (10, 2), run["stage"]
    assert (cb.explained_total, cb.skipped_total) == (30, 6)
    assert cb.probes.picked == set(range(12)) and sorted(cb.probes.records) == sorted(set(range(12)) - {3, 10})


def test_each_explained_run_says_one_line_in_the_log(tmp_path):
    """The line reaches Lightning's logger (the app's train.log, whether or not a console is watched)."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, sanity_check=False)
        _trainer(tmp_path, [cb], False).validate(perturb(tiny_module()), tiny_data(val_size=8, batch_size=4))
    finally:
        logger.removeHandler(handler)
    said = [line for line in lines if line.startswith("attnreg: ")]
    assert len(said) == 1 and said[0].startswith("attnreg: validate: 8 explained, lfdr/sparsity ")
    assert "lfdr/comprehensiveness" in said[0] and "nan" not in said[0]
