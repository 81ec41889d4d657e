"""The monitor catches a model that leans on a planted shortcut partly: two tiny ViTs trained alike, one on training
images whose marker colour leaks the label, one on images whose marker colour is random; the key the README tells
users to watch (``shortcut/reliance``) separates them where the attention shares do not have to."""

import lightning as L
import pytest
import timm
import torch

from attnreg_lightning import AttentionRegularizationCallback
from attnreg_lightning.data.shapes import ShapesDataModule, render

pytestmark = pytest.mark.slow  # two small trainings, ~30 s


class Classifier(L.LightningModule):
    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)

    def validation_step(self, batch, batch_idx):
        return None


def _trained(leak: float) -> tuple[Classifier, ShapesDataModule]:
    torch.manual_seed(0)
    data = ShapesDataModule(train_size=1000, val_size=48, batch_size=50, image_size=48, noise_squares=0,
                            shortcut_size=8, shortcut_leak=leak, shortcut_honest=0.6)  # fmt: skip
    data.setup("fit")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=2, embed_dim=96, num_heads=3,
                            num_classes=4)  # fmt: skip
    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-3, weight_decay=0.05)
    items = [data.train_set[i] for i in range(len(data.train_set))]  # rendered once
    images, labels = torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
    generator = torch.Generator().manual_seed(0)  # the same batches for both models
    for _ in range(3):
        for batch in torch.randperm(len(labels), generator=generator).split(50):
            loss = torch.nn.functional.cross_entropy(vit(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Classifier(vit.eval()), data


def _follows_the_cue(module: Classifier, data: ShapesDataModule) -> tuple[float, float]:
    """Accuracy on the validation images whose cue lies, and how often the prediction follows the cue there."""
    images, labels = zip(*[data.val_set[i][:2] for i in range(len(data.val_set))], strict=True)
    with torch.no_grad():
        predicted = module(torch.stack(images)).argmax(1)
    labels = torch.tensor(labels)
    cues = torch.tensor([render(data.spec, data.val_set.id_offset + i, train=False)["cue_class"] for i in range(48)])
    lies = cues != labels
    return float((predicted[lies] == labels[lies]).float().mean()), float(
        (predicted[lies] == cues[lies]).float().mean()
    )


def test_reliance_on_a_partly_used_shortcut_separates_a_leaked_model_from_a_clean_one(tmp_path):
    logged, measured = {}, {}
    for name, leak in (("leaked", 1.0), ("random", 0.0)):
        module, data = _trained(leak)
        measured[name] = _follows_the_cue(module, data)
        cb = AttentionRegularizationCallback(n_bootstrap=4, num_images=48, log_images=0, sanity_check=False)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[cb],
                            default_root_dir=tmp_path)  # fmt: skip
        trainer.validate(module, data, verbose=False)
        logged[name] = cb.history[-1]
    # partial reliance, measured directly: the leaked model follows the lying cue on some images, not all
    accuracy, follows = measured["leaked"]
    assert 0.1 < follows < 0.9 and 0.1 < accuracy < 0.9, measured
    assert measured["random"][0] > 0.8 and measured["random"][1] < 0.1, measured
    # the reliance key's intervals are apart, the leaked model's above; as many random tokens matter to neither
    key = "attnreg/shortcut/reliance"
    leaked, clean = logged["leaked"]["intervals"][key], logged["random"]["intervals"][key]
    assert leaked[0] > clean[1], (leaked, clean)
    floor = "attnreg/same_k_random@shortcut/reliance"
    assert logged["leaked"][key] > logged["leaked"][floor] + 0.05
