"""CLS-to-patch attention of a Vision Transformer's last attention, read by the registered reader of its family
(:mod:`attnreg_lightning.readers`).

    attn = cls_attention(model, images)               # [B, T], averaged over heads
    per_head = cls_attention(model, images, "all")     # [B, H, T]

Wrappers are read through: ``torch.compile``'s module and peft's ``PeftModel`` (the adapted model: LoRA layers
take part in the forward the reader runs), and a LightningModule's ``attention_model()`` / ``vit`` / ``backbone``
/ ``model``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import Tensor, nn

from attnreg_lightning.readers import attention_readers, find_reader, register_attention_reader
from attnreg_lightning.readers import timm as timm_reader
from attnreg_lightning.readers.core import as_pair

__all__ = [
    "attention_readers",
    "classifier",
    "cls_attention",
    "cls_attention_and_logits",
    "reads_logits",
    "register_attention_reader",
    "resolve_vit",
    "token_grid",
]

HOLDER_NAMES = ("vit", "backbone", "model")
"""Attributes of a LightningModule looked at, in order, for the ViT it fine-tunes."""


def held_vit(module: nn.Module) -> nn.Module | None:
    """The first of ``module.vit``, ``module.backbone``, ``module.model`` that is a module; None if none is."""
    for name in HOLDER_NAMES:
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model a wrapper runs: ``torch.compile``'s module holds it as ``_orig_mod``; a peft ``PeftModel`` as its
    base model, into which the adapters are injected (so the adapted model is the one read)."""
    while True:
        peft = sys.modules.get("peft")
        if peft is not None and isinstance(model, peft.PeftModel):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def resolve_vit(model: nn.Module) -> nn.Module:
    """The module that holds the ViT: ``model.attention_model()``, ``model`` itself when a reader matches it,
    else ``model.vit``, ``model.backbone`` or ``model.model`` (wrappers read through, see :func:`unwrap`)."""
    model = unwrap(model)
    if callable(getattr(model, "attention_model", None)):
        return unwrap(model.attention_model())
    if find_reader(model) is not None:
        return model
    held = held_vit(model)  # not `or`: a compiled module's truth value asks for its length
    return unwrap(held if held is not None else model)


def patch_size(vit: nn.Module) -> tuple[int, int] | None:
    """The model's ``(h, w)`` patch size: its reader's ``patch_size``, else ``patch_embed.patch_size``; None
    when neither is known."""
    reader = find_reader(vit)
    if reader is not None and reader.patch_size is not None:
        return reader.patch_size(vit)
    size = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    return None if size is None else as_pair(size)


def check_model(vit: nn.Module) -> None:
    """Raise ``TypeError`` naming the model class and why its CLS attention can't be read."""
    reader = find_reader(vit)
    if reader is None:
        tried = ", ".join(r.name for r in attention_readers())
        raise TypeError(
            f"{type(vit).__name__} is not a Vision Transformer any attention reader knows (readers tried: {tried}) "
            "and has no get_last_selfattention(images). Pass a timm or Hugging Face ViT, a DINO-style model, or a "
            "LightningModule whose attention_model() / vit / backbone / model is one; or teach the engine your "
            "model with attnreg_lightning.register_attention_reader(name, matches, read)"
        )
    if reader.check is not None:
        reader.check(vit)


def check_images(vit: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """Validate image shape for ``vit``; return the token grid ``(h, w)`` when it is known."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    patch = patch_size(vit)
    if patch is None:
        return None
    h, w = images.shape[-2:]
    if h % patch[0] or w % patch[1]:
        raise ValueError(
            f"{type(vit).__name__}: image size {h}x{w} is not divisible by the patch size {patch[0]}x{patch[1]}"
        )
    fixed = timm_reader.fixed_image_size(vit) if find_reader(vit) is timm_reader.READER else None
    if fixed is not None and (h, w) != fixed:
        raise ValueError(
            f"{type(vit).__name__}: images are {h}x{w} but the model takes {fixed[0]}x{fixed[1]} "
            "(create it with img_size=... or dynamic_img_size=True)"
        )
    return h // patch[0], w // patch[1]


def _checked_vit(model: nn.Module, images: Tensor, heads: str) -> nn.Module:
    if heads not in ("mean", "all"):
        raise ValueError(f"heads must be 'mean' or 'all', got {heads!r}")
    vit = resolve_vit(model)
    check_model(vit)
    check_images(vit, images)
    return vit


def _reduce(per_head: Tensor, heads: str) -> Tensor:
    per_head = per_head.float()
    return per_head.mean(dim=1) if heads == "mean" else per_head


def cls_attention(model: nn.Module, images: Tensor, heads: str = "mean") -> Tensor:
    """Last block's attention from the CLS query to each patch token, prefix tokens removed.

    Returns float32 ``[B, T]`` (``heads="mean"``, averaged over heads) or ``[B, H, T]`` (``heads="all"``).
    Runs under the caller's grad and autocast settings.
    """
    vit = _checked_vit(model, images, heads)
    return _reduce(find_reader(vit).read(vit, images), heads)


def classifier(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """``images -> class logits [B, classes]`` of the ViT read in ``model`` (:func:`resolve_vit`), from the first
    matching reader that knows its family's classifiers (a user's reader without one leaves it to the built-in
    reader of the family); None when the ViT has no classification head (a backbone) or no reader knows one."""
    vit = resolve_vit(model)
    for reader in attention_readers():
        if reader.classifier is not None and reader.matches(vit):
            return reader.classifier(vit)
    return None


def reads_logits(model: nn.Module) -> bool:
    """Whether the reader of ``model``'s attention also gives the class logits from the same forward
    (:func:`cls_attention_and_logits`)."""
    vit = resolve_vit(model)
    reader = find_reader(vit)
    return (
        reader is not None
        and reader.read_classified is not None
        and reader.classifier is not None
        and reader.classifier(vit) is not None
    )


def cls_attention_and_logits(model: nn.Module, images: Tensor, heads: str = "mean") -> tuple[Tensor, Tensor]:
    """:func:`cls_attention` and the class logits ``[B, classes]`` of the same forward, which runs on to the head
    (a model :func:`reads_logits` accepts)."""
    vit = _checked_vit(model, images, heads)
    reader = find_reader(vit)
    if reader.read_classified is None:  # a model without a head is refused by the reader itself, with its reason
        raise TypeError(f"{type(vit).__name__}: its attention reader ({reader.name}) gives no class logits")
    per_head, logits = reader.read_classified(vit, images)
    return _reduce(per_head, heads), logits


def num_heads(vit: nn.Module) -> int | None:
    """The last attention's number of heads, as its reader knows it; None when it doesn't."""
    reader = find_reader(vit)
    return None if reader is None or reader.num_heads is None else reader.num_heads(vit)


def pixels_per_token(model: nn.Module) -> int:
    """How many image pixels one patch token covers (the patch area); 1 when the patch size is unknown."""
    patch = patch_size(resolve_vit(model))
    return 1 if patch is None else patch[0] * patch[1]


def token_grid(model: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """The ``(h, w)`` patch grid of ``images`` for ``model``, when the model's patch size is known."""
    return check_images(resolve_vit(model), images)
