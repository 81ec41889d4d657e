"""What every reader shares: the reader record, and the CLS row of attention logits caught as the model computes it.

A reader does not re-implement its family's attention. It runs the model as it runs and, while the last
attention module is being called, catches the first ``scaled_dot_product_attention`` that module calls (its
query, keys, mask and scale, as the module formed them: adapters such as LoRA, wrapped or quantized Linears,
q/k norms, rotary embeddings and relative position biases all included) or, for an attention that forms its
weights itself, the first ``softmax`` (its logits). The model stops there: nothing after is computed; or, when
the caller also wants what the model returns (its class logits), it runs on untouched. Only the CLS query's row
is formed, in float32 whatever the autocast, so one ``1 x N`` row per head is all the engine ever builds.

An attention that forms its weights itself in low precision (bfloat16 or float16, or under such an autocast)
rounded its logits before the softmax sees them: there the CLS row is formed again in float32 from the q and k
the module passed to its product, and every elementwise step the module takes from that product to the softmax
(scale, biases, masks, in place or not) is replayed on that row. A softmax the row can't be followed to is
refused, never read in low precision.

An attention module called more than once in a forward (shared by several blocks, a looped or weight-tied ViT)
is read at its last call, the one that gives the model's last attention. How many times a forward calls it is
learned at its first read, which runs the forward to its end; a module called once is stopped at its kernel
from then on.
"""

from __future__ import annotations

import threading
import weakref
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
_LOW = (torch.bfloat16, torch.float16)
_MATMULS = frozenset({"matmul", "__matmul__"})
_IN_PLACE = frozenset({"add_", "sub_", "mul_", "div_", "masked_fill_", "clamp_", "clip_", "tanh_", "neg_"})
_ELEMENTWISE = _IN_PLACE | frozenset(
    {"add", "sub", "rsub", "mul", "div", "true_divide", "masked_fill", "where", "clamp", "clip", "tanh", "neg"}
)
"""What an attention may do to its q k product before its softmax, followed on the float32 CLS row (the
operators ``+ - * /``, ``+=``, ... reach the mode as these)."""
_FORMATS = frozenset({"to", "float", "type_as", "contiguous", "clone", "detach", "view", "reshape"})
"""Casts, copies and views of the product: the row is the same float32 row (a cast to lower precision is the
rounding the row is there to avoid)."""


def _sdpa_cls_logits(args: tuple, kwargs: dict) -> Tensor:
    bound = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
    q, k, mask = bound["query"], bound["key"], bound.get("attn_mask")
    if bound.get("is_causal"):
        raise TypeError(
            "the last attention is causal: its CLS query sees no patch token; explain a model whose last attention is "
            "bidirectional (is_causal=False)"
        )
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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an autocast active on ``device_type`` computes products in; None when none is active."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _rounds(t: Tensor) -> bool:
    """Whether a product of ``t`` is formed in bfloat16 or float16 (its own dtype, or the active autocast's)."""
    return t.dtype in _LOW or _autocast_dtype(t.device.type) in _LOW


class _CatchCls(TorchFunctionMode):
    """While the last attention runs (between ``begin`` and ``end``): the CLS logits of its first attention kernel,
    then stop when ``stop`` (else let every call through, that kernel's included). An attention called again is
    caught again: the logits are its last call's.

    ``rows`` follows a low-precision product of that attention to its softmax: for each tensor computed from the
    product, its CLS row in float32, kept while the tensor lives and is not changed in place by a step not
    followed (the tensor's version counter then moves on: the row is dropped)."""

    def __init__(self, stop: bool, where: str) -> None:
        super().__init__()
        self.stop = stop
        self.where = where  # the model and its attention, for errors
        self.active = False
        self.calls = 0
        self.logits: Tensor | None = None
        self.rows: dict[int, tuple[weakref.ref, Tensor, int]] = {}

    def begin(self) -> None:
        self.active, self.logits = True, None
        self.calls += 1
        self.rows.clear()

    def end(self) -> None:
        self.active = False
        self.rows.clear()

    def _row(self, t: object) -> Tensor | None:
        entry = self.rows.get(id(t)) if isinstance(t, Tensor) else None
        if entry is None:
            return None
        ref, row, version = entry
        return row if ref() is t and t._version == version else None

    def _keep(self, t: Tensor, row: Tensor) -> None:
        self.rows[id(t)] = (weakref.ref(t), row, t._version)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active or self.logits is not None:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None)
        if func is F.scaled_dot_product_attention:
            self.logits = _sdpa_cls_logits(args, kwargs)
        elif func in _SOFTMAXES and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self.logits = self._softmax_cls_logits(args[0])
        elif name in _MATMULS and not kwargs and len(args) == 2:
            return self._matmul(func, *args)
        elif name in _ELEMENTWISE and "out" not in kwargs:
            return self._elementwise(func, name, args, kwargs)
        elif name in _FORMATS and args and (row := self._row(args[0])) is not None:
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and out.shape == args[0].shape:
                self._keep(out, row if out is args[0] else row.clone())
            return out
        if self.logits is not None and self.stop:
            raise _Caught
        return func(*args, **kwargs)

    def _softmax_cls_logits(self, x: Tensor) -> Tensor:
        row = self._row(x)
        if row is not None:
            return row[:, :, 0, :]
        if _rounds(x):
            precision = x.dtype if x.dtype in _LOW else _autocast_dtype(x.device.type)
            raise TypeError(
                f"{self.where} formed its attention logits in {precision} by steps the reader can't follow from "
                "its q k product to its softmax (a product other than matmul, or an operation other than scale, "
                "bias, mask and cast), so their float32 CLS row can't be formed: read it without autocast "
                "(autocast_dtype=None, in float32), or with its fused scaled_dot_product_attention (timm: "
                "fused_attn=True; Hugging Face: attn_implementation='sdpa')"
            )
        return x[:, :, 0, :].float()

    def _matmul(self, func, a: object, b: object) -> object:
        out = func(a, b)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 4 and (_rounds(a) or _rounds(b)):
            with torch.autocast(a.device.type, enabled=False):
                self._keep(out, a[..., :1, :].float() @ b.float())
        return out

    def _elementwise(self, func, name: str, args: tuple, kwargs: dict) -> object:
        followed = [t for t in (*args, *kwargs.values()) if self._row(t) is not None]
        if not followed or (name in _IN_PLACE and self._row(args[0]) is None):
            return func(*args, **kwargs)
        queries = followed[0].shape[-2]

        def on_row(x: object) -> object:
            row = self._row(x)
            if row is not None or not isinstance(x, Tensor):
                return x if row is None else row
            if x.dim() >= 2 and x.shape[-2] == queries:
                x = x[..., :1, :]
            return x.float() if x.is_floating_point() else x

        replay = ([on_row(a) for a in args], {k: on_row(v) for k, v in kwargs.items()})
        out = func(*args, **kwargs)
        try:
            with torch.autocast(followed[0].device.type, enabled=False):
                row = func(*replay[0], **replay[1])
        except (RuntimeError, TypeError):  # a step the row can't take: the softmax then has no row, and says so
            return out
        if isinstance(out, Tensor) and out.dim() >= 2 and out.shape[-2] == queries:
            if isinstance(row, Tensor) and row.shape == (*out.shape[:-2], 1, out.shape[-1]):
                self._keep(out, row)
        return out


def eager(module: nn.Module) -> Callable[..., object]:
    """``module``'s own forward when it was compiled in place (``module.compile()``: its calls run compiled code,
    which skips hooks added after compiling, so the catch's hook would never fire), else the module itself."""
    return module.forward if getattr(module, "_compiled_call_impl", None) is not None else module


def cls_logits(attention: nn.Module, run: Callable[[], object], what: str) -> Tensor:
    """Float32 logits ``[B, H, N]`` of the CLS query over all ``N`` tokens in the first attention kernel of the
    last call of ``attention`` while ``run()`` runs the model as it runs; a module called once stops the model
    there (nothing after it is computed) once its first read has counted its calls. The hooks are removed
    whatever happens. ``what`` names the model in errors."""
    return _catch(attention, run, what, finish=False)[0]


def cls_logits_and_output(attention: nn.Module, run: Callable[[], object], what: str) -> tuple[Tensor, object]:
    """:func:`cls_logits`, but the model runs on to its end: the CLS logits and what ``run()`` returns, computed
    as without the catch (the kernel the logits are caught in included)."""
    return _catch(attention, run, what, finish=True)


_CALLS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""How many times a forward calls each attention module read, counted at its reads that ran to the end."""


@torch.compiler.disable  # the model may be stopped by an exception: run eagerly, also under torch.compile
def _catch(attention: nn.Module, run: Callable[[], object], what: str, finish: bool) -> tuple[Tensor, object]:
    # a module called once stops the model at its kernel; one not counted yet, or called again later in the
    # forward (its first call's logits are not the model's last attention), runs to the end and is read at its
    # last call
    catch = _CatchCls(
        not finish and _CALLS.get(attention) == 1, f"{what}: its last attention ({type(attention).__name__})"
    )
    entered: list[_CatchCls] = []
    reader = threading.get_ident()

    def arm(module: nn.Module, args: tuple) -> None:
        # only in this thread: a forward of the same model in another thread (e.g. faithfulness in the statistics
        # thread) runs untouched
        if threading.get_ident() == reader:
            if not entered:
                catch.__enter__()
                entered.append(catch)
            catch.begin()

    def close(module: nn.Module, args: tuple, output: object) -> None:
        # a kernel after the attention (e.g. an attention-pooling head) is not the attention's
        if entered and threading.get_ident() == reader:
            catch.end()

    handles = [attention.register_forward_pre_hook(arm), attention.register_forward_hook(close)]
    output, stopped = None, False
    try:
        output = run()
    except _Caught:
        stopped = True
    finally:
        for handle in handles:
            handle.remove()
        if entered:
            catch.__exit__(None, None, None)
    if not entered:
        raise RuntimeError(f"{what} never reached its last attention ({type(attention).__name__})")
    if not stopped:
        _CALLS[attention] = catch.calls
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
