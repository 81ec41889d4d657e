"""The one place that knows loggers: pictures, tables and histograms to W&B, TensorBoard and CSV.

Scalars go through ``LightningModule.log`` like any metric; this module handles what Lightning's logging
does not (images, per-image tables, histograms). Called on rank 0 only.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from attnreg_lightning.pictures import PictureRow
from attnreg_lightning.viz import MASK_CLASSES

# under the callback's prefix
IMAGE_KEY, TABLE_KEY, HIST_KEYS = "maps", "images", ("z_observed", "z_null")
MASK_KEY, EVOLUTION_KEY = "significance", "evolution"


def route_lightning_logs() -> None:
    """Send Lightning's log records (its notes, the callback's line per explained run) to the root logger's handlers,
    which an app configures (Hydra: the console and the run's ``<task>.log``): Lightning gives its logger a console
    handler of its own and stops its records there when imported before the app configures logging, which left the
    log file empty."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):  # Fabric's notes: seeds, the process group
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


class EpochLine(Callback):
    """One log line per validation of a fit (rank 0): the epoch, the validation's ``val/*`` values and the time
    since the fit started, so a log file follows a run whether or not a console shows its progress bar.

    Example::

        trainer = L.Trainer(callbacks=[EpochLine()])
    """

    def __init__(self) -> None:
        self._start = time.monotonic()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        # (the training values are not the epoch's yet: validation runs before the training epoch ends)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        said = ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        stage = f"epoch {trainer.current_epoch}" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value
        logging.getLogger("lightning.pytorch").info(
            f"{stage}: {said or 'no values'} ({time.monotonic() - self._start:.0f} s)"
        )


class WandbAppLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that gives ``wandb.init`` no ``anonymous`` setting unless one is asked for: Lightning
    passes ``anonymous=None`` to every run, and wandb (0.23 on, anonymous mode removed) warns at each run that the
    setting has no effect."""

    def __init__(self, *args, anonymous: bool | None = None, **kwargs) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if anonymous is None:
            del self._wandb_init["anonymous"]


def log_pictures(
    loggers: list[Logger],
    rows: list[PictureRow],
    z_observed: Tensor,
    z_null: Tensor,
    step: int,
    stage: str,
    prefix: str = "attnreg",
) -> list[str]:
    """Send pictures to every logger that can take them; return the names of loggers that could not.

    ``stage`` says which validation run they come from (``epoch3``, or ``validate`` for a ``trainer.validate``
    after fit); PNG files are named by global step and stage, so no run overwrites another's.
    """
    skipped = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _to_wandb(logger, rows, z_observed, z_null, step, stage, prefix)
        elif isinstance(logger, TensorBoardLogger):
            _to_tensorboard(logger, rows, z_observed, z_null, step, prefix)
        elif isinstance(logger, CSVLogger):
            _to_png(Path(logger.log_dir) / prefix, rows, f"step{step:07d}_{stage}")
        else:
            skipped.append(type(logger).__name__)
    return skipped


def wants_png(loggers: list[Logger]) -> bool:
    """Whether a logger takes the pictures as PNG files (W&B, CSV): then they are encoded where they are drawn."""
    return any(isinstance(logger, (WandbLogger, CSVLogger)) for logger in loggers)


def warn_unknown(names: list[str]) -> None:
    rank_zero_warn(f"attnreg: logger(s) {sorted(set(names))} take scalars only; pictures are not logged to them")


def log_evolution(loggers: list[Logger], pictures: list[tuple[np.ndarray, str]], step: int, prefix: str) -> None:
    """The end-of-fit evolution pictures (``(uint8 [H, W, 3], caption)``) to every logger that takes images."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            padded = one_size([image for image, _ in pictures])
            images = [wandb.Image(image, caption=caption) for image, (_, caption) in zip(padded, pictures, strict=True)]
            logger.log_metrics({f"{prefix}/{EVOLUTION_KEY}": images}, step=step)
        elif isinstance(logger, TensorBoardLogger):
            for i, (image, _) in enumerate(pictures):
                logger.experiment.add_image(f"{prefix}/{EVOLUTION_KEY}/{i}", image, step, dataformats="HWC")
        elif isinstance(logger, CSVLogger):
            rows = [PictureRow(image, caption) for image, caption in pictures]
            _to_png(Path(logger.log_dir) / prefix, rows, EVOLUTION_KEY)


def log_report(loggers: list[Logger], path: Path) -> None:
    """The HTML report as a file of the W&B run (the others find it beside the checkpoints); saved again, the run
    holds the report as it is now."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            # a copy of its own in the run's folder: wandb.save of a file outside it links the file and warns that a
            # later change needs another save (a link would also break when the run folder moves)
            run = logger.experiment
            copy = Path(run.dir) / path.name
            shutil.copyfile(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")


def _to_wandb(logger: WandbLogger, rows, z_observed, z_null, step, stage, prefix) -> None:
    import wandb

    # The table holds numbers only: images in it would be encoded and stored a second time.
    columns = ["stage", *rows[0].stats] if rows else ["stage"]
    table = wandb.Table(columns=columns, data=[[stage, *r.stats.values()] for r in rows])
    # a W&B run that links media to their files instead of copying them would link to files deleted once logged
    files = any(r.files for r in rows) and not getattr(logger.experiment.settings, "allow_media_symlink", False)
    if len({r.image.shape for r in rows}) > 1:  # W&B shows a list of images of one size (and warns of others)
        images = [
            wandb.Image(a, caption=r.caption) for a, r in zip(one_size([r.image for r in rows]), rows, strict=True)
        ]
    else:
        images = [wandb.Image(_file_or_array(r, "image", files), caption=r.caption) for r in rows]
    # the thresholded maps as toggleable overlays on the input (W&B's mask viewer); continuous maps above. The mask
    # goes as an array: given as a file, W&B would drop its class labels
    overlays = [
        wandb.Image(
            _file_or_array(r, "input", files),
            caption=r.caption,
            masks={"significance": {"mask_data": r.mask, "class_labels": MASK_CLASSES}},
        )
        for r in rows
        if r.mask is not None
    ]
    media = {f"{prefix}/{MASK_KEY}": overlays} if overlays else {}
    logger.log_metrics(
        {
            **media,
            f"{prefix}/{IMAGE_KEY}": images,
            f"{prefix}/{TABLE_KEY}": table,
            f"{prefix}/{HIST_KEYS[0]}": wandb.Histogram(z_observed.float().cpu().numpy()),
            f"{prefix}/{HIST_KEYS[1]}": wandb.Histogram(z_null.float().cpu().numpy()),
        },
        step=step,
    )


def one_size(images: list[np.ndarray]) -> list[np.ndarray]:
    """``uint8 [H, W, 3]`` pictures padded with white, at the bottom and right, to the largest height and width: the
    panels' widths follow their colour bars' labels, so two pictures of a run can differ by a few pixels."""
    height, width = max(a.shape[0] for a in images), max(a.shape[1] for a in images)
    out = []
    for a in images:
        pad = ((0, height - a.shape[0]), (0, width - a.shape[1]), (0, 0))
        out.append(np.pad(a, pad, constant_values=255) if any(p[1] for p in pad) else a)
    return out


def _file_or_array(row: PictureRow, name: str, files: bool) -> str | np.ndarray:
    """The row's PNG file when it was written and ``files`` are taken (W&B copies it as it is), else its array (W&B
    encodes it)."""
    path = row.files.get(name) if files else None
    return str(path) if path is not None else getattr(row, name)


def _to_tensorboard(logger: TensorBoardLogger, rows, z_observed, z_null, step, prefix) -> None:
    writer = logger.experiment
    for i, r in enumerate(rows):
        writer.add_image(f"{prefix}/{IMAGE_KEY}/{i}", r.image, step, dataformats="HWC")
    writer.add_histogram(f"{prefix}/{HIST_KEYS[0]}", z_observed.float().cpu(), step)
    writer.add_histogram(f"{prefix}/{HIST_KEYS[1]}", z_null.float().cpu(), step)


def _to_png(folder: Path, rows, name: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    taken = set()
    for i, r in enumerate(rows):
        # by the image's own name where it has one (nested/cat.jpg: ..._nested_cat.png), else by its place
        own = r.name and re.sub(r"[^A-Za-z0-9.-]+", "_", str(Path(r.name).with_suffix("")))
        file = f"{name}_{own}" if own and own not in taken else f"{name}_image{i}"
        taken.add(own)
        if "image" in r.files:
            shutil.copyfile(r.files["image"], folder / f"{file}.png")
        else:
            Image.fromarray(r.image).save(folder / f"{file}.png")
