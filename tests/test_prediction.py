"""Faithfulness scores the prediction the user's model makes: the module's own forward where it returns class scores,
the ViT's head where that is the module's prediction."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from attnreg_lightning.faithfulness import prediction_forward
from tests.helpers import IMAGE_SIZE, perturb, tiny_module

VIT = {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


class TwoHeads(nn.Module):
    """A backbone that kept its own (pretrained-style, 10-class) head, and the module's 4-class head on its
    features: the module predicts with the latter."""

    def __init__(self, backbone_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = perturb(timm.create_model("vit_tiny_patch16_224", num_classes=backbone_classes, **VIT))
        self.head = nn.Linear(48, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True))


class GivesADict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, **VIT)

    def forward(self, images):
        return {"logits": self.vit(images)}


def images() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def test_a_module_with_a_head_of_its_own_is_scored_by_its_own_forward():
    module = TwoHeads().eval()
    x = images()
    chosen = prediction_forward(module, x)
    assert chosen.source == "module" and chosen.note is None
    with torch.no_grad():
        torch.testing.assert_close(chosen.forward(x), module(x))
        assert chosen.forward(x).shape == (3, 4)  # not the backbone's 10 classes


def test_a_backbone_without_a_head_under_a_module_head_is_scored_by_the_module():
    module = TwoHeads(backbone_classes=0)
    assert prediction_forward(module, images()).source == "module"


def test_a_module_that_predicts_with_the_vit_head_uses_it():
    module = tiny_module()
    perturb(module.vit)
    chosen = prediction_forward(module, images())
    assert chosen.source == "vit" and chosen.note is None


def test_a_forward_without_class_scores_falls_back_to_the_vit_head_with_a_note():
    chosen = prediction_forward(GivesADict(), images())
    assert chosen.source == "vit" and "returned dict" in chosen.note


def test_told_otherwise():
    module = TwoHeads()
    x = images()
    assert prediction_forward(module, x, prefer="vit").forward(x).shape == (3, 10)
    with pytest.raises(ValueError, match="faithfulness_prediction='module'.*dict"):
        prediction_forward(GivesADict(), x, prefer="module")
    with pytest.raises(ValueError, match="faithfulness_prediction='vit'.*no head"):
        prediction_forward(TwoHeads(backbone_classes=0), x, prefer="vit")
    with pytest.raises(ValueError, match="faithfulness_prediction must be"):
        prediction_forward(module, x, prefer="head")


def test_the_module_forward_keeps_the_modules_own_modes():
    module = TwoHeads()
    module.train()
    module.backbone.blocks[0].attn.attn_drop.p = 0.5  # a dropout kept in train mode on purpose elsewhere
    chosen = prediction_forward(module, images())
    chosen.forward(images())
    assert all(m.training for m in module.modules())


class GivesProbabilities(GivesADict):
    def forward(self, images):
        return (self.vit(images) * 2).softmax(dim=-1)  # not the ViT head's logits: the module's own prediction


class GivesFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT)

    def forward(self, images):
        return self.backbone(images)


def test_probabilities_are_scored_as_probabilities_and_features_are_no_prediction():
    x, module = images(), GivesProbabilities().eval()
    chosen = prediction_forward(module, x)
    assert chosen.source == "module"
    with torch.no_grad():
        # faithfulness takes a softmax of what the forward gives: the module's probabilities, not a softmax of them
        torch.testing.assert_close(chosen.forward(x).softmax(-1), module(x))
    assert prediction_forward(GivesFeatures(), x).forward is None


def test_probe_images_take_the_models_pixels_channels_and_dtype():
    from attnreg_lightning.faithfulness import probe_images

    hybrid = timm.create_model("vit_small_r26_s32_224", img_size=64, num_classes=4)
    assert probe_images(hybrid).shape == (2, 3, 64, 64)  # the CNN stem's input, not the projection's
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, **VIT).to(torch.bfloat16)
    assert probe_images(vit).dtype == torch.bfloat16


def test_a_module_holding_a_compiled_vit_is_resolved():
    from attnreg_lightning.attention import resolve_vit

    module = GivesADict()
    module.vit = torch.compile(module.vit, backend="eager")
    assert resolve_vit(module) is module.vit._orig_mod
