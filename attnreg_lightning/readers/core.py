"""What every reader shares: the reader record, and the CLS row of attention logits caught as the model computes it.

A reader does not re-implement its family's attention. It runs the model as it runs and, while the last
attention module is being called, catches the first ``scaled_dot_product_attention`` that module calls (its
query, keys, mask and scale, as the module formed them: adapters such as LoRA, wrapped or quantized Linears,
q/k norms, rotary embeddings and relative position biases all included) or, for an attention that forms its
weights itself, the first ``softmax`` (its logits). The model stops there: nothing after is computed; or, when
the caller also wants what the model returns (its class logits), it runs on untouched. Only the CLS query's row
is formed, in float32 whatever the autocast, so one ``1 x N`` row per head is all the engine ever builds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class AttentionReader:
    """How to read one model family's CLS attention: ``matches(model)`` says whether it applies,
    ``read(model, images) -> [B, H, T]`` reads it, ``check(model)`` raises a ``TypeError`` naming what can't be
    read, ``patch_size(model) -> (h, w)`` gives the pixels one token stands for, ``num_heads(model)`` the last
    attention's head count. A family with classifiers also says ``classifier(model)``: the model's
    ``images -> class logits [B, classes]``, None for a model without a head (a backbone); and
    ``read_classified(model, images) -> (attention, logits)``: both from one forward, equal to ``read`` and to
    the classifier's logits."""

    name: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module, Tensor], Tensor]
    check: Callable[[nn.Module], None] | None = None
    patch_size: Callable[[nn.Module], tuple[int, int] | None] | None = None
    num_heads: Callable[[nn.Module], int | None] | None = None
    classifier: Callable[[nn.Module], Callable[[Tensor], Tensor] | None] | None = None
    read_classified: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]] | None = None


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _Caught(Exception):
    """Raised once the CLS logits are caught: nothing after the last attention's kernel is computed."""


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAXES = (F.softmax, Tensor.softmax, torch.softmax)


def _sdpa_cls_logits(args: tuple, kwargs: dict) -> Tensor:
    bound = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
    q, k, mask = bound["query"], bound["key"], bound.get("attn_mask")
    if bound.get("is_causal"):
        raise TypeError("the last attention is causal: its CLS query sees no patch token")
    scale = bound.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each key head serves a group of query heads
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        logits = (q[..., :1, :].float() @ k.float().transpose(-2, -1)) * scale
        if mask is not None:
            row = mask[..., :1, :] if mask.dim() >= 2 else mask
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
    return logits[..., 0, :]


class _CatchCls(TorchFunctionMode):
    """While the last attention runs: its first attention kernel's CLS logits, then stop (or, with ``finish``,
    let every call through, that kernel's included)."""

    def __init__(self, finish: bool) -> None:
        super().__init__()
        self.finish = finish
        self.closed = False  # the attention module has returned
        self.logits: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.logits is None and not self.closed:
            if func is F.scaled_dot_product_attention:
                self.logits = _sdpa_cls_logits(args, kwargs)
            elif func in _SOFTMAXES and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
                self.logits = args[0][:, :, 0, :].float()  # an attention that forms its weights itself
            if self.logits is not None and not self.finish:
                raise _Caught
        return func(*args, **kwargs)


def eager(module: nn.Module) -> Callable[..., object]:
    """``module``'s own forward when it was compiled in place (``module.compile()``: its calls run compiled code,
    which skips hooks added after compiling, so the catch's hook would never fire), else the module itself."""
    return module.forward if getattr(module, "_compiled_call_impl", None) is not None else module


def cls_logits(attention: nn.Module, run: Callable[[], object], what: str) -> Tensor:
    """Float32 logits ``[B, H, N]`` of the CLS query over all ``N`` tokens in the first attention kernel that
    ``attention`` calls while ``run()`` runs the model as it runs; nothing after it is computed and the hook is
    removed whatever happens. ``what`` names the model in errors."""
    return _catch(attention, run, what, finish=False)[0]


def cls_logits_and_output(attention: nn.Module, run: Callable[[], object], what: str) -> tuple[Tensor, object]:
    """:func:`cls_logits`, but the model runs on to its end: the CLS logits and what ``run()`` returns, computed
    as without the catch (the kernel the logits are caught in included)."""
    return _catch(attention, run, what, finish=True)


@torch.compiler.disable  # the model may be stopped by an exception: run eagerly, also under torch.compile
def _catch(attention: nn.Module, run: Callable[[], object], what: str, finish: bool) -> tuple[Tensor, object]:
    catch = _CatchCls(finish)
    armed: list[_CatchCls] = []
    reader = threading.get_ident()

    def arm(module: nn.Module, args: tuple) -> None:
        # only the first call of the module (a shared module may be called again), and only in this thread: a
        # forward of the same model in another thread (e.g. faithfulness in the statistics thread) runs untouched
        if not armed and threading.get_ident() == reader:
            catch.__enter__()
            armed.append(catch)

    def close(module: nn.Module, args: tuple, output: object) -> None:
        # a kernel after the attention (e.g. an attention-pooling head) is not the attention's
        if armed and threading.get_ident() == reader:
            catch.closed = True

    handles = [attention.register_forward_pre_hook(arm), attention.register_forward_hook(close)]
    output = None
    try:
        output = run()
    except _Caught:
        pass
    finally:
        for handle in handles:
            handle.remove()
        if armed:
            catch.__exit__(None, None, None)
    if not armed:
        raise RuntimeError(f"{what} never reached its last attention ({type(attention).__name__})")
    if catch.logits is None:
        raise TypeError(
            f"{what}: its last attention ({type(attention).__name__}) formed its weights with neither "
            "scaled_dot_product_attention nor a softmax (a flash-attention kernel?): run it with SDPA or eager "
            "attention to read them"
        )
    return catch.logits, output


def patch_columns(logits: Tensor, patches: int, after: int = 0) -> Tensor:
    """Softmax of the CLS logits ``[B, H, N]`` over all tokens, then the ``patches`` patch columns: the tokens
    before them (CLS, distillation, registers) and the ``after`` tokens after them (e.g. detection tokens)
    dropped."""
    before = logits.shape[-1] - patches - after
    if before < 1:
        raise RuntimeError(
            f"the last attention has {logits.shape[-1]} tokens, fewer than the class token, the {patches} patches "
            f"of the image's grid and {after} tokens after them: the token grid does not match the model"
        )
    return logits.softmax(dim=-1)[..., before : before + patches]
