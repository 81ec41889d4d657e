"""Validate a tiny ViT with the callback on 1 or 2 CPU processes (DDP, gloo); rank 0 writes the metrics.

Run as a script (Lightning's DDP launcher re-executes it for each rank):
    python tests/ddp_run.py OUT.json --devices 2 [--uneven] [--first N] [--no-ids] [--log-images K]
or one process per rank, started as torchrun or SLURM start them (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``
... in each one's environment: Lightning then launches nothing); or, for one process, in the test's own process:
``main([OUT.json, "--first", "15"])``.

Each rank also writes ``OUT.rank<r>.json``, whether the run ends or raises: the sample ids its engine was called with,
the z-scores of each image's first null image, the captions of the pictures it sent to a logger, and, with a failure
injected (``--fail-at``), when it failed (``failed_at``), when the rank ended (``ended_at``) and its error.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import attnreg_lightning.callback as callback_module  # noqa: E402
import attnreg_lightning.engine as engine_module  # noqa: E402
from attnreg_lightning import AttentionRegularizationCallback  # noqa: E402
from attnreg_lightning.callback import default_batch_to_images  # noqa: E402
from tests.helpers import tiny_data, tiny_module  # noqa: E402


class Val(L.LightningDataModule):
    """The tiny validation set; ``uneven``: rank r validates on 4 * (3 - 2 r) images (rank 0 images 0-11,
    rank 1 images 12-15), so ranks see different numbers of batches; ``first``: only the first images."""

    def __init__(self, uneven: bool, first: int | None):
        super().__init__()
        self.inner = tiny_data(val_size=24, batch_size=4)
        self.uneven, self.first = uneven, first

    def setup(self, stage=None):
        self.inner.setup(stage)

    def val_dataloader(self):
        if self.uneven:
            start, count = (0, 12) if self.trainer.global_rank == 0 else (12, 4)
            return DataLoader(Subset(self.inner.val_set, range(start, start + count)), batch_size=4)
        return DataLoader(Subset(self.inner.val_set, range(self.first or 24)), batch_size=4)


class Recording(AttentionRegularizationCallback):
    """The callback, with a record of what its engine was asked and gave."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.record = {"ids": [], "first_nulls": [], "pictures": [], "failed_at": None, "error": None}

    def _record(self, trainer, job, reg):
        self.record["ids"] += list(job.ids)
        self.record["first_nulls"] += reg.significance.z_null[:, 0].tolist()
        return super()._record(trainer, job, reg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--uneven", action="store_true")
    ap.add_argument("--first", type=int)
    ap.add_argument("--no-ids", action="store_true", help="batches carry no sample ids; ranks see the same images")
    ap.add_argument("--log-images", type=int, default=0)
    ap.add_argument("--statistics", default="auto", choices=["auto", "inline", "background"])
    ap.add_argument("--on-error", default="warn", choices=["warn", "raise"])
    ap.add_argument("--fail-on-rank", type=int, help="fault injection: this rank fails where --fail-at says")
    ap.add_argument(
        "--fail-at",
        default="statistics",
        choices=["statistics", "sanity", "pictures"],
        help="each batch's statistics, the sanity check or the pictures' logging (rank 0 alone logs pictures)",
    )
    ap.add_argument("--sanity", action="store_true", help="after the validation, the sanity check (as explain.py)")
    args = ap.parse_args(argv)
    if argv is not None and args.devices != 1:
        raise ValueError("in-process runs are single-process: launch DDP as a script")
    L.seed_everything(0, verbose=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    failing = args.fail_at if args.fail_on_rank == rank else None

    def fail(*_args, **_kwargs):
        callback.record["failed_at"] = callback.record["failed_at"] or time.time()
        raise RuntimeError(f"{failing} failed on purpose")

    real_significance, real_randomization = engine_module.significance, callback_module.model_randomization
    if failing == "statistics":
        engine_module.significance = fail
    if failing == "sanity":
        callback_module.model_randomization = fail

    def without_ids(batch):
        view = default_batch_to_images(batch)
        view.ids = None
        return view

    callback = Recording(
        n_bootstrap=3,
        num_images=100,
        log_images=args.log_images,
        batch_to_images=without_ids if args.no_ids else None,
        statistics=args.statistics,
        on_error=args.on_error,
        sanity_draws=2,
    )
    real_log_pictures = callback_module.log_pictures

    def log_pictures(loggers, rows, *rest, **kw):
        callback.record["pictures"] += [r.caption for r in rows]
        if failing == "pictures":
            fail()
        return real_log_pictures(loggers, rows, *rest, **kw)

    callback_module.log_pictures = log_pictures
    try:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy="ddp" if args.devices > 1 else "auto",
            callbacks=[callback],
            logger=CSVLogger(Path(args.out).parent, name="csv") if args.log_images else False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=not (args.uneven or args.no_ids),
        )
        module = tiny_module()
        (metrics,) = trainer.validate(module, Val(args.uneven, args.first), verbose=False)
        if args.sanity:
            callback.sanity_check(module)
    except BaseException as err:
        callback.record["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:  # an in-process run leaves the modules as it found them
        callback_module.log_pictures = real_log_pictures
        callback_module.model_randomization = real_randomization
        engine_module.significance = real_significance
        callback.record["ended_at"] = time.time()
        Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(callback.record))
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
