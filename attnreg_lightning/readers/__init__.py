"""The registry of attention readers, one per model family (one file each beside this one).

A reader knows one family: ``matches(model)`` says whether it applies, ``read(model, images)`` returns the last
attention's CLS->patch weights ``[B, H, T]`` (prefix tokens removed) and ``check(model)`` raises a ``TypeError``
naming what can't be read. Built in: timm (:mod:`.timm`), Hugging Face ``transformers`` (:mod:`.hf`) and the DINO
hub's ``get_last_selfattention`` (:mod:`.dino_hub`); all but the last catch the attention as the model computes it
(:mod:`.core`). Teach the engine another family with :func:`register_attention_reader`; readers registered later
are tried first.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from attnreg_lightning.readers import dino_hub, hf, timm
from attnreg_lightning.readers.core import AttentionReader

_READERS: list[AttentionReader] = [hf.READER, timm.READER, dino_hub.READER]


def register_attention_reader(
    name: str,
    matches: Callable[[nn.Module], bool],
    read: Callable[[nn.Module, Tensor], Tensor],
    check: Callable[[nn.Module], None] | None = None,
    patch_size: Callable[[nn.Module], tuple[int, int] | None] | None = None,
    num_heads: Callable[[nn.Module], int | None] | None = None,
    classifier: Callable[[nn.Module], Callable[[Tensor], Tensor] | None] | None = None,
    read_classified: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> AttentionReader:
    """Teach the engine a model family: ``read(model, images) -> [B, H, T]``, the last block's attention from
    the CLS query to each patch token (prefix tokens removed, rows over all tokens summing to at most one).

    The token grid comes from ``patch_size(model) -> (h, w)`` when given, else from
    ``model.patch_embed.patch_size`` when the model has one. Readers registered later are tried first, so a
    user's reader wins over a built-in one for the models it matches. :func:`.core.cls_logits` catches the CLS
    logits of any attention module as the model computes them.

    Faithfulness needs the model's class logits: ``classifier(model)`` gives ``images -> logits [B, classes]`` (None
    for a model without a head); ``read_classified(model, images) -> (attention, logits)`` gives both from one
    forward (:func:`.core.cls_logits_and_output`), saving the faithfulness scores a forward of the clean images.
    """
    reader = AttentionReader(name, matches, read, check, patch_size, num_heads, classifier, read_classified)
    _READERS.insert(0, reader)
    return reader


def unregister_attention_reader(reader: AttentionReader) -> None:
    """Forget a reader :func:`register_attention_reader` returned."""
    _READERS.remove(reader)


def attention_readers() -> list[AttentionReader]:
    """The registered readers, in the order they are tried."""
    return list(_READERS)


def find_reader(model: nn.Module) -> AttentionReader | None:
    return next((r for r in _READERS if r.matches(model)), None)


__all__ = [
    "AttentionReader",
    "attention_readers",
    "find_reader",
    "register_attention_reader",
    "unregister_attention_reader",
]
