"""Hugging Face ``transformers`` ViTs: the attention read equals the model's own, the engine, the mixin and a real
Trainer fit run on them, what can't be read is refused with the reason, and the package imports without them."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from attnreg_lightning import AttentionRegularizer
from attnreg_lightning.attention import cls_attention, patch_size
from attnreg_lightning.mixin import AttentionRegularizationMixin
from attnreg_lightning.models import HFViTClassifier
from tests.helpers import IMAGE_SIZE, RecordingCallback, perturb, tiny_data

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 32, "patch_size": 8}
# (model class, config class, extra config, prefix tokens before the patches)
FAMILIES = {
    "vit": (transformers.ViTForImageClassification, transformers.ViTConfig, {"intermediate_size": 96}, 1),
    "vit-model": (transformers.ViTModel, transformers.ViTConfig, {"intermediate_size": 96}, 1),
    "deit-teacher": (
        transformers.DeiTForImageClassificationWithTeacher,
        transformers.DeiTConfig,
        {"intermediate_size": 96},
        2,
    ),
    "deit-model": (transformers.DeiTModel, transformers.DeiTConfig, {"intermediate_size": 96}, 2),
    "dinov2": (transformers.Dinov2ForImageClassification, transformers.Dinov2Config, {"mlp_ratio": 2}, 1),
    "dinov2-registers": (
        transformers.Dinov2WithRegistersModel,
        transformers.Dinov2WithRegistersConfig,
        {"mlp_ratio": 2, "num_register_tokens": 4},
        5,
    ),
}


def _model(family: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    model_cls, config_cls, extra, prefix = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **extra, num_labels=4)).eval()
    return perturb(model, seed), prefix


def _eager_cls_row(model: torch.nn.Module, images: torch.Tensor, prefix: int) -> torch.Tensor:
    """The model's own last-layer attention (eager, ``output_attentions``): CLS row, prefix tokens dropped."""
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        kwargs = (
            {}
            if images.shape[-2:] == (32, 32) or "Dinov2" in type(model).__name__
            else {"interpolate_pos_encoding": True}
        )
        out = model(pixel_values=images, output_attentions=True, **kwargs)
    finally:
        model.set_attn_implementation(kernel)
    return out.attentions[-1][:, :, 0, prefix:]


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (32, 48)], ids=["config-size", "larger", "non-square"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_read_equals_the_models_own_attention(family, size):
    model, prefix = _model(family)
    images = torch.randn(3, 3, *size)
    assert model.config._attn_implementation == "sdpa"  # read as the model runs: fused kernels untouched
    ours = cls_attention(model, images, heads="all")
    assert model.config._attn_implementation == "sdpa"
    reference = _eager_cls_row(model, images, prefix)
    assert ours.shape == (3, 3, (size[0] // 8) * (size[1] // 8))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert patch_size(model) == (8, 8)


def test_a_lightning_module_holding_an_hf_model_works_with_the_mixin_and_the_engine():
    class Module(AttentionRegularizationMixin, L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

    hf, _ = _model("deit-teacher")
    module = Module(hf)
    images = torch.randn(2, 3, 32, 32)
    reg = module.regularized_attention(images, sample_ids=[0, 1], n_bootstrap=3)
    assert reg.spatial("lfdr").shape == (2, 4, 4)
    direct = AttentionRegularizer(hf, n_bootstrap=3)(images, sample_ids=[0, 1])
    torch.testing.assert_close(reg.maps["lfdr"], direct.maps["lfdr"], rtol=0, atol=0)
    # the patch null's tiles are the model's patches (from its config): 8 px, so 16 tokens of 2x2 tiles
    engine = AttentionRegularizer(module, method="patch", n_bootstrap=2)
    assert engine.method_options["patch_size"] == 8


def test_two_epoch_fit_with_the_callback_on_an_hf_vit(tmp_path):
    config = {**SMALL, "image_size": IMAGE_SIZE, "intermediate_size": 96}
    torch.manual_seed(0)
    module = HFViTClassifier("vit", num_classes=4, config=config)
    callback = RecordingCallback(n_bootstrap=2, num_images=8, log_images=0, heads="all")
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=tiny_data(train_size=32, val_size=8))
    assert sorted(callback.seen) == [0, 1]
    for epoch in (0, 1):
        ((ids, reg),) = callback.seen[epoch]
        assert ids == callback.seen[0][0][0] and reg.maps["lfdr"].shape == (8, (IMAGE_SIZE // 8) ** 2)
    assert trainer.callback_metrics["attnreg/explained"] == 8
    assert 0 <= trainer.callback_metrics["attnreg/lfdr/sparsity"] <= 1
    # heads=all: the head count from the transformers config, one key per head
    assert {f"attnreg/head{h}/discoveries" for h in range(3)} <= set(trainer.callback_metrics)
    # the fit trained: the second epoch's attention is not the first's
    assert not torch.equal(callback.seen[0][0][1].attention, callback.seen[1][0][1].attention)


def test_freeze_backbone_trains_only_the_classifier():
    module = HFViTClassifier("deit", num_classes=4, config={**SMALL, "intermediate_size": 96}, freeze_backbone=True)
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert trainable == ["model.classifier.bias", "model.classifier.weight"]


def test_bad_model_config_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.config\.hiden_size is not a field of ViTConfig"):
        HFViTClassifier("vit", config={"hiden_size": 48})
    with pytest.raises(ValueError, match=r"model\.model_type='vitt'"):
        HFViTClassifier("vitt")
    with pytest.raises(ValueError, match=r"model\.config must be null"):
        HFViTClassifier("vit", checkpoint_path=str(tmp_path), config={"hidden_size": 48})
    with pytest.raises(ValueError, match=r"model\.checkpoint_path=.* is not a directory"):
        HFViTClassifier("vit", checkpoint_path=str(tmp_path / "missing"))


def test_a_save_pretrained_directory_loads_its_weights_and_a_new_classifier(tmp_path):
    source, _ = _model("vit")
    source.save_pretrained(tmp_path / "vit")
    module = HFViTClassifier("vit", num_classes=7, checkpoint_path=str(tmp_path / "vit"))
    assert module.model.classifier.out_features == 7
    torch.testing.assert_close(module.model.vit.state_dict(), source.vit.state_dict(), rtol=0, atol=0)


def test_models_that_cannot_be_read_are_refused_with_the_reason():
    mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, intermediate_size=96))
    with pytest.raises(TypeError, match="ViTMAEModel shuffles and drops patch tokens"):
        AttentionRegularizer(mae)
    ijepa = transformers.IJepaModel(transformers.IJepaConfig(**SMALL, intermediate_size=96))
    with pytest.raises(TypeError, match="IJepaModel has no class token"):
        AttentionRegularizer(ijepa)


@pytest.mark.slow
def test_the_package_imports_and_reads_timm_models_without_transformers(tmp_path):
    # a Python whose site-packages are this one's without transformers (its dist-info included, which other
    # libraries probe before importing it)
    site = tmp_path / "site"
    site.mkdir()
    packages = Path(torch.__file__).resolve().parents[1]  # site-packages
    for entry in packages.iterdir():
        if not entry.name.startswith("transformers"):
            (site / entry.name).symlink_to(entry)
    code = (
        "import importlib.util, timm, torch\n"
        "assert importlib.util.find_spec('transformers') is None\n"
        "from attnreg_lightning import AttentionRegularizer\n"
        "from attnreg_lightning.models import HFViTClassifier\n"
        "vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1)\n"
        "print(AttentionRegularizer(vit, n_bootstrap=2)(torch.randn(1, 3, 32, 32)).maps['lfdr'].shape)\n"
        "try:\n    HFViTClassifier('vit')\nexcept ImportError as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 16])" in out.stdout
    assert "pip install -e '.[hf]'" in out.stdout
