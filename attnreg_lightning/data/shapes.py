"""Planted-object shapes: a download-free classification set with ground-truth object masks.

Each image is textured grey noise with one coloured object planted at a random place; the label is the
object's colour, so only the object carries it. With ``noise_squares > 0``, squares of strong pixel noise
are planted outside the object: they draw attention but carry no label (the paper's simulation).

A planted shortcut (``shortcut_size > 0``): a small square marker outside the object and the noise squares, placed
at a multiple of its size (whole tokens when the size is a multiple of the patch), whose colour, from a palette of
its own, can give the label away. On training images the marker shows the label's cue colour with probability
``shortcut_leak`` (else a random class's), and the object shows the label's colour with probability
``shortcut_honest`` (else a random class's: the honest feature lies); a model trained on leaked cues leans on the
marker the more, the less often the object tells the truth. Validation images are always honest, and their marker
colour is drawn at random: the cue lies on most of them (accuracy on those is how much the model relies on it).

Items are ``(image, label, object_mask, id)``, plus ``noise_mask`` when noise squares or a shortcut are on (all
zeros without noise squares), plus ``shortcut_mask`` when a shortcut is on; each a pure function of
``(seed, index)`` (and the split).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Well-separated hues; the class is the colour, whatever the shape.
PALETTE = np.array(
    [
        [0.90, 0.10, 0.10], [0.10, 0.75, 0.15], [0.15, 0.25, 0.95], [0.95, 0.85, 0.10], [0.85, 0.15, 0.85],
        [0.10, 0.85, 0.85], [0.95, 0.50, 0.05], [0.55, 0.25, 0.05], [0.50, 0.95, 0.50], [0.45, 0.10, 0.60],
    ],
    dtype=np.float32,
)  # fmt: skip
SHAPES = ("square", "disk", "triangle")
CUE_OFFSET = 4
"""The cue colour of class ``c`` is ``PALETTE[(c + CUE_OFFSET) % len(PALETTE)]``: for up to 4 classes, colours no
object wears."""


@dataclass(frozen=True)
class ShapesSpec:
    image_size: int = 64
    num_classes: int = 4
    object_fraction: float = 0.07
    noise_squares: int = 0
    noise_square_size: int = 8
    seed: int = 0
    shortcut_size: int = 0
    shortcut_leak: float = 1.0
    shortcut_honest: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(PALETTE):
            raise ValueError(f"num_classes must be in [2, {len(PALETTE)}], got {self.num_classes}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 0.005 <= self.object_fraction <= 0.5:
            raise ValueError(f"object_fraction must be in [0.005, 0.5], got {self.object_fraction}")
        if self.noise_squares < 0:
            raise ValueError(f"noise_squares must be >= 0, got {self.noise_squares}")
        if not 0 <= self.shortcut_size <= self.image_size // 4:
            raise ValueError(f"shortcut_size must be in [0, image_size / 4], got {self.shortcut_size}")
        if self.shortcut_size and self.num_classes > CUE_OFFSET:
            raise ValueError(
                f"shortcut_size={self.shortcut_size} needs num_classes <= {CUE_OFFSET} (got {self.num_classes}): "
                "beyond, a class's cue colour would be another class's object colour"
            )
        for name in ("shortcut_leak", "shortcut_honest"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


def _shape_mask(kind: str, size: int, top: int, left: int, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = yy - top, xx - left
    inside_box = (y >= 0) & (y < side) & (x >= 0) & (x < side)
    if kind == "square":
        return inside_box
    if kind == "disk":
        r = side / 2
        return ((y - r + 0.5) ** 2 + (x - r + 0.5) ** 2) <= r * r
    return inside_box & (np.abs(x - side / 2 + 0.5) <= y / 2 + 0.5)  # triangle, apex up


def _free_square(rng: np.random.Generator, taken: np.ndarray, size: int, aligned: bool = False) -> np.ndarray:
    """A ``size`` square that does not touch ``taken`` (20 tries; all False if none fits); ``aligned``: at a
    multiple of ``size`` (on the token grid when ``size`` is a multiple of the patch)."""
    s = taken.shape[0]
    square = np.zeros((s, s), bool)
    for _attempt in range(20):
        if aligned:
            y0, x0 = (int(v) * size for v in rng.integers(0, (s - size) // size + 1, size=2))
        else:
            y0, x0 = (int(v) for v in rng.integers(0, s - size + 1, size=2))
        if not taken[max(0, y0 - 1) : y0 + size + 1, max(0, x0 - 1) : x0 + size + 1].any():
            square[y0 : y0 + size, x0 : x0 + size] = True
            break
    return square


def render(spec: ShapesSpec, index: int, train: bool = True) -> dict[str, np.ndarray | int]:
    """One item as numpy arrays: image ``[3, H, W]`` in [0, 1], label, object, noise and shortcut masks
    ``[H, W]``, and the classes the object's and the marker's colours stand for (``-1``: no marker)."""
    rng = np.random.default_rng([spec.seed, index])
    s = spec.image_size
    # textured background: smoothed grey noise, low contrast, no colour
    coarse = rng.normal(0.5, 0.12, size=(s // 4 + 1, s // 4 + 1)).astype(np.float32)
    texture = np.kron(coarse, np.ones((4, 4), np.float32))[:s, :s] + rng.normal(0, 0.04, (s, s)).astype(np.float32)
    image = np.repeat(texture[None], 3, axis=0)
    label = int(rng.integers(spec.num_classes))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    side = max(4, int(round(np.sqrt(spec.object_fraction * s * s) * rng.uniform(0.85, 1.15))))
    top, left = (int(v) for v in rng.integers(0, s - side + 1, size=2))
    obj = _shape_mask(kind, s, top, left, side)
    shows = label
    if spec.shortcut_size and train and rng.uniform() >= spec.shortcut_honest:
        shows = int(rng.integers(spec.num_classes))  # the honest feature lies
    colour = PALETTE[shows] * rng.uniform(0.85, 1.0)
    shade = 1.0 + rng.normal(0, 0.03, (s, s)).astype(np.float32)
    image = np.where(obj[None], colour[:, None, None] * shade[None], image)
    noise = np.zeros((s, s), bool)
    for _ in range(spec.noise_squares):  # a place that does not touch the object
        noise |= _free_square(rng, obj, spec.noise_square_size)
    image = np.where(noise[None], rng.uniform(0, 1, (3, s, s)).astype(np.float32), image)
    cue, marker = -1, np.zeros((s, s), bool)
    if spec.shortcut_size:
        leaked = train and rng.uniform() < spec.shortcut_leak
        cue = label if leaked else int(rng.integers(spec.num_classes))
        marker = _free_square(rng, obj | noise, spec.shortcut_size, aligned=True)
        image = np.where(marker[None], PALETTE[(cue + CUE_OFFSET) % len(PALETTE)][:, None, None], image)
    return {
        "image": np.clip(image, 0, 1), "label": label, "mask": obj, "noise_mask": noise, "shortcut_mask": marker,
        "object_class": shows, "cue_class": cue,
    }  # fmt: skip


class ShapesDataset(Dataset):
    """``length`` planted-object images; normalized to mean 0.5, std 0.5 per channel (timm's ViT default)."""

    def __init__(self, length: int, spec: ShapesSpec = ShapesSpec(), id_offset: int = 0, train: bool = True) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.spec, self.id_offset, self.train = length, spec, id_offset, train

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample_id = self.id_offset + index
        item = render(self.spec, sample_id, self.train)
        image = (torch.from_numpy(item["image"]) - 0.5) / 0.5
        out = (image, item["label"], torch.from_numpy(item["mask"].astype(np.float32)), sample_id)
        if self.spec.noise_squares or self.spec.shortcut_size:
            out = (*out, torch.from_numpy(item["noise_mask"].astype(np.float32)))
        if self.spec.shortcut_size:
            out = (*out, torch.from_numpy(item["shortcut_mask"].astype(np.float32)))
        return out


class ShapesDataModule(L.LightningDataModule):
    """Train and validation splits of :class:`ShapesDataset` with disjoint sample ids."""

    def __init__(
        self,
        train_size: int = 4000,
        val_size: int = 512,
        batch_size: int = 64,
        image_size: int = 64,
        num_classes: int = 4,
        object_fraction: float = 0.07,
        noise_squares: int = 0,
        noise_square_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        shortcut_size: int = 0,
        shortcut_leak: float = 1.0,
        shortcut_honest: float = 1.0,
    ) -> None:
        super().__init__()
        self.spec = ShapesSpec(
            image_size, num_classes, object_fraction, noise_squares, noise_square_size, seed, shortcut_size,
            shortcut_leak, shortcut_honest,
        )  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_size, self.val_size, self.batch_size, self.num_workers = (
            train_size,
            val_size,
            batch_size,
            num_workers,
        )
        self.num_classes = num_classes

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ShapesDataset(self.train_size, self.spec, id_offset=0, train=True)
        self.val_set = ShapesDataset(self.val_size, self.spec, id_offset=10_000_000, train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers)
