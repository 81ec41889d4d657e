"""ViTClassifier: a timm Vision Transformer fine-tuned for classification, with the attention mixin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from torch import Tensor, nn

from attnreg_lightning.mixin import AttentionRegularizationMixin


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


class ViTClassifier(AttentionRegularizationMixin, L.LightningModule):
    """Fine-tune a timm ViT (AdamW, cosine schedule; ``freeze_backbone=True`` trains only the head, a linear probe).

    Batches are ``(images, labels, ...)`` tuples or dicts with ``image``/``label`` keys.
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
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.save_hyperparameters()
        self.vit = create_vit(model_name, num_classes, pretrained, checkpoint_path, **(model_kwargs or {}))
        if freeze_backbone:
            head = self.vit.get_classifier()
            for p in self.vit.parameters():
                p.requires_grad_(False)
            for p in head.parameters():
                p.requires_grad_(True)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)

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

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
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
