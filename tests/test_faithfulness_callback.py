"""Faithfulness and the sanity check as the callback logs them: against the functional core run by hand on the same
images, a backbone without a head refused with one warning, and the model-randomization check against scipy."""

from __future__ import annotations

import csv
import dataclasses
import warnings

import lightning as L
import numpy as np
import pytest
import timm
import torch
from scipy.stats import spearmanr
from torch import nn

from attnreg_lightning import AttentionRegularizationCallback, AttentionRegularizer
from attnreg_lightning.batch import BatchView, default_batch_to_images
from attnreg_lightning.faithfulness import classifier_forward, faithfulness
from attnreg_lightning.metrics import token_mask
from attnreg_lightning.sanity import draw_seed, last_block, randomized_last_block
from tests.helpers import IMAGE_SIZE, csv_trainer, perturb, tiny_data, tiny_module, val_images


def _shortcut_masks(data) -> torch.Tensor:
    return torch.cat([b[5] for b in data.val_dataloader()])


FIFTH = 10_000_004  # the validation set's fifth id


def spoiled(batch) -> BatchView:
    """The batch as the callback reads it, its first image made constant (degenerate: not explained) when it is the
    second batch's (the fifth image): the explained rows of that batch are not its first rows."""
    view = default_batch_to_images(batch)
    images = view.images.clone()
    images[view.ids == FIFTH] = 0.25
    return dataclasses.replace(view, images=images)


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_logged_faithfulness_is_the_functional_core_on_the_explained_images(tmp_path, statistics):
    module, data = perturb(tiny_module()), tiny_data(val_size=8, batch_size=4, shortcut_size=8)
    knobs = {"n_bootstrap": 4, "seed": 3, "maps": ["p", "lfdr"]}
    cb = AttentionRegularizationCallback(
        **knobs,
        num_images=8,
        log_images=0,
        statistics=statistics,
        faithfulness="curves",
        faithfulness_maps=["p", "lfdr"],
        batch_to_images=spoiled,
    )
    with pytest.warns(UserWarning, match="degenerate"):
        (logged,) = csv_trainer(tmp_path, [cb]).validate(module, data, verbose=False)
    assert cb.engine.classify  # the clean logits are the engine's

    images, ids = val_images(data)
    assert ids[4] == FIFTH
    valid = [i for i in range(8) if i != 4]
    images, ids, cues = images[valid], [ids[i] for i in valid], _shortcut_masks(data)[valid]
    reg = AttentionRegularizer(module, n_bootstrap=4, seed=3)(images, ids)
    assert bool(reg.significance.valid.all())
    # the fixed k of each map: its mean kept fraction over the run's explained images
    kappa = {m: float((reg.maps[m] > 0).double().mean()) for m in ("p", "lfdr")}
    want = faithfulness(
        classifier_forward(module), images, reg.attention, reg.maps, reg.grid, ids, mode="curves",
        kept_maps=["p", "lfdr"], fixed_k=kappa, regions={"shortcut": token_mask(cues, reg.grid)}, seed=3,
    )  # fmt: skip
    rows = {row["id"]: row for row in cb.image_stats}
    assert sorted(rows) == sorted(ids)
    assert len(want.scores) == 2 * 6 + 4 + 2
    # the images keep different numbers of tokens, so the fixed-k baseline is not the map itself
    kept = (reg.maps["lfdr"] > 0).sum(1)
    assert len(set(kept.tolist())) > 1
    assert not torch.equal(want.scores["fixed_k_top@lfdr/sufficiency"], want.scores["lfdr/sufficiency"])
    for key, values in want.scores.items():
        got = torch.tensor([rows[i][key] for i in ids], dtype=torch.float64)
        torch.testing.assert_close(got, values, equal_nan=True, rtol=1e-9, atol=1e-12, msg=key)
        finite = values[torch.isfinite(values)]
        if finite.numel():
            assert logged[f"attnreg/{key}"] == pytest.approx(float(finite.mean()), rel=1e-5, abs=1e-7), key
        else:
            assert f"attnreg/{key}" not in logged, key
    for name, count in want.undefined.items():
        assert logged[f"attnreg/{name}/faithfulness_undefined"] == count
    # the perturbed model's predictions move when tokens are removed: the numbers are not trivially zero
    assert max(abs(float(v.nan_to_num().abs().max())) for v in want.scores.values()) > 1e-4


def test_the_clean_images_reach_the_head_once_for_the_engine_and_faithfulness_together(tmp_path):
    """The engine's forward of the explained images runs on to the head and gives faithfulness their logits: each
    clean image goes through the model once more than the user's own validation step sends it, not twice."""
    module, data = perturb(tiny_module()), tiny_data(val_size=8, batch_size=4)
    images, _ = val_images(data)
    seen: list[torch.Tensor] = []
    # every forward starts there: the engine's (read-outs and the one that runs on), faithfulness's, the step's
    module.vit.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))

    def clean_passes() -> list[int]:
        rows = torch.cat(seen)
        return [int((rows == image).flatten(1).all(1).sum()) for image in images]

    csv_trainer(tmp_path, []).validate(module, data, verbose=False)
    alone = clean_passes()
    seen.clear()
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, faithfulness="kept")
    (logged,) = csv_trainer(tmp_path, [cb]).validate(module, data, verbose=False)
    assert logged["attnreg/explained"] == 8 and logged["attnreg/lfdr/faithfulness_undefined"] < 8
    assert clean_passes() == [n + 1 for n in alone]


class Backbone(L.LightningModule):
    """A user's module: a headless timm ViT and its own linear head (the attention model has no classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=0
        )
        self.head = nn.Linear(48, 4)

    def validation_step(self, batch, batch_idx):
        return None


def test_a_backbone_without_head_skips_faithfulness_with_one_warning(tmp_path):
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (logged,) = csv_trainer(tmp_path, [cb]).validate(Backbone(), tiny_data(val_size=8, batch_size=4), verbose=False)
    said = [str(w.message) for w in caught if "classification head" in str(w.message)]
    assert len(said) == 1 and "faithfulness='kept'" in said[0] and "VisionTransformer" in said[0]
    assert logged["attnreg/explained"] == 8
    assert not [k for k in logged if "comprehensiveness" in k or "sufficiency" in k or "undefined" in k]


def test_the_randomized_copy_changes_the_last_block_only_reproducibly_and_leaves_the_global_rng():
    module = perturb(tiny_module())
    state = torch.random.get_rng_state()
    a, b = randomized_last_block(module, seed=1), randomized_last_block(module, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    trained = dict(module.vit.named_parameters())
    changed = {n for n, p in a.named_parameters() if not torch.equal(p, trained[n])}
    last = len(module.vit.blocks) - 1
    assert changed and all(n.startswith(f"blocks.{last}.") for n in changed), changed
    assert {f"blocks.{last}.attn.qkv.weight", f"blocks.{last}.norm1.bias"} <= changed
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters())
    other = dict(randomized_last_block(module, seed=2).named_parameters())
    drawn = [n for n in changed if "norm" not in n and n.endswith("weight")]  # norms reset to 1 and 0 whatever the seed
    assert drawn and not any(torch.equal(dict(a.named_parameters())[n], other[n]) for n in drawn)
    assert torch.equal(module.vit.blocks[last].attn.qkv.weight, trained[f"blocks.{last}.attn.qkv.weight"])


def test_hugging_face_last_block_is_the_last_vit_layer():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, attn_implementation="eager")  # fmt: skip
    model = ViTForImageClassification(config)
    assert last_block(model) is [m for m in model.modules() if type(m).__name__ == "ViTLayer"][-1]


def test_fit_end_logs_the_sanity_check_against_scipy(tmp_path):
    # one draw (tests/test_sanity.py checks several): the first re-initialization of a check seeded 5
    module, data = perturb(tiny_module()), tiny_data(val_size=8, batch_size=4)
    knobs = {"n_bootstrap": 3, "num_images": 8, "log_images": 0, "faithfulness": "off", "seed": 5}
    cb = AttentionRegularizationCallback(**knobs, sanity_draws=1)
    trainer = csv_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    trainer.fit(module, data)
    # the oracle: the same probes explained by the trained model and by its randomized copy, scipy's Spearman
    images, ids = val_images(data)
    trained = AttentionRegularizer(module, n_bootstrap=3, seed=5)(images, ids)
    copy_of = randomized_last_block(module, draw_seed(5, 0))
    randomized = AttentionRegularizer(copy_of, n_bootstrap=3, seed=5)(images, ids)

    def rho_of(x: np.ndarray, y: np.ndarray) -> float:  # an empty map against a structured one: 0
        flat = (np.ptp(x) == 0) + (np.ptp(y) == 0)
        return {0: spearmanr(x, y).statistic, 1: 0.0, 2: np.nan}[flat]

    rho = {
        key: np.nanmean([rho_of(x, y) for x, y in zip(a.numpy(), b.numpy(), strict=True)])
        for key, a, b in (
            ("raw", trained.attention, randomized.attention),
            ("lfdr", trained.maps["lfdr"], randomized.maps["lfdr"]),
        )
    }
    with open(next(tmp_path.glob("csv/**/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("attnreg/sanity/raw_spearman")]
    assert len(rows) == 1
    assert float(rows[0]["attnreg/sanity/raw_spearman"]) == pytest.approx(rho["raw"], abs=1e-9)
    assert float(rows[0]["attnreg/sanity/lfdr_spearman"]) == pytest.approx(rho["lfdr"], abs=1e-9)
    assert rho["raw"] < 0.95  # re-initializing the last block really moved the maps
    assert cb.history[-1]["attnreg/sanity/raw_spearman"] == pytest.approx(rho["raw"], abs=1e-9)
    assert cb.history[-1]["attnreg/sanity/raw_spearman_draws"] == 1
    assert "attnreg/sanity/raw_spearman_sd" not in cb.history[-1]  # one draw has no spread


def test_an_unchanged_model_gives_sanity_correlations_of_one(tmp_path, monkeypatch):
    # the check's other end: "re-initializations" that leave the copy as the model is must give perfectly
    # correlated maps at every draw (the raw maps read without nulls, the lfdr maps explained with them)
    monkeypatch.setattr("attnreg_lightning.sanity.reinitialize", lambda block, seed: None)
    cb = AttentionRegularizationCallback(n_bootstrap=3, num_images=4, log_images=0, faithfulness="off", sanity_draws=9)
    trainer = csv_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
    trainer.fit(perturb(tiny_module()), tiny_data(val_size=4, batch_size=4))
    for key in ("raw", "lfdr"):
        assert cb.history[-1][f"attnreg/sanity/{key}_spearman"] == pytest.approx(1.0)
        assert cb.history[-1][f"attnreg/sanity/{key}_spearman_sd"] == pytest.approx(0.0, abs=1e-12)


def test_rank_correlation_of_an_empty_map_against_a_structured_one_is_zero():
    from attnreg_lightning.sanity import rank_correlation

    x = np.array([0.1, 0.4, 0.2, 0.3])
    assert rank_correlation(x, np.zeros(4)) == 0.0 and rank_correlation(np.zeros(4), x) == 0.0
    assert np.isnan(rank_correlation(np.zeros(4), np.ones(4)))
    y = np.array([0.3, 0.1, 0.2, 0.0])
    assert rank_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic)


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_a_faithfulness_failure_leaves_the_images_explained_and_counted_once(tmp_path, monkeypatch, statistics):
    def failing(*args, **kwargs):
        raise RuntimeError("out of memory on purpose")

    monkeypatch.setattr("attnreg_lightning.callback.faithfulness", failing)
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=1, statistics=statistics)
    with pytest.warns(UserWarning, match="could not score the faithfulness of validation batch 0.*on purpose"):
        data = tiny_data(val_size=8, batch_size=4)
        (logged,) = csv_trainer(tmp_path, [cb]).validate(tiny_module(), data, verbose=False)
    assert logged["attnreg/explained"] == 8 and logged["attnreg/skipped_error"] == 0
    assert not [k for k in logged if "comprehensiveness" in k]
    assert len(cb._last_rows) == 1  # the rest of the batch's record went on


def test_a_failing_sanity_check_warns_and_the_fit_ends(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("no memory for a copy, on purpose")

    monkeypatch.setattr("attnreg_lightning.callback.model_randomization", failing)
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, faithfulness="off")
    with pytest.warns(UserWarning, match="sanity_check failed on this rank.*on purpose"):
        csv_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(
            tiny_module(), tiny_data(val_size=4, batch_size=4)
        )
    assert not [k for k in cb.history[-1] if "sanity" in k] and cb.history[-1]["attnreg/explained"] == 4


def test_a_marked_region_smaller_than_half_a_token_is_said_once(tmp_path):
    # a 4-px marker on 8-px patches covers a quarter of a token at most: no token is the region's
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=8, log_images=0, sanity_check=False)
    data = tiny_data(val_size=8, batch_size=4, shortcut_size=4)
    with pytest.warns(UserWarning, match="the shortcut masks cover no token by half") as said:
        (logged,) = csv_trainer(tmp_path, [cb]).validate(tiny_module(), data, verbose=False)
    assert len([w for w in said if "cover no token" in str(w.message)]) == 1  # two batches, one warning
    assert not [k for k in logged if "shortcut" in k]


class TwoHeads(Backbone):
    """A backbone that kept its own (pretrained-style, 10-class) head, under the module's 4-class head: the module
    predicts with its own."""

    def __init__(self, backbone_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = perturb(
            timm.create_model(
                "vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, depth=2, embed_dim=48, num_heads=3,
                num_classes=backbone_classes,
            )
        )  # fmt: skip

    def forward(self, images):
        return self.head(self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True))


@pytest.mark.parametrize("backbone_classes", [10, 0])
def test_faithfulness_scores_the_modules_own_prediction_not_the_backbones_head(tmp_path, backbone_classes):
    module, data = TwoHeads(backbone_classes), tiny_data(val_size=8, batch_size=4)
    cb = AttentionRegularizationCallback(n_bootstrap=4, seed=3, num_images=8, log_images=0, sanity_check=False)
    csv_trainer(tmp_path, [cb]).validate(module, data, verbose=False)
    assert cb._prediction_source == "module" and not cb.engine.classify  # clean logits: the module's own forward

    images, ids = val_images(data)
    reg = AttentionRegularizer(module, n_bootstrap=4, seed=3)(images, ids)
    rows = {row["id"]: row for row in cb.image_stats}
    got = torch.tensor([rows[i]["lfdr/comprehensiveness"] for i in ids], dtype=torch.float64)

    def scored_by(forward):
        return faithfulness(forward, images, reg.attention, reg.maps, reg.grid, ids, seed=3).scores

    with torch.no_grad():
        want = scored_by(module.eval())["lfdr/comprehensiveness"]
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-9, atol=1e-12)
    if backbone_classes:  # the backbone's own head would have given other numbers
        vit_head = scored_by(classifier_forward(module))["lfdr/comprehensiveness"]
        assert not torch.allclose(vit_head.nan_to_num(), want.nan_to_num())
