"""The one place that knows loggers: pictures, tables and histograms to W&B, TensorBoard and CSV.

Scalars go through ``LightningModule.log`` like any metric; this module handles what Lightning's logging
does not (images, per-image tables, histograms). Called on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

IMAGE_KEY = "attnreg/maps"
TABLE_KEY = "attnreg/images"
HIST_KEYS = ("attnreg/z_observed", "attnreg/z_null")


@dataclass
class PictureRow:
    """One explained image: its strip of panels, a caption and a row of per-image statistics."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    stats: dict[str, float] = field(default_factory=dict)


def log_pictures(
    loggers: list[Logger], rows: list[PictureRow], z_observed: Tensor, z_null: Tensor, step: int, epoch: int
) -> list[str]:
    """Send pictures to every logger that can take them; return the names of loggers that could not."""
    skipped = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _to_wandb(logger, rows, z_observed, z_null, step, epoch)
        elif isinstance(logger, TensorBoardLogger):
            _to_tensorboard(logger, rows, z_observed, z_null, step)
        elif isinstance(logger, CSVLogger):
            _to_png(Path(logger.log_dir) / "attnreg", rows, epoch)
        else:
            skipped.append(type(logger).__name__)
    return skipped


def warn_unknown(names: list[str]) -> None:
    rank_zero_warn(f"attnreg: logger(s) {sorted(set(names))} take scalars only; pictures are not logged to them")


def _to_wandb(logger: WandbLogger, rows, z_observed, z_null, step, epoch) -> None:
    import wandb

    # The table holds numbers only: images in it would be encoded and stored a second time.
    columns = ["epoch", *rows[0].stats] if rows else ["epoch"]
    table = wandb.Table(columns=columns, data=[[epoch, *r.stats.values()] for r in rows])
    images = [wandb.Image(r.image, caption=r.caption) for r in rows]
    logger.log_metrics(
        {
            IMAGE_KEY: images,
            TABLE_KEY: table,
            HIST_KEYS[0]: wandb.Histogram(z_observed.float().cpu().numpy()),
            HIST_KEYS[1]: wandb.Histogram(z_null.float().cpu().numpy()),
        },
        step=step,
    )


def _to_tensorboard(logger: TensorBoardLogger, rows, z_observed, z_null, step) -> None:
    writer = logger.experiment
    for i, r in enumerate(rows):
        writer.add_image(f"{IMAGE_KEY}/{i}", r.image, step, dataformats="HWC")
    writer.add_histogram(HIST_KEYS[0], z_observed.float().cpu(), step)
    writer.add_histogram(HIST_KEYS[1], z_null.float().cpu(), step)


def _to_png(folder: Path, rows, epoch) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        Image.fromarray(r.image).save(folder / f"epoch{epoch:03d}_image{i}.png")
