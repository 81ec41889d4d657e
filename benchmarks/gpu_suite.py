"""Everything the project measures on a GPU, in one command: JSON lines, nothing downloaded, ~5 minutes.

    python benchmarks/gpu_suite.py                 # on the first CUDA device
    python benchmarks/gpu_suite.py --device cpu    # the same sections at toy sizes (checks the script)

Sections (each prints one or more ``{"section": ...}`` lines; a failing section prints its error and the
suite goes on):

- ``env``: torch, timm and lightning versions and the device;
- ``cuda_tests``: ``pytest -m cuda`` (the statistics on the device against the CPU, the engine there);
- ``engine``: the engine against the forward floor, ViT-S/8 in bf16, 224 and 488 px x N = 1, 10, 50, B = 32
  (per-image ms, ratio, peak memory; see ``bench_engine.py``);
- ``stats_share``: six batches through the engine, interleaved: forwards alone (``observe``), statistics
  inline on the device (``__call__``) and in the background CPU thread (``submit``): the statistics' share of
  the engine's wall time each way, and ``significance()`` timed alone on the device;
- ``sync_check``: the batch hook with background statistics under ``set_sync_debug_mode("error")``;
- ``callback``: a real ``trainer.validate`` on one device, the default model and ViT-S/8 at 224 px, with the
  statistics inline and in the background: validation wall time with and without the callback, the hooks'
  time and the added wall time against the engine's forwards alone (see ``bench_callback.py``);
- ``faithfulness``: the engine alone against the engine and faithfulness ``kept`` / ``curves``, ViT-S/8 in bf16,
  224 px, B = 32, N = 10 (see ``bench_faithfulness.py``);
- ``app``: ``train.py trainer=gpu`` and a one-device DDP run (nccl) with small limits: exit code and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def emit(section: str, **row) -> None:
    print(json.dumps({"section": section, **row}), flush=True)


def run_command(section: str, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str:
    """Run ``cmd`` from the repository root; emit its exit code and wall time; return its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = "timeout", (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    row = {"name": name, "rc": rc, "wall_s": round(time.perf_counter() - start, 1)}
    if rc != 0:
        row["tail"] = out[-1500:]
    emit(section, **row)
    return out


def section_env(device: torch.device) -> None:
    import lightning
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit("env", device=name, torch=torch.__version__, timm=timm.__version__, lightning=lightning.__version__)


def section_cuda_tests(device: torch.device) -> None:
    tests = ["tests/test_cuda.py", "tests/test_bootstrap.py"]  # no other module's imports (hydra, wandb) needed
    out = run_command("cuda_tests", "pytest -m cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", *tests], 240)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out))
    emit("cuda_tests", **counts)


def section_engine(device: torch.device, quick: bool) -> None:
    import timm
    from bench_engine import measure

    sizes, ns, batch = ([32], [1, 2], 2) if quick else ([224, 488], [1, 10, 50], 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for size in sizes:
        model = timm.create_model("vit_small_patch8_224", img_size=size).to(device).eval()
        images = torch.randn(batch, 3, size, size, device=device)
        for n in ns:
            m = measure(model, images, n, dtype, chunk=256, repeats=2 if quick else 3)
            f, e = m["floor_s"], m["engine_s"]
            emit(
                "engine", model="vit_small_patch8_224", dtype=str(dtype).removeprefix("torch."), size=size, N=n,
                B=batch, floor_ms_per_image=round(f / batch * 1e3, 2), engine_ms_per_image=round(e / batch * 1e3, 2),
                engine_over_floor=round(e / f, 3), peak_mib_floor=m["floor_mib"] and round(m["floor_mib"]),
                peak_mib_engine=m["engine_mib"] and round(m["engine_mib"]),
            )  # fmt: skip


def section_stats_share(device: torch.device, quick: bool) -> None:
    import timm
    from bench_engine import timed

    from attnreg_lightning import AttentionRegularizer
    from attnreg_lightning.stats import significance

    size, n, batch, batches, rounds = (32, 2, 2, 3, 3) if quick else (224, 10, 32, 6, 5)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model = timm.create_model("vit_small_patch8_224", img_size=size).to(device).eval()
    images = torch.randn(batch, 3, size, size, device=device)
    engine = AttentionRegularizer(model, n_bootstrap=n, autocast_dtype=dtype)
    ids = [list(range(i * batch, (i + 1) * batch)) for i in range(batches)]

    def forwards():  # the floor: observe() alone, batch after batch
        for i in ids:
            engine.observe(images, i)

    def inline():  # __call__: statistics on the device, right after each batch's forwards
        for i in ids:
            engine(images, i)

    def background():  # submit(): statistics in the CPU thread while the device runs the next batch's forwards
        for future in [engine.submit(images, i) for i in ids]:
            future.result()

    obs, null = engine.observe(images, ids[0])
    inline(), background()  # warm-up (and the thread started)
    runs = {"forwards": [], "inline": [], "background": [], "significance": []}
    for _ in range(rounds):  # interleaved: drift hits all alike
        for name, fn in (("forwards", forwards), ("inline", inline), ("background", background)):
            runs[name].append(timed(fn, device))
        runs["significance"].append(timed(lambda: significance(obs, null), device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    emit(
        "stats_share", size=size, N=n, B=batch, batches=batches, rounds=rounds,
        forwards_only_ms=round(med["forwards"] * 1e3, 2), inline_ms=round(med["inline"] * 1e3, 2),
        background_ms=round(med["background"] * 1e3, 2),
        significance_alone_ms_per_batch=round(med["significance"] * 1e3, 2),
        inline_stats_share=round((med["inline"] - med["forwards"]) / med["inline"], 4),
        background_stats_share=round((med["background"] - med["forwards"]) / med["background"], 4),
    )  # fmt: skip
    engine.close()


def section_callback(device: torch.device, quick: bool) -> None:
    """Goal: in a steady epoch with background statistics, the callback's hooks (``hooks_over_forwards``) and the
    validation time it adds (``cost_over_forwards``) are at most 1.10x the engine's forwards, at both models."""
    try:
        import wandb  # noqa: F401

        logger = "wandb"
    except ImportError:
        logger = "csv"
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    cmd = [sys.executable, "benchmarks/bench_callback.py", "--accelerator", accelerator, "--logger", logger]
    models = ["default"] if quick else ["default", "vit_small_patch8_224"]
    if quick:
        cmd += ["--num-images", "4", "--n-bootstrap", "2", "--log-images", "2"]
    for model in models:
        for where in ("inline", "background"):
            out = run_command(
                "callback",
                f"bench_callback.py {model} {where}",
                [*cmd, "--model", model, "--statistics", where],
                240,
                env={"WANDB_MODE": "offline"},
            )
            for line in out.splitlines():
                if line.startswith("{"):
                    emit("callback", **json.loads(line))


def section_faithfulness(device: torch.device, quick: bool) -> None:
    """Goal: faithfulness ``kept`` with the default map at most 1.6x the engine's time at N = 10 (ViT-S/8, bf16)."""
    cmd = [sys.executable, "benchmarks/bench_faithfulness.py", "--device", str(device)]
    cmd += ["--batch", "4", "--rounds", "1"] if quick else ["--model", "vit_small_patch8_224", "--dtype", "bfloat16"]
    out = run_command("faithfulness", "bench_faithfulness.py", cmd, 300)
    for line in out.splitlines():
        if line.startswith("{"):
            emit("faithfulness", **json.loads(line))


def section_sync_check(device: torch.device) -> None:
    """Goal: no device-to-host synchronization inside the batch hook with background statistics (the CUDA test
    runs the hook under ``torch.cuda.set_sync_debug_mode("error")``)."""
    test = "tests/test_cuda.py::test_the_background_batch_hook_never_waits_for_the_device"
    out = run_command("sync_check", "batch hook under set_sync_debug_mode('error')", [sys.executable, "-m", "pytest",
                      "-q", "-m", "cuda", test], 240)  # fmt: skip
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out))
    emit("sync_check", **counts)


def section_app(device: torch.device, quick: bool) -> None:
    limits = [
        "logger=csv",
        "++trainer.max_epochs=1",
        "++trainer.limit_train_batches=4",
        "++trainer.limit_val_batches=2",
        "attnreg.num_images=16",
        "validate_best=false",
        "hydra.run.dir=" + str(Path(os.environ.get("TMPDIR", "/tmp")) / f"attnreg_gpu_suite_{os.getpid()}"),
    ]
    if device.type == "cuda":
        runs = {"train.py trainer=gpu": ["trainer=gpu"], "train.py trainer=ddp devices=1 (nccl)": ["trainer=ddp",
                "trainer.devices=1"]}  # fmt: skip
    else:
        runs = {"train.py trainer=cpu": ["trainer=cpu"]}
    if quick:
        limits += ["data.batch_size=8", "attnreg.num_images=4", "attnreg.n_bootstrap=2"]
    for name, overrides in runs.items():
        run_command("app", name, [sys.executable, "train.py", *overrides, *limits], 240)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["env", "cuda_tests", "sync_check", "engine", "stats_share", "callback", "faithfulness", "app"],
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu to check the suite at toy sizes")
    quick = device.type != "cuda"
    start = time.perf_counter()
    sections = {
        "env": lambda: section_env(device),
        "cuda_tests": lambda: section_cuda_tests(device),
        "sync_check": lambda: section_sync_check(device),
        "engine": lambda: section_engine(device, quick),
        "stats_share": lambda: section_stats_share(device, quick),
        "callback": lambda: section_callback(device, quick),
        "faithfulness": lambda: section_faithfulness(device, quick),
        "app": lambda: section_app(device, quick),
    }
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            sections[name]()
        except Exception as err:  # one broken section must not hide the others' numbers
            emit(name, error=repr(err), traceback=traceback.format_exc()[-1500:])
        emit("timing", name=name, wall_s=round(time.perf_counter() - t0, 1))
    emit("timing", name="suite", wall_s=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
