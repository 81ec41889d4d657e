"""AttentionRegularizationMixin: tell the engine where a LightningModule's ViT is, and use it in your steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from attnreg_lightning.attention import HOLDER_NAMES, held_vit
from attnreg_lightning.config import AttnRegConfig
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.regularize import RegularizedAttention


class AttentionRegularizationMixin:
    """Mix into a ``LightningModule`` that holds a ViT.

    Example::

        class MyModule(AttentionRegularizationMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.vit = timm.create_model("vit_small_patch8_224", num_classes=10)

            def validation_step(self, batch, batch_idx):
                reg = self.regularized_attention(batch[0], n_bootstrap=20)
                self.log("lfdr_sparsity", reg.sparsity["lfdr"].mean())

    ``attention_model()`` returns the ViT (attribute ``vit``, else ``backbone``, else ``model``); override it
    when the ViT lives elsewhere. ``attnreg_config`` (optional attribute) holds the default knobs.
    """

    attnreg_config: AttnRegConfig | None = None

    def attention_model(self) -> nn.Module:
        vit = held_vit(self)
        if vit is None:
            names = ", ".join(repr(n) for n in HOLDER_NAMES)
            raise TypeError(
                f"{type(self).__name__} has no {names} module: override attention_model() to return its ViT"
            )
        return vit

    def regularized_attention(
        self, images: Tensor, sample_ids: Sequence[int] | Tensor | None = None, **overrides
    ) -> RegularizedAttention:
        """Regularized attention of ``images``; ``overrides`` replace knobs of :class:`AttnRegConfig`."""
        config = dataclasses.replace(self.attnreg_config or AttnRegConfig(), **overrides)
        return AttentionRegularizer(self.attention_model(), **config.engine_kwargs())(images, sample_ids=sample_ids)
