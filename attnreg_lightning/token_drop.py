"""Removing tokens the way a ViT can: dropping them from the sequence instead of replacing their pixels.

A removed token's pixels replaced by a baseline image (mean, blur, zeros) make an image the model never saw in
training; a ViT can instead be run on the kept tokens alone (the "missingness" argument of Jain et al., 2022),
its input staying in the distribution of token sequences it was trained on, only shorter::

    with keeping_tokens(vit, keep):        # keep: bool [B, T], the same count of True in every row
        logits = vit(images)               # the blocks see the prefix tokens and the kept patch tokens only

The tokens are dropped where the model's embedding ends: after the patch embedding, the prefix tokens (class,
distillation, registers) and the position embedding, before the first block; every later module (blocks, final
norm, pooling, head) runs as it runs on the shorter sequence. Only families whose later modules depend on nothing
but the tokens they are given are accepted (:func:`check_droppable`): timm ``VisionTransformer`` (DeiT distilled
and hybrid stems included) and Hugging Face ViT, DeiT and DINOv2 (registers included). Models whose blocks need
each token's grid position (rotary embeddings: EVA, DINOv3; relative position biases: BEiT, relpos) or whose
tokens follow the patches (YOLOS) are refused with the reason.

A row that keeps no patch token is the prefix tokens alone: a model pooling the patch tokens (``global_pool``
``"avg"``) has no value for it (NaN logits).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from attnreg_lightning.attention import resolve_vit, token_grid
from attnreg_lightning.readers import hf

HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")
"""Hugging Face model types whose embeddings' output may be shortened (``config.model_type``)."""


def _timm_classes() -> tuple[type, ...]:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, VisionTransformerDistilled


def _embedding_end(vit: nn.Module) -> nn.Module:
    """The module whose output is the embedded token sequence ``[B, prefix + T, D]`` (prefix tokens first, position
    embedding added), refused with the reason where shortening it would be wrong."""
    name = type(vit).__name__
    if getattr(vit, "_compiled_call_impl", None) is not None:
        raise TypeError(
            f"faithfulness_baseline='drop': {name} was compiled in place (module.compile()), whose compiled forward "
            "skips the hook that drops tokens; use faithfulness_baseline='mean' (or 'blur')"
        )
    if "timm" in sys.modules and type(vit).__module__.startswith("timm."):
        if type(vit) not in _timm_classes():
            raise TypeError(
                f"faithfulness_baseline='drop': {name}'s blocks may need each token's grid position (rotary "
                "embeddings, relative position biases) or place their tokens otherwise, so dropping tokens could "
                "change what the kept ones compute; only timm VisionTransformer and VisionTransformerDistilled "
                "are run on kept tokens alone (use faithfulness_baseline='mean' or 'blur')"
            )
        # timm's own patch dropout sits here (the identity in eval mode): after the position embedding, before
        # the blocks
        return vit.patch_drop
    if hf.READER.matches(vit):
        model_type = getattr(vit.config, "model_type", None)
        if model_type not in HF_MODEL_TYPES:
            raise TypeError(
                f"faithfulness_baseline='drop': {name} (model_type={model_type!r}) is not among the Hugging Face "
                f"models run on kept tokens alone ({', '.join(HF_MODEL_TYPES)}): its layers may need each token's "
                "position or its tokens may follow the patches (use faithfulness_baseline='mean' or 'blur')"
            )
        return hf.tower(vit).embeddings
    raise TypeError(
        f"faithfulness_baseline='drop': {name} is not a model the engine knows how to run on kept tokens alone "
        f"(timm VisionTransformer / DeiT, Hugging Face {', '.join(HF_MODEL_TYPES)}); use "
        "faithfulness_baseline='mean' or 'blur'"
    )


def check_droppable(model: nn.Module) -> None:
    """Raise ``TypeError`` with the reason and the way out unless the ViT read in ``model`` (:func:`resolve_vit`) can
    be run on kept tokens alone: a family whose later modules depend only on the tokens they are given, run eagerly
    (a compiled forward, of the module or of a module it holds, reuses its graph without the hook)."""
    compiled = getattr(model, "_compiler_ctx", None) is not None or any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )
    if compiled:
        raise TypeError(
            f"faithfulness_baseline='drop': {type(model).__name__} runs compiled code (torch.compile), whose graph "
            "skips the hook that drops tokens; use faithfulness_baseline='mean' (or 'blur'), or explain an uncompiled "
            "model"
        )
    _embedding_end(resolve_vit(model))


@torch.no_grad()
def check_prediction_without_patches(forward, model: nn.Module, images: Tensor) -> None:
    """Raise ``TypeError`` when ``forward`` gives no finite prediction for ``images`` with every patch token dropped
    (the prefix tokens alone): a model that pools the patch tokens (``global_pool="avg"``, DINOv2's classifier) has
    none, and the deletion and insertion curves start or end there."""
    h, w = token_grid(model, images)
    with keeping_tokens(model, torch.zeros(len(images), h * w, dtype=torch.bool, device=images.device)):
        logits = forward(images)
    if not bool(torch.isfinite(logits).all()):
        raise TypeError(
            f"faithfulness='curves' with faithfulness_baseline='drop': {type(resolve_vit(model)).__name__} gives no "
            "prediction with every patch token dropped (it pools the patch tokens), where the deletion and insertion "
            "curves start and end; use faithfulness='kept', or a pixel baseline (faithfulness_baseline='mean')"
        )


@contextmanager
def keeping_tokens(model: nn.Module, keep: Tensor) -> Iterator[None]:
    """While inside, each forward of the ViT read in ``model`` gives its blocks the prefix tokens and the patch tokens
    that ``keep [B, T]`` keeps (in grid order), row by row; every row must keep as many tokens. The hook is removed
    whatever happens."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool [B, T] token mask, got {keep.dtype} {tuple(keep.shape)}")
    counts = keep.sum(dim=1)
    if len(counts) and bool((counts != counts[0]).any()):
        raise ValueError(f"keep: every row must keep as many tokens (a batch is one sequence length), got {counts}")
    # stable: the kept tokens stay in grid order (the order the model saw them in)
    kept = int(counts[0]) if len(counts) else 0
    index = keep.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :kept]

    fired: list[bool] = []

    def shorten(module: nn.Module, args: tuple, tokens: Tensor) -> Tensor:
        fired.append(True)
        b, n, d = tokens.shape
        if b != keep.shape[0] or n < keep.shape[1]:
            raise ValueError(
                f"keeping_tokens: the model embedded {b} images into {n} tokens, the mask is for {keep.shape[0]} "
                f"images of {keep.shape[1]} patch tokens"
            )
        prefix = n - keep.shape[1]
        patches = tokens[:, prefix:].gather(1, index.to(tokens.device)[..., None].expand(-1, -1, d))
        return torch.cat([tokens[:, :prefix], patches], dim=1)

    handle = _embedding_end(resolve_vit(model)).register_forward_hook(shorten)
    try:
        yield
        if not fired:  # a forward that never reached the hook kept every token: its numbers would be the clean ones
            raise RuntimeError(
                "keeping_tokens: the forward ran without dropping tokens (a compiled forward, or one that does not "
                "run the model's embedding): use faithfulness_baseline='mean'"
            )
    finally:
        handle.remove()
