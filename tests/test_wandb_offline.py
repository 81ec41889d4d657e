"""W&B for real, offline: the run's transaction log is read back from disk (no network, no account)."""

import json
import re
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from attnreg_lightning import AttentionRegularizationCallback
from attnreg_lightning.loggers import one_size
from tests.helpers import tiny_data, tiny_module
from tests.wandb_reader import history_rows


def _run_file(root: Path) -> Path:
    (found,) = root.glob("wandb/offline-run-*/run-*.wandb")
    return found


def test_reader_handles_records_split_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="reader", dir=tmp_path, mode="offline")
    run.log({"small": 1})
    run.log({"big": "x" * 100_000})  # ~3 blocks: FIRST, MIDDLE, LAST pieces
    run.log({"small": 2})
    run.finish()
    rows = history_rows(_run_file(tmp_path))
    assert [r.get("small") for r in rows] == [1, None, 2]
    assert rows[1]["big"] == "x" * 100_000


def test_callback_logs_metrics_images_table_and_histograms(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    before = set(Path(tempfile.gettempdir()).glob("attnreg-pictures-*"))
    given = []  # what each wandb.Image was made of
    init = wandb.Image.__init__

    def spy(self, data_or_path, *args, **kwargs):
        given.append(type(data_or_path).__name__)
        init(self, data_or_path, *args, **kwargs)

    monkeypatch.setattr(wandb.Image, "__init__", spy)
    logger = WandbLogger(project="attnreg-test", save_dir=str(tmp_path), offline=True)
    cb = AttentionRegularizationCallback(n_bootstrap=3, num_images=4, log_images=2)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb],
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,  # the report goes there, not into the working directory
    )
    trainer.fit(tiny_module(), tiny_data())
    wandb.finish()
    rows = history_rows(_run_file(tmp_path))
    scalar_rows = [r for r in rows if "attnreg/lfdr/sparsity" in r]
    assert len(scalar_rows) == 2
    for key in ("attnreg/pi0", "attnreg/lfdr/roi_f1", "attnreg/raw/roi_mass", "attnreg/null_srmsd"):
        assert all(isinstance(r[key], float) for r in scalar_rows), key
    picture_rows = [r for r in rows if "attnreg/maps/_type" in r]
    assert len(picture_rows) == 2  # one per validation epoch
    for r in picture_rows:
        assert r["attnreg/maps/_type"] == "images/separated"
        assert r["attnreg/maps/count"] == 2
        assert r["attnreg/images/_type"] == "table-file"
        assert r["attnreg/images/nrows"] == 2
        assert r["attnreg/z_observed/_type"] == "histogram"
        assert sum(r["attnreg/z_null/values"]) == 4 * 3 * 36  # explained images x N x tokens
        assert r["trainer/global_step"] in (2, 4)
        # the thresholded maps as toggleable mask overlays on the input
        assert r["attnreg/significance/_type"] == "images/separated" and r["attnreg/significance/count"] == 2
        assert "significance" in json.dumps(r["attnreg/significance/all_masks"])
        titles = r["attnreg/maps/captions"]
        assert all(c.startswith("id ") and "epoch " in c and "pi0" in c for c in titles)
    # the pictures went as PNG files written off the training thread: W&B holds the very pixels drawn, and the
    # files were deleted once taken
    run_dir = _run_file(tmp_path).parent / "files"
    last = picture_rows[-1]
    # (rows of a run whose widths differ, as their colour bars' labels do, go as arrays padded to one size)
    maps = one_size([r.image for r in cb._last_rows])
    for key, arrays in (("maps", maps), ("significance", [r.input for r in cb._last_rows])):
        logged = [np.asarray(Image.open(run_dir / name)) for name in last[f"attnreg/{key}/filenames"]]
        assert len(logged) == len(arrays) == 2
        assert all(np.array_equal(a, b) for a, b in zip(logged, arrays, strict=True)), key
    # 2 runs x 2 rows x (maps, overlay): overlays as files, maps as files or padded arrays; then the evolution's arrays
    assert given[-2:] == ["ndarray"] * 2 and given[:-2].count("str") >= 4 and len(given) == 10
    assert set(Path(tempfile.gettempdir()).glob("attnreg-pictures-*")) <= before
    (evolution,) = [r for r in rows if "attnreg/evolution/_type" in r]
    assert evolution["attnreg/evolution/count"] == 2
    # the end-of-fit report is a file of the run
    assert list(tmp_path.glob("wandb/*/files/attnreg_report.html"))


def test_a_run_that_links_media_gets_arrays_not_files_that_are_deleted(tmp_path, monkeypatch):
    """With ``allow_media_symlink`` W&B links a media file to the file it was given: the pictures' PNG files are
    deleted once logged, so such a run is given the arrays (its media are whole after the files are gone)."""
    from attnreg_lightning.loggers import log_pictures
    from attnreg_lightning.pictures import PictureRow, RunPictures

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(
        project="attnreg-test", save_dir=str(tmp_path), offline=True, settings=wandb.Settings(allow_media_symlink=True)
    )
    rng = np.random.default_rng(0)
    folder = tempfile.TemporaryDirectory()
    picture, base = (rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((20, 60, 3), (20, 20, 3)))
    files = {"image": Path(folder.name) / "image.png", "input": Path(folder.name) / "input.png"}
    Image.fromarray(picture).save(files["image"])
    Image.fromarray(base).save(files["input"])
    row = PictureRow(picture, "id 0", {"id": 0}, base, np.zeros((20, 20), np.uint8), files)
    run = RunPictures([row], torch.zeros(3), torch.zeros(6), folder)
    log_pictures([logger], run.rows, run.z_observed, run.z_null, 1, "epoch0")
    run.close()
    wandb.finish()
    (logged,) = [r for r in history_rows(_run_file(tmp_path)) if "attnreg/maps/_type" in r]
    media = _run_file(tmp_path).parent / "files" / logged["attnreg/maps/filenames"][0]
    assert not Path(folder.name).exists()
    assert np.array_equal(np.asarray(Image.open(media)), picture)


@pytest.mark.slow  # starts W&B's service process
def test_the_apps_wandb_run_and_its_report_warn_of_nothing(tmp_path, monkeypatch, capfd):
    """The app's W&B logger (conf/logger/wandb.yaml) starts its run without the ``anonymous`` setting wandb warns of
    (Lightning passes it to every run), and the report saved to the run twice (the fit's end, then after
    validate-best) is a copy of its own, updated, with no "call wandb.save again" warning."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from attnreg_lightning.loggers import log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    given = []  # what wandb.init was asked (its "anonymous" warning is said once a process: ask, not listen)
    init = wandb.init

    def spy(*args, **kwargs):
        given.append(kwargs)
        return init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "logger" / "wandb.yaml")
    node.save_dir = str(tmp_path)
    logger = instantiate(node, name="quiet", group="")
    capfd.readouterr()
    report = tmp_path / "checkpoints" / "attnreg_report.html"
    report.parent.mkdir()
    for version in ("fit", "validate-best"):
        report.write_text(f"<p>{version}</p>")
        log_report([logger], report)
    wandb.finish()
    (kwargs,) = given
    assert "anonymous" not in kwargs and kwargs["name"] == "quiet"
    # (a W&B session an earlier test of this process started may warn of its own: only the report's save is looked at)
    assert not re.search(r"(Symlinked|Linked|Copied) \d+ files?", capfd.readouterr().err)
    saved = _run_file(tmp_path).parent / "files" / "attnreg_report.html"
    assert not saved.is_symlink() and saved.read_text() == "<p>validate-best</p>"


def test_a_runs_pictures_of_different_sizes_reach_wandb_at_one_size_without_its_warning(tmp_path, monkeypatch, caplog):
    """The panels' widths follow their colour bars' labels, so a run's rows can differ by a few pixels; W&B shows a
    list of one size and warns of others ("Images sizes do not match"): they go padded with white."""
    from attnreg_lightning.loggers import log_evolution, log_pictures
    from attnreg_lightning.pictures import PictureRow

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="attnreg-test", save_dir=str(tmp_path), offline=True)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((20, 60, 3), (22, 57, 3))]
    rows = [PictureRow(p, f"id {i}", {"id": i}) for i, p in enumerate(pictures)]
    with caplog.at_level("WARNING"):
        log_pictures([logger], rows, torch.zeros(3), torch.zeros(6), 1, "epoch0")
        log_evolution([logger], [(p, f"id {i}") for i, p in enumerate(pictures)], 2, "attnreg")
    wandb.finish()
    assert not [r for r in caplog.records if "sizes do not match" in r.getMessage()]
    files = _run_file(tmp_path).parent / "files"
    for key in ("attnreg/maps", "attnreg/evolution"):
        (logged,) = [r for r in history_rows(_run_file(tmp_path)) if f"{key}/_type" in r]
        shown = [np.asarray(Image.open(files / name)) for name in logged[f"{key}/filenames"]]
        assert [a.shape for a in shown] == [(22, 60, 3)] * 2
        assert np.array_equal(shown[1][:, :57], pictures[1]) and (shown[1][:, 57:] == 255).all()
