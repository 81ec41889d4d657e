"""The batch formats the callback reads, and which of a run's batch rows it explains."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

_FALLBACK_ID_STRIDE = 1 << 40  # ids made up per rank when the batch carries none
REGIONS = ("roi", "noise", "shortcut")
"""The regions a batch can mark, by name: the object (the region of interest), planted noise, a shortcut cue."""


@dataclass
class BatchView:
    """What the callback needs from a batch: images ``[B, C, H, W]``, optional sample ids and pixel masks of the
    regions it scores: the object (``masks``, the region of interest), planted ``noise`` and a suspected
    ``shortcut`` cue."""

    images: Tensor
    masks: Tensor | None = None
    ids: Tensor | None = None
    noise_masks: Tensor | None = None
    shortcut_masks: Tensor | None = None


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
    ``mask``/``masks``, ``id``/``ids``/``sample_id``, ``noise_mask`` and ``shortcut_mask`` keys.

    In a tuple the label ``y`` is ignored; among the extras a 1-D integer tensor of length ``B`` is the
    sample ids, and the others are, in order, the object mask, the noise mask and the shortcut mask:
    ``(x, y, id)``, ``(x, y, mask)``, ``(x, y, mask, id)``, ``(x, y, mask, id, noise_mask)`` and
    ``(x, y, mask, id, noise_mask, shortcut_mask)`` all read as expected.
    """
    if isinstance(batch, Tensor):
        return BatchView(batch)
    if isinstance(batch, Mapping):
        image = next((batch[k] for k in ("image", "images", "x") if k in batch), None)
        if image is None:
            raise ValueError(f"batch dict has no 'image' key (keys: {sorted(batch)}); pass batch_to_images=...")
        get = lambda *keys: next((batch[k] for k in keys if k in batch), None)  # noqa: E731
        ids = get("id", "ids", "sample_id")
        return BatchView(image, get("mask", "masks"), ids, get("noise_mask"), get("shortcut_mask"))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images, ids, masks = batch[0], None, []
        for item in batch[2:]:
            if ids is None and _is_ids(item, images.shape[0]):
                ids = item
            else:
                masks.append(item)
        masks += [None] * (3 - len(masks))
        return BatchView(images, masks[0], ids, masks[1], masks[2])
    raise ValueError(f"can't find images in a batch of type {type(batch).__name__}; pass batch_to_images=...")


def check_masks(masks: Tensor | None, images: Tensor, what: str) -> None:
    """Pixel masks must cover the images pixel for pixel: ``[B, H, W]`` or ``[B, 1, H, W]`` at the images' size
    (pooling a mask of another size to the token grid would place the regions wrongly, without a word)."""
    if masks is None:
        return
    b, _, h, w = images.shape
    if tuple(masks.shape) not in ((b, h, w), (b, 1, h, w)):
        raise ValueError(
            f"{what} of shape {tuple(masks.shape)} do not match the images {tuple(images.shape)}: expected "
            f"[{b}, {h}, {w}] or [{b}, 1, {h}, {w}]"
        )


def take_rows(values: Any, rows: list[int], size: int) -> Tensor | None:
    """The chosen rows of an optional per-image tensor of ``size`` rows (masks may come as arrays or lists).

    On a GPU this never waits for the device: all rows are the tensor itself, and others are gathered with an
    index copied to it asynchronously (indexing with a Python list would copy the index synchronously)."""
    if values is None:
        return None
    values = torch.as_tensor(values)
    if rows == list(range(size)):
        return values
    index = torch.tensor(rows, dtype=torch.long)
    if values.device.type == "cuda":
        index = index.pin_memory()
    return values.index_select(0, index.to(values.device, non_blocking=True))


def sampler_padding(loader: Any) -> Callable[[int], bool] | None:
    """Which of this rank's positions in ``loader`` are padding: a ``DistributedSampler`` without ``drop_last``
    repeats samples so every rank gets as many; position ``p`` of rank ``r`` is the run's sample ``r + p * W``,
    padding when past the dataset's end. None when the loader has no such sampler."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    n, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
    if n % world == 0:
        return None
    return lambda position: rank + position * world >= n


class RowPicker:
    """Which rows of one validation run's batches to explain, and their sample ids.

    Each sample id is explained once per run, even if a loader yields it twice (in two batches, or twice in
    one). Either only the rows that ``wanted`` accepts (the probes, wherever they are), or the first
    ``limit`` new images this rank sees.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.start_run()

    def start_run(self) -> None:
        self.seen = self.position = 0
        self.explained: set[int] = set()

    def pick(
        self,
        view: BatchView,
        rank: int,
        wanted: Callable[[int], bool] | None,
        padding: Callable[[int], bool] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Rows of ``view`` to explain now and their sample ids; ``padding(position)`` marks a distributed
        sampler's repeated samples, left to the rank that holds them for real."""
        size = view.images.shape[0]
        if view.ids is not None:
            batch_ids = torch.as_tensor(view.ids).tolist()
        else:  # made up by position: the same images get the same ids at every run
            base = rank * _FALLBACK_ID_STRIDE + self.position
            batch_ids = list(range(base, base + size))
        real = range(size) if padding is None else [j for j in range(size) if not padding(self.position + j)]
        self.position += size
        first = {}
        for j in real:
            first.setdefault(batch_ids[j], j)
        fresh = [j for i, j in first.items() if i not in self.explained]
        if wanted is not None:
            rows = [j for j in fresh if wanted(batch_ids[j])]
        else:
            rows = fresh[: max(0, self.limit - self.seen)]
        ids = [batch_ids[j] for j in rows]
        self.seen += len(rows)
        self.explained.update(ids)
        return rows, ids
