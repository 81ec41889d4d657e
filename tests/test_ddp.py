"""Real DDP: two CPU processes (gloo) against one process over the same validation images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_run.py")
ROOT = SCRIPT.parents[1]


def _run(tmp_path: Path, name: str, *args: str, stderr: list | None = None) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
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


def test_ddp_reports_what_one_process_reports(tmp_path):
    single = _run(tmp_path, "single", "--devices", "1")
    printed = []
    ddp = _run(tmp_path, "ddp", "--devices", "2", stderr=printed)
    # values already reduced by torchmetrics: Lightning has nothing to warn about (it did, once per key)
    assert "sync_dist=True" not in printed[0]
    keys = {k for k in single if k.startswith("attnreg/")}
    assert {"attnreg/lfdr/sparsity", "attnreg/pi0", "attnreg/null_srmsd", "attnreg/topk/roi_f1"} <= keys
    assert keys == {k for k in ddp if k.startswith("attnreg/")}
    assert ddp["attnreg/explained"] == single["attnreg/explained"] == 24
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


def test_ddp_finishes_when_ranks_see_different_numbers_of_batches(tmp_path):
    uneven = _run(tmp_path, "uneven", "--devices", "2", "--uneven")
    assert uneven["attnreg/explained"] == 16  # 12 on rank 0 + 4 on rank 1
    assert 0 <= uneven["attnreg/lfdr/sparsity"] <= 1
