"""AttentionRegularizationCallback: bootstrap-regularized attention maps of validation images, while training."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from attnreg_lightning.attention import check_model, num_heads, reads_logits, resolve_vit
from attnreg_lightning.batch import (
    REGIONS,
    BatchView,
    RowPicker,
    check_masks,
    default_batch_to_images,
    sampler_padding,
    take_rows,
)
from attnreg_lightning.config import KNOB_DEFAULTS, KNOB_NAMES, AttnRegConfig, check_knob_names
from attnreg_lightning.engine import AUTOCAST_DTYPES, AttentionRegularizer, statistics_device, usable_images
from attnreg_lightning.faithfulness import (
    Prediction,
    classifier_forward,
    faithfulness,
    prediction_forward,
    probe_images,
)
from attnreg_lightning.loggers import log_evolution, log_pictures, log_report, wants_png, warn_unknown
from attnreg_lightning.metrics import MeanScores, token_mask
from attnreg_lightning.pictures import PictureBook, PictureRow
from attnreg_lightning.probes import ProbeBook
from attnreg_lightning.regularize import RegularizedAttention
from attnreg_lightning.report import write_report
from attnreg_lightning.run_metrics import (
    RunMetrics,
    image_rows,
    nonfinite_attention,
    quiet_compute,
)
from attnreg_lightning.sanity import draw_keys, intervals, model_randomization, per_draw_scores, per_image, summarize
from attnreg_lightning.token_drop import check_droppable, check_prediction_without_patches

__all__ = ["AttentionRegularizationCallback", "BatchView", "default_batch_to_images"]


@dataclass
class _Job:
    """One validation batch's explained images and what their records need besides the result."""

    batch_idx: int
    ids: list[int]
    images: Tensor  # on the model's device
    masks: Tensor | None
    noise_masks: Tensor | None
    shortcut_masks: Tensor | None
    shown: Tensor | None  # the images to draw (a host copy with background statistics), None if none will be
    usable: Tensor | None = None  # [B] bool: pixels finite and not constant (the images' fault if not)


@dataclass
class _Recorded:
    """What an explained batch's statistics left for the rest of its record: the valid images' scores (by key,
    ``[V]``), their rows in the batch and their per-image rows of :attr:`image_stats` (which faithfulness fills in)."""

    scores: dict[str, Tensor]
    valid_rows: Tensor
    rows: list[dict[str, Any]]


SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
"""Strategies that shard the parameters and gather them per forward: refused (``setup``)."""

UNCOMPARED_KNOBS = frozenset(
    {"seed", "every_n_epochs", "max_images_per_forward", "statistics", "log_images", "on_error", "sanity_check",
     "sanity_draws", "name"}
)  # fmt: skip
"""Knobs that change when, how fast or how loudly runs are explained, or only the fit-end sanity check: a resume may
change them and still compare its runs with the checkpoint's. Every other knob changes what a run measures (a knob
added later too, unless listed here); ``seed``: the checkpoint's is taken."""

SANITY_IMAGES = 16
"""Most probe images per rank the sanity check explains again (their host copies are kept between runs)."""


def _degenerate(images: int) -> str:
    return (
        f"{images} degenerate image(s) (pixels constant or non-finite, or attention that does not vary or is not "
        "finite on their null images: no null distribution to test against)"
    )


def _nonfinite_attention(images: int) -> str:
    return (
        f"the model's attention is not finite on {images} image(s) whose pixels are finite and not constant: NaN or "
        "inf weights or activations (check the loss and the learning rate; under float16, an overflow: try bfloat16)"
    )


def _plain(value: Any) -> Any:
    """A knob's value as compared across a checkpoint: sequences (a list, Hydra's ListConfig) as lists."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _stage(trainer: L.Trainer) -> str:
    """Which validation run: ``epoch<e>`` during fit, else the trainer's stage (``validate``)."""
    return f"epoch{trainer.current_epoch}" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value


class AttentionRegularizationCallback(Callback):
    """Explain validation images with bootstrap-regularized attention and log maps and metrics.

    It explains the first ``num_images`` validation images of each rank at the first validation run of a fit
    and every ``every_n_epochs``-th run after it (runs are counted, so ``check_val_every_n_epoch`` and
    ``val_check_interval`` compose with it; never during sanity checking; a ``trainer.validate`` is always
    explained). At each explained run's end it logs ``<name>/<map>/<metric>`` (reduced over ranks by
    torchmetrics) and, from rank 0, a picture row for ``log_images`` images. It never changes training: no
    gradients, modes restored, its own random generators.

    Example::

        from attnreg_lightning import AttentionRegularizationCallback

        trainer = L.Trainer(callbacks=[AttentionRegularizationCallback(method="normal", n_bootstrap=10)])
        trainer.fit(model, datamodule)  # model: a timm ViT LightningModule (attribute ``vit``/``backbone``)

    Two in one Trainer need distinct names (their key prefixes and checkpoint state keys)::

        callbacks=[AttentionRegularizationCallback(method="normal"),
                   AttentionRegularizationCallback(method="pixel", name="attnreg_pixel")]

    A checkpoint keeps what the next runs build on (:meth:`state_dict`): the run count, the totals, the
    history of logged values and the probes' records, so a resumed fit explains and compares as an
    uninterrupted one would. A resume whose knobs change what a run measures (any but
    :data:`UNCOMPARED_KNOBS`), or that runs on another number of processes while its batches carry no sample ids
    (ids made up by position then name other images), starts a new comparison instead (:meth:`load_state_dict`).

    Args:
        config: all knobs at once (an :class:`AttnRegConfig`, as the app builds it); or give them one by one below
            (with ``config`` the knobs below are not read: one set off its default is refused).
        batch_to_images: reads a batch into a :class:`BatchView` when the default reader can't.
        method: null images: ``normal``, ``uniform``, ``pixel`` (pixels resampled) or ``patch`` (tiles permuted).
        n_bootstrap: null images per explained image (``N >= 1``; ``N + 1`` forwards per image).
        z_th: the ``zreg`` map keeps tokens with ``z >= z_th``.
        p_th: the ``p`` map keeps tokens with ``p <= p_th``.
        lfdr_th: the ``lfdr`` map keeps tokens with local FDR ``<= lfdr_th``.
        q_th: the ``q`` map keeps tokens with q-value ``<= q_th``.
        pi0: None: Storey's estimate per image; a float in [0, 1] fixes it.
        num_images: probe images per rank, explained at every explained run (0: off).
        every_n_epochs: explain the first validation run of a fit and every n-th run after it.
        dataloader_idx: the validation loader explained (one callback, with its own ``name``, per loader).
        maps: the maps whose metrics and pictures are logged (``p``, ``lfdr``, ``pi0``, ``posterior``, ``zreg``,
            ``q``).
        max_images_per_forward: most images in one forward (memory does not grow with ``N``); None: 32 on a CPU,
            256 on other devices.
        autocast_dtype: the forwards' autocast: ``"auto"`` (the trainer's precision; float32 on a CPU that would
            emulate bfloat16), None (float32), ``"bfloat16"`` or ``"float16"``.
        seed: seed of the callback's own generators (the global RNG is never touched).
        log_images: picture rows per explained run (rank 0).
        on_error: ``"warn"``: skip, count and warn of what fails; ``"raise"``: fail the run (every rank).
        std_factor: ``normal`` nulls: the noise's std as a multiple of the image's.
        all_channels: ``normal``/``uniform`` nulls: one distribution per channel (False: over all channels).
        patch_size: ``patch`` nulls: the tile size (None: the model's patch size).
        normalization: ``uniform`` nulls: ``"imagenet"`` re-normalizes them, as the paper's code does.
        probe_ids: sample ids of the probe images (None: each rank's first ``num_images``).
        heads: ``"mean"`` (attention averaged over heads) or ``"all"`` (each head tested too).
        statistics: ``"inline"``, ``"background"`` (a CPU thread, off the device's critical path) or ``"auto"``
            (background on a GPU).
        faithfulness: ``"off"``, ``"kept"`` (do the kept tokens matter?) or ``"curves"`` (deletion/insertion too).
        faithfulness_maps: the thresholded maps whose faithfulness is scored.
        faithfulness_steps: steps of the deletion and insertion curves.
        faithfulness_baseline: what a removed token becomes: ``"mean"``, ``"blur"``, ``"zeros"`` (pixels) or
            ``"drop"`` (dropped from the ViT's sequence).
        faithfulness_regions: marked regions whose reliance is scored (``roi``, ``noise``, ``shortcut``).
        faithfulness_prediction: whose prediction faithfulness scores: ``"auto"`` (the module's own forward where it
            returns class scores, else the ViT's head), ``"module"`` or ``"vit"``.
        sanity_check: at a fit's end, compare the maps with those of the model's last block re-initialized.
        sanity_draws: re-initializations in the sanity check.
        name: prefix of every logged key and the checkpoint state's key (two callbacks need two names).

    Every knob's meaning, default and cost: ``docs/knobs.md``. An unknown knob is refused naming the closest ones.
    """

    def __init__(
        self,
        config: AttnRegConfig | None = None,
        batch_to_images: Callable[[Any], BatchView] | None = None,
        *,
        method: str = "normal",
        n_bootstrap: int = 10,
        z_th: float = 0.0,
        p_th: float = 0.3,
        lfdr_th: float = 0.3,
        q_th: float = 0.1,
        pi0: float | None = None,
        num_images: int = 16,
        every_n_epochs: int = 1,
        dataloader_idx: int = 0,
        maps: Sequence[str] = ("p", "lfdr", "pi0", "posterior"),
        max_images_per_forward: int | None = None,
        autocast_dtype: str | torch.dtype | None = "auto",
        seed: int = 0,
        log_images: int = 4,
        on_error: str = "warn",
        std_factor: float = 1.0,
        all_channels: bool = True,
        patch_size: int | None = None,
        normalization: str | None = None,
        probe_ids: Sequence[int] | None = None,
        heads: str = "mean",
        statistics: str = "auto",
        faithfulness: str = "kept",
        faithfulness_maps: Sequence[str] = ("lfdr",),
        faithfulness_steps: int = 8,
        faithfulness_baseline: str = "mean",
        faithfulness_regions: Sequence[str] = ("shortcut",),
        faithfulness_prediction: str = "auto",
        sanity_check: bool = True,
        sanity_draws: int = 128,
        name: str = "attnreg",
        **unknown: Any,
    ) -> None:
        check_knob_names(unknown, type(self).__name__)
        if isinstance(autocast_dtype, torch.dtype):  # the config holds names (Hydra's, a checkpoint's)
            autocast_dtype = {v: k for k, v in AUTOCAST_DTYPES.items()}.get(autocast_dtype, autocast_dtype)
        given = {k: v for k, v in locals().items() if k in KNOB_NAMES}
        given = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
        if config is not None:
            changed = sorted(k for k, v in given.items() if v != KNOB_DEFAULTS[k])
            if changed:
                raise ValueError(f"give either config or keyword knobs, not both (got {changed})")
        self.config = config if config is not None else AttnRegConfig(**given)
        self._batch_to_images = batch_to_images or default_batch_to_images
        self.engine: AttentionRegularizer | None = None
        cfg = self.config
        self.run_metrics = RunMetrics(cfg.maps, cfg.faithfulness, cfg.faithfulness_maps, cfg.faithfulness_regions)
        self._classify: Callable[[Tensor], Tensor] | None = None  # images -> logits, for faithfulness
        self._prediction_source: str | None = None  # whose logits _classify gives: "vit" or "module"
        self._root_device: torch.device | None = None  # where the trainer runs the model
        self._stage_name = "validate"  # the explained run's (epoch3, validate), named in the pictures
        self.num_heads: int | None = None
        self.probes = ProbeBook(self.config.probe_ids)
        self.pictures = PictureBook(self.probes, self.config.maps, self.config.log_images)
        self.explained_total = 0
        self.skipped_total = 0
        self.validation_runs = 0
        self._active = False
        self._picker = RowPicker(self.config.num_images)
        self._last_rows: list[PictureRow] = []
        self.history: list[dict[str, Any]] = []  # each explained run's logged values, for the report
        self.image_stats: list[dict[str, Any]] = []  # this run's per-image scores on this rank
        self._precision: str | None = None  # the trainer's, for autocast_dtype="auto"
        self._fitting = True
        self._padding: Callable[[int], bool] | None = None  # the explained loader's sampler padding, per run
        self._warned_loggers = False
        self._warned_loaders = False
        self._ids_given: bool | None = None  # whether the explained batches carried sample ids (None: none seen)
        self._comparison = 0  # how many resumes with other knobs the history has seen: its rows' "comparison"
        self._changed: dict[str, list[Any]] | None = None  # what the last such resume changed, for the next row
        self._logged_config = False
        self._background = False
        self._pending: deque[tuple[Future[None], _Job]] = deque()
        self._drawing: deque[tuple[Future[None], _Job]] = deque()  # inline statistics: pictures being drawn
        self._failed_images = 0  # counted on the training thread, added to the metrics once the run's jobs are done
        self._error: Exception | None = None  # this run's first error on this rank, raised once every rank knows
        self._rank, self._world_size = 0, 1
        self._warned_regions: set[str] = set()  # regions whose masks cover no token: said once
        self._fixed_k_jobs: list[tuple[Tensor, Tensor, Tensor, list[int], tuple[int, int]]] = []  # scored at run end
        self._sanity_images: dict[int, Tensor] = {}  # a few probes' images (host), for the sanity check
        self.sanity_rows: list[dict[str, float]] = []  # the last sanity check's per-image values on this rank

    @property
    def prefix(self) -> str:
        return self.config.name

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.config.name)

    def batch_to_images(self, batch: Any) -> BatchView:
        return self._batch_to_images(batch)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer is not None:
            self._refuse_sharded(trainer.strategy)
        vit = resolve_vit(pl_module)
        check_model(vit)
        self._fitting = stage == "fit"
        self._precision = getattr(trainer, "precision", None)
        # the model moves there after the setup hooks: autocast_dtype="auto" is resolved for the device it runs on
        self._root_device = trainer.strategy.root_device if trainer is not None else _device(pl_module)
        if trainer is not None:
            self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self.pictures.write_png = trainer is not None and wants_png(trainer.loggers)
        images = None if self.config.faithfulness == "off" else probe_images(vit, pl_module.device)
        self._choose_prediction(pl_module, vit, images)
        if self._classify is not None and self.config.faithfulness_baseline == "drop":
            check_droppable(pl_module)  # refused now, with the reason, rather than at every batch
            if self.config.faithfulness == "curves" and images is not None:
                check_prediction_without_patches(self._classify, pl_module, images)
        self.engine = self._new_engine(pl_module)
        # (bf16-true: the weights themselves are bf16, the forwards too)
        bf16 = str(self._precision) == "bf16-mixed"
        if bf16 and self.config.autocast_dtype == "auto" and self.engine.autocast_dtype is None:
            rank_zero_info(
                f"{self.prefix}: precision={self._precision} on a CPU without bfloat16 in hardware (emulated there, "
                "several times slower): the callback's forwards run in float32; autocast_dtype='bfloat16' follows the "
                "trainer anyway"
            )
        if self.config.heads == "all" and self.run_metrics.head_scores is None:
            self.num_heads = num_heads(vit)
            if self.num_heads is None:
                raise ValueError(f"{self.prefix}.heads='all': the model's number of heads is unknown")
            self.run_metrics.follow_heads(self.num_heads)
        if trainer is not None:
            self._refuse_monitors_of_unexplained_runs(trainer)
        if trainer is not None and trainer.is_global_zero and not self._logged_config:
            # the knobs are the experiment: every logger that takes hyperparameters records them, once
            for logger in trainer.loggers:
                logger.log_hyperparams({self.prefix: dataclasses.asdict(self.config)})
            self._logged_config = True

    def _choose_prediction(self, pl_module: L.LightningModule, vit: nn.Module, images: Tensor | None) -> None:
        """Whose class scores faithfulness scores (:func:`prediction_forward`), decided once at setup on ``images``
        (:func:`probe_images`: random images of the model's size; None when it is unknown), the same on every rank:
        the module's own forward where it gives class scores other than the ViT head's (a head of its own), else the
        ViT's head; none for a backbone without any."""
        self._classify, self._prediction_source = None, None
        cfg = self.config
        if cfg.faithfulness == "off":
            return
        if images is None:  # a family whose input size is not known: its reader's head, as the model predicts it
            chosen = Prediction(classifier_forward(pl_module), "vit")
        else:
            chosen = prediction_forward(pl_module, images, cfg.faithfulness_prediction)
        if chosen.note:
            rank_zero_warn(f"{self.prefix}: {chosen.note} (faithfulness_prediction='vit' says so and is quiet)")
        self._classify, self._prediction_source = chosen.forward, chosen.source
        if self._classify is None:
            rank_zero_warn(
                f"{self.prefix}.faithfulness={cfg.faithfulness!r}: {type(vit).__name__} has no classification head "
                f"and {type(pl_module).__name__}'s forward gives no class scores [B, classes], so the faithfulness "
                "metrics are not computed (set faithfulness='off' to say so)"
            )
            self.run_metrics.drop_faithfulness()

    def _new_engine(self, model: nn.Module) -> AttentionRegularizer:
        """The engine of the knobs; when the ViT's head is the prediction scored, it also gives the images' class
        logits from the forward that reads their attention (the scores' clean forward, saved)."""
        kwargs = self.config.engine_kwargs(self._precision, self._root_device or _device(model))
        from_vit = self._prediction_source == "vit" and reads_logits(model)
        return AttentionRegularizer(model, **kwargs, classify=from_vit)

    def _refuse_sharded(self, strategy: Strategy) -> None:
        """Sharded parameters are gathered at each forward, a collective every rank joins: the reads stop a forward
        inside the last block (its gathers left open) and each rank runs as many as it has images to explain, so
        the ranks' gathers no longer pair up: they hang, or take one another's parameters."""
        if isinstance(strategy, SHARDED_STRATEGIES):
            raise ValueError(
                f"{self.prefix}: the {type(strategy).__name__} strategy shards the model's parameters and gathers "
                "them at each forward, which the callback's reads (forwards stopped inside the last block, as many "
                "as each rank has images) would hang or corrupt: explain with DDP or on one device (fit without the "
                "callback, then trainer.validate with it, or explain.py, on an unsharded copy of the model, e.g. "
                "from a consolidated checkpoint)"
            )

    def _refuse_monitors_of_unexplained_runs(self, trainer: L.Trainer) -> None:
        """A monitor (ModelCheckpoint, EarlyStopping, ...) of one of this callback's keys needs a value at every
        validation run; with ``every_n_epochs > 1`` most runs are not explained, and it would read a copied or a
        missing value."""
        every = self.config.every_n_epochs
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if every > 1 and isinstance(monitor, str) and monitor.startswith(f"{self.prefix}/"):
                raise ValueError(
                    f"{type(callback).__name__}(monitor={monitor!r}) needs that value at every validation run, but "
                    f"{self.prefix}.every_n_epochs={every} explains one run in {every}: set every_n_epochs=1, or "
                    f"monitor a key this callback does not log"
                )

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run logs its own values or none: an earlier run's must not stand in for this one's (a run that is
        # not explained, or a metric not finite this run)
        metrics = trainer.callback_metrics
        for key in [k for k in metrics if k.startswith(f"{self.prefix}/")]:
            del metrics[key]
        cfg = self.config
        if trainer.sanity_checking or cfg.num_images == 0:
            self._active = False
        elif trainer.state.fn == TrainerFn.FITTING:
            self._active = self.validation_runs % cfg.every_n_epochs == 0
            self.validation_runs += 1
        else:
            self._active = True
        loaders = len(trainer.num_val_batches)
        if self._active and cfg.dataloader_idx >= loaders:
            raise ValueError(
                f"{self.prefix}.dataloader_idx={cfg.dataloader_idx}, but this validation has {loaders} loader(s)"
            )
        if not self._warned_loaders and loaders > 1 and cfg.num_images > 0:
            self._warned_loaders = True
            self._warn_of_unexplained_loaders(trainer, loaders)
        if self._active:  # the explained loader's sampler is fixed for the run
            dataloaders = trainer.val_dataloaders
            single = not isinstance(dataloaders, (list, tuple))
            self._padding = sampler_padding(dataloaders if single else dataloaders[cfg.dataloader_idx])
        self._picker.start_run()
        self._stage_name = _stage(trainer)
        self.image_stats = []
        self.pictures.start_run()
        # background statistics land on the CPU: the metrics gather them there, and move to the device to sync
        on_gpu = pl_module.device.type == "cuda"
        self._background = cfg.statistics == "background" or (cfg.statistics == "auto" and on_gpu)
        self._pending.clear()
        self._drawing.clear()
        self._failed_images = 0
        self._error = None
        self._fixed_k_jobs = []
        self.run_metrics.reset("cpu" if self._background else statistics_device(pl_module.device))

    def _warn_of_unexplained_loaders(self, trainer: L.Trainer, loaders: int) -> None:
        """A validation loader no callback explains is said once, by the first callback of the Trainer: its images
        are in none of the logged values, which a user reading them as the validation's would not know."""
        ours = [
            c for c in trainer.callbacks if isinstance(c, AttentionRegularizationCallback) and c.config.num_images > 0
        ]
        if ours[0] is not self:
            return
        explained = sorted({c.config.dataloader_idx for c in ours})
        missing = [i for i in range(loaders) if i not in explained]
        if missing:
            rank_zero_warn(
                f"{self.prefix}: this validation has {loaders} loaders and explains only loader(s) {explained} (each "
                f"callback explains the one its dataloader_idx picks); loader(s) {missing} are not explained: add an "
                f"AttentionRegularizationCallback(name='{self.prefix}_{missing[0]}', dataloader_idx={missing[0]}) per "
                "loader to explain"
            )

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # after a failure to raise, this rank explains no more: the run's end raises it on every rank
        if not self._active or dataloader_idx != self.config.dataloader_idx or self._error is not None:
            return
        try:
            job = self._job(trainer, pl_module, batch, batch_idx)
        except Exception as err:  # a batch the reader can't read: a bug to raise, whatever on_error says
            self._error = err
            return
        if job is None:
            return
        images, ids = job.images, job.ids
        try:
            check_masks(job.masks, images, "masks")
            check_masks(job.noise_masks, images, "noise masks")
            check_masks(job.shortcut_masks, images, "shortcut masks")
            if self._background:
                self._submit(trainer, job)
            else:
                reg = self.engine(images, sample_ids=ids)
                recorded = self._record(trainer, job, reg)
                if recorded is not None:
                    self._record_rest(job, reg, recorded)
        except Exception as err:
            self._failed(err, job)
        self._collect(wait=False)

    def _job(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> _Job | None:
        """The batch's images to explain now, on the model's device, with what their records need (None if none)."""
        view = self.batch_to_images(batch)
        self._ids_given = view.ids is not None
        # once chosen, the probes are explained wherever they are (shuffled or distributed loaders); until
        # then, the first explained run picks them: the first num_images this rank sees
        wanted = self.probes.is_probe if self.probes.chosen else None
        rows, ids = self._picker.pick(view, trainer.global_rank, wanted, self._padding)
        if not rows:
            return None
        if wanted is None:
            self.probes.pick(ids)
        size = view.images.shape[0]
        images = take_rows(view.images, rows, size).to(pl_module.device)
        masks, noise = take_rows(view.masks, rows, size), take_rows(view.noise_masks, rows, size)
        shortcut = take_rows(view.shortcut_masks, rows, size)
        shown = images if trainer.is_global_zero else None
        return _Job(batch_idx, ids, images, masks, noise, shortcut, shown, usable=usable_images(images))

    def _submit(self, trainer: L.Trainer, job: _Job) -> None:
        """The forwards now; the statistics, metrics and probes' records in the engine's thread, in the order
        submitted; the faithfulness forwards and the drawing once the training thread collects the job, so the
        statistics thread never runs the model (a module's modes flipped from two threads could be left wrong, and
        two threads' forwards would hold twice the memory) and the run's values are those of the inline path. The
        images go along only while a picture may still be drawn of them."""
        drawn = job.shown is not None and len(self.pictures.rows) < self.pictures.limit
        carry = (job.masks, job.noise_masks, job.shortcut_masks, job.shown if drawn else None, job.usable)

        def record(reg: RegularizedAttention, masks: Tensor | None, noise: Tensor | None, shortcut: Tensor | None,
                   shown: Tensor | None, usable: Tensor | None) -> tuple[_Job, RegularizedAttention, Any]:  # fmt: skip
            copied = dataclasses.replace(
                job, masks=masks, noise_masks=noise, shortcut_masks=shortcut, shown=shown, usable=usable
            )
            return copied, reg, self._record(trainer, copied, reg)

        self._pending.append((self.engine.submit(job.images, job.ids, then=record, carry=carry), job))

    def _collect(self, wait: bool) -> None:
        """Take the background jobs and drawings that are done (all of them with ``wait``), in the order submitted: a
        job's faithfulness forwards run here, on the training thread, and its drawing is handed back to the engine's
        thread."""
        while self._pending and (wait or self._pending[0][0].done()):
            future, job = self._pending.popleft()
            try:  # the statistics thread's exception is raised here, in the training process
                copied, reg, recorded = future.result()
            except Exception as err:
                self._failed(err, job)
                continue
            if recorded is not None:
                # the job's own images are on the device; the carried copies (masks, pictures) on the host
                on_device = dataclasses.replace(copied, images=job.images)
                try:
                    self._record_rest(on_device, reg, recorded)
                except Exception as err:  # the images are explained and counted: only this part is missing
                    if self.config.on_error == "raise":
                        self._error = self._error or err  # held to the run's end, as every failure
                    else:
                        warnings.warn(f"{self.prefix}: could not finish the record of validation batch "
                                      f"{job.batch_idx}{self._on_rank}: {err}", stacklevel=2)  # fmt: skip
        while self._drawing and (wait or self._drawing[0][0].done()):
            future, job = self._drawing.popleft()
            try:
                future.result()
            except Exception as err:
                if self.config.on_error == "raise":
                    self._error = self._error or err
                else:  # the images are explained and counted: only their pictures are missing
                    rank_zero_warn(f"{self.prefix}: could not draw validation batch {job.batch_idx}: {err}")

    def _failed(self, err: Exception, job: _Job) -> None:
        """A batch that could not be explained: raised at the run's end (the first one), or warned and counted."""
        if self.config.on_error == "raise":
            self._error = self._error or err
            return
        take = len(job.ids)
        # every rank says its own (rank_zero_warn would hide the other ranks')
        warnings.warn(
            f"{self.prefix}: could not explain {take} image(s) of validation batch {job.batch_idx}{self._on_rank}: "
            f"{err}",
            stacklevel=2,
        )
        self._failed_images += take

    @property
    def _on_rank(self) -> str:
        return f" on rank {self._rank}" if self._world_size > 1 else ""

    def _raise_if_a_rank_failed(self, strategy: Strategy | None, error: Exception | None) -> None:
        """Every rank raises if one failed, before any rank enters a collective: a rank that raised alone would leave
        the others waiting in the next one (for the process group's timeout: 30 minutes under NCCL). The failed rank
        raises its own error, the others one that names it. A collective: every rank calls it. The ranks decide
        through the Trainer's ``strategy``, as Lightning's callbacks do; without one (a module no Trainer runs), the
        errors are gathered from every rank of torch.distributed's process group."""
        if strategy is not None and not strategy.reduce_boolean_decision(error is not None, all=False):
            return
        said = None if error is None else f"{type(error).__name__}: {error}"
        messages = [said]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, said)
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"{self.prefix}: rank {rank} failed, so every rank stops here: {message}")
        if strategy is not None:  # a rank failed, and the strategy's processes gather no objects (no process group)
            raise RuntimeError(f"{self.prefix}: another rank failed, so every rank stops here (its error is there)")

    def _record(self, trainer: L.Trainer, job: _Job, reg: RegularizedAttention) -> _Recorded | None:
        """What an explained batch's record needs no forward for: metrics, the probes' records, the per-image rows (in
        the statistics thread with background statistics: nothing else touches them until the run's jobs are done);
        None when no image of the batch was valid. :meth:`_record_rest` follows, on the training thread."""
        valid = reg.significance.valid
        bad = int((~valid).sum())
        if bad and self.config.on_error == "raise":
            model = int(nonfinite_attention(reg, job.usable).sum())
            said = []
            if bad > model:
                said.append(_degenerate(bad - model))
            if model:
                said.append(_nonfinite_attention(model))
            raise ValueError(f"{self.prefix}: {'; '.join(said)} in batch {job.batch_idx}")
        scores = self.run_metrics.update(reg, job.masks, job.noise_masks, job.shortcut_masks, job.usable)
        if scores is None:
            return None
        valid_rows = valid.nonzero().flatten()
        self.run_metrics.update_stability(self.probes.follow(reg, job.ids))
        valid_ids = [job.ids[i] for i in valid_rows.tolist()]
        rows = image_rows(scores, valid_ids)
        self.image_stats += rows
        if self.config.sanity_check:
            self._keep_for_sanity(job, valid_rows.tolist(), valid_ids)
        return _Recorded(scores, valid_rows, rows)

    def _record_rest(self, job: _Job, reg: RegularizedAttention, recorded: _Recorded) -> None:
        """The faithfulness forwards (on the training thread, the images on the model's device) and the pictures."""
        scores = recorded.scores
        if self._classify is not None and reg.grid is not None:
            faithful = self._unless_it_fails(
                "score the faithfulness of", job, self._faithfulness, job, reg, recorded.valid_rows
            )
            scores.update(faithful)
            listed = {k: v.tolist() for k, v in faithful.items()}
            for j, row in enumerate(recorded.rows):
                row.update({k: v[j] for k, v in listed.items()})
        if self._rank == 0:
            drawn = (job.shown, reg, job.ids, scores, self._stage_name, self.num_heads)
            if job.shown is not None and len(self.pictures.rows) < self.pictures.limit:
                # drawing leaves the training thread: the run's end waits for it
                self._drawing.append((self.engine.later(job.images.device, self.pictures.add, *drawn), job))
            else:
                self.pictures.add(None, *drawn[1:])  # the z-scores still go into the run's histograms

    def _unless_it_fails(self, what: str, job: _Job, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for what follows an explained batch's metrics: a failure there leaves the images explained
        and counted (only that part is missing, with a warning), or is raised with ``on_error="raise"``."""
        try:
            return fn(*args)
        except Exception as err:
            if self.config.on_error == "raise":
                raise
            rank_zero_warn(f"{self.prefix}: could not {what} validation batch {job.batch_idx}: {err}")
            return {}

    def _keep_for_sanity(self, job: _Job, rows: list[int], ids: list[int]) -> None:
        """Host copies of the probes the sanity check will explain again: the first ``SANITY_IMAGES`` seen, each
        replaced by its latest run's image."""
        room = SANITY_IMAGES - len(self._sanity_images)
        kept = []
        for row, sample_id in zip(rows, ids, strict=True):
            if sample_id in self._sanity_images or room > 0:
                room -= sample_id not in self._sanity_images
                kept.append((row, sample_id))
        if kept:
            host = job.images[torch.tensor([row for row, _ in kept], device=job.images.device)].cpu()  # one copy
            self._sanity_images.update({sample_id: image for (_, sample_id), image in zip(kept, host, strict=True)})

    def _forward(self, device: torch.device) -> Callable[[Tensor], Tensor]:
        """The classifier's forward under the engine's autocast, for the faithfulness scores."""
        amp, classify = self.engine.autocast_dtype, self._classify

        def forward(images: Tensor) -> Tensor:
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                return classify(images)

        return forward

    def _faithfulness(self, job: _Job, reg: RegularizedAttention, rows: Tensor) -> dict[str, Tensor]:
        """The valid images' faithfulness scores (in ``scores``' order and device), into the run's metrics; what
        their fixed-k baseline needs is kept for the run's end, when the run's kept fractions are known."""
        device = job.images.device
        index = rows.to(device)
        cfg = self.config
        needed = list(cfg.faithfulness_maps) + (["posterior"] if cfg.faithfulness == "curves" else [])
        images, attention = job.images.index_select(0, index), reg.attention.index_select(0, rows)
        ids = [job.ids[i] for i in rows.tolist()]
        marked = dict(zip(REGIONS, (job.masks, job.noise_masks, job.shortcut_masks), strict=True))
        regions = {
            name: token_mask(marked[name].to(device), reg.grid).index_select(0, index)
            for name in cfg.faithfulness_regions
            if marked[name] is not None
        }
        for name, tokens in regions.items():
            if name not in self._warned_regions and not bool(tokens.any()) and bool(marked[name].any()):
                self._warned_regions.add(name)
                rank_zero_warn(
                    f"{self.prefix}: the {name} masks cover no token by half (a region smaller than the model's "
                    f"{reg.grid[0]}x{reg.grid[1]} token grid resolves?), so its keys are not computed: mark regions of "
                    "at least half a token (e.g. data.shortcut_size = the patch size)"
                )
        result = faithfulness(
            self._forward(device),
            images,
            attention,
            {m: reg.maps[m].index_select(0, rows) for m in needed},
            reg.grid,
            ids,
            regions=regions,
            clean_logits=None if reg.logits is None else reg.logits.index_select(0, rows),
            model=self.engine.model,
            **cfg.faithfulness_kwargs(),
        )
        self.run_metrics.update_faithfulness(result.scores, result.undefined)
        self.run_metrics.update_kept({m: reg.maps[m].index_select(0, rows) for m in cfg.faithfulness_maps})
        # host copies: a run's images would otherwise stay on the device until its end (num_images of them)
        self._fixed_k_jobs.append((images.cpu(), attention.cpu(), result.clean_logits.cpu(), ids, reg.grid))
        return {k: v.to(rows.device, torch.float64) for k, v in result.scores.items()}

    def _score_fixed_k(self, pl_module: L.LightningModule) -> None:
        """The fixed-k baseline of each faithfulness map: every image's top ``round(kappa T)`` raw tokens, ``kappa``
        the map's mean kept fraction over the run's explained images on all ranks (a collective: every rank calls
        it), scored on the training thread once the run's jobs are done."""
        if self._classify is None or self.config.faithfulness == "off":
            return
        kappa = self.run_metrics.kept_fractions(statistics_device(pl_module.device))
        jobs, self._fixed_k_jobs = self._fixed_k_jobs, []
        if not kappa:
            return
        rows: dict[int, list[dict[str, Any]]] = {}  # an id explained twice in a run (padding) has two rows
        for row in self.image_stats:
            rows.setdefault(row["id"], []).append(row)
        kwargs = {**self.config.faithfulness_kwargs(), "mode": "kept", "kept_maps": ()}
        device = pl_module.device
        for images, attention, logits, ids, grid in jobs:
            try:
                result = faithfulness(
                    self._forward(device), images.to(device), attention, {}, grid, ids, fixed_k=kappa,
                    clean_logits=logits, model=self.engine.model, **kwargs,
                )  # fmt: skip
            except Exception as err:
                if self.config.on_error == "raise":
                    raise
                # every rank's own failure is said (rank_zero_warn would hide the other ranks')
                warnings.warn(f"{self.prefix}: could not score the fixed-k baseline of {len(ids)} image(s) on "
                              f"rank {pl_module.global_rank}: {err}", stacklevel=2)  # fmt: skip
                continue
            self.run_metrics.update_faithfulness(result.scores, {})
            listed = {k: v.tolist() for k, v in result.scores.items()}
            for j, sample_id in enumerate(ids):
                for row in rows.get(sample_id, []):
                    row.update({k: v[j] for k, v in listed.items()})

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._collect(wait=True)
        self.run_metrics.count_failed(self._failed_images)
        try:
            self._score_fixed_k(pl_module)
        except Exception as err:  # on_error="raise"
            self._error = self._error or err
        self._raise_if_a_rank_failed(trainer.strategy, self._error)
        # compute() syncs across ranks, so every rank calls it, whatever it explained, and logs the same values
        results = self.run_metrics.compute(statistics_device(pl_module.device))
        values = {f"{self.prefix}/{k}": v.float() for k, v in results.items()}
        # Already reduced over ranks by torchmetrics: rank_zero_only turns Lightning's own sync (and its
        # "use sync_dist=True" warning) off, while every rank still logs the same value.
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, rank_zero_only=True)
        self.history.append({"stage": _stage(trainer), **{k: float(v) for k, v in values.items()}})
        self.history[-1]["comparison"] = self._comparison
        if self._changed is not None:  # the first run of a new comparison says what changed
            self.history[-1]["changed"], self._changed = self._changed, None
        # the values' 95% intervals over images (computed with them; JSON-like, since the history is checkpointed;
        # rows of older checkpoints have none)
        intervals = self.run_metrics.intervals()
        self.history[-1]["intervals"] = {f"{self.prefix}/{k}": [lo, hi] for k, (lo, hi) in intervals.items()}
        degenerate, fit_failed = int(results["skipped_degenerate"]), int(results["lfdr_fit_failed"])
        nonfinite = int(results["skipped_nonfinite_attention"])
        self.explained_total += int(results["explained"])
        self.skipped_total += degenerate + nonfinite + int(results["skipped_error"])
        if degenerate:
            rank_zero_warn(f"{self.prefix}: {_degenerate(degenerate)} skipped (counted in skipped_degenerate)")
        if nonfinite:
            rank_zero_warn(
                f"{self.prefix}: {_nonfinite_attention(nonfinite)}: skipped (counted in skipped_nonfinite_attention)"
            )
        if fit_failed:
            rank_zero_warn(
                f"{self.prefix}: the local-FDR density fit diverged for {fit_failed} image(s); their lfdr is 1 "
                "(no lfdr discoveries), counted in lfdr_fit_failed"
            )
        rank_zero_info(self._run_line(results))
        self.probes.end_run()  # a collective: every rank, every explained run
        error = None
        try:  # rank 0 alone logs: a failure there must not leave the other ranks in the training's next collective
            self._log_pictures(trainer)
        except Exception as err:
            error = err
        self._raise_if_a_rank_failed(trainer.strategy, error)

    def _run_line(self, results: dict[str, Tensor]) -> str:
        """One line for the run's log (a log file too, whether or not anyone watches the console): what was
        explained and the headline keys this run computed."""
        said = [f"{int(results['explained'])} explained"]
        skipped = sum(int(results[k]) for k in ("skipped_degenerate", "skipped_nonfinite_attention", "skipped_error"))
        if skipped:
            said.append(f"{skipped} skipped")
        for key in ("lfdr/sparsity", "lfdr/roi_mass", "lfdr/comprehensiveness", "fixed_k_top@lfdr/comprehensiveness",
                    "same_k_random@lfdr/comprehensiveness", "shortcut/reliance", "stability/lfdr_iou"):  # fmt: skip
            value = results.get(key)
            if value is not None and bool(torch.isfinite(value)):
                said.append(f"{key} {float(value):.3f}")
        return f"{self.prefix}: {self._stage_name}: " + ", ".join(said)

    def _log_pictures(self, trainer: L.Trainer) -> None:
        pictured = self.pictures.end_run()  # rank 0 only draws
        if pictured is None:
            return
        stage = _stage(trainer)
        try:
            unknown = log_pictures(
                trainer.loggers,
                pictured.rows,
                pictured.z_observed,
                pictured.z_null,
                trainer.global_step,
                stage,
                self.prefix,
            )
        finally:
            pictured.close()  # the loggers have copied the PNG files they take
        if unknown and not self._warned_loggers:
            warn_unknown(unknown)
            self._warned_loggers = True
        self._last_rows = pictured.rows

    def evolution_pictures(self) -> list[tuple[np.ndarray, str]]:
        """How each pictured probe's raw and lfdr maps moved over the explained runs (up to ``log_images``)."""
        return self.pictures.evolution()

    def record_sanity(self, sanity: dict[str, float]) -> dict[str, float]:
        """Add a :meth:`sanity_check`'s values to the last explained run's record, with their 95% intervals over draws
        where the report and ``explain_summary.json`` look for intervals; returns the values by logged key."""
        logged = {f"{self.prefix}/{k}": v for k, v in sanity.items()}
        self.history[-1].update(logged)
        spans = {f"{self.prefix}/{k}": list(v) for k, v in intervals(sanity).items()}
        self.history[-1].setdefault("intervals", {}).update(spans)
        return logged

    def write_report(self, path: str | Path, evolution: list[tuple[np.ndarray, str]] | None = None) -> Path:
        """The HTML report of the runs explained so far (see :mod:`attnreg_lightning.report`)."""
        pictures = (self.evolution_pictures() if evolution is None else evolution) + [
            (r.image, r.caption) for r in self._last_rows
        ]
        config = {self.prefix: dataclasses.asdict(self.config)}
        return write_report(path, self.history, pictures, config, self.prefix, title=f"{self.prefix}: report")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_statistics()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_statistics()

    def _stop_statistics(self) -> None:
        """End the statistics thread without running the rest of a stopped run: the jobs not started are cancelled,
        only the running one is waited for, and the jobs that failed are warned of (their images were never counted:
        a stop leaves no run's end to count them). Never raises: Lightning re-raises the exception that stopped the
        run once the ``on_exception`` hooks return, and an error here would take its place."""
        jobs = [*self._pending, *self._drawing]
        self._pending.clear()
        self._drawing.clear()
        cancelled = sum(future.cancel() for future, _ in jobs)
        if isinstance(self.engine, AttentionRegularizer):
            self.engine.close()  # the running job's end: the others are cancelled
        errors = [err for future, _ in jobs if not future.cancelled() and (err := future.exception()) is not None]
        if errors:
            # every rank says its own (rank_zero_warn would hide the other ranks')
            warnings.warn(
                f"{self.prefix}: the run stopped with {len(errors)} failed background job(s) (the first: "
                f"{type(errors[0]).__name__}: {errors[0]}); {cancelled} job(s) not started were cancelled",
                stacklevel=2,
            )

    def sanity_check(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Model randomization (:mod:`attnreg_lightning.sanity`): the last explained probes (up to
        ``SANITY_IMAGES`` per rank) explained by the model and by ``sanity_draws`` independent re-initializations of
        its last block (in a copy; the same nulls). Per map (raw, lfdr): the mean over draws of each draw's mean
        Spearman correlation over the probes of all ranks, the sd of those per-draw means (``_sd``) and how many
        draws gave one (``_draws``); a collective: every rank calls it. Per-image values of this rank (means over
        the draws) in :attr:`sanity_rows`."""
        draws = self.config.sanity_draws
        metric = MeanScores(draw_keys(draws))  # one mean per draw, over every rank's probes
        self.sanity_rows = []
        error = None
        try:  # whatever happens on this rank, every rank reaches the reduction below (no rank left waiting)
            if self._sanity_images:
                ids = sorted(self._sanity_images)
                images = torch.stack([self._sanity_images[i] for i in ids]).to(pl_module.device)
                seed = self.config.seed
                rho = model_randomization(pl_module, self.engine, self._new_engine, images, ids, seed, draws)
                if rho is None:
                    rank_zero_warn(f"{self.prefix}.sanity_check: the model's last block is not known, so it is not run")
                else:
                    metric.update(per_draw_scores(rho))
                    self.sanity_rows = image_rows(per_image(rho), ids)
        except Exception as err:
            if self.config.on_error == "raise":
                error = err
            else:
                message = f"{self.prefix}.sanity_check failed on this rank, its probes are left out: {err}"
                warnings.warn(message, stacklevel=2)
        trainer = getattr(pl_module, "_trainer", None)  # None: a module no Trainer ran (one process)
        self._raise_if_a_rank_failed(None if trainer is None else trainer.strategy, error)
        results = quiet_compute(metric.to(statistics_device(pl_module.device)))
        return summarize({k: float(v) for k, v in results.items() if torch.isfinite(v)}, draws)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        sanity = self.sanity_check(pl_module) if self.config.sanity_check else {}
        error = None
        try:  # rank 0 alone reports: a failure there must not leave the other ranks in a later collective
            if trainer.is_global_zero:
                self._report(trainer, sanity)
        except Exception as err:
            error = err
        self._raise_if_a_rank_failed(trainer.strategy, error)

    def _report(self, trainer: L.Trainer, sanity: dict[str, float]) -> None:
        """The sanity check's values, the evolution pictures and the report, to the loggers."""
        if sanity:
            logged = self.record_sanity(sanity)
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        evolution = self.evolution_pictures()
        if evolution:
            log_evolution(trainer.loggers, evolution, trainer.global_step, self.prefix)
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = Path(checkpoints) if checkpoints else Path(trainer.default_root_dir)
        report = self.write_report(folder / f"{self.prefix}_report.html", evolution)
        log_report(trainer.loggers, report)
        rank_zero_info(f"{self.prefix}: report written to {report}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "explained_total": self.explained_total,
            "skipped_total": self.skipped_total,
            "validation_runs": self.validation_runs,
            "probes": self.probes.state_dict(),
            "history": self.history,
            "autocast": self._forwards_dtype(),
            "world_size": self._world_size,
            "ids": self._ids_given,
            "comparison": self._comparison,
            "changed": self._changed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Go on from the checkpoint's record: its seed (the maps go on from the same nulls), totals, run count,
        history and probes.

        Runs measured otherwise are not compared: when a knob that changes what a run measures differs from the
        checkpoint's (any knob but :data:`UNCOMPARED_KNOBS`; ``autocast_dtype`` by the dtype the forwards run in), or
        when the checkpoint's batches carried no sample ids and the number of processes differs (ids made up by
        position then name other images), it warns, naming each change, and starts a new comparison: the probes are
        picked and followed anew (the stability keys compare no map across the checkpoint), and the history keeps
        the checkpoint's rows while the next ones carry the next ``"comparison"`` number, the first of them also
        what changed (``"changed"``: ``{knob: [old, new]}``), so that no plot or table joins the two. The totals and
        the run count go on. A checkpoint of another version, with knobs this one lacks or does not know, is
        compared on the knobs both know.
        """
        if not self._fitting and (self.history or self.validation_runs):
            # trainer.validate(ckpt_path=...) after runs of its own: the record goes on (the validation is added
            # to it); rewinding it to the checkpoint's would lose the runs since
            return
        # only the seed is taken from the saved knobs (the maps must go on from the same nulls): a checkpoint of
        # another version, with knobs this one lacks or does not know, resumes all the same
        seed = state_dict.get("config", {}).get("seed", self.config.seed)
        if seed != self.config.seed:
            rank_zero_warn(f"{self.prefix}: resuming with the checkpoint's seed {seed} (was {self.config.seed})")
            self.config = dataclasses.replace(self.config, seed=seed)
            if self.engine is not None:
                self.engine = self._new_engine(self.engine.model)
        self.explained_total = state_dict["explained_total"]
        self.skipped_total = state_dict["skipped_total"]
        self.validation_runs = state_dict.get("validation_runs", 0)
        self.probes.load_state_dict(state_dict.get("probes", {}))
        self.history = list(state_dict.get("history", []))
        self._comparison = state_dict.get("comparison", 0)
        self._changed = state_dict.get("changed")
        changed = self._changed_since(state_dict)
        if changed:
            described = ", ".join(f"{knob} {old!r} -> {new!r}" for knob, (old, new) in changed.items())
            rank_zero_warn(
                f"{self.prefix}: resumed with what a run measures changed ({described}): its runs are not comparable "
                "with the checkpoint's, so a new comparison starts (the probes are picked anew, the history's rows "
                f"from here on carry comparison={self._comparison + 1})"
            )
            self.probes.reset()
            self._comparison += 1
            self._changed = {knob: [_plain(old), _plain(new)] for knob, (old, new) in changed.items()}

    def _forwards_dtype(self) -> str | None:
        """The dtype of the engine's forwards (None before ``setup`` has made the engine)."""
        if not isinstance(self.engine, AttentionRegularizer):
            return None
        dtype = self.engine.autocast_dtype
        return "float32" if dtype is None else str(dtype).removeprefix("torch.")

    def _changed_since(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """What the checkpoint measured otherwise than this run will: ``{knob: (old, new)}``."""
        saved, now = state.get("config", {}), dataclasses.asdict(self.config)
        changed = {
            knob: (saved[knob], now[knob])
            for knob in now
            if knob in saved and knob not in UNCOMPARED_KNOBS and _plain(saved[knob]) != _plain(now[knob])
        }
        # the dtype the forwards ran in, whatever the knob said ("auto": the precision's, on the model's device)
        forwards = self._forwards_dtype()
        if state.get("autocast") is not None and forwards is not None:
            changed.pop("autocast_dtype", None)
            if state["autocast"] != forwards:
                changed["autocast_dtype"] = (state["autocast"], forwards)
        if state.get("ids") is False and state.get("world_size", self._world_size) != self._world_size:
            changed["processes (batches without sample ids)"] = (state["world_size"], self._world_size)
        return changed
