"""``python train.py`` as a user runs it: subprocesses on CPU with tiny overrides."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.train_size=48",
    "data.val_size=16",
    "data.batch_size=16",
    "data.image_size=48",
    "model.model_kwargs.depth=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "attnreg.n_bootstrap=2",
    "attnreg.num_images=8",
    "attnreg.log_images=1",
]


def run_app(
    tmp_path: Path, *overrides: str, timeout: int = 420, script: str = "train.py"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One default ``python train.py`` (W&B offline) at the tiny size, shared by the tests that read it, resume it
    or explain its checkpoint: its folder and the finished process."""
    where = tmp_path_factory.mktemp("trained")
    proc = run_app(where, *TINY, f"hydra.run.dir={where / 'run'}")
    _ok(proc)
    return where / "run", proc


def test_train_writes_metrics_and_says_where_wandb_went(trained):
    run, proc = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/acc" in metrics and "attnreg/lfdr/sparsity" in metrics and "attnreg/topk/roi_f1" in metrics
    assert metrics["attnreg/explained"] == 8
    assert "wandb sync" in proc.stdout
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0
    assert list((run / "checkpoints").glob("*.ckpt"))
    # no warning of the app's own W&B settings: Lightning's "anonymous" (which wandb dropped) and the report saved to
    # the run by a link ("Symlinked 1 file ... call wandb.save again")
    assert "wandb: WARNING" not in proc.stderr, proc.stderr


def test_the_log_file_follows_the_run_without_a_console(trained):
    """stdout and stderr were pipes: train.log still has a line per epoch and per explained run (Lightning's notes
    reach it too)."""
    run, _ = trained
    log = (run / "train.log").read_text()
    assert len(re.findall(r"\] - epoch 0: .*val/acc [0-9.]+.* \(\d+ s\)$", log, re.M)) == 1, log
    assert len(re.findall(r"\] - attnreg: epoch0: 8 explained, lfdr/sparsity ", log)) == 1, log
    assert len(re.findall(r"\] - attnreg: validate: 8 explained", log)) == 1, log
    assert "] - validate: " in log and "attnreg: report written to" in log
    # nothing our own pictures cause: W&B warned (in the log) of a run's pictures of different sizes
    assert "][WARNING] - " not in log, log


def test_the_report_ends_with_the_validate_best_run_and_reads_right_in_a_browser(trained, tmp_path):
    """The report the app leaves (beside the checkpoints, and in the W&B run) is written after its last validation,
    the validate-best pass whose values metrics.json holds; as Chromium lays it out: one row per headline metric some
    run computed, values and intervals on one line, each picture's caption above it."""
    from attnreg_lightning.report import HEADLINE
    from tests import browser
    from tests.wandb_reader import history_rows

    run, _ = trained
    page = run / "checkpoints" / "attnreg_report.html"
    (in_wandb,) = run.glob("wandb/offline-run-*/files/attnreg_report.html")
    assert not in_wandb.is_symlink() and in_wandb.read_bytes() == page.read_bytes()
    if browser.chromium() is None:
        pytest.skip(browser.SKIP)
    shown = browser.measure(page, tmp_path)
    assert shown["runs"] == "2 explained run(s): epoch0, validate."
    # the rows: the keys some run computed, as the W&B run logged them (the fit's runs, its end's sanity check and the
    # validate-best pass, whose values metrics.json holds)
    metrics = json.loads((run / "metrics.json").read_text())
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = [
        {k: v for k, v in row.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        for row in history_rows(run_file)
    ]
    rows = {r[0]["text"]: r for r in shown["rows"]}
    computed = [f"attnreg/{k}" for k in HEADLINE if any(f"attnreg/{k}" in row for row in logged)]
    assert list(rows) == computed and "attnreg/sanity/raw_spearman" in rows
    assert "attnreg/shortcut/reliance" not in rows and "attnreg/raw/deletion_auc" not in rows  # not computed by default
    for key, (_, value, interval, meaning) in rows.items():
        if key in metrics:  # the validate-best pass's value
            assert value["text"] == f"{metrics[key]:.4g}", key
        else:  # the sanity check, run at the fit's end only: its value, said to be that run's
            assert key.startswith("attnreg/sanity/") and value["text"].endswith(" (epoch0)"), key
            assert value["text"].split()[0] == f"{[row[key] for row in logged if key in row][-1]:.4g}", key
        assert value["lines"] == 1 and interval["lines"] <= 1, (key, value, interval)
        assert meaning["text"] == HEADLINE[key.removeprefix("attnreg/")], key
    # every picture decoded, its caption just above it (below, it would read as the next picture's title)
    figures = shown["figures"]
    assert figures and all(f["image_width"] > 0 for f in figures)
    for previous, figure in zip([None, *figures], figures, strict=False):
        caption, image = figure["caption_box"], figure["image_box"]
        assert caption[3] <= image[1] <= caption[3] + 10, figure["caption"]
        if previous is not None:
            assert caption[1] - previous["image_box"][3] > image[1] - caption[3], figure["caption"]
    assert [f["caption"] for f in figures][-1].startswith("id ") and "· validate ·" in figures[-1]["caption"]


def test_a_hugging_face_dinov2_trains_with_maps_and_report_and_is_explained(tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.")]
    proc = run_app(
        tmp_path, *tiny, "model=hf_dinov2", "model.config.num_hidden_layers=2", f"hydra.run.dir={tmp_path}/r"
    )
    _ok(proc)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["attnreg/explained"] == 8 and 0 <= metrics["attnreg/lfdr/sparsity"] <= 1
    assert list((tmp_path / "r").glob("wandb/offline-run-*/files/media/images/attnreg/maps_*.png"))
    assert (tmp_path / "r" / "checkpoints" / "attnreg_report.html").is_file()
    # explain.py rebuilds the Hugging Face model from the checkpoint and explains its validation images
    ckpt = tmp_path / "r" / "checkpoints" / "last.ckpt"
    knobs = ["data.image_size=48", "attnreg.num_images=4", "attnreg.log_images=1", "attnreg.n_bootstrap=2"]
    proc = run_app(tmp_path, f"ckpt_path={ckpt}", *knobs, f"hydra.run.dir={tmp_path}/x", script="explain.py")
    _ok(proc)
    stats = json.loads((tmp_path / "x" / "explain_stats.json").read_text())
    assert len(stats) == 4 and all(0 <= s["lfdr/sparsity"] <= 1 for s in stats)
    with pytest.raises(ValueError, match="for a Hugging Face checkpoint explain a data= set instead"):
        _explain_in_process(tmp_path / "y", f"ckpt_path={ckpt}", f"images={tmp_path}")


def _explain_in_process(out: Path, *overrides: str) -> Path:
    """``explain.py`` with ``overrides``, in this process: its checks run before anything is explained."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import explain

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("explain", overrides=[*overrides, f"paths.output_dir={out}"])
    return explain.explain(cfg)


def test_ddp_cpu_runs_two_processes(tmp_path):
    proc = run_app(tmp_path, *TINY, "trainer=ddp_cpu", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}")
    _ok(proc)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["attnreg/explained"] == 16  # 8 images on each of 2 ranks


def test_two_nodes_launched_from_the_environment(tmp_path):
    """Multi-node DDP as a cluster launches it: one train.py per node, told where the master is and its node
    rank by environment variables; here two "nodes" on this machine, one CPU process each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(rank)}  # fmt: skip
        args = [*TINY, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "logger=csv",
                f"hydra.run.dir={tmp_path / f'node{rank}'}"]  # fmt: skip
        nodes.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outputs = [node.communicate(timeout=420) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-2000:] + err[-4000:]
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert metrics["attnreg/explained"] == 16  # 8 images on each of the 2 nodes' ranks
    assert not (tmp_path / "node1" / "metrics.json").exists()  # written by global rank 0 only


def _wandb_runs(folder: Path) -> list[dict]:
    from tests.wandb_reader import run_info

    return [run_info(f) for f in sorted(folder.glob("*/wandb/offline-run-*/run-*.wandb"))]


def test_multirun_sweeps_the_method_knobs_one_wandb_run_per_job(tmp_path):
    proc = run_app(tmp_path, "-m", "attnreg.method=normal,pixel", *TINY, f"hydra.sweep.dir={tmp_path / 'multi'}")
    _ok(proc)
    runs = sorted((tmp_path / "multi").glob("*/metrics.json"))
    assert len(runs) == 2
    sparsities = {json.loads(p.read_text())["attnreg/lfdr/sparsity"] for p in runs}
    assert len(sparsities) > 1  # the knob changes the maps
    # W&B, read back from disk: a run of its own per job, named by the swept key alone (not by the overrides every
    # job shares), in the sweep's group, holding the whole resolved experiment
    wandb_runs = _wandb_runs(tmp_path / "multi")
    assert len(wandb_runs) == 2 and "reuse this run" not in proc.stderr
    assert {r["config"]["attnreg"]["method"] for r in wandb_runs} == {"normal", "pixel"}
    for r in wandb_runs:
        assert r["name"] == f"attnreg.method={r['config']['attnreg']['method']}"
        assert r["group"] == "multi" and r["exit_code"] == 0
        assert r["config"]["data"]["train_size"] == 48 and r["config"]["seed"] == 0
        assert r["config"]["model"]["model_kwargs"]["depth"] == 2 and r["config"]["attnreg"]["n_bootstrap"] == 2
    # the end-of-run summary of each job names that job's own run
    printed = [line.split()[-1] for line in proc.stdout.splitlines() if "W&B run (offline):" in line]
    assert len(set(printed)) == 2


def test_a_bad_override_fails_fast_naming_the_key(tmp_path):
    """As a user sees it, from the app's own process; test_app_config.py checks the other kinds of bad override
    (typos, wrong types, unknown options) in-process."""
    proc = run_app(tmp_path, *TINY, "attnreg.p_th=1.5", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode != 0
    assert "attnreg.p_th" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


def test_image_folder_end_to_end(tmp_path):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "images", size=40)
    proc = run_app(
        tmp_path,
        *[o for o in TINY if not o.startswith("data.")],
        "data=image_folder",
        f"data.root={root}",
        "data.num_classes=2",
        "data.image_size=48",
        "data.batch_size=4",
        "data.num_workers=0",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    _ok(proc)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["attnreg/explained"] == 6  # every val image (3 per class), masks read from disk
    assert "attnreg/lfdr/roi_mass" in metrics


def test_optuna_preset_runs_trials_and_reports_the_best(tmp_path):
    proc = run_app(
        tmp_path,
        "hparams_search=attnreg_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        *[o for o in TINY if not o.startswith("attnreg.n_bootstrap")],
        f"hydra.sweep.dir={tmp_path / 'optuna'}",
    )
    _ok(proc)
    wandb_runs = _wandb_runs(tmp_path / "optuna")
    assert len(wandb_runs) == 2 and len({r["name"] for r in wandb_runs}) == 2
    results = (tmp_path / "optuna" / "optimization_results.yaml").read_text()
    for knob in ("attnreg.method", "attnreg.n_bootstrap", "attnreg.p_th", "attnreg.lfdr_th"):
        assert knob in results
    assert len(list((tmp_path / "optuna").glob("*/metrics.json"))) == 2


def test_resume_fit_from_a_checkpoint_through_the_app(tmp_path, trained):
    """A finished fit (1 epoch of 3 steps, its cosine over those 3 steps) resumed with trainer.max_epochs raised to 3:
    it trains two epochs more, on the checkpoint's optimizer, and its learning rate goes on along the first fit's
    cosine past its end: from 0 back up to model.lr in 3 steps, then down again (not planned anew over 9 steps). With
    max_epochs not raised it is refused, naming the key."""
    import csv

    import torch

    import train

    last = trained[0] / "checkpoints" / "last.ckpt"
    cfg = _compose_train(f"ckpt_path={last}", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'refused'}")
    with pytest.raises(ValueError, match=r"has trained 1 epoch\(s\) and trainer\.max_epochs=1: nothing is left"):
        train.train(cfg)
    assert not (tmp_path / "refused").exists()
    proc = run_app(
        tmp_path,
        *[o for o in TINY if o != "trainer.max_epochs=1"],
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=1",
        f"ckpt_path={last}",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'resumed'}",
    )
    _ok(proc)
    assert "Resuming" in proc.stderr and "trainer.max_epochs=3" in proc.stderr and "not planned anew" in proc.stderr
    first = torch.load(last, weights_only=False)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 3  # trained on: epochs 1 and 2
    assert first["global_step"] == 3 and state["global_step"] == 9
    (adam,) = state["optimizer_states"]
    assert {int(s["step"]) for s in adam["state"].values()} == {9}  # the optimizer's moments carried on
    lr = 1e-3  # model.lr
    logged = list(csv.DictReader(open(tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv")))
    rates = {int(r["step"]): float(r["lr-AdamW"]) for r in logged if r.get("lr-AdamW")}
    # step 3 at the finished schedule's last rate, then lr (1 - cos(pi k / 3)) / 2 for k steps past its end
    expected = {3 + k: lr * (1 - np.cos(np.pi * k / 3)) / 2 for k in range(6)}
    assert rates.keys() == expected.keys()
    assert [rates[s] for s in sorted(rates)] == pytest.approx([expected[s] for s in sorted(expected)], abs=1e-12)
    assert rates[3] == 0 and rates[6] == pytest.approx(lr) and rates[8] < rates[7] < rates[6]  # up, then down
    (cb_first,) = [v for k, v in first["callbacks"].items() if "AttentionRegularizationCallback" in k]
    (cb_state,) = [v for k, v in state["callbacks"].items() if "AttentionRegularizationCallback" in k]
    assert cb_state["validation_runs"] == 3 and cb_state["explained_total"] == 24  # the count carried over
    assert cb_state["history"][:1] == cb_first["history"]  # the first run's logged values, kept


def _compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_explain_a_checkpoint_on_its_validation_images_and_on_a_folder(tmp_path, trained):
    from PIL import Image

    from attnreg_lightning import AttnRegConfig
    from tests.test_pictures import _panels

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    knobs = ["data.image_size=48", "attnreg.num_images=6", "attnreg.log_images=2", "attnreg.n_bootstrap=3"]
    proc = run_app(tmp_path, f"ckpt_path={ckpt}", *knobs, f"hydra.run.dir={tmp_path / 'val'}", script="explain.py")
    _ok(proc)
    # the CSV logger has a folder of its own: in the run folder, beside Hydra's files, it warned it deletes files
    assert "will be deleted" not in proc.stderr, proc.stderr
    out = tmp_path / "val"
    stats = json.loads((out / "explain_stats.json").read_text())
    assert len(stats) == 6 and all(0 <= s["lfdr/sparsity"] <= 1 for s in stats)
    assert len({s["id"] for s in stats}) == 6
    assert len(list((out / "csv" / "attnreg").glob("*_validate_image*.png"))) == 2
    assert "attnreg/lfdr/roi_kept" in (out / "attnreg_report.html").read_text()

    # a folder: squares, and two files of other aspects in three bands (red, green, blue) each, the green one in the
    # middle square and a margin wide: what the model sees of them (their middle square, aspect kept), and that it
    # is said; every picture and picture file named by its file
    folder = tmp_path / "pngs" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(folder / f"x{i}.png")
    bands = np.zeros((60, 120, 3), np.uint8)
    bands[:, :20], bands[:, 20:100], bands[:, 100:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(bands).save(tmp_path / "pngs" / "wide one.png")
    Image.fromarray(bands.transpose(1, 0, 2)[:100]).save(tmp_path / "pngs" / "tall.png")  # 60 x 100, bands 20/60/20
    folder_knobs = ["data.image_size=48", "attnreg.num_images=7", "attnreg.log_images=7", "attnreg.n_bootstrap=3"]
    proc = run_app(
        tmp_path,
        f"ckpt_path={ckpt}",
        f"images={tmp_path / 'pngs'}",
        *folder_knobs,
        "batch_size=2",
        f"hydra.run.dir={tmp_path / 'folder'}",
        script="explain.py",
    )
    _ok(proc)
    assert "will be deleted" not in proc.stderr, proc.stderr
    names = [f"nested/x{i}.png" for i in range(5)] + ["tall.png", "wide one.png"]
    stats = json.loads((tmp_path / "folder" / "explain_stats.json").read_text())
    assert [Path(s["path"]).relative_to(tmp_path / "pngs").as_posix() for s in stats] == names  # every file, in order
    assert [(s["size"], s["crop_box"]) for s in stats[-2:]] == [
        ([60, 100], [0, 20, 60, 80]),
        ([120, 60], [30, 0, 90, 60]),
    ]
    assert all(s["crop_box"] == [0, 0, 60, 60] for s in stats[:5])
    assert "2 of the explained images are not square" in proc.stderr
    assert (
        "tall.png (60x100: the middle 60x60)" in proc.stderr
        and "wide one.png (120x60: the middle 60x60)" in proc.stderr
    )
    pictures = tmp_path / "folder" / "csv" / "attnreg"
    files = ["nested_x0", "nested_x1", "nested_x2", "nested_x3", "nested_x4", "tall", "wide_one"]
    assert sorted(p.name for p in pictures.glob("*.png")) == sorted(f"step0000000_validate_{n}.png" for n in files)
    page = (tmp_path / "folder" / "attnreg_report.html").read_text()
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert [c.split(" · ")[0] for c in captions] == names and all(" · validate · " in c for c in captions)
    panels = 5 + len(AttnRegConfig().maps)  # input, raw, z, -log10 p, local FDR, each map
    for name in ("tall", "wide_one"):  # the input as drawn: the green middle, neither squashed nor another part
        picture = np.asarray(Image.open(pictures / f"step0000000_validate_{name}.png").convert("RGB")).astype(int)
        x0, x1, y0, y1 = _panels(picture, panels)[0]
        shown = picture[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3)
        assert (shown[:, 1] > 200).all() and (shown[:, [0, 2]] < 60).all(), name

    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*no such file"):
        _explain_in_process(tmp_path / "bad", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    (tmp_path / "not_a.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a checkpoint of attnreg_lightning's ViTClassifier"):
        _explain_in_process(tmp_path / "bad2", f"ckpt_path={tmp_path / 'not_a.ckpt'}")
