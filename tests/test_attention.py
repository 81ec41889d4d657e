import copy

import lightning as L
import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from attnreg_lightning.attention import cls_attention, token_grid
from tests.helpers import perturb


def unfused_reference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS->patch attention [B, H, T] taken from timm's own unfused attention path of the last block."""
    ref = copy.deepcopy(model).eval()
    attn = ref.blocks[-1].attn
    attn.fused_attn = False  # this instance only; timm's global switch is left alone
    seen = {}
    attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault("attn", inp[0]))
    with torch.no_grad():
        ref.forward_features(images)
    return seen["attn"][:, :, 0, ref.num_prefix_tokens :]


def _images(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


MODELS = [
    ("vit_tiny_patch16_224", {}, (224, 224), 1),
    ("deit_tiny_distilled_patch16_224", {}, (224, 224), 2),
    ("vit_tiny_patch16_224", {"reg_tokens": 4, "img_size": 64, "patch_size": 8}, (64, 64), 5),
    ("vit_tiny_patch16_224", {"qk_norm": True, "img_size": 64}, (64, 64), 1),
    ("vit_tiny_patch16_224", {"pre_norm": True, "img_size": 64}, (64, 64), 1),  # CLIP-style norm_pre
    ("vit_tiny_patch16_224", {"qkv_bias": False, "img_size": 64}, (64, 64), 1),
    # post-norm blocks (norm1 after the attention): the attention's real input is read, not norm1's output
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "block_fn": ResPostBlock}, (64, 64), 1),
    # RoPE ViTs: the rotary embedding applied to the keys as the model's attention applies it
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2}, (56, 56), 1),
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2, "qkv_fused": False}, (56, 56), 1),
    ("eva_giant_patch14_224", {"img_size": 56, "depth": 2, "embed_dim": 32, "num_heads": 2}, (56, 56), 1),
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2, "num_reg_tokens": 2}, (56, 56), 3),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "prefix"), MODELS)
def test_matches_unfused_attention(name, kwargs, size, prefix):
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, **kwargs)).eval()
    assert model.num_prefix_tokens == prefix
    x = _images(2, *size)
    with torch.no_grad():
        per_head = cls_attention(model, x, heads="all")
        mean = cls_attention(model, x)
    ref = unfused_reference(model, x)
    assert per_head.shape == ref.shape
    torch.testing.assert_close(per_head, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean, ref.mean(1), atol=1e-6, rtol=1e-5)
    # prefix tokens removed: patch attention sums to less than one
    assert (mean.sum(1) < 1).all()


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
def test_dynamic_img_size_non_square(size):
    torch.manual_seed(0)
    model = perturb(timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True)).eval()
    x = _images(2, *size)
    with torch.no_grad():
        got = cls_attention(model, x, heads="all")
    torch.testing.assert_close(got, unfused_reference(model, x), atol=1e-6, rtol=1e-5)
    assert token_grid(model, x) == (size[0] // 16, size[1] // 16)
    assert got.shape[-1] == (size[0] // 16) * (size[1] // 16)


class DinoStyle(nn.Module):
    """A model that only offers the DINO hub's ``get_last_selfattention`` (full [B, H, T+1, T+1] matrix)."""

    def __init__(self, vit):
        super().__init__()
        self.inner = vit

    def get_last_selfattention(self, images):
        ref = copy.deepcopy(self.inner)
        ref.blocks[-1].attn.fused_attn = False
        seen = {}
        ref.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", i[0]))
        ref.forward_features(images)
        return seen["a"]


def test_get_last_selfattention_convention():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    x = _images(2, 64, 64)
    with torch.no_grad():
        got = cls_attention(DinoStyle(model), x)
        want = cls_attention(model, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


class WithVit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)


class WithMethod(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)

    def attention_model(self):
        return self.net


@pytest.mark.parametrize("module_cls", [WithVit, WithMethod])
def test_lightning_module_through_mixin_protocol(module_cls):
    module = module_cls().eval()
    vit = module.vit if hasattr(module, "vit") else module.net
    x = _images(3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cls_attention(module, x), cls_attention(vit, x))


def test_errors_name_the_model_and_what_is_missing():
    with pytest.raises(TypeError, match="Linear.*get_last_selfattention"):
        cls_attention(nn.Linear(3, 3), _images(1, 32, 32))
    gap = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(TypeError, match="VisionTransformer.*class token"):
        cls_attention(gap, _images(1, 32, 32))
    dyn = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size 16x16"):
        cls_attention(dyn, _images(1, 40, 48))
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=64)
    with pytest.raises(ValueError, match="takes 64x64"):
        cls_attention(fixed, _images(1, 32, 32))
    with pytest.raises(ValueError, match="heads"):
        cls_attention(fixed, _images(1, 64, 64), heads="max")


def test_rope_vit_at_another_size_reads_its_own_attention():
    torch.manual_seed(0)
    eva = perturb(timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2, dynamic_img_size=True)).eval()
    x = _images(2, 42, 70)
    with torch.no_grad():
        got = cls_attention(eva, x, heads="all")
    torch.testing.assert_close(got, unfused_reference(eva, x), atol=1e-6, rtol=1e-5)
    assert token_grid(eva, x) == (3, 5)
    from attnreg_lightning import AttentionRegularizer

    reg = AttentionRegularizer(eva, n_bootstrap=2)(x, sample_ids=[0, 1])  # and the engine explains it
    assert reg.grid == (3, 5) and reg.significance.valid.all()
    torch.testing.assert_close(reg.attention, got.mean(1))


class _OwnAttention(nn.Module):
    """An attention timm does not define: weights formed by a kernel the reader can't see into."""

    def __init__(self, attn):
        super().__init__()
        self.inner, self.num_heads = attn, attn.num_heads

    def forward(self, x, **kwargs):
        return self.inner.proj(x)


def test_an_attention_the_engine_does_not_know_is_refused_naming_it():
    from attnreg_lightning import AttentionRegularizer
    from attnreg_lightning.readers.core import cls_logits

    odd = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    odd.blocks[-1].attn = _OwnAttention(odd.blocks[-1].attn)
    with pytest.raises(TypeError, match="VisionTransformer: its last attention \\(_OwnAttention\\) is not one the"):
        AttentionRegularizer(odd)
    # and a module that forms its weights with neither SDPA nor a softmax can't be caught: said, not guessed
    with pytest.raises(TypeError, match="_OwnAttention\\) formed its weights with neither"):
        cls_logits(odd.blocks[-1].attn, lambda: odd.forward_features(_images(1, 32, 32)), "odd")


def test_a_user_registered_reader_teaches_the_engine_a_new_model():
    from attnreg_lightning import AttentionRegularizer, register_attention_reader
    from attnreg_lightning.readers import unregister_attention_reader

    class Tiny(nn.Module):
        """Not a ViT any reader knows: CLS attention computed from its own logits."""

        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.patch_size = (8, 8)
            self.scores = nn.Conv2d(3, 2, 8, stride=8)  # 2 heads, one score per 8x8 patch

        def cls_scores(self, images):
            return self.scores(images).flatten(2)  # [B, 2, T]

    with pytest.raises(TypeError, match="readers tried: .*timm Vision Transformer.*register_attention_reader"):
        AttentionRegularizer(Tiny())
    reader = register_attention_reader(
        "tiny", lambda m: isinstance(m, Tiny), lambda m, x: m.cls_scores(x).softmax(-1) * 0.9
    )
    try:
        model = Tiny()
        x = _images(2, 32, 32)
        reg = AttentionRegularizer(model, n_bootstrap=3)(x, sample_ids=[0, 1])
        with torch.no_grad():
            want = (model.cls_scores(x).softmax(-1) * 0.9).mean(1)
        torch.testing.assert_close(reg.attention, want)
        assert reg.grid == (4, 4) and reg.significance.valid.all()
    finally:
        unregister_attention_reader(reader)
