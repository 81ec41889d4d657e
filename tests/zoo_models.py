"""The model zoo of ``tests/test_zoo.py``: one small, perturbed model per family, and independent references.

Every builder makes a tiny random model (depth 2, 32-128 px images, width 48, 3 heads) and perturbs it so that a
read-out taking a bias from the wrong slice, skipping a norm, a position table, a token, a relative-position bias
(BEiT's class-token entries included) or a LoRA update would disagree with the reference: :func:`tests.helpers.perturb`
(biases and norms) and :func:`fill` (position tables, CLS/distillation/register/detection tokens, relative-position
bias tables, layer scales, LoRA B matrices, all set to ``0.5 * randn``).

The references never use our code:

* timm: :class:`timm.utils.AttentionExtract` (forward hook on the last attention's ``attn_drop``, the identity in
  eval mode, so its output is the softmax) on a deep copy with ``fused_attn = False`` on every module that has it.
  timm's global fused-attention switch is left alone.
* Hugging Face: the model's own eager attention, ``set_attn_implementation("eager")`` (restored afterwards) and
  ``output_attentions=True``, ``attentions[-1]``. Data2VecVision can't switch kernels on a built model: an eager twin
  with the same state dict is built instead.

A reference returns the full CLS row ``[B, H, N]`` (every token, softmax over all of them): the test slices the
patch columns with the row's ``prefix`` (tokens before the patches) and ``grid``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from tests.helpers import perturb

B = 2
T_SMALL = {"embed_dim": 48, "depth": 2, "num_heads": 3}
HF_SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "patch_size": 8}

FILLED = re.compile(
    r"pos_embed|position_embedding|cls_token|reg_token|dist_token|distillation_token|register_tokens"
    r"|detection_tokens|class_embedding|relative_position_bias_table|lora_B|gamma|lambda|temperature"
)
"""Parameters :func:`fill` sets to ``0.5 * randn``: those fresh models hold at zero, one, or near zero."""


def fill(model: nn.Module, seed: int = 0) -> nn.Module:
    """Position tables, prefix tokens, relative-position bias tables (every entry: BEiT's class-token rows too),
    layer scales and LoRA B matrices to ``0.5 * randn``: fresh models hold them at zero (or 1e-5), under which a
    read-out that skips them still agrees."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if FILLED.search(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def shake(model: nn.Module, seed: int = 0) -> nn.Module:
    """:func:`tests.helpers.perturb` and :func:`fill`, in eval mode."""
    return fill(perturb(model, seed), seed).eval()


# --- references ---


def unfused_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return ref


def timm_reference(module_glob: str) -> Callable[[nn.Module, Tensor], Tensor]:
    """The CLS row ``[B, H, N]`` of the softmax that ``AttentionExtract`` hooks at ``module_glob`` (the last
    attention's ``attn_drop``; ``*`` first so that it also matches inside a PeftModel)."""

    def reference(model: nn.Module, images: Tensor) -> Tensor:
        from timm.utils import AttentionExtract

        extract = AttentionExtract(unfused_copy(model), names=[module_glob], method="hook")
        assert len(extract.names) == 1, f"{module_glob} matches {extract.names}"
        with torch.no_grad():
            (attn,) = extract(images).values()
        return attn[:, :, 0].float()

    return reference


def _hf_inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule: its model, run eagerly


def hf_reference(model: nn.Module, images: Tensor) -> Tensor:
    """The model's own eager last-layer attention, CLS row ``[B, H, N]``; its kernel is restored afterwards."""
    inner = _hf_inner(model)
    kernel = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = inner(pixel_values=images, output_attentions=True)
    finally:
        inner.set_attn_implementation(kernel)
    assert inner.config._attn_implementation == kernel
    assert out.attentions, f"{type(inner).__name__} returned no attentions"
    return out.attentions[-1][:, :, 0].float()


def hf_eager_twin_reference(model: nn.Module, images: Tensor) -> Tensor:
    """For models that can't switch kernels once built (Data2VecVision): an eager twin, same weights."""
    twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    twin.load_state_dict(model.state_dict())
    assert twin.config._attn_implementation == "eager" and model.config._attn_implementation != "eager"
    with torch.no_grad():
        out = twin(pixel_values=images, output_attentions=True)
    return out.attentions[-1][:, :, 0].float()


def of_held(reference: Callable, name: str = "model") -> Callable[[nn.Module, Tensor], Tensor]:
    """A reference taken on the module a LightningModule holds as ``name``."""
    return lambda module, images: reference(getattr(module, name), images)


# --- builders ---


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return shake(timm.create_model(name, num_classes=4, **kwargs), seed)


def shrunk_r26_hybrid(img_size: int = 128, seed: int = 0) -> nn.Module:
    """``vit_small_r26_s32_224``'s layout (ResNetV2 (2, 2, 2, 2) stem, stride 32, patch 1, StdConv2dSame), shrunk:
    one block per stage, 16-128 channels, GroupNorm of 4 groups (32 don't divide the narrow bottlenecks)."""
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    backbone = ResNetV2(
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_chs=16,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=4),
    )
    model = VisionTransformer(
        img_size=img_size,
        patch_size=1,
        embed_layer=partial(HybridEmbed, backbone=backbone),
        num_classes=4,
        **T_SMALL,
    )
    return shake(model, seed)


def timm_lora(seed: int = 0) -> nn.Module:
    import peft

    base = timm_model("vit_tiny_patch16_224", seed, img_size=32, patch_size=8, **T_SMALL)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["qkv"], r=4))
    return fill(model, seed).eval()  # lora_B starts at zero: make the adapter change the attention


def hf_model(model_cls: str, config_cls: str, seed: int = 0, **config) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**HF_SMALL, "image_size": 32, **config})
    return shake(getattr(transformers, model_cls)(cfg), seed)


def hf_lora(seed: int = 0) -> nn.Module:
    """ViTForImageClassification with LoRA on the query and key projections (``q_proj``/``k_proj`` in
    transformers 5.x; ``query``/``key`` in 4.x)."""
    import peft

    base = hf_model("ViTForImageClassification", "ViTConfig", seed, intermediate_size=96, num_labels=4)
    names = ["q_proj", "k_proj"] if hasattr(base.vit.layers[0].attention, "q_proj") else ["query", "key"]
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=names, r=4))
    return fill(model, seed).eval()


def lightning_holding_lora(seed: int = 0) -> nn.Module:
    import lightning as L

    class LoraModule(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Tensor) -> Tensor:
            return self.model(images)

    return LoraModule(timm_lora(seed)).eval()


def compiled_hf_vit(seed: int = 0) -> nn.Module:
    """``torch.compile(ViTModel(...))``: an OptimizedModule. Its backend counts the frames Dynamo compiles and runs
    their graphs eagerly (the model's ``compiled`` attribute), so a test can call the compiled forward without
    inductor's ~40 s of kernel generation on a CPU."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    model = torch.compile(hf_model("ViTModel", "ViTConfig", seed, intermediate_size=96), backend=counter)
    model.compiled = counter
    return model


# --- the table ---


@dataclass(frozen=True)
class Row:
    """One family: ``build() -> model``, ``reference(model, images) -> [B, H, N]`` CLS row over all tokens, the
    image size, the tokens before the patches (``prefix``), the patch ``grid`` and the tokens after the patches
    (``after``: YOLOS' detection tokens), ``N = prefix + h w + after``."""

    build: Callable[[], nn.Module]
    reference: Callable[[nn.Module, Tensor], Tensor]
    size: int
    prefix: int
    grid: tuple[int, int]
    heads: int = 3
    after: int = 0
    tags: frozenset[str] = field(default_factory=frozenset)


LAST = timm_reference("*blocks.1.attn.attn_drop")
T32 = {"img_size": 32, "patch_size": 8, **T_SMALL}


def _t(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm_model(name, **kwargs)


def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    return lambda: hf_model(model_cls, config_cls, **config)


TIMM_ROWS = {
    "timm-vit": Row(_t("vit_tiny_patch16_224", **T32), LAST, 32, 1, (4, 4)),
    "timm-deit-distilled": Row(_t("deit_tiny_distilled_patch16_224", **T32), LAST, 32, 2, (4, 4)),
    "timm-vit-reg-tokens": Row(
        _t("vit_tiny_patch16_224", reg_tokens=2, no_embed_class=True, **T32), LAST, 32, 3, (4, 4)
    ),
    "timm-vit-qk-norm": Row(_t("vit_tiny_patch16_224", qk_norm=True, **T32), LAST, 32, 1, (4, 4)),
    "timm-eva02-interleaved": Row(_t("eva02_tiny_patch14_224", img_size=56, **T_SMALL), LAST, 56, 1, (4, 4)),
    "timm-eva02-rotate-half": Row(
        _t("eva02_tiny_patch14_224", img_size=56, rope_rotate_half=True, **T_SMALL), LAST, 56, 1, (4, 4)
    ),
    "timm-rope-reg1-cls-eva-attention": Row(
        _t("vit_medium_patch16_rope_reg1_gap_256", img_size=64, class_token=True, global_pool="token", **T_SMALL),
        LAST,
        64,
        2,
        (4, 4),
    ),
    "timm-rope-reg1-cls-attention-rope": Row(
        _t(
            "vit_medium_patch16_rope_reg1_gap_256",
            img_size=64,
            class_token=True,
            global_pool="token",
            attn_type="rope",
            **T_SMALL,
        ),
        LAST,
        64,
        2,
        (4, 4),
    ),
    "timm-pe-core": Row(_t("vit_pe_core_tiny_patch16_384", img_size=64, **T_SMALL), LAST, 64, 1, (4, 4)),
    "timm-beit-rel-pos-bias": Row(_t("beit_base_patch16_224", **T32), LAST, 32, 1, (4, 4), tags=frozenset({"relbias"})),
    "timm-beit-shared-rel-pos-bias": Row(
        _t("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **T32),
        LAST,
        32,
        1,
        (4, 4),
        tags=frozenset({"relbias"}),
    ),
    "timm-relpos-cls": Row(
        _t("vit_relpos_base_patch16_cls_224", **T32), LAST, 32, 1, (4, 4), tags=frozenset({"relbias"})
    ),
    "timm-srelpos-cls": Row(
        _t("vit_srelpos_small_patch16_224", class_token=True, global_pool="token", rel_pos_dim=48, **T32),
        LAST,
        32,
        1,
        (4, 4),
        tags=frozenset({"relbias"}),
    ),
    "timm-cait": Row(
        _t("cait_xxs24_224", depth_token_only=2, **T32),
        timm_reference("*blocks_token_only.1.attn.attn_drop"),
        32,
        1,
        (4, 4),
    ),
    "timm-xcit": Row(
        _t("xcit_nano_12_p16_224", img_size=64, cls_attn_layers=2, **T_SMALL),
        timm_reference("*cls_attn_blocks.1.attn.attn_drop"),
        64,
        1,
        (4, 4),
    ),
    "timm-hybrid-r-s16-p8": Row(
        _t("vit_tiny_r_s16_p8_224", img_size=128, **T_SMALL), LAST, 128, 1, (4, 4), tags=frozenset({"hybrid"})
    ),
    "timm-hybrid-r26-s32-shrunk": Row(shrunk_r26_hybrid, LAST, 128, 1, (4, 4), tags=frozenset({"hybrid"})),
    "lora-timm-vit": Row(timm_lora, LAST, 32, 1, (4, 4), tags=frozenset({"lora"})),
    "lora-lightning-module": Row(lightning_holding_lora, of_held(LAST), 32, 1, (4, 4), tags=frozenset({"lora"})),
}

HF_ROWS = {
    "hf-vit": Row(
        _hf("ViTForImageClassification", "ViTConfig", intermediate_size=96, num_labels=4), hf_reference, 32, 1, (4, 4)
    ),
    "hf-deit-teacher": Row(
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", intermediate_size=96, num_labels=4),
        hf_reference,
        32,
        2,
        (4, 4),
    ),
    "hf-vit-msn": Row(_hf("ViTMSNModel", "ViTMSNConfig", intermediate_size=96), hf_reference, 32, 1, (4, 4)),
    "hf-dpt": Row(_hf("DPTModel", "DPTConfig", intermediate_size=96), hf_reference, 32, 1, (4, 4)),
    "hf-dinov2": Row(_hf("Dinov2Model", "Dinov2Config", mlp_ratio=2), hf_reference, 32, 1, (4, 4)),
    "hf-dinov2-registers": Row(
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", mlp_ratio=2, num_register_tokens=2),
        hf_reference,
        32,
        3,
        (4, 4),
    ),
    "hf-beit-rel-pos-bias": Row(
        _hf("BeitModel", "BeitConfig", intermediate_size=96, use_relative_position_bias=True),
        hf_reference,
        32,
        1,
        (4, 4),
        tags=frozenset({"relbias"}),
    ),
    "hf-beit-shared-rel-pos-bias": Row(
        _hf("BeitModel", "BeitConfig", intermediate_size=96, use_shared_relative_position_bias=True),
        hf_reference,
        32,
        1,
        (4, 4),
        tags=frozenset({"relbias"}),
    ),
    "hf-data2vec-vision": Row(
        _hf("Data2VecVisionModel", "Data2VecVisionConfig", intermediate_size=96, use_relative_position_bias=True),
        hf_eager_twin_reference,
        32,
        1,
        (4, 4),
        tags=frozenset({"relbias"}),
    ),
    "hf-yolos": Row(
        _hf("YolosModel", "YolosConfig", image_size=[32, 32], intermediate_size=96, num_detection_tokens=3),
        hf_reference,
        32,
        1,
        (4, 4),
        after=3,
    ),
    "hf-clip-vision": Row(
        _hf("CLIPVisionModel", "CLIPVisionConfig", intermediate_size=96), hf_reference, 32, 1, (4, 4)
    ),
    "hf-metaclip2-vision": Row(
        _hf("MetaClip2VisionModel", "MetaClip2VisionConfig", intermediate_size=96), hf_reference, 32, 1, (4, 4)
    ),
    "hf-blip-vision": Row(  # BLIP initializes its weights at std 1e-10 (every token alike): at 0.02 they differ
        _hf("BlipVisionModel", "BlipVisionConfig", intermediate_size=96, initializer_range=0.02),
        hf_reference,
        32,
        1,
        (4, 4),
    ),
    "hf-dinov3-vit": Row(
        _hf("DINOv3ViTModel", "DINOv3ViTConfig", intermediate_size=96, num_register_tokens=2),
        hf_reference,
        32,
        3,
        (4, 4),
    ),
    "lora-hf-vit": Row(hf_lora, hf_reference, 32, 1, (4, 4), tags=frozenset({"lora"})),
    "hf-vit-torch-compile": Row(compiled_hf_vit, hf_reference, 32, 1, (4, 4)),
}

ROWS = {**TIMM_ROWS, **HF_ROWS}


# --- refused ---


REFUSED = {
    # DiffAttention's weights are softmax_1 - lambda * softmax_2: they can be negative and do not sum to one
    "timm-diff-attention": (
        _t("vit_tiny_patch16_224", attn_layer="diff", **T32),
        r"(?is)^(?=.*DiffAttention)(?=.*(negative|differen))",
    ),
    "timm-vit-no-class-token": (
        _t("vit_tiny_patch16_224", class_token=False, global_pool="avg", **T32),
        r"(?is)VisionTransformer.*class token",
    ),
    "timm-rope-reg1-gap-no-class-token": (
        _t("vit_medium_patch16_rope_reg1_gap_256", img_size=64, **T_SMALL),
        r"(?is)Eva.*class token",
    ),
    "hf-vit-mae": (
        _hf("ViTMAEModel", "ViTMAEConfig", intermediate_size=96),
        r"(?is)ViTMAEModel.*(masking|shuffl)",
    ),
    "hf-ijepa": (
        _hf("IJepaModel", "IJepaConfig", intermediate_size=96),
        r"(?is)IJepaModel.*class token",
    ),
}
