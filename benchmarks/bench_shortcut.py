"""Does the monitor catch a model that cheats? Two models trained with the same seed and steps on the planted-shapes
data with a shortcut marker (``data.shortcut_size``): one whose training images leak the label through the marker's
colour (``leaked``), one whose marker colour is random (``random``). Both explain the same honest validation images
at every epoch; the validation markers carry a random colour, so the cue lies on most of them.

At each strength of reliance (``--honest``: how often the object, the honest feature, tells the truth on training
images; the lower, the more the leaked model leans on the cue), it prints, per epoch and model, the reliance measured
directly (accuracy on the validation images whose cue lies, and how often the prediction follows the cue there) and
the callback's keys for the marked region with their 95% intervals; then, per key and strength, the two models' last
values and the first epoch from which their intervals stay apart (``separated_from``; null if they never separate).

    python benchmarks/bench_shortcut.py                       # CPU, ~6 min on an idle 2-core machine
    python benchmarks/bench_shortcut.py --honest 1.0 0.8 0.6 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning import AttentionRegularizationCallback  # noqa: E402
from attnreg_lightning.data.shapes import ShapesDataModule, render  # noqa: E402
from attnreg_lightning.models import ViTClassifier  # noqa: E402

KEYS = (
    "raw/shortcut_mass",
    "lfdr/shortcut_mass",
    "lfdr/shortcut_kept",
    "raw/shortcut_percentile",
    "lfdr/shortcut_percentile",
    "shortcut/reliance",
    "same_k_random@shortcut/reliance",
)


def cue_reliance(module: ViTClassifier, data: ShapesDataModule) -> dict[str, float]:
    """Accuracy on the validation images whose cue lies, and how often the prediction follows the cue there."""
    module.eval()
    xs, ys = zip(*[(b[0], b[1]) for b in data.val_dataloader()], strict=True)
    with torch.no_grad():
        predicted = torch.cat([module(x).argmax(1) for x in xs])
    labels = torch.cat(ys)
    cues = torch.tensor(
        [render(data.spec, data.val_set.id_offset + i, train=False)["cue_class"] for i in range(len(labels))]
    )
    lies = cues != labels
    return {
        "acc": float((predicted == labels).float().mean()),
        "acc_when_cue_lies": float((predicted[lies] == labels[lies]).float().mean()),
        "follows_cue_when_it_lies": float((predicted[lies] == cues[lies]).float().mean()),
    }


class Reliance(L.Callback):
    """The direct measure at every validation run, beside the callback's keys."""

    def __init__(self, data: ShapesDataModule) -> None:
        self.data, self.rows = data, []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            training = pl_module.training
            self.rows.append(cue_reliance(pl_module, self.data))
            pl_module.train(training)


def train(args, honest: float, leak: float) -> list[dict]:
    L.seed_everything(args.seed, verbose=False)
    data = ShapesDataModule(
        train_size=args.train_size, val_size=args.val_size, batch_size=64, image_size=args.image_size,
        noise_squares=0, shortcut_size=8, shortcut_leak=leak, shortcut_honest=honest, seed=args.seed,
    )  # fmt: skip
    data.setup("fit")
    shape = {"img_size": args.image_size, "patch_size": 8, "depth": args.depth, "embed_dim": 96, "num_heads": 3}
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=4, lr=1e-3, warmup_fraction=0.05, model_kwargs=shape)
    callback = AttentionRegularizationCallback(
        n_bootstrap=args.n_bootstrap, num_images=args.val_size, log_images=0, sanity_check=False
    )
    direct = Reliance(data)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, direct],
        num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp(prefix="bench_shortcut_"),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    rows = []
    for epoch, (logged, measured) in enumerate(zip(callback.history, direct.rows, strict=True)):
        intervals = logged.get("intervals", {})
        row = {"epoch": epoch, **measured}
        for key in KEYS:
            value = logged.get(f"attnreg/{key}")
            row[key] = value
            row[f"{key}_ci95"] = intervals.get(f"attnreg/{key}")
        rows.append(row)
    return rows


def separated_from(leaked: list[dict], random: list[dict], key: str) -> int | None:
    """The first epoch from which the two models' intervals of ``key`` stay apart to the last epoch."""
    apart = []
    for a, b in zip(leaked, random, strict=True):
        ia, ib = a.get(f"{key}_ci95"), b.get(f"{key}_ci95")
        apart.append(ia is not None and ib is not None and (ia[0] > ib[1] or ib[0] > ia[1]))
    for epoch in range(len(apart)):
        if all(apart[epoch:]):
            return epoch
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--honest", type=float, nargs="+", default=[1.0, 0.6])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for honest in args.honest:
        runs = {}
        for name, leak in (("leaked", 1.0), ("random", 0.0)):
            start = time.perf_counter()
            runs[name] = train(args, honest, leak)
            for row in runs[name]:
                print(json.dumps({"honest": honest, "model": name, **row}), flush=True)
            print(json.dumps({"honest": honest, "model": name, "fit_seconds": round(time.perf_counter() - start)}))
        for key in KEYS:
            last = {name: runs[name][-1][key] for name in runs}
            summary = {"honest": honest, "key": key, **{f"{n}_last": v for n, v in last.items()}}
            summary["separated_from"] = separated_from(runs["leaked"], runs["random"], key)
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
