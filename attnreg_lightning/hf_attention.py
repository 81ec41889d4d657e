"""CLS attention of Hugging Face ``transformers`` ViTs: ViT, DeiT (CLS + distillation token), DINOv2, DINOv2
with registers, and vision models whose layers are laid out as theirs.

The backbone runs as the model runs it (its own embeddings, position embeddings interpolated at other image
sizes, every layer before the last with its configured attention kernel, SDPA untouched) until the last
layer's attention is called; a pre-hook takes that call's input (the normalized hidden states) and stops the
model. Only the CLS query and the keys are then projected, with the layer's own ``q_proj``/``k_proj``
(``query``/``key`` in transformers 4.x) and scaling. ``output_attentions`` is never used: depending on the
version it switches every layer to eager attention or returns nothing under SDPA.

``transformers`` is optional: a model can only be a Hugging Face model once ``transformers`` is imported, so
nothing here imports it.
"""

from __future__ import annotations

import inspect
import sys

from torch import Tensor, nn

from attnreg_lightning.attention import (
    as_pair,
    input_of,
    register_attention_reader,
    softmax_cls_row,
    split_heads,
)


def _is_hf_vision(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return (
        transformers is not None
        and isinstance(model, transformers.PreTrainedModel)
        and getattr(model, "main_input_name", None) == "pixel_values"
    )


def _base(model: nn.Module) -> nn.Module:
    """The backbone (``ViTModel`` inside ``ViTForImageClassification``, ...); the model itself when it is one."""
    return model.base_model


def _layers(base: nn.Module) -> nn.ModuleList | None:
    layers = getattr(base, "layers", None)  # transformers 5.x ViT, DeiT
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)  # DINOv2; every model in 4.x
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _projections(attention: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear] | None:
    """The self-attention module holding the q/k projections, and those projections."""
    inner = getattr(attention, "attention", attention)  # 4.x nests the self-attention one level down
    for q, k in (("q_proj", "k_proj"), ("query", "key")):
        q_lin, k_lin = getattr(inner, q, None), getattr(inner, k, None)
        if isinstance(q_lin, nn.Linear) and isinstance(k_lin, nn.Linear):
            return inner, q_lin, k_lin
    return None


def _hf_patch_size(model: nn.Module) -> tuple[int, int]:
    return as_pair(_base(model).config.patch_size)


def _check_hf(model: nn.Module) -> None:
    name = type(model).__name__
    base = _base(model)
    embeddings = getattr(base, "embeddings", None)
    if embeddings is None or getattr(base.config, "patch_size", None) is None:
        raise TypeError(f"{name} is a Hugging Face model without ViT patch embeddings (embeddings, config.patch_size)")
    if hasattr(embeddings, "random_masking"):
        raise TypeError(
            f"{name} shuffles and drops patch tokens in its embeddings (random masking, as ViTMAE): its attention "
            "can't be mapped back to image positions"
        )
    if getattr(embeddings, "cls_token", None) is None:
        raise TypeError(f"{name} has no class token (embeddings.cls_token): there is no CLS query to read")
    layers = _layers(base)
    attention = getattr(layers[-1], "attention", None) if layers is not None else None
    if attention is None or _projections(attention) is None:
        raise TypeError(
            f"{name}: its last layer has no self-attention laid out as ViT's (layers[-1].attention with "
            "q_proj/k_proj, or .attention.query/.key): its attention can't be read"
        )


def size_kwargs(model: nn.Module, images: Tensor) -> dict:
    """``interpolate_pos_encoding=True`` when ``images`` are not the config's size and the model's forward takes
    it (ViT, DeiT); DINOv2 interpolates always and takes no such argument."""
    same = tuple(images.shape[-2:]) == as_pair(_base(model).config.image_size)
    if same or "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters:
        return {}
    return {"interpolate_pos_encoding": True}


def _hf_attention(model: nn.Module, images: Tensor) -> Tensor:
    base = _base(model)
    layers = _layers(base)
    run = lambda: base(pixel_values=images, **size_kwargs(base, images))  # noqa: E731
    x, _ = input_of(layers[-1].attention, run, type(model).__name__)
    attn, q_proj, k_proj = _projections(layers[-1].attention)
    heads = attn.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.attention_head_size
    scale = getattr(attn, "scaling", head_dim**-0.5)
    ph, pw = _hf_patch_size(model)
    prefix = x.shape[1] - (images.shape[-2] // ph) * (images.shape[-1] // pw)  # CLS, distillation, registers
    q = split_heads(q_proj(x[:, :1]), heads)
    k = split_heads(k_proj(x), heads)
    return softmax_cls_row(q, k, scale, prefix)


register_attention_reader(
    "Hugging Face transformers ViT / DeiT / DINOv2",
    _is_hf_vision,
    _hf_attention,
    _check_hf,
    patch_size=_hf_patch_size,
)
