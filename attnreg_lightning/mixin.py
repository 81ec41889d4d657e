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
        """Regularized attention of ``images``; ``overrides`` replace knobs of :class:`AttnRegConfig`.

        With ``sample_ids`` each image's nulls are its own (the same at every call); without them the nulls come
        from one stream per set of knobs, seeded by ``seed``, that goes on from call to call, so each batch gets
        fresh null noise and a module built alike draws the same sequence."""
        config = dataclasses.replace(self.attnreg_config or AttnRegConfig(), **overrides)
        precision = getattr(getattr(self, "_trainer", None), "precision", None)
        kwargs = config.engine_kwargs(precision, images.device)
        vit = self.attention_model()
        engines = self.__dict__.setdefault("_attnreg_engines", {})
        key = (id(vit), repr(sorted(kwargs.items())))
        if key not in engines:
            engines[key] = AttentionRegularizer(vit, **kwargs)
        return engines[key](images, sample_ids=sample_ids)
