"""The CLS logits are float32 on every path, under a bfloat16 autocast too: for each zoo family, with its fused
(``scaled_dot_product_attention``) and its eager attention (timm ``fused_attn = False``, Hugging Face ``eager``),
the row read equals the float32 softmax of the exact (float64) product of the q and k that the module itself
passed to its kernel, its scale and biases applied as timm and transformers apply them. On the eager path the
module's own logits were formed in bfloat16: the old read (the softmax's input row) is off by far more.

The q and k are caught by this file's own recorder (a torch function mode armed by hooks on the last attention);
the biases come from the module as its family's code computes them."""

from __future__ import annotations

import copy
import math
from functools import cache

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from attnreg_lightning.attention import cls_attention, resolve_vit
from attnreg_lightning.readers import hf as hf_reader
from attnreg_lightning.readers import timm as timm_reader
from attnreg_lightning.readers.core import cls_logits
from tests.zoo_models import ROWS, B, unfused_copy

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

KEYS = [k for k in ROWS if k not in ("hf-vit-torch-compile", "lora-lightning-module")]  # the same attentions
ALWAYS_EAGER = {"hf-blip-vision"}  # BLIP's attention has no SDPA path


class Recorder(TorchFunctionMode):
    """Inside the armed module: the first scaled_dot_product_attention's arguments, the first 4-D matmul's
    operands and the first 4-D softmax's input."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.seen: dict[str, object] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            if func is F.scaled_dot_product_attention:
                names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale")
                self.seen.setdefault("sdpa", {**dict(zip(names, args, strict=False)), **kwargs})
            elif getattr(func, "__name__", None) == "matmul" and args[0].dim() == 4:
                self.seen.setdefault("matmul", (args[0], args[1]))
            elif getattr(func, "__name__", None) == "softmax" and args[0].dim() == 4:
                self.seen.setdefault("softmax_in", args[0])
        return func(*args, **kwargs)


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, transformers.PreTrainedModel)


def last_attention(vit: nn.Module) -> nn.Module:
    return hf_reader._last_attention(hf_reader.tower(vit)) if _is_hf(vit) else timm_reader.last_attention(vit)


def run_forward(vit: nn.Module, images: Tensor) -> None:
    if _is_hf(vit):
        hf_reader.tower(vit)(pixel_values=images)
    else:
        vit.forward_features(images)


def bias_of(attention: nn.Module, args: tuple, kwargs: dict, outputs: dict) -> Tensor | None:
    """The bias the module's eager code adds to its scaled product (None without one), as that code gets it."""
    from timm.models.beit import Attention as TimmBeitAttention
    from timm.models.vision_transformer_relpos import RelPosAttention

    name = type(attention).__name__
    if isinstance(attention, TimmBeitAttention):  # attn + _get_rel_pos_bias() + shared_rel_pos_bias
        shared = kwargs.get("shared_rel_pos_bias")
        own = None if attention.relative_position_bias_table is None else attention._get_rel_pos_bias()
        parts = [b for b in (own, shared) if b is not None]
        return sum(parts[1:], parts[0]) if parts else None
    if isinstance(attention, RelPosAttention):  # rel_pos(attn) is attn + rel_pos.get_bias(); else + shared_rel_pos
        return attention.rel_pos.get_bias() if attention.rel_pos is not None else kwargs.get("shared_rel_pos")
    if name == "BeitAttention":  # the relative position bias comes in as the attention mask
        return kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if name == "Data2VecVisionAttention":  # its self-attention adds relative_position_bias(...) and a shared one
        parts = [outputs.get("relative_position_bias"), args[2] if len(args) > 2 else None]
        parts = [b for b in parts if b is not None]
        return sum(parts[1:], parts[0]) if parts else None
    return None


def eager_scale(attention: nn.Module, head_dim: int) -> float:
    """What the eager code multiplies the product by: timm scales q before its matmul (the caught operand already
    carries it), transformers scales the product by ``head_dim ** -0.5`` (Data2Vec divides by ``sqrt(head_dim)``)."""
    if not type(attention).__module__.startswith("transformers"):
        return 1.0
    return 1 / math.sqrt(head_dim) if type(attention).__name__ == "Data2VecVisionAttention" else head_dim**-0.5


def record(vit: nn.Module, images: Tensor) -> tuple[dict, Tensor | None, nn.Module]:
    """One forward under the caller's autocast, its last attention's kernel operands recorded, and its bias."""
    attention = last_attention(vit)
    recorder, call, outputs = Recorder(), {}, {}

    def arm(module, args, kwargs):
        call.update(args=args, kwargs=kwargs)
        recorder.on = True

    def disarm(module, args, output):
        recorder.on = False

    handles = [
        attention.register_forward_pre_hook(arm, with_kwargs=True),
        attention.register_forward_hook(disarm),
    ]
    inner = getattr(getattr(attention, "attention", None), "relative_position_bias", None)  # Data2Vec's own bias
    if isinstance(inner, nn.Module):
        handles.append(inner.register_forward_hook(lambda m, a, o: outputs.setdefault("relative_position_bias", o)))
    try:
        with recorder:
            run_forward(vit, images)
    finally:
        for handle in handles:
            handle.remove()
    with torch.autocast(images.device.type, enabled=False):
        bias = bias_of(attention, call["args"], call["kwargs"], outputs)
    return recorder.seen, bias, attention


def reference_row(seen: dict, bias: Tensor | None, attention: nn.Module) -> Tensor:
    """The exact CLS logits ``[B, H, N]`` of the recorded kernel: a float64 product of its own q and k."""
    if "sdpa" in seen:
        args = seen["sdpa"]
        q, k, mask = args["q"].double(), args["k"].double(), args.get("attn_mask")
        scale = args.get("scale") or q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-2, -1))[:, :, 0] * scale
    else:
        a, b = seen["matmul"]
        logits = (a.double() @ b.double())[:, :, 0] * eager_scale(attention, a.shape[-1])
        mask = bias
    if mask is not None:
        logits = logits + mask.double()[..., 0, :]
    return logits


def eager_twin(model: nn.Module) -> nn.Module:
    """The model with its eager attention: timm's unfused copy; transformers' own kernel switch, or a twin built
    eager with the same weights for a model that can't switch (Data2VecVision)."""
    if not _is_hf(model):
        return unfused_copy(model)
    if model.config._attn_implementation == "eager":
        return model
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    if twin.config._attn_implementation != "eager":  # warned and left as it was
        twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
        twin.load_state_dict(model.state_dict())
    assert twin.config._attn_implementation == "eager"
    return twin


@cache
def built(key: str) -> nn.Module:
    return ROWS[key].build()


def _cases() -> list:
    return [
        pytest.param(key, path, id=f"{key}-{path}")
        for key in KEYS
        for path in ("fused", "eager")
        if not (path == "fused" and key in ALWAYS_EAGER)
    ]


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("key", "path"), _cases())
def test_the_cls_row_is_float32_under_a_bfloat16_autocast(key, path):
    _the_cls_row_is_float32(key, path, "cpu")


ON_CUDA = ("timm-vit", "timm-beit-rel-pos-bias", "hf-vit", "hf-beit-rel-pos-bias")


@pytest.mark.parametrize(("key", "path"), [(k, p) for k in ON_CUDA for p in ("fused", "eager")])
@pytest.mark.parametrize("marks", [pytest.param(None, marks=CUDA, id="cuda")])
def test_the_cls_row_is_float32_under_a_bfloat16_autocast_on_cuda(key, path, marks):
    _the_cls_row_is_float32(key, path, "cuda")


def _the_cls_row_is_float32(key: str, path: str, device: str) -> None:
    row = ROWS[key]
    model = built(key) if path == "fused" else eager_twin(resolve_vit(built(key)))
    model = copy.deepcopy(model).to(device) if device != "cpu" else model
    vit = resolve_vit(model)
    images = torch.randn(B, 3, row.size, row.size, generator=torch.Generator().manual_seed(1)).to(device)
    t = row.grid[0] * row.grid[1]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        ours = cls_attention(model, images, heads="all")
        seen, bias, attention = record(vit, images)
    assert torch._C._len_torch_function_stack() == 0
    assert ("sdpa" in seen) == (path == "fused"), sorted(seen)  # the path named is the path taken
    full = reference_row(seen, bias, attention).float().softmax(-1)
    want = full[..., row.prefix : row.prefix + t]
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    if path == "eager":  # the module's own logits were rounded: what the read took before is far off
        assert seen["softmax_in"].dtype == torch.bfloat16 or seen["matmul"][0].dtype != torch.float32
        old = seen["softmax_in"][:, :, 0].float().softmax(-1)[..., row.prefix : row.prefix + t]
        assert (old - want).abs().max() > 100 * max((ours - want).abs().max(), 1e-8), key


def test_a_bfloat16_model_without_autocast_is_read_in_float32():
    """Weights in bfloat16 (a ``bf16-true`` model): no autocast, yet the eager product is rounded all the same."""
    row = ROWS["timm-vit"]
    vit = unfused_copy(row.build()).to(torch.bfloat16)
    images = torch.randn(B, 3, row.size, row.size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        got = cls_logits(vit.blocks[-1].attn, lambda: vit.forward_features(images), "vit")
        seen, _, _ = record(vit, images)
    a, b = seen["matmul"]
    want = (a.double() @ b.double())[:, :, 0]
    torch.testing.assert_close(got.softmax(-1), want.float().softmax(-1), atol=1e-6, rtol=0)
    assert (seen["softmax_in"][:, :, 0].float().softmax(-1) - want.softmax(-1)).abs().max() > 1e-4


@pytest.mark.parametrize("key", ["timm-vit", "timm-beit-rel-pos-bias", "hf-vit", "hf-beit-rel-pos-bias"])
def test_without_autocast_the_eager_read_is_the_softmax_input_bit_for_bit(key):
    row = ROWS[key]
    vit = eager_twin(resolve_vit(row.build()))
    images = torch.randn(B, 3, row.size, row.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = cls_logits(last_attention(vit), lambda: run_forward(vit, images), key)
        seen, _, _ = record(vit, images)
    assert seen["softmax_in"].dtype == torch.float32
    assert torch.equal(got, seen["softmax_in"][:, :, 0])


def _qkv(n=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, d, generator=g) * 3 for _ in range(3))


class InPlace(nn.Module):
    """An eager attention that takes every followed step in place: scale, bias, mask."""

    def __init__(self, bias: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.bias, self.mask = bias, mask

    def forward(self, q, k, v):
        attn = torch.matmul(q, k.transpose(-2, -1))
        attn.mul_(q.shape[-1] ** -0.5)
        attn += self.bias
        attn.masked_fill_(self.mask, float("-inf"))
        return attn.float().softmax(dim=-1).to(v.dtype) @ v


def test_steps_taken_in_place_are_followed():
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    bias, mask = torch.randn(1, 3, 7, 7, generator=g), torch.rand(2, 1, 7, 7, generator=g) > 0.7
    mask[..., 0] = False
    module = InPlace(bias, mask)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()  # as the module's projections give them under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cls_logits(module, lambda: module(q, k, v), "test")
    want = (q.double() @ k.double().transpose(-2, -1))[:, :, 0] * 0.25 + bias.double()[:, :, 0]
    want = want.masked_fill(mask[:, :, 0], float("-inf"))
    torch.testing.assert_close(got.softmax(-1), want.float().softmax(-1), atol=1e-6, rtol=0)


class Einsum(nn.Module):
    """An eager attention whose product is an einsum: a step the reader does not follow."""

    def forward(self, q, k, v):
        return (torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


class ChangedUnseen(nn.Module):
    """An eager attention that changes its product in place through an indexed view: a step not followed."""

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn[..., 1] += 5.0
        return attn.softmax(dim=-1) @ v


@pytest.mark.parametrize("module_cls", [Einsum, ChangedUnseen])
def test_a_low_precision_softmax_the_row_cannot_be_followed_to_is_refused(module_cls):
    q, k, v = _qkv()
    module = module_cls()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError) as err:
        cls_logits(module, lambda: module(q, k, v), "the model")
    message = str(err.value)
    assert f"the model: its last attention ({module_cls.__name__})" in message
    assert "bfloat16" in message and "autocast_dtype=None" in message and "scaled_dot_product_attention" in message
    assert torch._C._len_torch_function_stack() == 0
    # in float32 the softmax's own input is the float32 logits: read as it is
    got = cls_logits(module, lambda: module(q, k, v), "the model")
    want = (q.double() @ k.double().transpose(-2, -1))[:, :, 0] * 0.25
    if module_cls is ChangedUnseen:
        want[..., 1] += 5.0
    torch.testing.assert_close(got.softmax(-1), want.float().softmax(-1), atol=1e-6, rtol=0)
