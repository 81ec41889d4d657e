"""CLS-to-patch attention of a Vision Transformer's last block.

For timm ``VisionTransformer`` models the last block is not run as a whole: every block before it runs
as usual (fused attention untouched), and for the last one only the keys and the CLS query are projected,
so one ``1 x T`` softmax row per head is all that is ever formed. Models that expose
``get_last_selfattention(images) -> [B, H, T+1, T+1]`` (the DINO hub convention) are read through it.
A LightningModule is read through the mixin protocol: ``attention_model()``, else a ``vit`` or ``backbone``
attribute.

    attn = cls_attention(model, images)               # [B, T], averaged over heads
    per_head = cls_attention(model, images, "all")     # [B, H, T]
"""

from __future__ import annotations

from torch import Tensor, nn


def resolve_vit(model: nn.Module) -> nn.Module:
    """The module that holds the ViT: ``model.attention_model()``, ``model.vit``, ``model.backbone`` or ``model``."""
    if callable(getattr(model, "attention_model", None)):
        return model.attention_model()
    if _is_readable(model):
        return model
    for name in ("vit", "backbone"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _is_timm_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed"))


def _has_last_selfattention(model: nn.Module) -> bool:
    return callable(getattr(model, "get_last_selfattention", None))


def _is_readable(model: nn.Module) -> bool:
    return _is_timm_vit(model) or _has_last_selfattention(model)


def _patch_size(vit: nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_model(vit: nn.Module) -> None:
    """Raise ``TypeError`` naming the model class and what is missing if its CLS attention can't be read."""
    name = type(vit).__name__
    if not _is_timm_vit(vit) and _has_last_selfattention(vit):
        return
    missing = [a for a in ("patch_embed", "blocks", "_pos_embed") if not hasattr(vit, a)]
    if missing:
        raise TypeError(
            f"{name} is not a readable Vision Transformer: it has no {', '.join(missing)} and no "
            "get_last_selfattention(images); pass a timm VisionTransformer, a DINO-style model, or a "
            "LightningModule whose attention_model() / vit / backbone is one"
        )
    if hasattr(vit, "rope"):
        raise TypeError(
            f"{name} uses rotary position embeddings (timm EVA-style blocks): reading its attention without "
            "applying them to q and k would give wrong maps, so it is refused (RoPE ViTs are not supported yet)"
        )
    if getattr(vit, "cls_token", None) is None:
        raise TypeError(f"{name} has no class token (class_token=False): there is no CLS query to read attention from")
    last = vit.blocks[-1]
    attn = getattr(last, "attn", None)
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    if not hasattr(last, "norm1") or attn is None or not all(hasattr(attn, a) for a in needed):
        raise TypeError(
            f"{name}: last block {type(last).__name__} has no pre-norm self-attention with a fused qkv "
            f"projection (norm1, attn.{{{', '.join(needed)}}}); its attention can't be read"
        )


def check_images(vit: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """Validate image shape for ``vit``; return the token grid ``(h, w)`` when it is known."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    patch = _patch_size(vit)
    if patch is None:
        return None
    h, w = images.shape[-2:]
    if h % patch[0] or w % patch[1]:
        raise ValueError(
            f"{type(vit).__name__}: image size {h}x{w} is not divisible by the patch size {patch[0]}x{patch[1]}"
        )
    fixed = getattr(vit.patch_embed, "img_size", None)
    strict = _is_timm_vit(vit) and not vit.dynamic_img_size and getattr(vit.patch_embed, "strict_img_size", True)
    if strict and fixed is not None:
        if (h, w) != tuple(fixed):
            raise ValueError(
                f"{type(vit).__name__}: images are {h}x{w} but the model takes {fixed[0]}x{fixed[1]} "
                "(create it with img_size=... or dynamic_img_size=True)"
            )
    return h // patch[0], w // patch[1]


def _timm_cls_attention(vit: nn.Module, images: Tensor) -> Tensor:
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    b, n, _ = h.shape
    heads, dim = attn.num_heads, attn.head_dim
    width = heads * dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_bias = None if bias is None else bias[:width]
    k_bias = None if bias is None else bias[width : 2 * width]
    # Only the CLS query row is needed; values and the MLP never enter the attention weights.
    q = nn.functional.linear(h[:, :1], weight[:width], q_bias).reshape(b, 1, heads, dim).transpose(1, 2)
    k = nn.functional.linear(h, weight[width : 2 * width], k_bias).reshape(b, n, heads, dim).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    return scores.float().softmax(dim=-1)[:, :, 0, vit.num_prefix_tokens :]


def cls_attention(model: nn.Module, images: Tensor, heads: str = "mean") -> Tensor:
    """Last block's attention from the CLS query to each patch token, prefix tokens removed.

    Returns float32 ``[B, T]`` (``heads="mean"``, averaged over heads) or ``[B, H, T]`` (``heads="all"``).
    Runs under the caller's grad and autocast settings.
    """
    if heads not in ("mean", "all"):
        raise ValueError(f"heads must be 'mean' or 'all', got {heads!r}")
    vit = resolve_vit(model)
    check_model(vit)
    check_images(vit, images)
    if _is_timm_vit(vit):
        per_head = _timm_cls_attention(vit, images)
    else:
        full = vit.get_last_selfattention(images)
        prefix = getattr(vit, "num_prefix_tokens", 1)
        per_head = full[:, :, 0, prefix:].float()
    return per_head.mean(dim=1) if heads == "mean" else per_head


def pixels_per_token(model: nn.Module) -> int:
    """How many image pixels one patch token covers (the patch area); 1 when the patch size is unknown."""
    patch = _patch_size(resolve_vit(model))
    return 1 if patch is None else patch[0] * patch[1]


def token_grid(model: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """The ``(h, w)`` patch grid of ``images`` for ``model``, when the model's patch size is known."""
    return check_images(resolve_vit(model), images)
