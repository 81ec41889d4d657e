"""CLS-to-patch attention of a Vision Transformer's last block, through a registry of readers by model family.

A reader knows one family: ``matches(model)`` says whether it applies, ``read(model, images)`` returns the
last block's CLS->patch attention ``[B, H, T]`` (prefix tokens removed) and ``check(model)`` raises a
``TypeError`` naming what can't be read. Built in: timm ``VisionTransformer``, timm RoPE ViTs (EVA, EVA02)
and models with ``get_last_selfattention(images) -> [B, H, T+1, T+1]`` (the DINO hub convention). Teach the
engine another family with :func:`register_attention_reader`; readers registered later are tried first.

For timm models the last block is not run as a whole: every block before it runs as the model runs it
(fused attention untouched), the last one up to its attention's input, and only the keys and the CLS query
are projected, so one ``1 x T`` softmax row per head is all that is ever formed.

    attn = cls_attention(model, images)               # [B, T], averaged over heads
    per_head = cls_attention(model, images, "all")     # [B, H, T]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AttentionReader:
    """How to read one model family's CLS attention (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module, Tensor], Tensor]
    check: Callable[[nn.Module], None] | None = None
    patch_size: Callable[[nn.Module], tuple[int, int] | None] | None = None


_READERS: list[AttentionReader] = []


def register_attention_reader(
    name: str,
    matches: Callable[[nn.Module], bool],
    read: Callable[[nn.Module, Tensor], Tensor],
    check: Callable[[nn.Module], None] | None = None,
    patch_size: Callable[[nn.Module], tuple[int, int] | None] | None = None,
) -> AttentionReader:
    """Teach the engine a model family: ``read(model, images) -> [B, H, T]``, the last block's attention from
    the CLS query to each patch token (prefix tokens removed, rows over all tokens summing to at most one).

    The token grid comes from ``patch_size(model) -> (h, w)`` when given, else from
    ``model.patch_embed.patch_size`` when the model has one. Readers registered later are tried first, so a
    user's reader wins over a built-in one for the models it matches.
    """
    reader = AttentionReader(name, matches, read, check, patch_size)
    _READERS.insert(0, reader)
    return reader


def attention_readers() -> list[AttentionReader]:
    """The registered readers, in the order they are tried."""
    return list(_READERS)


def find_reader(model: nn.Module) -> AttentionReader | None:
    return next((r for r in _READERS if r.matches(model)), None)


HOLDER_NAMES = ("vit", "backbone", "model")
"""Attributes of a LightningModule looked at, in order, for the ViT it fine-tunes."""


def held_vit(module: nn.Module) -> nn.Module | None:
    """The first of ``module.vit``, ``module.backbone``, ``module.model`` that is a module; None if none is."""
    for name in HOLDER_NAMES:
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def resolve_vit(model: nn.Module) -> nn.Module:
    """The module that holds the ViT: ``model.attention_model()``, ``model`` itself when a reader matches it,
    else ``model.vit``, ``model.backbone`` or ``model.model``."""
    if callable(getattr(model, "attention_model", None)):
        return model.attention_model()
    if find_reader(model) is not None:
        return model
    return held_vit(model) or model


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
        name = type(vit).__name__
        missing = [a for a in ("patch_embed", "blocks", "_pos_embed") if not hasattr(vit, a)]
        tried = ", ".join(r.name for r in _READERS)
        raise TypeError(
            f"{name} is not a readable Vision Transformer (it has no {', '.join(missing) or 'known layout'} and no "
            f"get_last_selfattention(images)); readers tried: {tried}. Pass a timm VisionTransformer or EVA, a "
            "DINO-style model, or a LightningModule whose attention_model() / vit / backbone is one; or teach "
            "the engine your model with attnreg_lightning.register_attention_reader(name, matches, read)"
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
    if not _is_timm_layout(vit):
        return h // patch[0], w // patch[1]
    fixed = getattr(vit.patch_embed, "img_size", None)
    dynamic = getattr(vit, "dynamic_img_size", False)
    strict = not dynamic and getattr(vit.patch_embed, "strict_img_size", True)
    if strict and fixed is not None and (h, w) != tuple(fixed):
        raise ValueError(
            f"{type(vit).__name__}: images are {h}x{w} but the model takes {fixed[0]}x{fixed[1]} "
            "(create it with img_size=... or dynamic_img_size=True)"
        )
    return h // patch[0], w // patch[1]


# --- timm: run the model up to its last attention, then project the CLS query and the keys ---


class _Reached(Exception):
    """Raised by the pre-hook once the last attention's input is known: nothing after it is computed."""


@torch.compiler.disable  # the hook stops the model by an exception: run eagerly, also under torch.compile
def input_of(module: nn.Module, run: Callable[[], object], what: str) -> tuple[Tensor, dict]:
    """The hidden states (and keyword arguments, e.g. EVA's ``rope``) that ``module`` is first called with while
    ``run()`` runs the model as it runs; nothing after that call is computed, and the hook is removed
    whatever happens. ``what`` names ``run`` in the error raised when ``module`` is never reached."""
    seen: dict = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        seen["x"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs
        raise _Reached

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        run()
    except _Reached:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise RuntimeError(f"{what} never reached its last layer's attention")
    return seen["x"], seen["kwargs"]


def _last_attention_input(vit: nn.Module, images: Tensor) -> tuple[Tensor, dict]:
    run = lambda: vit.forward_features(images)  # noqa: E731
    return input_of(vit.blocks[-1].attn, run, f"{type(vit).__name__}.forward_features")


def _is_timm_layout(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "forward_features"))


def _check_cls(vit: nn.Module) -> None:
    if getattr(vit, "cls_token", None) is None:
        name = type(vit).__name__
        raise TypeError(f"{name} has no class token (class_token=False): there is no CLS query to read attention from")


def softmax_cls_row(q: Tensor, k: Tensor, scale: float, prefix: int) -> Tensor:
    scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    return scores.float().softmax(dim=-1)[:, :, 0, prefix:]


def split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _timm_vit_attention(vit: nn.Module, images: Tensor) -> Tensor:
    h, _ = _last_attention_input(vit, images)
    attn = vit.blocks[-1].attn
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_bias = None if bias is None else bias[:width]
    k_bias = None if bias is None else bias[width : 2 * width]
    # Only the CLS query row is needed; values and the MLP never enter the attention weights.
    q = split_heads(nn.functional.linear(h[:, :1], weight[:width], q_bias), attn.num_heads)
    k = split_heads(nn.functional.linear(h, weight[width : 2 * width], k_bias), attn.num_heads)
    return softmax_cls_row(attn.q_norm(q), attn.k_norm(k), attn.scale, vit.num_prefix_tokens)


def _is_timm_vit(model: nn.Module) -> bool:
    return _is_timm_layout(model) and not hasattr(model, "rope")


def _check_timm_vit(vit: nn.Module) -> None:
    _check_cls(vit)
    last = vit.blocks[-1]
    attn = getattr(last, "attn", None)
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    if attn is None or not all(hasattr(attn, a) for a in needed):
        raise TypeError(
            f"{type(vit).__name__}: last block {type(last).__name__} has no self-attention with a fused qkv "
            f"projection (attn.{{{', '.join(needed)}}}); its attention can't be read"
        )


def _eva_attention(vit: nn.Module, images: Tensor) -> Tensor:
    from timm.layers import apply_rot_embed_cat

    x, kwargs = _last_attention_input(vit, images)
    attn = vit.blocks[-1].attn
    heads = attn.num_heads
    if attn.qkv is not None:
        width = attn.qkv.weight.shape[0] // 3
        weight = attn.qkv.weight
        if attn.q_bias is None:
            bias = attn.qkv.bias
        else:  # as EvaAttention: its own q/k/v biases, added to the projection's when kept separate
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate and attn.qkv.bias is not None:
                bias = bias + attn.qkv.bias
        q = nn.functional.linear(x[:, :1], weight[:width], None if bias is None else bias[:width])
        k = nn.functional.linear(x, weight[width : 2 * width], None if bias is None else bias[width : 2 * width])
    else:
        q, k = attn.q_proj(x[:, :1]), attn.k_proj(x)
    q, k = attn.q_norm(split_heads(q, heads)), attn.k_norm(split_heads(k, heads))
    rope = kwargs.get("rope")
    if rope is not None:
        # rotary embedding on the patch tokens only, as the model's attention applies it; the CLS query
        # (a prefix token) is not rotated
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        rotated = apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half).type_as(k)
        k = torch.cat([k[:, :, :npt, :], rotated], dim=2)
    return softmax_cls_row(q, k, attn.scale, vit.num_prefix_tokens)


def _is_eva(model: nn.Module) -> bool:
    return _is_timm_layout(model) and hasattr(model, "rope")


def _check_eva(vit: nn.Module) -> None:
    _check_cls(vit)
    last = vit.blocks[-1]
    attn = getattr(last, "attn", None)
    needed = ("num_heads", "scale", "q_norm", "k_norm", "num_prefix_tokens", "q_bias")
    if (
        attn is None
        or not all(hasattr(attn, a) for a in needed)
        or not (getattr(attn, "qkv", None) is not None or hasattr(attn, "q_proj"))
    ):
        raise TypeError(
            f"{type(vit).__name__} uses rotary position embeddings, but its last block's attention "
            f"({type(attn).__name__}) is not EVA's (qkv or q_proj/k_proj, q_bias, q_norm, k_norm, "
            "num_prefix_tokens): reading it without its rotary embedding would give wrong maps, so it is refused"
        )


def _last_selfattention(vit: nn.Module, images: Tensor) -> Tensor:
    full = vit.get_last_selfattention(images)
    return full[:, :, 0, getattr(vit, "num_prefix_tokens", 1) :].float()


register_attention_reader(
    "get_last_selfattention (DINO hub)",
    lambda m: callable(getattr(m, "get_last_selfattention", None)),
    _last_selfattention,
)
register_attention_reader("timm VisionTransformer", _is_timm_vit, _timm_vit_attention, _check_timm_vit)
register_attention_reader("timm EVA / RoPE ViT", _is_eva, _eva_attention, _check_eva)


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
    per_head = find_reader(vit).read(vit, images).float()
    return per_head.mean(dim=1) if heads == "mean" else per_head


def num_heads(vit: nn.Module) -> int | None:
    """The last block's number of heads: timm's ``blocks[-1].attn.num_heads``, else the config's
    ``num_attention_heads`` (Hugging Face); None when neither is known."""
    blocks = getattr(vit, "blocks", None)
    heads = getattr(getattr(blocks[-1], "attn", None), "num_heads", None) if blocks else None
    return heads if heads is not None else getattr(getattr(vit, "config", None), "num_attention_heads", None)


def pixels_per_token(model: nn.Module) -> int:
    """How many image pixels one patch token covers (the patch area); 1 when the patch size is unknown."""
    patch = patch_size(resolve_vit(model))
    return 1 if patch is None else patch[0] * patch[1]


def token_grid(model: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """The ``(h, w)`` patch grid of ``images`` for ``model``, when the model's patch size is known."""
    return check_images(resolve_vit(model), images)
