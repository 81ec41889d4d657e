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

    cls_logits(attention, model, "test")  # the first read runs on to the end: it counts the module's calls
    assert after == [True]
    after.clear()
    got = cls_logits(attention, model, "test").softmax(-1).double()
    torch.testing.assert_close(got, _expected(q, k), atol=1e-6, rtol=1e-6)
    assert not after and not attention._forward_pre_hooks  # stopped at the kernel; no hook left behind
    # and outside the attention the mode is gone: the same call runs normally
    assert Explicit()(q, k, v).shape == v.shape


def test_a_forward_of_the_same_model_in_another_thread_runs_untouched_while_a_read_is_armed():
    # faithfulness runs full forwards of the model in the statistics thread while the training thread reads the
    # next batch's attention: the read's hook must catch only its own thread's call of the last attention. The
    # two overlap for real: the reading thread waits inside its armed attention (at qkv, after the catch's
    # pre-hook) until the other thread has run the whole model through that same attention.
    import threading

    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_logits = vit(x)
        want_read = cls_logits(vit.blocks[-1].attn, lambda: vit.forward_features(x), "vit")
    reader = threading.get_ident()
    armed, other_done = threading.Event(), threading.Event()
    other: dict = {"modes": []}

    def hold_the_other_until_armed(module, args):  # registered before the read's own hook: runs first
        if threading.get_ident() != reader:
            other["waited"] = armed.wait(timeout=60)

    def hold_the_reader_while_armed(module, args):
        if threading.get_ident() == reader:
            armed.set()
            other["overlapped"] = other_done.wait(timeout=60)
        else:  # the reader's catch is on its own thread's mode stack only
            other["modes"].append(torch._C._len_torch_function_stack())

    def elsewhere() -> None:
        try:
            with torch.no_grad():
                other["logits"] = vit(x)
        except BaseException as err:  # noqa: BLE001 (the caught exception is what the test reports)
            other["error"] = err
        finally:
            other_done.set()

    def run() -> None:  # the other thread starts, and the read's hook arms while it is under way
        thread = threading.Thread(target=elsewhere)
        thread.start()
        vit.forward_features(x)
        thread.join()

    handles = [
        vit.blocks[-1].attn.register_forward_pre_hook(hold_the_other_until_armed),
        vit.blocks[-1].attn.qkv.register_forward_pre_hook(hold_the_reader_while_armed),
    ]
    try:
        with torch.no_grad():
            got = cls_logits(vit.blocks[-1].attn, run, "vit")
    finally:
        for handle in handles:
            handle.remove()
    assert other.get("waited") and other.get("overlapped"), other  # the other forward ran inside the armed read
    assert "error" not in other, repr(other.get("error"))
    assert other["modes"] == [0]
    assert torch.equal(other["logits"], want_logits)
    assert torch.equal(got, want_read)


class Exponentials(nn.Module):
    """An attention that normalizes its weights without softmax or SDPA (as a fused kernel would, unseen)."""

    def forward(self, q, k, v):
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).exp()
        return (weights / weights.sum(-1, keepdim=True)) @ v


def test_a_kernel_after_the_attention_is_never_taken_for_it():
    # the read that runs on to the head passes an attention-pooling kernel after the last attention: an attention
    # the catch can't see is refused with its reason, not read from that later kernel
    from attnreg_lightning.readers.core import cls_logits_and_output

    q, k, v = _qkv()
    attention, pool = Exponentials(), Kernel()

    def model():
        return pool(attention(q, k, v), k, v)

    with pytest.raises(TypeError, match="formed its weights with neither scaled_dot_product_attention nor a softmax"):
        cls_logits_and_output(attention, model, "test")
    with pytest.raises(TypeError, match="formed its weights with neither"):
        cls_logits(attention, model, "test")
    assert torch._C._len_torch_function_stack() == 0
    caught, out = cls_logits_and_output(pool, model, "test")  # the pooling kernel itself is caught where it runs
    torch.testing.assert_close(caught.softmax(-1).double(), _expected(attention(q, k, v), k), atol=1e-6, rtol=1e-6)
    assert torch.equal(out, model())


def _timm_classifier():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return vit


def test_a_model_compiled_in_place_is_read_with_its_logits():
    """``model.compile()`` makes its calls run compiled code that skips the catch's hook: the reads run the model's
    own forward instead, with the attention and logits of the model before compiling, and the compiled call still
    runs compiled (its frames counted by the backend, which runs Dynamo's graphs eagerly: no inductor minutes)."""
    from torch._dynamo.testing import CompileCounter
    from transformers import ViTConfig, ViTForImageClassification

    from attnreg_lightning.attention import cls_attention, cls_attention_and_logits

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=96, num_labels=3)  # fmt: skip
    for model in (_timm_classifier(), ViTForImageClassification(config).eval()):

        def logits_of_the_call(model=model):
            out = model(x)
            return getattr(out, "logits", out)

        with torch.no_grad():
            want_attention, want_logits = cls_attention_and_logits(model, x)
            counter = CompileCounter()
            model.compile(backend=counter)
            torch.testing.assert_close(logits_of_the_call(), want_logits)
            frames = counter.frame_count
            attention, logits = cls_attention_and_logits(model, x)
            assert torch.equal(attention, want_attention) and torch.equal(logits, want_logits)
            assert torch.equal(cls_attention(model, x), want_attention)
            torch.testing.assert_close(logits_of_the_call(), want_logits)
        # the calls above ran compiled, and the reads left nothing (e.g. a hook) that makes Dynamo compile again
        assert frames >= 1 and counter.frame_count == frames, type(model).__name__


def test_a_users_reader_without_a_classifier_leaves_it_to_the_built_in_one():
    """A user's reader for timm ViTs that knows no classifier: faithfulness still scores the model's head (the timm
    reader's classifier), and the engine reads the logits apart (its reader gives none)."""
    from attnreg_lightning import AttentionRegularizer, register_attention_reader
    from attnreg_lightning.attention import classifier, reads_logits
    from attnreg_lightning.readers import timm as timm_reader
    from attnreg_lightning.readers import unregister_attention_reader

    vit = _timm_classifier()
    x = torch.randn(2, 3, 32, 32)
    mine = register_attention_reader("mine", timm_reader.READER.matches, timm_reader.READER.read)
    try:
        assert not reads_logits(vit)
        with torch.no_grad():
            assert torch.equal(classifier(vit)(x), vit(x))
        with pytest.raises(ValueError, match="classify=True: VisionTransformer's attention reader gives no class"):
            AttentionRegularizer(vit, classify=True)
    finally:
        unregister_attention_reader(mine)
    assert reads_logits(vit)
