"""The zoo: one small, perturbed model per Vision Transformer family, its CLS->patch attention read by
``cls_attention`` equal (1e-5) to an independent reference (timm's ``AttentionExtract`` on an unfused copy, or the
Hugging Face model's own eager attention), the engine run end to end on it, and the families that can't be read
refused with the reason. The models and references are in ``tests/zoo_models.py``."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from attnreg_lightning import AttentionRegularizer
from attnreg_lightning.attention import (
    classifier,
    cls_attention,
    cls_attention_and_logits,
    resolve_vit,
    token_grid,
)
from tests.zoo_models import REFUSED, ROWS, B, Row

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def _params(rows: dict, tag: str | None = None) -> list:
    return [pytest.param(key, id=key) for key, row in rows.items() if tag is None or tag in row.tags]


@cache
def built(key: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The row's model, its images and the reference CLS row ``[B, H, N]`` (built once per session)."""
    row = ROWS[key]
    model = row.build()
    images = torch.randn(B, 3, row.size, row.size, generator=torch.Generator().manual_seed(1))
    return model, images, row.reference(model, images)


def patch_columns(row: Row, full: torch.Tensor) -> torch.Tensor:
    t = row.grid[0] * row.grid[1]
    return full[..., row.prefix : row.prefix + t]


@pytest.mark.parametrize("key", _params(ROWS))
def test_the_reference_is_the_cls_softmax_row(key):
    """The reference itself: a softmax row over every token (prefix + patches + what follows), of the expected
    length, whose patch columns hold less than all of it."""
    row = ROWS[key]
    _, _, full = built(key)
    t = row.grid[0] * row.grid[1]
    assert full.dim() == 3 and full.shape[:2] == (B, row.heads)
    assert full.shape[-1] == row.prefix + t + row.after
    torch.testing.assert_close(full.sum(-1), torch.ones(B, row.heads), atol=1e-5, rtol=0)
    assert (patch_columns(row, full).sum(-1) < 1).all()
    assert (full >= 0).all()


@pytest.mark.parametrize("key", _params(ROWS))
def test_the_reference_tells_the_patches_apart(key):
    """Every reference row spreads its patch weights (max over min above 1.02; 1.05 the least in the zoo): a model
    whose weights start near zero (BLIP's default init, std 1e-10) attends alike to every token, and a read that
    mixed up tokens, heads or images would agree with it."""
    row = ROWS[key]
    _, _, full = built(key)
    patches = patch_columns(row, full)
    assert (patches.amax(-1) / patches.amin(-1)).min() > 1.02


@pytest.mark.parametrize("key", _params(ROWS))
def test_read_equals_the_reference_and_the_engine_runs(key):
    row = ROWS[key]
    model, images, full = built(key)
    reference = patch_columns(row, full)
    t = row.grid[0] * row.grid[1]

    assert token_grid(model, images) == row.grid
    ours = cls_attention(model, images, heads="all")
    assert ours.dtype == torch.float32 and ours.shape == (B, row.heads, t)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    # the engine, end to end: its raw attention is the head-mean read, on the model's patch grid
    reg = AttentionRegularizer(model, n_bootstrap=2)(images, sample_ids=list(range(B)))
    assert reg.grid == row.grid
    mean = cls_attention(model, images)
    assert mean.shape == (B, t)
    torch.testing.assert_close(reg.attention, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(reg.attention, reference.mean(1), atol=1e-5, rtol=0)
    assert reg.spatial("lfdr").shape == (B, *row.grid)


def plain_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    """The class logits of the model's own forward, without any reader; None for a model with no head."""
    import transformers

    vit = resolve_vit(model)
    if isinstance(vit, transformers.PreTrainedModel):
        return getattr(vit(pixel_values=images), "logits", None)  # a backbone's output has no logits
    return vit(images) if vit.num_classes > 0 else None  # timm


@pytest.mark.parametrize("key", _params(ROWS))
def test_one_forward_reads_the_attention_and_the_class_logits(key):
    """The forward that reads the attention can run on to the head: the same attention as the read that stops there,
    and the logits of the model's own forward, bit for bit; the engine's ``classify`` gives them per image. A
    backbone is refused."""
    row = ROWS[key]
    model, images, full = built(key)
    with torch.no_grad():
        want = plain_logits(model, images)
        if want is None:
            assert classifier(model) is None
            with pytest.raises(TypeError, match="no classification head"):
                cls_attention_and_logits(model, images)
            with pytest.raises(ValueError, match="classify=True"):
                AttentionRegularizer(model, classify=True)
            return
        attention, logits = cls_attention_and_logits(model, images, heads="all")
        assert torch._C._len_torch_function_stack() == 0  # the catch is gone once the forward is over
        assert torch.equal(attention, cls_attention(model, images, heads="all"))
        torch.testing.assert_close(attention, patch_columns(row, full), atol=1e-5, rtol=0)
        assert torch.equal(logits, want)
        assert torch.equal(classifier(model)(images), want)

        reg = AttentionRegularizer(model, n_bootstrap=2, classify=True)(images, sample_ids=list(range(B)))
        torch.testing.assert_close(reg.logits, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(reg.attention, attention.mean(1), atol=1e-6, rtol=0)


def test_some_zoo_models_have_heads_and_some_are_backbones():
    """The test above checks both branches: neither is empty."""
    heads = {key: classifier(built(key)[0]) is not None for key in ROWS}
    assert 10 <= sum(heads.values()) < len(heads)


@pytest.mark.parametrize("key", _params(ROWS, "relbias"))
def test_the_reference_includes_the_relative_position_bias(key):
    """Zeroing every relative-position bias (BEiT's tables, or the relpos MLP's output layer) changes the
    reference by well over the 1e-5 tolerance: it is the model's attention with its bias, not without. (timm's
    relpos pads its bias with zeros for the CLS row and column, so there the bias reaches the CLS row through the
    earlier layer only: ~6e-4 here.)"""
    row = ROWS[key]
    model, images, full = built(key)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        hits = 0
        for name, p in zeroed.named_parameters():
            if "relative_position_bias_table" in name or ("rel_pos" in name and ".mlp.fc2." in name):
                p.zero_()
                hits += 1
    assert hits, "no relative-position bias found"
    assert (row.reference(zeroed, images) - full).abs().max() > 1e-4


@pytest.mark.parametrize("key", ["timm-beit-rel-pos-bias", "hf-beit-rel-pos-bias", "hf-data2vec-vision"])
def test_the_beit_reference_includes_the_class_token_bias_entries(key):
    """BEiT's tables end with three class-token entries (rows -3, -2, -1: cls->token, token->cls, cls->cls).
    Raising cls->cls in the last layer's table alone changes the CLS row (cls->token moves the whole patch row
    against the CLS column too; adding one constant to both would change nothing: softmax is shift-invariant)."""
    row = ROWS[key]
    model, images, full = built(key)
    for entry in (-1, -3):
        changed = copy.deepcopy(model)
        tables = [p for n, p in changed.named_parameters() if "relative_position_bias_table" in n]
        with torch.no_grad():
            tables[-1][entry] += 1.0
        assert (row.reference(changed, images) - full).abs().max() > 1e-3, entry


@pytest.mark.parametrize("key", _params(ROWS, "hybrid"))
def test_the_hybrid_grid_is_the_cnn_stems(key):
    """The row's grid is what the CNN stem and the patch projection really give (not the image over the
    ``patch_size`` alone), and the reference has exactly that many patch tokens after the CLS."""
    row = ROWS[key]
    model, images, full = built(key)
    with torch.no_grad():
        features = model.patch_embed.backbone(images)
        features = features[-1] if isinstance(features, (list, tuple)) else features
        real = tuple(model.patch_embed.proj(features).shape[-2:])
    assert real == row.grid
    assert full.shape[-1] == row.prefix + real[0] * real[1]


@pytest.mark.parametrize("key", _params(ROWS, "lora"))
def test_the_lora_reference_is_the_adapted_attention(key):
    """The reference taken on the PeftModel is the adapted model's attention, not the base model's."""
    row = ROWS[key]
    model, images, full = built(key)
    peft_model = model if hasattr(model, "disable_adapter") else model.model  # a LightningModule holds it
    with peft_model.disable_adapter():
        base = row.reference(model, images)
    assert (base - full).abs().max() > 1e-3


def test_the_compiled_model_read_leaves_the_kernel_and_the_compiled_forward_alone():
    """torch.compile(ViTModel): read as its own model, and the compiled forward, called before and after the read,
    still runs compiled (Dynamo's frames, counted by the row's backend) and gives the eager model's output; the
    model's kernel is still sdpa after the read."""
    model, images, _ = built("hf-vit-torch-compile")
    with torch.no_grad():
        want = model._orig_mod(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model(pixel_values=images).last_hidden_state, want)
        compiled_frames = model.compiled.frame_count
        attention = cls_attention(model, images, heads="all")
        torch.testing.assert_close(cls_attention(model._orig_mod, images, heads="all"), attention)
        torch.testing.assert_close(model(pixel_values=images).last_hidden_state, want)
    assert compiled_frames >= 1 and model.compiled.frame_count == compiled_frames  # compiled once, not recompiled
    assert model._orig_mod.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("key", list(REFUSED), ids=list(REFUSED))
def test_models_that_cannot_be_read_are_refused_with_the_reason(key):
    build, message = REFUSED[key]
    model = build()
    with pytest.raises(TypeError, match=message) as refused:
        AttentionRegularizer(model)
    # and what to do instead
    ways_out = ("; use ", "; create ", "register_attention_reader", "use attn_layer", "; explain ", "use a DPT")
    assert any(way in str(refused.value) for way in ways_out), str(refused.value)


def test_the_callback_explains_a_lightning_module_holding_a_lora_model(tmp_path):
    """A user's LightningModule whose ``model`` is a peft LoRA model, validated by a real Trainer: the callback's
    maps are those of the adapted model (not of the base weights), and the adapters are left as they were."""
    import lightning as L
    import peft
    import timm
    from torch.nn import functional as F

    from tests.helpers import IMAGE_SIZE, RecordingCallback, perturb, tiny_data
    from tests.zoo_models import fill

    class LoraClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            vit = perturb(timm.create_model("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, depth=2,
                                            embed_dim=48, num_heads=3, num_classes=4))  # fmt: skip
            self.model = fill(peft.get_peft_model(vit, peft.LoraConfig(target_modules=["qkv"], r=4)))

        def validation_step(self, batch, batch_idx):
            images, targets = batch[0], batch[1]
            self.log("val/loss", F.cross_entropy(self.model(images), targets))

    module = LoraClassifier()
    lora_before = {n: p.clone() for n, p in module.named_parameters() if "lora_" in n}
    callback = RecordingCallback(n_bootstrap=2, num_images=8, log_images=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[callback], default_root_dir=tmp_path)
    data = tiny_data(train_size=8, val_size=8)
    trainer.validate(module, datamodule=data)
    ((ids, reg),) = callback.seen[0]
    images = torch.stack([data.val_set[i - data.val_set.id_offset][0] for i in ids])
    with torch.no_grad():
        adapted = cls_attention(module.model, images)
        with module.model.disable_adapter():
            base = cls_attention(module.model, images)
    torch.testing.assert_close(reg.attention, adapted, atol=1e-6, rtol=0)
    assert (reg.attention - base).abs().max() > 1e-3
    assert all(torch.equal(p, lora_before[n]) for n, p in module.named_parameters() if "lora_" in n)
