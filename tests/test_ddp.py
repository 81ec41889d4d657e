"""Real DDP: two CPU processes (gloo) against one process over the same validation images (the one-process
references run in the test's own process: the same script, no interpreter to launch)."""

import json
import os
import socket
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
    args = ["--devices", "2", "--statistics", "background", "--on-error", "raise", "--fail-on-rank", "1"]
    # a hang (the other rank waiting in a collective) would end in TimeoutExpired
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out.json"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "statistics failed on purpose" in proc.stderr


def _each_rank_its_own_process(tmp_path: Path, name: str, *args: str) -> list[tuple[int, str, dict]]:
    """Two ranks, each started on its own as torchrun or SLURM start them: no Lightning launcher watches them (it
    kills every rank once a child rank fails), so a rank left waiting in a collective would wait. Each rank's exit
    code, stderr and record (``ddp_run``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{name}.json"
    procs, logs = [], [tmp_path / f"{name}.rank{rank}.stderr" for rank in (0, 1)]
    for rank, log in enumerate(logs):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": str(rank)}  # fmt: skip
        command = [sys.executable, str(SCRIPT), str(out), "--devices", "2", *args]
        with open(log, "w") as stderr:  # a file, not a pipe: a rank that fills a pipe no one reads would stall
            procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stderr=stderr))
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            proc.kill()
    return [
        (proc.returncode, log.read_text(), _record(tmp_path, name, r))
        for r, (proc, log) in enumerate(zip(procs, logs, strict=True))
    ]


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_one_rank_failing_with_on_error_warn_is_warned_there_and_every_rank_goes_on(tmp_path, statistics):
    ranks = _each_rank_its_own_process(tmp_path, "warn", "--statistics", statistics, "--fail-on-rank", "1")
    for rank, (code, stderr, _) in enumerate(ranks):
        assert code == 0, (rank, stderr[-3000:])
    # rank 1's own warning names its error (rank 0 has no word of it); its images are counted as failed
    assert "could not explain 4 image(s) of validation batch 0 on rank 1: statistics failed on purpose" in ranks[1][1]
    assert "failed on purpose" not in ranks[0][1]
    metrics = json.loads((tmp_path / "warn.json").read_text())
    assert (metrics["attnreg/explained"], metrics["attnreg/skipped_error"]) == (12, 12)


@pytest.mark.parametrize(
    ("failing", "where", "args"),
    [
        (1, "statistics", ["--statistics", "inline"]),  # a batch's statistics: the run's end decides
        (1, "statistics", ["--statistics", "background"]),
        (0, "pictures", ["--log-images", "1"]),  # rank 0 alone logs pictures, after the run's collectives
        (1, "sanity", ["--sanity"]),  # the sanity check's reduction
    ],
    ids=["statistics-inline", "statistics-background", "pictures-rank0", "sanity"],
)
def test_one_rank_failing_with_on_error_raise_stops_every_rank_promptly_with_its_error(tmp_path, failing, where, args):
    ranks = _each_rank_its_own_process(
        tmp_path, "raise", "--on-error", "raise", "--fail-on-rank", str(failing), "--fail-at", where, *args
    )
    failed_at = ranks[failing][2]["failed_at"]
    assert failed_at is not None
    message = f"{where} failed on purpose"
    for rank, (code, stderr, record) in enumerate(ranks):
        assert code != 0, (rank, stderr[-3000:])
        # every rank raises the error itself, none a broken connection or a timeout of a collective it waited in
        if rank == failing:
            assert record["error"] == f"RuntimeError: {message}", rank
        else:
            assert record["error"] == f"RuntimeError: attnreg: rank {failing} failed, so every rank stops here: " \
                                      f"RuntimeError: {message}"  # fmt: skip
        # far below any process group's timeout (30 minutes): no rank waited for the failed one
        assert record["ended_at"] - failed_at < 60, rank
