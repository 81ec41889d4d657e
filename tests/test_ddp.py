"""Real DDP: two CPU processes (gloo) against one process over the same validation images (the one-process
references run in the test's own process: the same script, no interpreter to launch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("ddp_run.py")
ROOT = SCRIPT.parents[1]


def _run(tmp_path: Path, name: str, *args: str, stderr: list | None = None) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", "2", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if stderr is not None:
        stderr.append(proc.stderr)
    return json.loads(out.read_text())


def _single(tmp_path: Path, name: str, *args: str) -> dict:
    """The one-process reference, in this process."""
    from tests import ddp_run

    out = tmp_path / f"{name}.json"
    ddp_run.main([str(out), *args])
    return json.loads(out.read_text())


def _record(tmp_path: Path, name: str, rank: int) -> dict | None:
    path = tmp_path / f"{name}.json.rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _assert_same_metrics(a: dict, b: dict) -> None:
    keys = {k for k in a if k.startswith("attnreg/")}
    assert {"attnreg/lfdr/sparsity", "attnreg/pi0", "attnreg/null_srmsd", "attnreg/topk/roi_f1"} <= keys
    faithful = {"attnreg/lfdr/comprehensiveness", "attnreg/same_k_random@lfdr/sufficiency"}
    assert faithful | {"attnreg/fixed_k_top@lfdr/comprehensiveness"} <= keys  # faithfulness: kept
    assert keys == {k for k in b if k.startswith("attnreg/")}
    for key in keys:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_ddp_reports_what_one_process_reports(tmp_path):
    single = _single(tmp_path, "single")
    printed = []
    ddp = _run(tmp_path, "ddp", stderr=printed)
    # values already reduced by torchmetrics: Lightning has nothing to warn about (it did, once per key)
    assert "sync_dist=True" not in printed[0]
    assert ddp["attnreg/explained"] == single["attnreg/explained"] == 24
    _assert_same_metrics(ddp, single)


def test_a_padded_distributed_sampler_explains_each_image_once(tmp_path):
    """15 images on 2 ranks: the sampler repeats one so both get 8; the repeat is not explained again."""
    ddp = _run(tmp_path, "ddp", "--first", "15")
    (tmp_path / "single").mkdir()
    single = _single(tmp_path / "single", "single", "--first", "15")
    ids = _record(tmp_path, "ddp", 0)["ids"] + _record(tmp_path, "ddp", 1)["ids"]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 15
    assert ddp["attnreg/explained"] == single["attnreg/explained"] == 15
    _assert_same_metrics(ddp, single)


def test_uneven_ranks_report_what_one_process_over_their_images_reports_and_rank_zero_draws(tmp_path):
    uneven = _run(tmp_path, "uneven", "--uneven", "--log-images", "2")
    assert uneven["attnreg/explained"] == 16  # 12 on rank 0 + 4 on rank 1
    (tmp_path / "single").mkdir()
    single = _single(tmp_path / "single", "single", "--first", "16")
    _assert_same_metrics(uneven, single)
    ranks = [_record(tmp_path, "uneven", r) for r in (0, 1)]
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == sorted(_record(tmp_path / "single", "single", 0)["ids"])
    # pictures come from rank 0 only, once: two rows, two PNGs in the run
    assert len(ranks[0]["pictures"]) == 2 and ranks[1]["pictures"] == []
    assert len(list(tmp_path.glob("csv/**/*.png"))) == 2


def test_ddp_without_ids_gives_each_rank_its_own_nulls(tmp_path):
    _run(tmp_path, "no_ids", "--no-ids")
    ranks = [_record(tmp_path, "no_ids", r) for r in (0, 1)]
    # both ranks explain the same 24 images: the ids they make up must differ, and so must the nulls
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 24
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    for a, b in zip(ranks[0]["first_nulls"], ranks[1]["first_nulls"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 0.1


def test_background_statistics_in_ddp_report_what_one_inline_process_reports(tmp_path):
    single = _single(tmp_path, "single", "--statistics", "inline")
    ddp = _run(tmp_path, "ddp", "--statistics", "background")
    assert ddp["attnreg/explained"] == 24
    _assert_same_metrics(ddp, single)


def test_a_failing_statistics_thread_on_one_rank_stops_the_run_with_its_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    args = ["--devices", "2", "--statistics", "background", "--on-error", "raise", "--fail-statistics-on-rank", "1"]
    # a hang (the other rank waiting in a collective) would end in TimeoutExpired
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out.json"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "statistics failed on purpose" in proc.stderr
