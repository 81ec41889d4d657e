"""timm Vision Transformers: ViT / DeiT / DeiT3 / FlexiViT / CLIP / DINOv2 / DINOv3 and hybrid (CNN stem) ViTs,
EVA / EVA02 and ``AttentionRope`` ViTs (rotary embeddings), BEiT and ``vit_relpos`` / ``vit_srelpos`` (relative
position bias), CaiT and XCiT (whose CLS attention is their last class-attention block's).

The model runs its ``forward_features`` as it runs (fused attention, gradient checkpointing, adapters untouched)
until the last attention module calls its attention kernel (:func:`~attnreg_lightning.readers.core.cls_logits`).
Only the model classes and attention modules below are accepted: each is checked against timm's own unfused
attention in the zoo test, so an accepted model is read exactly and any other is refused with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache

from torch import Tensor, nn

from attnreg_lightning.readers.core import (
    AttentionReader,
    as_pair,
    cls_logits,
    cls_logits_and_output,
    eager,
    patch_columns,
)


@cache
def _families() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The timm model classes read, and the attention modules their last attention may be."""
    from timm.layers import Attention, AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Beit
    from timm.models.cait import Cait, ClassAttn
    from timm.models.eva import Eva, EvaAttention
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import RelPosAttention, VisionTransformerRelPos
    from timm.models.xcit import Xcit

    models = (VisionTransformer, Eva, Beit, VisionTransformerRelPos, Cait, Xcit)
    attentions = (Attention, AttentionRope, EvaAttention, BeitAttention, RelPosAttention, ClassAttn)
    return models, attentions


def _is_timm(model: nn.Module) -> bool:
    return "timm" in sys.modules and isinstance(model, _families()[0])


def last_attention(vit: nn.Module) -> nn.Module | None:
    """The attention whose CLS row is read: the last class-attention block's (CaiT, XCiT), else the last
    block's."""
    for blocks in ("blocks_token_only", "cls_attn_blocks", "blocks"):
        seq = getattr(vit, blocks, None)
        if seq is not None and len(seq):
            return getattr(seq[-1], "attn", None)
    return None


def _check(vit: nn.Module) -> None:
    from timm.layers import DiffAttention

    name = type(vit).__name__
    if getattr(vit, "cls_token", None) is None:
        raise TypeError(
            f"{name} has no class token (class_token=False): there is no CLS query to read attention from; create "
            "it with class_token=True (global_pool='token'), use a model with a class token, or teach the engine the "
            "attention you want read with attnreg_lightning.register_attention_reader"
        )
    attn = last_attention(vit)
    if isinstance(attn, DiffAttention):
        raise TypeError(
            f"{name}: its last attention is differential (DiffAttention: softmax(q1 k1) - lambda softmax(q2 k2)), "
            "whose weights can be negative and are not a distribution over the tokens; the bootstrap's log-scale "
            "statistics need attention weights, so it is refused (use attn_layer='attn' to read a ViT)"
        )
    if not isinstance(attn, _families()[1]):
        raise TypeError(
            f"{name}: its last attention ({type(attn).__name__}) is not one the engine reads exactly (timm "
            "Attention, AttentionRope, EvaAttention, BEiT and relpos attention, CaiT/XCiT ClassAttn); teach the "
            "engine with attnreg_lightning.register_attention_reader"
        )


def _patch_size(vit: nn.Module) -> tuple[int, int]:
    """Pixels per token: the patch embedding's total stride (a hybrid's CNN stem included)."""
    embed = vit.patch_embed
    ratio = getattr(embed, "feat_ratio", None)
    return as_pair(ratio(as_scalar=False)) if callable(ratio) else as_pair(embed.patch_size)


def _num_heads(vit: nn.Module) -> int | None:
    return getattr(last_attention(vit), "num_heads", None)


def _columns(vit: nn.Module, images: Tensor, logits: Tensor) -> Tensor:
    ph, pw = _patch_size(vit)
    return patch_columns(logits, (images.shape[-2] // ph) * (images.shape[-1] // pw))


def _read(vit: nn.Module, images: Tensor) -> Tensor:
    logits = cls_logits(last_attention(vit), lambda: vit.forward_features(images), type(vit).__name__)
    return _columns(vit, images, logits)


def _classifier(vit: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The model itself (``forward_features`` then ``forward_head``), unless it was built with ``num_classes=0``."""
    return vit if getattr(vit, "num_classes", 0) > 0 else None


def _read_classified(vit: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    if _classifier(vit) is None:
        raise TypeError(f"{type(vit).__name__} has no classification head (num_classes=0)")
    logits, classes = cls_logits_and_output(last_attention(vit), lambda: eager(vit)(images), type(vit).__name__)
    return _columns(vit, images, logits), classes


def fixed_image_size(vit: nn.Module) -> tuple[int, int] | None:
    """The one image size the model takes, when it takes only one."""
    embed = vit.patch_embed
    if getattr(vit, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", False):
        return None
    size = getattr(embed, "img_size", None)
    return None if size is None else as_pair(size)


READER = AttentionReader(
    "timm Vision Transformer", _is_timm, _read, _check, _patch_size, _num_heads, _classifier, _read_classified
)
