"""Small real components shared by the Lightning tests: a tiny timm ViT module and planted-shapes data."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from attnreg_lightning import AttentionRegularizationCallback
from attnreg_lightning.data.shapes import ShapesDataModule
from attnreg_lightning.models import ViTClassifier
from attnreg_lightning.regularize import RegularizedAttention

IMAGE_SIZE = 48


def tiny_module(seed_weights: int = 0, **kwargs) -> ViTClassifier:
    torch.manual_seed(seed_weights)
    model_kwargs = {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    return ViTClassifier("vit_tiny_patch16_224", num_classes=4, model_kwargs=model_kwargs, **kwargs)


def tiny_data(train_size: int = 64, val_size: int = 24, batch_size: int = 8, **kwargs) -> ShapesDataModule:
    return ShapesDataModule(
        train_size=train_size, val_size=val_size, batch_size=batch_size, image_size=IMAGE_SIZE, **kwargs
    )


def csv_trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    """A quiet CPU Trainer logging to CSV under ``tmp_path``."""
    return L.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="csv"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def val_images(data) -> tuple[torch.Tensor, list[int]]:
    """Every validation image of ``data`` (a shapes data module), in the loader's order, and their sample ids."""
    data.setup("validate")
    batches = list(data.val_dataloader())
    return torch.cat([b[0] for b in batches]), [int(i) for b in batches for i in b[3]]


class OrderedData(L.LightningDataModule):
    """The tiny shapes data, each loader's order chosen (``shuffle_train``, ``shuffle_val``; ids carried)."""

    def __init__(self, shuffle_train: bool, shuffle_val: bool) -> None:
        super().__init__()
        self.inner = tiny_data()
        self.shuffle_train, self.shuffle_val = shuffle_train, shuffle_val

    def setup(self, stage=None):
        self.inner.setup(stage)

    def train_dataloader(self):
        return DataLoader(self.inner.train_set, self.inner.batch_size, shuffle=self.shuffle_train)

    def val_dataloader(self):
        return DataLoader(self.inner.val_set, self.inner.batch_size, shuffle=self.shuffle_val)


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases and norm parameters: fresh timm models have zero biases and identity norms, under which a
    read-out that takes a bias from the wrong slice, swaps q-norm and k-norm or skips a norm still agrees."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


class RecordingCallback(AttentionRegularizationCallback):
    """The callback, keeping every result its engine gives, by epoch, as the callback records it."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.seen: dict[int, list[tuple[list[int], RegularizedAttention]]] = {}

    def _record(self, trainer, job, reg):
        self.seen.setdefault(trainer.current_epoch, []).append((list(job.ids), reg))
        return super()._record(trainer, job, reg)

    def ids(self, epoch: int) -> list[int]:
        """The sample ids explained at ``epoch``, in the order they were explained."""
        return [i for ids, _ in self.seen.get(epoch, []) for i in ids]


def observe_late(engine, monkeypatch, delay: Callable[[], None]) -> list[int]:
    """Make the forwards that ``engine.submit`` runs finish late: after the real forwards, ``delay()`` runs, and only
    then are the returned tensors written (copies of the real ones), so a reader that does not wait for them reads
    too early. Returns the batch sizes it was called with: a test shows the patch is reached."""
    real, calls = engine._observe, []

    def late(images, sample_ids=None):
        calls.append(images.shape[0])
        obs, null, logits = real(images, sample_ids)
        delay()
        return obs * 1, null * 1, None if logits is None else logits * 1

    monkeypatch.setattr(engine, "_observe", late)
    return calls
