"""Hugging Face ``transformers`` vision Transformers: ViT, DeiT (CLS + distillation token), ViTMSN, DPT, DINOv2
(+ registers), DINOv3 (rotary embeddings), BEiT and Data2Vec-Vision (relative position bias), YOLOS (detection
tokens after the patches), and the CLIP-family vision towers (CLIP, MetaCLIP 2, BLIP).

The model runs as it runs (its embeddings, position embeddings interpolated at other image sizes, its
configured attention kernel, adapters untouched) until its last layer's attention calls its kernel
(:func:`~attnreg_lightning.readers.core.cls_logits`); ``output_attentions`` is never used. Only the model types
below are accepted: each is checked against the model's own eager ``output_attentions`` in the zoo test.

``transformers`` is optional: a model can only be a Hugging Face model once ``transformers`` is imported, so
nothing here imports it.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

from torch import Tensor, nn

from attnreg_lightning.readers.core import (
    AttentionReader,
    as_pair,
    cls_logits,
    cls_logits_and_output,
    eager,
    patch_columns,
)

MODEL_TYPES = (
    "vit",
    "deit",
    "vit_msn",
    "dpt",
    "dinov2",
    "dinov2_with_registers",
    "dinov3_vit",
    "beit",
    "data2vec-vision",
    "yolos",
    "clip_vision_model",
    "metaclip_2_vision_model",
    "blip_vision_model",
)
"""The vision towers read exactly (``config.model_type``)."""


def _is_hf_vision(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return (
        transformers is not None
        and isinstance(model, transformers.PreTrainedModel)
        and getattr(model, "main_input_name", None) == "pixel_values"
    )


def tower(model: nn.Module) -> nn.Module:
    """The vision backbone: the model itself when it holds the embeddings (DINOv3's ``base_model`` is its
    encoder), else ``vision_model`` (CLIP-family heads), else the base model (``ViTModel`` inside
    ``ViTForImageClassification``, ...)."""
    if isinstance(getattr(model, "embeddings", None), nn.Module):
        return model
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model.base_model


def _last_attention(base: nn.Module) -> nn.Module | None:
    for path in ("layers", "layer", "encoder.layer", "encoder.layers", "model.layer"):
        layers = base
        for name in path.split("."):
            layers = getattr(layers, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            last = layers[-1]
            return getattr(last, "attention", None) or getattr(last, "self_attn", None)
    return None


def _patch_size(model: nn.Module) -> tuple[int, int]:
    return as_pair(tower(model).config.patch_size)


def _num_heads(model: nn.Module) -> int | None:
    return getattr(tower(model).config, "num_attention_heads", None)


def _check(model: nn.Module) -> None:
    name = type(model).__name__
    base = tower(model)
    config = base.config
    embeddings = getattr(base, "embeddings", None)
    if hasattr(embeddings, "random_masking"):
        raise TypeError(
            f"{name} shuffles and drops patch tokens in its embeddings (random masking, as ViTMAE): its attention "
            "can't be mapped back to image positions; explain a ViT built from its encoder's weights (ViTModel) "
            "instead"
        )
    if not any(getattr(embeddings, a, None) is not None for a in ("cls_token", "class_embedding")):
        raise TypeError(
            f"{name} has no class token (embeddings.cls_token): there is no CLS query to read; use a model with a "
            "class token (ViT, DeiT, DINOv2, ...) or teach the engine the attention you want read with "
            "attnreg_lightning.register_attention_reader"
        )
    if config.model_type not in MODEL_TYPES:
        raise TypeError(
            f"{name} (model_type={config.model_type!r}) is not among the Hugging Face vision models whose attention "
            f"the engine reads exactly ({', '.join(MODEL_TYPES)}); teach the engine with "
            "attnreg_lightning.register_attention_reader"
        )
    if getattr(config, "is_hybrid", False):
        raise TypeError(
            f"{name} is a hybrid DPT (a BiT backbone before the Transformer): its token grid is not the config's "
            "patch grid, and that layout is not read; use a DPT without is_hybrid"
        )
    if _last_attention(base) is None:
        raise TypeError(
            f"{name}: its last layer has no attention module (attention / self_attn); teach the engine where it is "
            "with attnreg_lightning.register_attention_reader"
        )


def size_kwargs(model: nn.Module, images: Tensor) -> dict:
    """``interpolate_pos_encoding=True`` when ``images`` are not the config's size and the model's forward takes
    it (ViT, DeiT, BEiT, CLIP); DINOv2, DINOv3 and YOLOS adapt always and take no such argument."""
    same = tuple(images.shape[-2:]) == as_pair(tower(model).config.image_size)
    if same or "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters:
        return {}
    return {"interpolate_pos_encoding": True}


def _columns(model: nn.Module, images: Tensor, logits: Tensor) -> Tensor:
    ph, pw = _patch_size(model)
    after = getattr(tower(model).config, "num_detection_tokens", 0)  # YOLOS: detection tokens follow the patches
    return patch_columns(logits, (images.shape[-2] // ph) * (images.shape[-1] // pw), after)


def _read(model: nn.Module, images: Tensor) -> Tensor:
    base = tower(model)
    run = lambda: eager(base)(pixel_values=images, **size_kwargs(base, images))  # noqa: E731
    return _columns(model, images, cls_logits(_last_attention(base), run, type(model).__name__))


def _is_classifier(model: nn.Module) -> bool:
    """One of the image classification classes transformers' auto mapping lists for the model's type (a CLIP vision
    tower, a ``ViTModel`` or a ``Dinov2Model`` are not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model.config.model_type, ())
    return type(model).__name__ in ((names,) if isinstance(names, str) else names)


def _classifier(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    if not _is_classifier(model):
        return None

    def classify(images: Tensor) -> Tensor:
        return model(pixel_values=images, **size_kwargs(model, images)).logits

    return classify


def _read_classified(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    if not _is_classifier(model):
        raise TypeError(f"{type(model).__name__} has no classification head (not an image classification model)")

    def run() -> Tensor:
        return eager(model)(pixel_values=images, **size_kwargs(model, images)).logits

    caught, logits = cls_logits_and_output(_last_attention(tower(model)), run, type(model).__name__)
    return _columns(model, images, caught), logits


READER = AttentionReader(
    "Hugging Face transformers vision Transformer",
    _is_hf_vision,
    _read,
    _check,
    _patch_size,
    _num_heads,
    _classifier,
    _read_classified,
)
