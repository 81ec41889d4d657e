"""faithfulness_baseline='drop': removed tokens are dropped from the sequence, not replaced.

The references feed each model only its kept tokens by hand (timm: the forward's own pieces, the sequence cut
between the position embedding and the blocks; Hugging Face DINOv2: its embeddings, encoder, norm and head), or mask
the removed tokens out as attention keys with the model's own ``attention_mask`` (Hugging Face ViT and DeiT, whose
heads read only the prefix tokens: a token no query attends to changes nothing else). None of them uses our hook.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnreg_lightning.faithfulness import classifier_forward, faithfulness
from attnreg_lightning.token_drop import check_droppable, keeping_tokens
from tests.zoo_models import hf_model, timm_model

B = 3


def masks(t: int, kept: int, seed: int = 0) -> torch.Tensor:
    """Bool [B, T]: a different random set of ``kept`` tokens per image."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, t, generator=g).argsort(dim=1) < kept


def timm_by_hand(vit, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    x = vit._pos_embed(vit.patch_embed(images))
    prefix = x.shape[1] - keep.shape[1]
    rows = [torch.cat([x[i, :prefix], x[i, prefix:][keep[i]]]) for i in range(len(x))]
    x = vit.norm_pre(torch.stack(rows))
    return vit.forward_head(vit.norm(vit.blocks(x)))


TIMM = {
    "vit_registers_token_pool": lambda: timm_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, reg_tokens=2
    ),
    "vit_avg_pool": lambda: timm_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, global_pool="avg"
    ),
    "deit_distilled": lambda: timm_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    ),
}


@pytest.mark.parametrize("key", sorted(TIMM))
@pytest.mark.parametrize("kept", [1, 7, 15])
def test_timm_models_see_only_the_kept_tokens(key, kept):
    vit = TIMM[key]()
    images = torch.randn(B, 3, 32, 32)
    keep = masks(16, kept)
    with torch.no_grad(), keeping_tokens(vit, keep):
        got = vit(images)
    expected = timm_by_hand(vit, images, keep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - vit(images)).abs().max() > 1e-4  # dropping changed the prediction: the hook took effect


def hf_masked_out(model, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    prefix = {"vit": 1, "deit": 2}[model.config.model_type]
    mask = torch.cat([torch.ones(len(keep), prefix, dtype=torch.long), keep.long()], dim=1)
    return model(pixel_values=images, attention_mask=mask).logits


def dinov2_by_hand(model, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    base = model.dinov2
    x = base.embeddings(images)
    x = torch.stack([torch.cat([x[i, :1], x[i, 1:][keep[i]]]) for i in range(len(x))])
    seq = base.layernorm(base.encoder(x).last_hidden_state)
    return model.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))


HF = {
    "vit": (lambda: hf_model("ViTForImageClassification", "ViTConfig", num_labels=4), hf_masked_out),
    "deit_with_teacher": (
        lambda: hf_model("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=4),
        hf_masked_out,
    ),
    "dinov2": (lambda: hf_model("Dinov2ForImageClassification", "Dinov2Config", num_labels=4), dinov2_by_hand),
}


@pytest.mark.parametrize("key", sorted(HF))
def test_hugging_face_models_see_only_the_kept_tokens(key):
    pytest.importorskip("transformers")
    build, reference = HF[key]
    model = build()
    images = torch.randn(B, 3, 32, 32)
    keep = masks(16, 6, seed=1)
    forward = classifier_forward(model)
    with torch.no_grad():
        with keeping_tokens(model, keep):
            got = forward(images)
        expected = reference(model, images, keep)
        assert (got - forward(images)).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_faithfulness_with_drop_scores_the_probability_of_the_kept_tokens_alone():
    vit = TIMM["vit_registers_token_pool"]()
    images = torch.randn(B, 3, 32, 32)
    attention = torch.rand(B, 16)
    lfdr = torch.zeros(B, 16)
    lfdr[0, :3] = 1.0
    lfdr[1, 5:14] = 1.0
    lfdr[2, [0, 15]] = 1.0  # three different kept counts in one batch
    forward = classifier_forward(vit)
    got = faithfulness(
        forward, images, attention, {"lfdr": lfdr}, (4, 4), [0, 1, 2], baseline="drop", model=vit,
        fixed_k={"lfdr": 0.25}, regions={"shortcut": lfdr > 0}, max_images_per_forward=2,
    )  # fmt: skip

    def p(keep: torch.Tensor) -> torch.Tensor:
        out = torch.stack([timm_by_hand(vit, images[i : i + 1], keep[i : i + 1])[0] for i in range(B)])
        return out.double().softmax(-1).gather(1, got.predicted[:, None])[:, 0]

    kept = lfdr > 0
    torch.testing.assert_close(got.scores["lfdr/comprehensiveness"], got.p_clean - p(~kept))
    torch.testing.assert_close(got.scores["lfdr/sufficiency"], got.p_clean - p(kept))
    torch.testing.assert_close(got.scores["shortcut/reliance"], got.p_clean - p(~kept))
    top = attention.argsort(dim=1, descending=True, stable=True).argsort(dim=1) < 4
    torch.testing.assert_close(got.scores["fixed_k_top@lfdr/sufficiency"], got.p_clean - p(top))


def test_faithfulness_with_drop_forwards_one_sequence_length_at_a_time():
    vit = TIMM["vit_avg_pool"]()
    lengths = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    lfdr = torch.zeros(B, 16)
    for i, k in enumerate((2, 9, 2)):
        lfdr[i, :k] = 1.0
    faithfulness(
        classifier_forward(vit), torch.randn(B, 3, 32, 32), torch.rand(B, 16), {"lfdr": lfdr}, (4, 4), [0, 1, 2],
        baseline="drop", model=vit,
    )  # fmt: skip
    # the class token and: the clean forward's 16 patches, then one forward per kept count (the map's sets and the
    # same-size random sets of every image together)
    assert sorted(lengths) == [3, 8, 10, 15, 17]


REFUSED = {
    "timm_eva_rope": lambda: timm_model("eva02_tiny_patch14_224", img_size=28, depth=2),
    "timm_beit_relpos": lambda: timm_model(
        "beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    ),
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_models_whose_blocks_need_token_positions_are_refused_with_the_way_out(key):
    with pytest.raises(TypeError, match="faithfulness_baseline='mean'"):
        check_droppable(REFUSED[key]())


def test_hugging_face_models_with_positions_in_their_layers_are_refused():
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="model_type='beit'"):
        check_droppable(hf_model("BeitForImageClassification", "BeitConfig", num_labels=4))


def test_a_mask_with_uneven_counts_is_refused():
    vit = TIMM["vit_avg_pool"]()
    keep = torch.zeros(B, 16, dtype=torch.bool)
    keep[:, :3] = True
    keep[1, 3] = True
    with pytest.raises(ValueError, match="as many tokens"), keeping_tokens(vit, keep):
        pass


def test_drop_without_the_model_is_refused():
    with pytest.raises(ValueError, match="model="):
        faithfulness(
            lambda x: torch.zeros(len(x), 4), torch.randn(1, 3, 32, 32), torch.rand(1, 16), {"lfdr": torch.ones(1, 16)},
            (4, 4), [0], baseline="drop",
        )  # fmt: skip


def _validate(tmp_path, module, **knobs) -> dict[str, float]:
    import lightning as L

    from attnreg_lightning import AttentionRegularizationCallback
    from tests.helpers import tiny_data

    cb = AttentionRegularizationCallback(n_bootstrap=4, num_images=8, log_images=0, sanity_check=False, **knobs)
    trainer = L.Trainer(
        default_root_dir=tmp_path, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=tiny_data(val_size=8))
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("attnreg/")}


def test_the_callback_scores_dropped_tokens_and_differs_from_replaced_pixels(tmp_path):
    from tests.helpers import perturb, tiny_module

    module = tiny_module()
    perturb(module.vit)
    dropped = _validate(tmp_path / "drop", module, faithfulness_baseline="drop")
    replaced = _validate(tmp_path / "mean", module, faithfulness_baseline="mean")
    keys = [k for k in dropped if "comprehensiveness" in k or "sufficiency" in k]
    assert keys and all(math.isfinite(dropped[k]) for k in keys)
    assert dropped["attnreg/lfdr/comprehensiveness"] != replaced["attnreg/lfdr/comprehensiveness"]
    assert dropped["attnreg/lfdr/sparsity"] == replaced["attnreg/lfdr/sparsity"]  # the same maps


def test_the_callback_refuses_drop_at_setup_for_a_model_it_cannot_shorten(tmp_path):
    from attnreg_lightning.models import ViTClassifier

    module = ViTClassifier("eva02_tiny_patch14_224", model_kwargs={"img_size": 28, "depth": 2})
    with pytest.raises(TypeError, match="faithfulness_baseline='drop'.*grid position"):
        _validate(tmp_path, module, faithfulness_baseline="drop")


def test_compiled_code_is_refused_and_a_forward_that_drops_nothing_is_caught():
    """A compiled forward reuses its graph without the hook: every score would be the clean image's (0), silently."""
    from torch import nn

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = torch.compile(TIMM["vit_avg_pool"](), backend="eager")

    with pytest.raises(TypeError, match="runs compiled code"):
        check_droppable(Holder())
    vit = TIMM["vit_avg_pool"]()
    with pytest.raises(RuntimeError, match="without dropping tokens"), keeping_tokens(vit, masks(16, 4)):
        torch.zeros(B, 4)  # a "forward" that never reaches the model's embedding


def test_curves_with_drop_on_a_model_that_pools_the_patches_is_refused_at_setup(tmp_path):
    from attnreg_lightning.models import ViTClassifier

    kwargs = {"img_size": 48, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "global_pool": "avg"}
    module = ViTClassifier("vit_tiny_patch16_224", model_kwargs=kwargs)
    with pytest.raises(TypeError, match="no prediction with every patch token dropped"):
        _validate(tmp_path, module, faithfulness_baseline="drop", faithfulness="curves")
    assert _validate(tmp_path, module, faithfulness_baseline="drop")  # kept: no all-removed image, it runs
