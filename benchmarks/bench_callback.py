"""Callback overhead beyond the engine's own compute: batch reading, metrics, pictures and logging.

A real ``trainer.validate`` of the default app model (ViT-tiny, 8-px patches, 64-px planted shapes) or of
ViT-S/8 at 224 px (``--model vit_small_patch8_224``) with the callback and a W&B offline logger (pictures on).
Per validation epoch it prints: time inside the callback's hooks minus time inside the engine, over the engine
time (``overhead_over_engine``); and against the engine's forward passes alone, timed right after on the same
images (``observe``, device synchronized): the hooks' wall time (``hooks_over_forwards``) and what turning the
callback on adds to the validation's wall time (``cost_over_forwards``). On a GPU with background statistics
``submit`` returns once the forwards are launched, so the hooks' time is the training thread's, and the
validation's added wall time is what the user pays. Two validation epochs are timed separately: the first also
pays one-time costs (wandb's lazy imports), the second is what every later epoch costs.
Run: ``python benchmarks/bench_callback.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning import AttentionRegularizationCallback  # noqa: E402
from attnreg_lightning.data.shapes import ShapesDataModule  # noqa: E402
from attnreg_lightning.models import ViTClassifier  # noqa: E402


class Stopwatch:
    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class TimedCallback(AttentionRegularizationCallback):
    """The callback with its hooks and its engine timed separately."""

    def __init__(self, **knobs) -> None:
        super().__init__(**knobs)
        self.hooks, self.engine_time = Stopwatch(), Stopwatch()
        for name in ("on_validation_epoch_start", "on_validation_batch_end", "on_validation_epoch_end"):
            setattr(self, name, self.hooks.wrap(getattr(self, name)))

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        self.engine = TimedEngine(self.engine, self.engine_time)


class TimedEngine:
    """The engine, its calls timed: ``__call__`` whole; ``submit`` up to the forwards' launch (its statistics run
    in the background thread, so the hooks' time beyond it is what the training thread pays)."""

    def __init__(self, engine, watch: Stopwatch) -> None:
        self.engine, self.call, self.submit = engine, watch.wrap(engine), watch.wrap(engine.submit)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def time_forwards(engine, data, device) -> float:
    """The engine's forward passes alone over the explained images, batch by batch, device synchronized."""
    batches = [(batch[0].to(device), batch[3].tolist()) for batch in data.val_dataloader()]  # (x, y, mask, id, ...)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for images, ids in batches:
        engine.observe(images, ids)
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--log-images", type=int, default=8)
    ap.add_argument("--accelerator", default="cpu", help="cpu or gpu (one device)")
    ap.add_argument("--logger", default="wandb", choices=["wandb", "csv"], help="csv where wandb is not installed")
    ap.add_argument("--statistics", default="auto", choices=["auto", "inline", "background"])
    ap.add_argument("--model", default="default", choices=["default", "vit_small_patch8_224"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--faithfulness", default="off", choices=["off", "kept", "curves"], help="its extra forwards")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0)
        if args.model == "default":
            size, model = 64, ViTClassifier(num_classes=4, model_kwargs={"img_size": 64, "patch_size": 8, "depth": 6})
        else:
            size, model = 224, ViTClassifier(args.model, num_classes=4)
        data = ShapesDataModule(train_size=64, val_size=args.num_images, batch_size=args.batch_size, image_size=size)
        knobs = {"n_bootstrap": args.n_bootstrap, "num_images": args.num_images, "log_images": args.log_images}
        cb = TimedCallback(**knobs, statistics=args.statistics, faithfulness=args.faithfulness)
        if args.logger == "wandb":
            logger = WandbLogger(project="attnreg-bench", save_dir=tmp, offline=True)
        else:
            logger = CSVLogger(tmp)
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            logger=logger,
            callbacks=[cb],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        bare = L.Trainer(
            accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        for epoch in ("first", "steady"):
            cb.hooks.seconds = cb.engine_time.seconds = 0.0
            start = time.perf_counter()
            trainer.validate(model, data, verbose=False)
            with_callback = time.perf_counter() - start
            start = time.perf_counter()
            bare.validate(model, data, verbose=False)
            without = time.perf_counter() - start
            engine, hooks = cb.engine_time.seconds, cb.hooks.seconds
            forwards = time_forwards(cb.engine.engine, data, model.device)
            row = {
                "epoch": epoch, "accelerator": args.accelerator, "logger": args.logger,
                "statistics": args.statistics, "images": args.num_images, "N": args.n_bootstrap,
                "log_images": args.log_images, "validate_s": round(with_callback, 3),
                "validate_without_callback_s": round(without, 3), "engine_s": round(engine, 3),
                "callback_hooks_s": round(hooks, 3), "overhead_over_engine": round((hooks - engine) / engine, 4),
                "model": args.model, "faithfulness": args.faithfulness, "forwards_s": round(forwards, 3),
                "hooks_over_forwards": round(hooks / forwards, 3),
                "cost_over_forwards": round((with_callback - without) / forwards, 3),
            }  # fmt: skip
            print(json.dumps(row), flush=True)
        if args.logger == "wandb":
            import wandb

            wandb.finish()


if __name__ == "__main__":
    main()
