"""AttentionRegularizationCallback: bootstrap-regularized attention maps of validation images, while training."""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from attnreg_lightning.attention import check_model, num_heads, resolve_vit
from attnreg_lightning.config import AttnRegConfig
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.loggers import PictureRow, log_evolution, log_pictures, log_report, warn_unknown
from attnreg_lightning.metrics import (
    Counts,
    MeanScores,
    NullCalibration,
    RegionShares,
    TopKBaseline,
    head_score_keys,
    head_scores,
    image_scores,
    score_keys,
    token_mask,
)
from attnreg_lightning.probes import STABILITY_KEYS, ProbeBook
from attnreg_lightning.regularize import RegularizedAttention
from attnreg_lightning.report import write_report
from attnreg_lightning.stats import null_pvalues
from attnreg_lightning.viz import (
    attention_scale,
    display_uint8,
    evolution_picture,
    heads_picture,
    mask_classes,
    picture_row,
    stack,
)

_FALLBACK_ID_STRIDE = 1 << 40  # ids made up per rank when the batch carries none


@dataclass
class BatchView:
    """What the callback needs from a batch: images ``[B, C, H, W]``, optional pixel masks and sample ids."""

    images: Tensor
    masks: Tensor | None = None
    ids: Tensor | None = None
    noise_masks: Tensor | None = None


def _is_ids(item: Any, batch_size: int) -> bool:
    return (
        isinstance(item, Tensor)
        and item.dim() == 1
        and not item.is_floating_point()
        and item.dtype != torch.bool
        and item.shape[0] == batch_size
    )


def default_batch_to_images(batch: Any) -> BatchView:
    """Read a batch: ``x``; a tuple or list ``(x, y, *extras)``; or a dict with ``image``/``images``/``x``,
    ``mask``/``masks``, ``id``/``ids``/``sample_id`` and ``noise_mask`` keys.

    In a tuple the label ``y`` is ignored; among the extras a 1-D integer tensor of length ``B`` is the
    sample ids, and the others are, in order, the object mask and the noise mask: ``(x, y, id)``,
    ``(x, y, mask)``, ``(x, y, mask, id)`` and ``(x, y, mask, id, noise_mask)`` all read as expected.
    """
    if isinstance(batch, Tensor):
        return BatchView(batch)
    if isinstance(batch, Mapping):
        image = next((batch[k] for k in ("image", "images", "x") if k in batch), None)
        if image is None:
            raise ValueError(f"batch dict has no 'image' key (keys: {sorted(batch)}); pass batch_to_images=...")
        get = lambda *keys: next((batch[k] for k in keys if k in batch), None)  # noqa: E731
        return BatchView(image, get("mask", "masks"), get("id", "ids", "sample_id"), get("noise_mask"))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images, ids, masks = batch[0], None, []
        for item in batch[2:]:
            if ids is None and _is_ids(item, images.shape[0]):
                ids = item
            else:
                masks.append(item)
        masks += [None] * (2 - len(masks))
        return BatchView(images, masks[0], ids, masks[1])
    raise ValueError(f"can't find images in a batch of type {type(batch).__name__}; pass batch_to_images=...")


@dataclass
class _Job:
    """One validation batch's explained images and what their records need besides the result."""

    batch_idx: int
    ids: list[int]
    images: Tensor
    masks: Tensor | None
    noise_masks: Tensor | None


def _rows_of(masks: Any, rows: list[int]) -> Tensor | None:
    return None if masks is None else torch.as_tensor(masks)[rows]


def _compute(metric: Metric):
    """``metric.compute()``; a rank that explained nothing still takes part in the sync, without a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return metric.compute()


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

    Args:
        config: all knobs at once; or give them as keyword arguments (``n_bootstrap=20``, ...).
        batch_to_images: reads a batch into a :class:`BatchView` when the default reader can't.
    """

    COUNT_KEYS = ("explained", "skipped_degenerate", "skipped_error", "lfdr_fit_failed", "clamped_tokens")

    def __init__(
        self,
        config: AttnRegConfig | None = None,
        batch_to_images: Callable[[Any], BatchView] | None = None,
        **knobs: Any,
    ) -> None:
        if config is not None and knobs:
            raise ValueError(f"give either config or keyword knobs, not both (got {sorted(knobs)})")
        self.config = config if config is not None else AttnRegConfig(**knobs)
        self._batch_to_images = batch_to_images or default_batch_to_images
        self.engine: AttentionRegularizer | None = None
        self.scores = MeanScores(score_keys(self.config.maps))
        self.regions = RegionShares(self.config.maps)
        self.calibration = NullCalibration()
        self.topk = TopKBaseline()
        self.counts = Counts(self.COUNT_KEYS)
        self.stability = MeanScores(STABILITY_KEYS)
        self.head_scores: MeanScores | None = None  # heads="all": created in setup, once the head count is known
        self.num_heads: int | None = None
        self.probes = ProbeBook(self.config.probe_ids)
        self.explained_total = 0
        self.skipped_total = 0
        self.validation_runs = 0
        self._active = False
        self._seen = 0
        self._position = 0
        self._explained_ids: set[int] = set()
        self._rows: list[PictureRow] = []
        self._last_rows: list[PictureRow] = []
        self.history: list[dict[str, Any]] = []  # each explained run's logged values, for the report
        self.image_stats: list[dict[str, Any]] = []  # this run's per-image scores on this rank
        self._z: list[tuple[Tensor, Tensor]] = []
        self._warned_loggers = False
        self._logged_config = False
        self._background = False
        self._pending: deque[tuple[Future[RegularizedAttention], _Job]] = deque()

    @property
    def prefix(self) -> str:
        return self.config.name

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.config.name)

    def batch_to_images(self, batch: Any) -> BatchView:
        return self._batch_to_images(batch)

    def _metrics(self) -> tuple[Metric, ...]:
        heads = () if self.head_scores is None else (self.head_scores,)
        return (self.scores, self.regions, self.calibration, self.topk, self.counts, self.stability, *heads)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        vit = resolve_vit(pl_module)
        check_model(vit)
        self.engine = AttentionRegularizer(pl_module, **self.config.engine_kwargs())
        if self.config.heads == "all" and self.head_scores is None:
            # keys fixed before any batch, so every rank holds the same states
            self.num_heads = num_heads(vit)
            if self.num_heads is None:
                raise ValueError(f"{self.prefix}.heads='all': the model's number of heads is unknown")
            self.head_scores = MeanScores(head_score_keys(self.num_heads))
        if trainer is not None and trainer.is_global_zero and not self._logged_config:
            # the knobs are the experiment: every logger that takes hyperparameters records them, once
            for logger in trainer.loggers:
                logger.log_hyperparams({self.prefix: dataclasses.asdict(self.config)})
            self._logged_config = True

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = self.config
        if trainer.sanity_checking or cfg.num_images == 0:
            self._active = False
        elif trainer.state.fn == TrainerFn.FITTING:
            self._active = self.validation_runs % cfg.every_n_epochs == 0
            self.validation_runs += 1
        else:
            self._active = True
        self._seen = self._position = 0
        self._explained_ids = set()
        self.image_stats = []
        self._rows, self._z = [], []
        # background statistics land on the CPU: the metrics gather them there, and move to the device to sync
        self._background = cfg.statistics == "background" or (
            cfg.statistics == "auto" and pl_module.device.type == "cuda"
        )
        self._pending.clear()
        for metric in self._metrics():
            metric.to("cpu" if self._background else pl_module.device).reset()

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
        cfg = self.config
        if not self._active:
            return
        view = self.batch_to_images(batch)
        size = view.images.shape[0]
        if view.ids is not None:
            batch_ids = torch.as_tensor(view.ids).tolist()
        else:  # made up by position: the same images get the same ids at every run
            base = trainer.global_rank * _FALLBACK_ID_STRIDE + self._position
            batch_ids = list(range(base, base + size))
        self._position += size
        # an image a loader yields twice in a run (in two batches, or twice in one) is explained once
        first = {}
        for j, i in enumerate(batch_ids):
            first.setdefault(i, j)
        fresh = [j for i, j in first.items() if i not in self._explained_ids]
        if self.probes.chosen:  # the probes, wherever they are (shuffled or distributed loaders)
            rows = [j for j in fresh if self.probes.is_probe(batch_ids[j])]
        else:  # the first explained run picks them: the first num_images this rank sees
            rows = fresh[: max(0, cfg.num_images - self._seen)]
        if not rows:
            return
        images = view.images[rows].to(pl_module.device)
        ids = [batch_ids[j] for j in rows]
        self._seen += len(rows)
        self._explained_ids.update(ids)
        job = _Job(batch_idx, ids, images, _rows_of(view.masks, rows), _rows_of(view.noise_masks, rows))
        try:
            if self._background:  # forwards now; statistics in the engine's thread, collected below
                self._pending.append((self.engine.submit(images, sample_ids=ids), job))
            else:
                self._record(trainer, job, self.engine(images, sample_ids=ids))
        except Exception as err:
            self._failed(err, job)
        self._collect(trainer, wait=False)

    def _collect(self, trainer: L.Trainer, wait: bool) -> None:
        """Record the background jobs that are done (all of them with ``wait``), in the order submitted."""
        while self._pending and (wait or self._pending[0][0].done()):
            future, job = self._pending.popleft()
            try:
                reg = future.result()
            except Exception as err:  # the statistics thread's exception, raised here in the training process
                self._failed(err, job)
                continue
            self._record(trainer, job, reg)

    def _failed(self, err: Exception, job: _Job) -> None:
        if self.config.on_error == "raise":
            raise err
        take = len(job.ids)
        rank_zero_warn(f"{self.prefix}: could not explain {take} image(s) of validation batch {job.batch_idx}: {err}")
        self.counts.update(skipped_error=take)

    def _record(self, trainer: L.Trainer, job: _Job, reg: RegularizedAttention) -> None:
        """Counts, scores, probes and pictures of one explained batch."""
        cfg = self.config
        valid = reg.significance.valid
        bad = int((~valid).sum())
        if bad:
            if cfg.on_error == "raise":
                raise ValueError(
                    f"{self.prefix}: {bad} degenerate image(s) (constant or non-finite) in batch {job.batch_idx}"
                )
            self.counts.update(skipped_degenerate=bad)
        sig = reg.significance
        self.counts.update(
            explained=len(job.ids) - bad,
            lfdr_fit_failed=int((valid & ~sig.fit_ok).sum()),
            clamped_tokens=int(sig.clamped[valid].sum()),
        )
        if not bool(valid.any()):
            return
        device = reg.attention.device
        roi = self._token_mask(job.masks, reg.grid, device)
        noise = self._token_mask(job.noise_masks, reg.grid, device)
        scores = image_scores(reg, cfg.maps, roi, noise)
        self.scores.update(scores)
        self.regions.update(reg, roi, noise)
        self.calibration.update(null_pvalues(reg.significance)[valid])
        if roi is not None:
            self.topk.update(reg.attention[valid], roi[valid], reg.maps["lfdr"][valid])
        ids = job.ids
        self._follow_probes(reg, ids)
        if reg.per_head is not None and self.head_scores is not None:
            self.head_scores.update(head_scores(reg, self.num_heads))
        # one device-to-host copy per score, not one per image and score
        listed = {k: v.tolist() for k, v in scores.items()}
        valid_ids = [ids[i] for i in valid.nonzero().flatten().tolist()]
        self.image_stats += [{"id": i, **{k: v[j] for k, v in listed.items()}} for j, i in enumerate(valid_ids)]
        if trainer.is_global_zero:
            self._collect_pictures(job.images, reg, ids, scores, _stage(trainer))

    @staticmethod
    def _token_mask(masks: Tensor | None, grid, device) -> Tensor | None:
        # without a known token grid (a model that only offers get_last_selfattention) masks can't be mapped
        return None if masks is None or grid is None else token_mask(masks.to(device), grid)

    def _follow_probes(self, reg, ids: list[int]) -> None:
        """Score how each probe's maps moved since the earlier runs; note where they are now."""
        sig = reg.significance
        keep = (reg.maps["lfdr"] > 0).cpu().numpy()
        z, raw = sig.z.double().cpu().numpy(), reg.attention.double().cpu().numpy()
        moved: dict[str, list[float]] = {k: [] for k in STABILITY_KEYS}
        for i in sig.valid.nonzero().flatten().tolist():
            for key, value in self.probes.stability(ids[i], keep[i], z[i]).items():
                moved[key].append(value)
            self.probes.observe(ids[i], keep[i], z[i], self.probes.scale(ids[i]) or attention_scale(raw[i]))
        device = self.stability.total.device
        self.stability.update({k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in moved.items()})

    def _collect_pictures(self, images: Tensor, reg, ids: list[int], scores: dict[str, Tensor], stage: str) -> None:
        sig = reg.significance
        valid_rows = sig.valid.nonzero().flatten().tolist()
        self._z.append((sig.z[sig.valid], sig.z_null[sig.valid]))
        for j, i in enumerate(valid_rows):
            if len(self._rows) >= self.config.log_images or reg.grid is None:
                return
            scale = self.probes.scale(ids[i])  # noted by _follow_probes: the probe's first run's scale
            kept = int((reg.maps["lfdr"][i] > 0).sum())
            run = stage.replace("epoch", "epoch ")
            title = f"id {ids[i]} · {run} · pi0 {float(sig.pi0[i]):.2f} · lfdr keeps {kept}/{sig.z.shape[1]}"
            picture = picture_row(images[i], reg, i, self.config.maps, title=title, scale=scale)
            if reg.per_head is not None:
                picture = stack(picture, heads_picture(images[i], reg.per_head, i, self.num_heads))
            base = display_uint8(images[i])
            stats = {"id": ids[i], **{k: float(v[j]) for k, v in scores.items()}}
            self._rows.append(PictureRow(picture, title, stats, base, mask_classes(reg, i, base.shape[:2])))
            self.probes.add_history(
                ids[i],
                stage,
                reg.attention[i].double().cpu().numpy().reshape(reg.grid),
                reg.maps["lfdr"][i].double().cpu().numpy().reshape(reg.grid),
                base,
            )

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._collect(trainer, wait=True)
        # compute() syncs across ranks, so every rank calls it, whatever it explained, and logs the same values
        metrics = [m.to(pl_module.device) for m in self._metrics()]
        scores, regions, srmsd, topk_f1, counts, stability, *heads = (_compute(m) for m in metrics)
        values = {**scores, **regions, "null_srmsd": srmsd, "topk/roi_f1": topk_f1, **counts, **stability}
        for per_head in heads:
            values.update(per_head)
        values = {f"{self.prefix}/{k}": v.float() for k, v in values.items() if torch.isfinite(v)}
        # Already reduced over ranks by torchmetrics: rank_zero_only turns Lightning's own sync (and its
        # "use sync_dist=True" warning) off, while every rank still logs the same value.
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, rank_zero_only=True)
        self.history.append({"stage": _stage(trainer), **{k: float(v) for k, v in values.items()}})
        explained, degenerate, failed, fit_failed = (int(counts[k]) for k in self.COUNT_KEYS[:4])
        self.explained_total += explained
        self.skipped_total += degenerate + failed
        if degenerate:
            rank_zero_warn(f"{self.prefix}: {degenerate} degenerate image(s) (constant or non-finite) skipped")
        if fit_failed:
            rank_zero_warn(
                f"{self.prefix}: the local-FDR density fit diverged for {fit_failed} image(s); their lfdr is 1 "
                "(no lfdr discoveries), counted in lfdr_fit_failed"
            )
        self.probes.end_run()  # a collective: every rank, every explained run
        if trainer.is_global_zero and self._rows:
            z_obs = torch.cat([z.flatten() for z, _ in self._z])
            z_null = torch.cat([z0.flatten() for _, z0 in self._z])
            stage = _stage(trainer)
            unknown = log_pictures(trainer.loggers, self._rows, z_obs, z_null, trainer.global_step, stage, self.prefix)
            if unknown and not self._warned_loggers:
                warn_unknown(unknown)
                self._warned_loggers = True
            self._last_rows = self._rows
        self._rows, self._z = [], []

    def evolution_pictures(self) -> list[tuple[np.ndarray, str]]:
        """How each pictured probe's raw and lfdr maps moved over the explained runs (up to ``log_images``)."""
        followed = [(i, r) for i, r in self.probes.records.items() if r.history and r.image is not None]
        return [
            (evolution_picture(r.image, r.history, r.scale, title=f"id {i}"), f"id {i}: raw and lfdr maps by run")
            for i, r in followed[: self.config.log_images]
        ]

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
        self._pending.clear()
        if isinstance(self.engine, AttentionRegularizer):
            self.engine.close()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
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
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = AttnRegConfig(**state_dict["config"])
        if saved.seed != self.config.seed:
            rank_zero_warn(f"{self.prefix}: resuming with the checkpoint's seed {saved.seed} (was {self.config.seed})")
            self.config = dataclasses.replace(self.config, seed=saved.seed)
            if self.engine is not None:
                self.engine = AttentionRegularizer(self.engine.model, **self.config.engine_kwargs())
        self.explained_total = state_dict["explained_total"]
        self.skipped_total = state_dict["skipped_total"]
        self.validation_runs = state_dict.get("validation_runs", 0)
        self.probes.load_state_dict(state_dict.get("probes", {}))
        self.history = list(state_dict.get("history", []))
