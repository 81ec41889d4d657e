"""Models that offer the DINO hub's ``get_last_selfattention(images) -> [B, H, N, N]`` (the full last-block
attention): its CLS row, prefix tokens (``num_prefix_tokens``, default 1) removed. The grid is the model's
``patch_embed.patch_size`` when it has one."""

from __future__ import annotations

from torch import Tensor, nn

from attnreg_lightning.readers.core import AttentionReader


def _matches(model: nn.Module) -> bool:
    return callable(getattr(model, "get_last_selfattention", None))


def _read(vit: nn.Module, images: Tensor) -> Tensor:
    full = vit.get_last_selfattention(images)
    return full[:, :, 0, getattr(vit, "num_prefix_tokens", 1) :].float()


READER = AttentionReader("get_last_selfattention (DINO hub)", _matches, _read)
