"""The CLS row caught from an attention kernel's own arguments: float32 under autocast, masks and grouped keys as
scaled_dot_product_attention applies them, causal kernels refused, explicit softmaxes caught."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attnreg_lightning.readers.core import cls_logits


class Kernel(nn.Module):
    """An attention module that hands its q, k, v and mask to one kernel call, as timm's and HF's do."""

    def __init__(self, **kernel_kwargs):
        super().__init__()
        self.kernel_kwargs = kernel_kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kernel_kwargs)


def _qkv(heads=3, kv_heads=3, n=7, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, d, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    return q, k, v


def _expected(q, k, scale=None, mask=None):
    """The CLS row of softmax(q k^T * scale + mask) in float64, keys repeated per group as SDPA's enable_gqa."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits[:, :, 0].softmax(-1)


def _caught(module, *args):
    return cls_logits(module, lambda: module(*args), "test").softmax(-1).double()


def test_logits_are_formed_in_float32_under_autocast():
    q, k, v = _qkv(dtype=torch.bfloat16, d=64)
    q, k = q * 4, k * 4  # large logits: bf16 products would be off by far more than float32 rounding
    kernel = Kernel()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cls_logits(kernel, lambda: kernel(q, k, v), "test")
    assert got.dtype == torch.float32
    want = (q[:, :, :1].float() @ k.float().transpose(-2, -1))[:, :, 0] / 8
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["float", "bool", "scale", "grouped"])
def test_masks_scale_and_grouped_keys_as_the_kernel_applies_them(kind):
    q, k, v = _qkv(heads=6, kv_heads=2 if kind == "grouped" else 6)
    g = torch.Generator().manual_seed(1)
    mask = {"float": torch.randn(1, 6, 7, 7, generator=g), "bool": torch.rand(2, 1, 7, 7, generator=g) > 0.3}.get(kind)
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # every row keeps a key
    kwargs = {"attn_mask": mask} if mask is not None else {}
    kwargs |= {"scale": 0.37} if kind == "scale" else {}
    kwargs |= {"enable_gqa": True} if kind == "grouped" else {}
    got = _caught(Kernel(**kwargs), q, k, v)
    torch.testing.assert_close(got, _expected(q, k, kwargs.get("scale"), mask), atol=1e-6, rtol=1e-6)
    # and these are the weights the kernel itself uses: its output's CLS row is their average of v
    out = Kernel(**kwargs)(q, k, v)[:, :, 0]
    values = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    torch.testing.assert_close(out.double(), (got.unsqueeze(-2) @ values)[:, :, 0], atol=1e-5, rtol=1e-5)


def test_a_causal_kernel_is_refused():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="causal"):
        _caught(Kernel(is_causal=True), q, k, v)


class Explicit(nn.Module):
    """An attention that forms its weights itself (timm and HF with fused attention off, eager)."""

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def test_an_explicit_softmax_is_caught_and_nothing_after_the_attention_runs():
    q, k, v = _qkv()
    attention, after = Explicit(), []

    def model():
        attention(q, k, v)
        after.append(True)

    got = cls_logits(attention, model, "test").softmax(-1).double()
    torch.testing.assert_close(got, _expected(q, k), atol=1e-6, rtol=1e-6)
    assert not after and not attention._forward_pre_hooks  # stopped at the kernel; no hook left behind
    # and outside the attention the mode is gone: the same call runs normally
    assert Explicit()(q, k, v).shape == v.shape


def test_a_forward_of_the_same_model_in_another_thread_runs_untouched_while_a_read_is_armed():
    # faithfulness runs full forwards of the model in the statistics thread while the training thread reads the
    # next batch's attention: the read's hook must catch only its own thread's call of the last attention
    import threading

    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_logits = vit(x)
        want_read = cls_logits(vit.blocks[-1].attn, lambda: vit.forward_features(x), "vit")
    other: dict = {}

    def elsewhere() -> None:
        try:
            with torch.no_grad():
                other["logits"] = vit(x)
        except BaseException as err:  # noqa: BLE001 (the caught exception is what the test reports)
            other["error"] = err

    def run() -> None:  # the hook is armed now: another thread runs the whole model through it
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        vit.forward_features(x)

    with torch.no_grad():
        got = cls_logits(vit.blocks[-1].attn, run, "vit")
    assert "error" not in other, repr(other.get("error"))
    assert torch.equal(other["logits"], want_logits)
    assert torch.equal(got, want_read)
