"""Behaviours no other test guards: the faithfulness_steps knob, the autocast dtype a 16-bit mixed trainer gives the
callback's forwards, the app's seed reaching attnreg.seed, errors counted in the checkpointed skipped_total, a monitor
of an attnreg key at every_n_epochs=1, the sanity check's cap on probes, the classify forward's chunking, and raw
curves of an image whose posterior map is not finite."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

import attnreg_lightning.callback as callback_module
from attnreg_lightning import AttentionRegularizationCallback, AttentionRegularizer, AttnRegConfig
from attnreg_lightning.batch import default_batch_to_images
from attnreg_lightning.callback import SANITY_IMAGES
from attnreg_lightning.config import register_configs
from attnreg_lightning.faithfulness import classifier_forward, faithfulness
from attnreg_lightning.sanity import lfdr_draws
from tests.helpers import perturb, tiny_data, tiny_module

CONF = Path(__file__).resolve().parents[1] / "conf"
CURVE_KEYS = [f"{m}/{kind}_auc" for m in ("raw", "posterior") for kind in ("deletion", "insertion")]


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def _val_batches(data) -> tuple[torch.Tensor, list[int]]:
    data.setup("validate")
    batches = list(data.val_dataloader())
    return torch.cat([b[0] for b in batches]), [int(i) for b in batches for i in b[3]]


def test_faithfulness_steps_sets_the_curves_points_and_changes_their_areas(tmp_path, monkeypatch):
    """The knob reaches the curves the callback scores: ``K + 1`` points each, more perturbed images forwarded for
    more steps, and other areas (a trapezoid over 2 steps is not one over 5)."""
    calls: list[dict] = []

    def spy(forward, *args, **kwargs):
        if kwargs["mode"] != "curves":  # the fixed-k baseline, scored at the run's end
            return faithfulness(forward, *args, **kwargs)
        seen = {"steps": kwargs["steps"], "images": 0}

        def counted(images):
            seen["images"] += images.shape[0]
            return forward(images)

        result = faithfulness(counted, *args, **kwargs)
        seen["points"] = {name: curve.shape[1] for name, curve in result.curves.items()}
        calls.append(seen)
        return result

    monkeypatch.setattr(callback_module, "faithfulness", spy)
    module = perturb(tiny_module())

    def run(steps: int) -> dict[int, dict]:
        calls.clear()
        cb = AttentionRegularizationCallback(
            n_bootstrap=2, num_images=4, log_images=0, faithfulness="curves", faithfulness_steps=steps,
            sanity_check=False,
        )  # fmt: skip
        _trainer(tmp_path, [cb]).validate(module, tiny_data(val_size=4, batch_size=4), verbose=False)
        assert [c["steps"] for c in calls] == [steps]
        assert calls[0]["points"] == {key.removesuffix("_auc"): steps + 1 for key in CURVE_KEYS}
        return {row["id"]: row for row in cb.image_stats}

    two = run(2)
    forwarded_two = calls[0]["images"]
    five = run(5)
    assert calls[0]["images"] > forwarded_two
    assert sorted(two) == sorted(five) and len(two) == 4
    for key in CURVE_KEYS:
        pairs = [(two[i][key], five[i][key]) for i in two if math.isfinite(two[i][key])]
        assert pairs, key
        assert any(abs(a - b) > 1e-6 for a, b in pairs), key


class DtypeCallback(AttentionRegularizationCallback):
    """Records the dtype the last block's qkv Linear computes in, apart for the callback's forwards (inline
    statistics on the CPU: every forward of the callback runs inside on_validation_batch_end) and the user's step."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.inside = False
        self.dtypes: dict[str, set[torch.dtype]] = {"callback": set(), "step": set()}

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)

        def note(module, args, out):
            self.dtypes["callback" if self.inside else "step"].add(out.dtype)

        pl_module.vit.blocks[-1].attn.qkv.register_forward_hook(note)

    def on_validation_batch_end(self, *args, **kwargs):
        self.inside = True
        try:
            super().on_validation_batch_end(*args, **kwargs)
        finally:
            self.inside = False


def test_a_16_mixed_precision_plugin_makes_the_callbacks_forwards_float16_on_cpu(tmp_path):
    cb = DtypeCallback(n_bootstrap=2, num_images=4, log_images=0, autocast_dtype="auto", sanity_check=False)
    trainer = _trainer(tmp_path, [cb], plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.precision == "16-mixed"
    (logged,) = trainer.validate(tiny_module(), tiny_data(val_size=4, batch_size=4), verbose=False)
    assert cb.engine.autocast_dtype == torch.float16
    assert cb.dtypes == {"callback": {torch.float16}, "step": {torch.float16}}
    assert logged["attnreg/explained"] == 4


def test_precision_16_mixed_on_cpu_gives_the_callback_the_trainers_own_forward_dtype(tmp_path):
    """Lightning runs ``precision="16-mixed"`` on a CPU as bfloat16 (fp16 AMP is not offered there, it says): the
    callback's "auto" follows what the trainer's forwards actually run in, not the flag as typed."""
    cb = DtypeCallback(n_bootstrap=2, num_images=4, log_images=0, autocast_dtype="auto", sanity_check=False)
    with pytest.warns(UserWarning, match="16-mixed"):
        trainer = _trainer(tmp_path, [cb], precision="16-mixed")
    trainer.validate(tiny_module(), tiny_data(val_size=4, batch_size=4), verbose=False)
    step = cb.dtypes["step"]
    assert len(step) == 1 and step != {torch.float32}
    assert cb.dtypes["callback"] == step and cb.engine.autocast_dtype in step


def _compose(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_attnreg_seed_follows_the_apps_seed_unless_set():
    def knobs(*overrides):
        return AttnRegConfig(**OmegaConf.to_container(_compose(*overrides).attnreg, resolve=True))

    assert knobs("seed=7").seed == 7
    assert knobs("seed=7", "attnreg.seed=3").seed == 3  # conf/attnreg/default.yaml: seed: ${seed}, a default only
    assert knobs().seed == _compose().seed


def test_checkpointed_skipped_total_counts_images_lost_to_errors_and_degenerate_ones(tmp_path, monkeypatch):
    data = tiny_data(val_size=8, batch_size=4)
    _, ids = _val_batches(data)
    failing, constant = ids[4], ids[1]  # the second batch fails whole; one image of the first is constant
    original = AttentionRegularizer.__call__

    def engine(self, images, sample_ids=None):
        if sample_ids is not None and failing in list(sample_ids):
            raise RuntimeError("out of memory on purpose")
        return original(self, images, sample_ids)

    monkeypatch.setattr(AttentionRegularizer, "__call__", engine)

    def spoil(batch):
        view = default_batch_to_images(batch)
        images = view.images.clone()
        images[view.ids == constant] = 0.25
        return dataclasses.replace(view, images=images)

    cb = AttentionRegularizationCallback(
        n_bootstrap=2, num_images=8, log_images=0, on_error="warn", faithfulness="off", sanity_check=False,
        batch_to_images=spoil,
    )  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    with pytest.warns(UserWarning, match="could not explain 4 image.*on purpose"):
        _trainer(tmp_path, [cb, ckpt], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0).fit(
            tiny_module(), data
        )
    run = cb.history[-1]
    assert (run["attnreg/explained"], run["attnreg/skipped_error"], run["attnreg/skipped_degenerate"]) == (3, 4, 1)
    assert cb.state_dict()["skipped_total"] == 5
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert (saved["skipped_total"], saved["explained_total"]) == (5, 3)


def test_a_monitor_of_an_attnreg_key_is_accepted_at_every_run_and_refused_at_every_second(tmp_path):
    key = "attnreg/lfdr/sparsity"
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, faithfulness="off",
                                         sanity_check=False, every_n_epochs=1)  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max", save_top_k=1)
    trainer = _trainer(tmp_path, [cb, ckpt], max_epochs=2, limit_train_batches=1, num_sanity_val_steps=0)
    trainer.fit(tiny_module(), tiny_data(val_size=8))
    values = [run[key] for run in cb.history]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    # the checkpoint read this run's value (not a copy), and kept the best of the two runs
    assert float(ckpt.current_score) == pytest.approx(values[-1], abs=1e-7)
    assert float(ckpt.best_model_score) == pytest.approx(max(values), abs=1e-7)
    assert Path(ckpt.best_model_path).is_file()

    refused = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, every_n_epochs=2)
    monitor = ModelCheckpoint(dirpath=tmp_path / "ckpt2", monitor=key)
    with pytest.raises(ValueError, match=r"every_n_epochs=2"):
        _trainer(tmp_path, [refused, monitor], max_epochs=1).fit(tiny_module(), tiny_data(val_size=8))


def test_the_sanity_check_explains_at_most_its_cap_of_probes_per_rank(tmp_path, monkeypatch):
    assert SANITY_IMAGES == 16  # the number AttnRegConfig's docstring promises
    num_images = SANITY_IMAGES + 2
    given: list[tuple[bool, int]] = []  # (in the sanity check, images) for each engine call
    original = AttentionRegularizer.__call__

    def engine(self, images, sample_ids=None):
        given.append((checking[0], images.shape[0]))
        return original(self, images, sample_ids)

    monkeypatch.setattr(AttentionRegularizer, "__call__", engine)
    checking = [False]

    class Counting(AttentionRegularizationCallback):
        def sanity_check(self, pl_module):
            checking[0] = True
            try:
                return super().sanity_check(pl_module)
            finally:
                checking[0] = False

    cb = Counting(n_bootstrap=2, num_images=num_images, log_images=0, faithfulness="off", sanity_draws=16)
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0).fit(
        perturb(tiny_module()), tiny_data(val_size=num_images, batch_size=6)
    )
    assert cb.history[-1]["attnreg/explained"] == num_images  # more probes than the check takes
    assert sum(n for inside, n in given if not inside) == num_images
    # the trained model's explanation and the randomized copies' whose lfdr maps are compared (their raw maps are
    # read apart), each of the capped probes
    assert [n for inside, n in given if inside] == [SANITY_IMAGES] * (1 + lfdr_draws(16))
    assert len(cb.sanity_rows) == SANITY_IMAGES
    assert "attnreg/sanity/raw_spearman" in cb.history[-1]


def test_the_forward_that_reads_attention_and_logits_respects_max_images_per_forward():
    module = perturb(tiny_module())
    images, ids = _val_batches(tiny_data(val_size=5, batch_size=5))
    sizes: list[int] = []
    module.vit.patch_embed.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    engine = AttentionRegularizer(module, n_bootstrap=2, max_images_per_forward=2, classify=True)
    reg = engine(images, ids)
    assert reg.logits is not None and reg.logits.shape == (5, 4) and torch.isfinite(reg.logits).all()
    assert max(sizes) <= 2
    assert sum(sizes) == 5 + 5 * 2  # each image once on to the head, then its nulls


def test_a_non_finite_posterior_leaves_the_images_raw_curves_as_they_were():
    module = perturb(tiny_module()).eval()
    images, ids = _val_batches(tiny_data(val_size=3, batch_size=3))
    reg = AttentionRegularizer(module, n_bootstrap=2)(images, ids)
    assert bool(reg.significance.valid.all())
    forward = classifier_forward(module)
    # one image per forward: the same image gives the same logits bit for bit, however the others are batched
    kwargs = {"mode": "curves", "kept_maps": (), "steps": 4, "max_images_per_forward": 1}
    clean = faithfulness(forward, images, reg.attention, {"posterior": reg.maps["posterior"]}, reg.grid, ids, **kwargs)
    posterior = reg.maps["posterior"].clone()
    posterior[1, 3] = float("nan")
    spoiled = faithfulness(forward, images, reg.attention, {"posterior": posterior}, reg.grid, ids, **kwargs)
    for key in ("raw/deletion_auc", "raw/insertion_auc"):
        assert torch.isfinite(spoiled.scores[key]).all(), key
        torch.testing.assert_close(spoiled.scores[key], clean.scores[key], rtol=0, atol=0, msg=key)
    for key in ("posterior/deletion_auc", "posterior/insertion_auc"):
        assert spoiled.scores[key][1].isnan() and torch.isfinite(clean.scores[key][1]), key
        torch.testing.assert_close(spoiled.scores[key][[0, 2]], clean.scores[key][[0, 2]], rtol=0, atol=0, msg=key)
    # the model really responds to the removed tokens: the raw areas are not all the clean probability
    assert not torch.allclose(clean.scores["raw/deletion_auc"], clean.scores["raw/insertion_auc"])
