"""AttentionRegularizationCallback: bootstrap-regularized attention maps of validation images, while training."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from attnreg_lightning.attention import check_model, resolve_vit
from attnreg_lightning.config import AttnRegConfig
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.loggers import PictureRow, log_pictures, warn_unknown
from attnreg_lightning.metrics import (
    MeanScores,
    NullCalibration,
    TopKBaseline,
    curve_at,
    image_scores,
    score_keys,
    token_mask,
)
from attnreg_lightning.stats import null_pvalues
from attnreg_lightning.viz import picture_row

_FALLBACK_ID_STRIDE = 1 << 40  # ids made up per rank when the batch carries none


@dataclass
class BatchView:
    """What the callback needs from a batch: images ``[B, C, H, W]``, optional pixel masks and sample ids."""

    images: Tensor
    masks: Tensor | None = None
    ids: Tensor | None = None
    noise_masks: Tensor | None = None


def default_batch_to_images(batch: Any) -> BatchView:
    """Read ``x``, ``(x, y)``, ``(x, y, mask)``, ``(x, y, mask, id)``, ``(x, y, mask, id, noise_mask)`` or a dict
    with ``image``/``mask``/``id``/``noise_mask`` keys."""
    if isinstance(batch, Tensor):
        return BatchView(batch)
    if isinstance(batch, Mapping):
        image = next((batch[k] for k in ("image", "images", "x") if k in batch), None)
        if image is None:
            raise ValueError(f"batch dict has no 'image' key (keys: {sorted(batch)}); pass batch_to_images=...")
        get = lambda *keys: next((batch[k] for k in keys if k in batch), None)  # noqa: E731
        return BatchView(image, get("mask", "masks"), get("id", "ids", "sample_id"), get("noise_mask"))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        extra = list(batch[2:5]) + [None] * (5 - len(batch))
        return BatchView(batch[0], *extra[:3])
    raise ValueError(f"can't find images in a batch of type {type(batch).__name__}; pass batch_to_images=...")


def _compute(metric: Metric):
    """``metric.compute()``; a rank that explained nothing still takes part in the sync, without a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return metric.compute()


class AttentionRegularizationCallback(Callback):
    """Explain validation images with bootstrap-regularized attention and log maps and metrics.

    Each validation epoch (every ``every_n_epochs``, never during sanity checking) it explains the first
    ``num_images`` validation images of each rank, logs ``attnreg/<map>/<metric>`` at epoch end (reduced
    over ranks by torchmetrics) and, from rank 0, a picture row per image for ``log_images`` images. It
    never changes training: no gradients, modes restored, its own random generators.

    Example::

        from attnreg_lightning import AttentionRegularizationCallback

        trainer = L.Trainer(callbacks=[AttentionRegularizationCallback(method="normal", n_bootstrap=10)])
        trainer.fit(model, datamodule)  # model: a timm ViT LightningModule (attribute ``vit``/``backbone``)

    Args:
        config: all knobs at once; or give them as keyword arguments (``n_bootstrap=20``, ...).
        batch_to_images: reads a batch into a :class:`BatchView` when the default reader can't.
    """

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
        self.calibration = NullCalibration()
        self.topk = TopKBaseline()
        self.explained_total = 0
        self.skipped_total = 0
        self._active = False
        self._explained = 0
        self._skipped = 0
        self._rows: list[PictureRow] = []
        self._z: list[tuple[Tensor, Tensor]] = []
        self._warned_loggers = False

    def batch_to_images(self, batch: Any) -> BatchView:
        return self._batch_to_images(batch)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_model(resolve_vit(pl_module))
        self.engine = AttentionRegularizer(pl_module, **self.config.engine_kwargs())

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = self.config
        self._active = (
            not trainer.sanity_checking and cfg.num_images > 0 and trainer.current_epoch % cfg.every_n_epochs == 0
        )
        self._explained = self._skipped = 0
        self._rows, self._z = [], []
        for metric in (self.scores, self.calibration, self.topk):
            metric.to(pl_module.device).reset()

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
        if not self._active or self._explained >= cfg.num_images:
            return
        view = self.batch_to_images(batch)
        take = min(cfg.num_images - self._explained, view.images.shape[0])
        images = view.images[:take].to(pl_module.device)
        if view.ids is not None:
            ids = torch.as_tensor(view.ids[:take]).tolist()
        else:
            base = trainer.global_rank * _FALLBACK_ID_STRIDE + self._explained
            ids = list(range(base, base + take))
        self._explained += take
        try:
            reg = self.engine(images, sample_ids=ids)
        except Exception as err:
            if cfg.on_error == "raise":
                raise
            rank_zero_warn(f"attnreg: skipped {take} images of validation batch {batch_idx}: {err!r}")
            self._skipped += take
            return
        valid = reg.significance.valid
        bad = int((~valid).sum())
        if bad:
            if cfg.on_error == "raise":
                raise ValueError(f"attnreg: {bad} degenerate image(s) (constant or non-finite) in batch {batch_idx}")
            self._skipped += bad
        if not bool(valid.any()):
            return
        roi = self._token_mask(view.masks, take, reg.grid, images.device)
        noise = self._token_mask(view.noise_masks, take, reg.grid, images.device)
        scores = image_scores(reg, cfg.maps, roi, noise)
        self.scores.update(scores)
        self.calibration.update(null_pvalues(reg.significance)[valid])
        if roi is not None:
            self.topk.update(reg.attention[valid], roi[valid])
        if trainer.is_global_zero:
            self._collect_pictures(images, reg, ids, scores)

    @staticmethod
    def _token_mask(masks: Tensor | None, take: int, grid, device) -> Tensor | None:
        # without a known token grid (a model that only offers get_last_selfattention) masks can't be mapped
        return None if masks is None or grid is None else token_mask(torch.as_tensor(masks[:take]).to(device), grid)

    def _collect_pictures(self, images: Tensor, reg, ids: list[int], scores: dict[str, Tensor]) -> None:
        valid_rows = reg.significance.valid.nonzero().flatten().tolist()
        self._z.append((reg.significance.z[reg.significance.valid], reg.significance.z_null[reg.significance.valid]))
        for j, i in enumerate(valid_rows):
            if len(self._rows) >= self.config.log_images or reg.grid is None:
                return
            strip, caption = picture_row(images[i], reg, i, self.config.maps)
            stats = {"id": ids[i], **{k: float(v[j]) for k, v in scores.items()}}
            self._rows.append(PictureRow(strip, f"id {ids[i]}: {caption}", stats))

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        # compute() syncs across ranks, so every rank calls it, whatever it explained, and logs the same values
        scores, srmsd, curve = (_compute(m) for m in (self.scores, self.calibration, self.topk))
        values = {f"attnreg/{k}": v for k, v in scores.items()}
        values["attnreg/null_srmsd"] = srmsd
        for m in self.config.maps:
            # D: the share of attention on the noise squares kept by a map, relative to the raw map's
            noise_mass, raw_noise = values.get(f"attnreg/{m}/noise_mass"), values.get("attnreg/raw/noise_mass")
            if noise_mass is not None and raw_noise is not None and raw_noise > 0:
                values[f"attnreg/{m}/noise_d"] = noise_mass / raw_noise
        kept = values.get("attnreg/lfdr/sparsity")
        if kept is not None and torch.isfinite(curve).all():  # curve is NaN when no rank saw a mask
            values["attnreg/topk/roi_f1"] = curve_at(curve, 1 - kept)
        values = {k: v.float() for k, v in values.items() if torch.isfinite(v)}
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        counts = torch.tensor([self._explained, self._skipped], dtype=torch.float32, device=pl_module.device)
        pl_module.log_dict(
            {"attnreg/explained": counts[0], "attnreg/skipped": counts[1]},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            reduce_fx="sum",
        )
        self.explained_total += self._explained
        self.skipped_total += self._skipped
        if self._skipped:
            rank_zero_warn(f"attnreg: {self._skipped} degenerate image(s) skipped this epoch on rank 0")
        if trainer.is_global_zero and self._rows:
            z_obs = torch.cat([z.flatten() for z, _ in self._z])
            z_null = torch.cat([z0.flatten() for _, z0 in self._z])
            unknown = log_pictures(
                trainer.loggers, self._rows, z_obs, z_null, trainer.global_step, trainer.current_epoch
            )
            if unknown and not self._warned_loggers:
                warn_unknown(unknown)
                self._warned_loggers = True
        self._rows, self._z = [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "explained_total": self.explained_total,
            "skipped_total": self.skipped_total,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = AttnRegConfig(**state_dict["config"])
        if saved.seed != self.config.seed:
            rank_zero_warn(f"attnreg: resuming with the checkpoint's seed {saved.seed} (was {self.config.seed})")
            self.config = dataclasses.replace(self.config, seed=saved.seed)
            if self.engine is not None:
                self.engine = AttentionRegularizer(self.engine.model, **self.config.engine_kwargs())
        self.explained_total = state_dict["explained_total"]
        self.skipped_total = state_dict["skipped_total"]
