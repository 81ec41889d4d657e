"""Small real components shared by the Lightning tests: a tiny timm ViT module and planted-shapes data."""

from __future__ import annotations

from attnreg_lightning.data.shapes import ShapesDataModule
from attnreg_lightning.models import ViTClassifier

IMAGE_SIZE = 48


def tiny_module(seed_weights: int = 0, **kwargs) -> ViTClassifier:
    import torch

    torch.manual_seed(seed_weights)
    model_kwargs = {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    return ViTClassifier("vit_tiny_patch16_224", num_classes=4, model_kwargs=model_kwargs, **kwargs)


def tiny_data(train_size: int = 64, val_size: int = 24, batch_size: int = 8, **kwargs) -> ShapesDataModule:
    return ShapesDataModule(
        train_size=train_size, val_size=val_size, batch_size=batch_size, image_size=IMAGE_SIZE, **kwargs
    )
