"""Every code block of the README and docs/ runs as written, so none can go stale.

Python blocks are executed, each in a fresh namespace, in a temporary folder. Shell blocks: every ``python
train.py ...`` and ``python explain.py ...`` line is composed with the app's Hydra config (an unknown group option
or key fails there, as it would at the command line); what those runs do is tested in ``test_app_run.py``. Lines
for other programs (pip, pytest, srun, torchrun, wandb) are listed here by what they start with, so a new kind of
line fails until it is looked at.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from attnreg_lightning.config import register_configs
from attnreg_lightning.readers import _READERS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = ("pip ", "python3 -m venv", "source ", "WANDB_MODE=offline python -m pytest", "wandb ", "srun ", "torchrun ")
"""Shell lines not run here: installs and the test suite itself (CI runs those), and launchers of other machines."""


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(BLOCK.finditer(page.read_text())):
            if match.group(1) == language:
                found.append((f"{page.relative_to(ROOT)}#{i}", match.group(2)))
    return found


def test_the_pages_hold_code_blocks():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 3


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=[w for w, _ in blocks("python")])
def test_python_blocks_run(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    readers = list(_READERS)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    finally:
        _READERS[:] = readers  # a block may teach the engine a reader: the other tests must not see it


def _app_lines() -> list[tuple[str, str, list[str]]]:
    lines = []
    for where, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#") or line.startswith(NOT_RUN):
                continue
            words = shlex.split(line)
            words = words[next(i for i, w in enumerate(words) if w.endswith((".py", "python"))) :]
            if words[0] == "python":
                words = words[1:]
            assert words[0] in ("train.py", "explain.py"), f"{where}: a shell line this test does not know: {line}"
            lines.append((where, words[0].removesuffix(".py"), words[1:]))
    return lines


@pytest.mark.parametrize(("where", "app", "args"), _app_lines(), ids=[f"{w}:{' '.join(a)}" for w, _, a in _app_lines()])
def test_app_command_lines_compose(where, app, args):
    register_configs()
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if len(overrides) < len(args):  # a sweep: each job composes one value of each swept key
        overrides = [re.sub(r"=([^,\[]+),.*$", r"=\1", o) for o in overrides]
    # placeholders a reader fills in (a path, a time stamp, a host) compose as any string would
    overrides = [re.sub(r"<[^>]+>|\.\.\.", "X", o) for o in overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        compose(app, overrides=overrides)
