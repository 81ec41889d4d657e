"""Image classifiers the app fine-tunes, with the attention mixin: ``ViTClassifier`` (timm) and
``HFViTClassifier`` (Hugging Face ``transformers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from torch import Tensor, nn

from attnreg_lightning.mixin import AttentionRegularizationMixin
from attnreg_lightning.readers.hf import size_kwargs


def create_vit(
    model_name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """A timm model; ``checkpoint_path`` (.safetensors/.pth/.bin) loads local weights through timm's own loader,
    as it loads hub weights: position embeddings adapted, the classifier kept when its size matches
    ``num_classes`` and freshly initialized when it does not."""
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise ValueError(f"model.checkpoint_path={checkpoint_path!r} is not a file")
        # timm keeps the file's classifier only if the pretrained config says it has num_classes outputs
        classifier = timm.models.get_pretrained_cfg(model_name).classifier or "head"
        head = timm.models.load_state_dict(str(path)).get(f"{classifier}.weight")
        overlay = {"file": str(path), "num_classes": head.shape[0] if head is not None else 0}
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **model_kwargs
        )
    return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)


class ImageClassifier(AttentionRegularizationMixin, L.LightningModule):
    """The fine-tuning loop shared by the app's classifiers: cross-entropy, accuracy, AdamW with a linear
    warm-up and a cosine schedule. Batches are ``(images, labels, ...)`` tuples or dicts with ``image``/``label``
    keys; subclasses build the network and say which parameters are its head."""

    def __init__(self, lr: float, warmup_fraction: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")

    def freeze_all_but(self, network: nn.Module, head: list[nn.Parameter]) -> None:
        """Train only ``head`` (a linear probe)."""
        for p in network.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)

    @staticmethod
    def _inputs(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def _step(self, batch: Any, stage: str) -> Tensor:
        images, labels = self._inputs(batch)
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        # several validation loaders: Lightning keys each loader's val/* with its dataloader_idx
        return self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.hparams.warmup_fraction)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=max(1, warmup)),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
            ],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ViTClassifier(ImageClassifier):
    """Fine-tune a timm ViT (AdamW, cosine schedule; ``freeze_backbone=True`` trains only the head, a linear probe).

    Example: ``ViTClassifier("vit_small_patch8_224", num_classes=10)``; the model is ``self.vit``.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 4,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        freeze_backbone: bool = False,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__(lr, warmup_fraction)
        self.save_hyperparameters()
        self.vit = create_vit(model_name, num_classes, pretrained, checkpoint_path, **(model_kwargs or {}))
        if freeze_backbone:
            self.freeze_all_but(self.vit, list(self.vit.get_classifier().parameters()))

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)


def create_hf_vit(
    model_type: str, num_classes: int, checkpoint_path: str | None = None, config: dict | None = None
) -> nn.Module:
    """A Hugging Face ``transformers`` image classifier: random weights from ``AutoConfig.for_model(model_type,
    **config)``, or a local directory written by ``save_pretrained`` (its own architecture; a classifier of
    another size is freshly initialized)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face models need transformers: pip install -e '.[hf]'") from err
    if checkpoint_path is not None:
        if config:
            raise ValueError(
                "model.config must be null when model.checkpoint_path is set (the checkpoint's architecture is used)"
            )
        if not Path(checkpoint_path).is_dir():
            raise ValueError(f"model.checkpoint_path={checkpoint_path!r} is not a directory written by save_pretrained")
        return transformers.AutoModelForImageClassification.from_pretrained(
            checkpoint_path, num_labels=num_classes, ignore_mismatched_sizes=True
        )
    try:
        config_class = transformers.AutoConfig.for_model(model_type).__class__
    except ValueError as err:
        raise ValueError(
            f"model.model_type={model_type!r} is not a transformers model type (read: vit, deit, dinov2, "
            "dinov2_with_registers)"
        ) from err
    # transformers keeps unknown config keys as attributes: a typo would change nothing, silently
    unknown = sorted(set(config or {}) - set(config_class().to_dict()))
    if unknown:
        raise ValueError(f"model.config.{unknown[0]} is not a field of {config_class.__name__}")
    hf_config = config_class(**(config or {}), num_labels=num_classes)
    # transformers 5.x iterates config.architectures (None in a fresh config) for types with several classes (DeiT)
    hf_config.architectures = hf_config.architectures or []
    return transformers.AutoModelForImageClassification.from_config(hf_config)


class HFViTClassifier(ImageClassifier):
    """Fine-tune a Hugging Face ``transformers`` ViT, DeiT or DINOv2 (``model_type``: ``vit``, ``deit``,
    ``dinov2``, ``dinov2_with_registers``); same loop as :class:`ViTClassifier`. Images of another size than the
    config's are run with interpolated position embeddings.

    Example: ``HFViTClassifier("vit", num_classes=10, config={"image_size": 64, "patch_size": 8})``; the model is
    ``self.model``.
    """

    def __init__(
        self,
        model_type: str = "vit",
        num_classes: int = 4,
        checkpoint_path: str | None = None,
        config: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(lr, warmup_fraction)
        self.save_hyperparameters()
        self.model = create_hf_vit(model_type, num_classes, checkpoint_path, config)
        if freeze_backbone:
            prefix = self.model.base_model_prefix + "."
            head = [p for name, p in self.model.named_parameters() if not name.startswith(prefix)]
            self.freeze_all_but(self.model, head)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images, **size_kwargs(self.model, images)).logits
