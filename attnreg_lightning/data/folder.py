"""Image folders: any torchvision ``ImageFolder`` tree with ``train/`` and ``val/`` splits, optional masks.

    root/train/<class>/<name>.png|jpg ...     root/val/<class>/<name>.png|jpg ...
    root/masks/val/<class>/<name>.png         (optional: object masks, non-zero = object)

Resize and normalization come from the timm model's pretrained config; for a model without one (a Hugging Face
ViT: ``model_name=None``) from ``mean``/``std`` when given, else ImageNet's. Items are dicts with ``image``,
``label``, ``id`` and, where the split has mask files, ``mask`` (all NaN for an image without a mask file: its
region metrics are left out; a warning counts such images).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms


def model_transform(
    model_name: str | None,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> transforms.Compose:
    """Resize (shorter side), centre-crop and normalize as the timm model's pretrained config says; ``mean`` and
    ``std``, when given, win (ImageNet's when neither they nor a timm model name are given)."""
    cfg = {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD}
    if model_name is not None:
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(model_name).to_dict())
    if (mean is None) != (std is None):
        raise ValueError("data.mean and data.std go together: give both or neither")
    if mean is not None:
        cfg = {**cfg, "mean": tuple(mean), "std": tuple(std)}
    interpolation = transforms.InterpolationMode(cfg.get("interpolation", "bicubic"))
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=interpolation),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


class MaskedImageFolder(Dataset):
    """An ``ImageFolder`` split whose items carry a sample id and, when present, a mask resized alike."""

    def __init__(self, root: Path, transform, image_size: int, mask_root: Path | None, id_offset: int) -> None:
        self.folder = datasets.ImageFolder(str(root), transform=transform)
        self.image_size, self.id_offset = image_size, id_offset
        self.mask_paths = None
        if mask_root is not None and mask_root.is_dir():
            paths = [mask_root / Path(p).relative_to(root).with_suffix(".png") for p, _ in self.folder.samples]
            missing = sum(not p.is_file() for p in paths)
            if missing < len(paths):
                self.mask_paths = [p if p.is_file() else None for p in paths]
            if 0 < missing < len(paths):
                warnings.warn(
                    f"{missing} of {len(paths)} images under {root} have no mask in {mask_root}: their region "
                    "metrics are left out (the masks that exist are used)",
                    stacklevel=2,
                )
        self.mask_transform = transforms.Compose(
            [
                transforms.Resize(image_size, interpolation=transforms.InterpolationMode.NEAREST),
                transforms.CenterCrop(image_size),
                transforms.PILToTensor(),
            ]
        )

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        image, label = self.folder[index]
        item = {"image": image, "label": label, "id": self.id_offset + index}
        if self.mask_paths is not None:
            path = self.mask_paths[index]
            if path is None:  # unknown, not empty: NaN covers no token, so the image has no region to score
                item["mask"] = torch.full((self.image_size, self.image_size), float("nan"))
            else:
                mask = self.mask_transform(Image.open(path).convert("L"))[0]
                item["mask"] = (mask > 0).to(torch.float32)
        return item


class ImageFolderDataModule(L.LightningDataModule):
    """``root/train`` and ``root/val`` image folders; ``num_classes`` must match the class folders."""

    def __init__(
        self,
        root: str,
        num_classes: int,
        model_name: str | None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        mask_dir: str = "masks",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise ValueError(
                    f"data.root={root!r} has no '{split}' folder (expected ImageFolder trees train/ and val/)"
                )
        self.num_classes, self.image_size = num_classes, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transform = model_transform(model_name, image_size, mean, std)
        self.mask_dir = mask_dir

    def setup(self, stage: str | None = None) -> None:
        sets = {}
        for offset, split in enumerate(("train", "val")):
            mask_root = self.root / self.mask_dir / split if self.mask_dir else None
            sets[split] = MaskedImageFolder(
                self.root / split, self.transform, self.image_size, mask_root, offset * 10_000_000
            )
        if len(sets["train"].classes) != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.num_classes} but {self.root / 'train'} has "
                f"{len(sets['train'].classes)} class folders {sets['train'].classes}"
            )
        self.train_set, self.val_set = sets["train"], sets["val"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFiles(Dataset):
    """Every image file under ``root`` (any depth, sorted by path), for explaining without labels: items are
    dicts with ``image`` and ``id`` (the file's place in that order), ``paths`` names them. Each image keeps its
    aspect: resized by its shorter side to ``image_size`` and centre-cropped, as the model's validation images are
    (:func:`model_transform`), so a non-square image is explained on its middle square (:meth:`crop_box`)."""

    def __init__(self, root: str | Path, model_name: str, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"images={str(root)!r} is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"images={str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.image_size = image_size
        self.transform = model_transform(model_name, image_size)

    def name(self, index: int) -> str:
        """The file's path under ``root``."""
        return self.paths[index].relative_to(self.root).as_posix()

    def crop_box(self, index: int) -> tuple[int, int, int, int, int, int]:
        """The file's size and the part of it the model sees: ``(width, height, left, top, right, bottom)`` in the
        file's pixels (the whole file for a square one)."""
        with Image.open(self.paths[index]) as image:  # the header only: no pixels are decoded
            width, height = image.size
        side = min(width, height)
        left, top = round((width - side) / 2), round((height - side) / 2)
        return width, height, left, top, left + side, top + side

    def cropped(self, indices: Sequence[int]) -> list[str]:
        """Of the images at ``indices``, the non-square ones, each as ``name (W x H: the middle S x S)``."""
        out = []
        for i in indices:
            width, height, left, top, right, bottom = self.crop_box(i)
            if (width, height) != (right - left, bottom - top):
                out.append(f"{self.name(i)} ({width}x{height}: the middle {right - left}x{bottom - top})")
        return out

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.transform(Image.open(self.paths[index]).convert("RGB")), "id": index}
