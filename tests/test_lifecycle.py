"""The callback's lifecycle in a real Trainer: a stopped run, several loaders, sharded strategies, a resume with
other knobs, a model whose attention is not finite."""

import threading
import time
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from attnreg_lightning import AttentionRegularizationCallback
from tests.helpers import tiny_data, tiny_module
from tests.test_callback import MappedVal, TwoLoaders, _trainer

QUICK = {"n_bootstrap": 2, "num_images": 2, "log_images": 0, "faithfulness": "off", "sanity_check": False}


class Stop(Exception):
    pass


def test_a_stopped_run_cancels_the_queued_statistics_and_warns_of_the_running_ones_failure(tmp_path, monkeypatch):
    started, release = [], threading.Event()

    def significance(*args, **kwargs):
        started.append(len(started))
        if len(started) == 1:  # the first job holds the thread until the run has stopped
            release.wait(30)
        raise RuntimeError("statistics failed on purpose")

    monkeypatch.setattr("attnreg_lightning.engine.significance", significance)

    def stop(trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 4:  # jobs 1-3 queued behind the running job 0
            for _ in range(1000):
                if started:
                    break
                time.sleep(0.01)
            threading.Timer(2.0, release.set).start()  # the stop has cancelled the queue by then
            raise Stop("stopped on purpose")

    cb = AttentionRegularizationCallback(
        n_bootstrap=2, num_images=8, log_images=0, statistics="background", faithfulness="off"
    )
    trainer = _trainer(tmp_path, [L.pytorch.callbacks.LambdaCallback(on_validation_batch_start=stop), cb], False)
    before = set(threading.enumerate())
    with pytest.warns(UserWarning, match=r"1 failed background job.*statistics failed on purpose.*3 job\(s\) not "
                                         r"started were cancelled"):  # fmt: skip
        with pytest.raises(Stop, match="stopped on purpose"):  # the exception that stopped the run, not ours
            trainer.validate(tiny_module(), tiny_data(val_size=8, batch_size=1), verbose=False)
    assert started == [0]  # the queued jobs never ran
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive() and "statistics" in t.name]


def _said(caught, text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def test_a_validation_loader_no_callback_explains_is_said_once_unless_another_callback_explains_it(tmp_path):
    data, module = TwoLoaders(), tiny_module()
    trainer = _trainer(tmp_path, [AttentionRegularizationCallback(**QUICK)], False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            trainer.validate(module, data, verbose=False)
    (said,) = _said(caught, "not explained")
    assert "2 loaders and explains only loader(s) [0]" in said and "loader(s) [1] are not explained" in said
    assert "AttentionRegularizationCallback(name='attnreg_1', dataloader_idx=1)" in said

    second = AttentionRegularizationCallback(**QUICK, name="second", dataloader_idx=1)
    trainer = _trainer(tmp_path, [second, AttentionRegularizationCallback(**QUICK)], False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, data, verbose=False)
    assert not _said(caught, "not explained")
    assert trainer.callback_metrics["second/explained"] == trainer.callback_metrics["attnreg/explained"] == 2


def _deepspeed_without_deepspeed() -> DeepSpeedStrategy:
    """The DeepSpeed strategy made as the DDP strategy it extends (its own __init__ wants the package)."""
    made = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    DDPStrategy.__init__(made)
    return made


@pytest.mark.parametrize(
    "strategy",
    [
        FSDPStrategy,
        ModelParallelStrategy,
        _deepspeed_without_deepspeed,
    ],
    ids=["fsdp", "model-parallel", "deepspeed"],
)
def test_a_sharded_strategy_is_refused_at_setup_with_the_way_out(tmp_path, monkeypatch, strategy):
    # Lightning runs FSDP on GPUs only: a CPU Trainer gets the real strategy object where its own would be
    cb = AttentionRegularizationCallback(**QUICK)
    trainer = _trainer(tmp_path, [cb], False)
    cb.setup(trainer, tiny_module(), "fit")  # the Trainer's own strategy is fine
    sharded = strategy()
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", sharded)
    assert trainer.strategy is sharded
    with pytest.raises(ValueError, match=rf"the {type(sharded).__name__} strategy shards .* explain with DDP or on one "
                                         r"device .* trainer\.validate"):  # fmt: skip
        cb.setup(trainer, tiny_module(), "fit")


STABILITY = "attnreg/stability/lfdr_iou"


def _fit(root, data, ckpt_path=None, max_epochs=1, **knobs) -> AttentionRegularizationCallback:
    """A fit of ``max_epochs`` epochs (one training batch each), resumed from ``ckpt_path``; ``root/last.ckpt``."""
    cb = AttentionRegularizationCallback(**{**QUICK, "num_images": 4, **knobs})
    callbacks = [cb, ModelCheckpoint(dirpath=root, save_last=True)]
    trainer = _trainer(root, callbacks, False, max_epochs=max_epochs, limit_train_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_module(), data, ckpt_path=ckpt_path)
    cb.resumed_warnings = _said(caught, "resumed with what a run measures changed")
    return cb


@pytest.mark.slow  # four fits
def test_a_resume_that_changes_what_runs_measure_warns_and_starts_a_new_comparison(tmp_path):
    first = tmp_path / "first" / "last.ckpt"
    _fit(first.parent, tiny_data(val_size=8))
    # knobs of speed and output only, and autocast_dtype=None: float32, as "auto" was at 32-bit precision (the dtype
    # the forwards ran in is compared, not the knob's words): the runs are compared across the checkpoint
    same = _fit(tmp_path / "same", tiny_data(val_size=8), first, 2, statistics="background", log_images=1,
                autocast_dtype=None)  # fmt: skip
    assert not same.resumed_warnings
    assert [row["comparison"] for row in same.history] == [0, 0] and STABILITY in same.history[1]

    other = _fit(tmp_path / "other", tiny_data(val_size=8), first, 2, n_bootstrap=3, p_th=0.2, maps=["lfdr"])
    (said,) = other.resumed_warnings
    assert "n_bootstrap 2 -> 3, p_th 0.3 -> 0.2, maps ['p', 'lfdr', 'pi0', 'posterior'] -> ['lfdr']" in said
    assert "statistics" not in said and "log_images" not in said
    assert other.history[0] == same.history[0]  # the checkpoint's run is kept
    assert [row["comparison"] for row in other.history] == [0, 1]
    assert other.history[1]["changed"] == {
        "n_bootstrap": [2, 3], "p_th": [0.3, 0.2], "maps": [["p", "lfdr", "pi0", "posterior"], ["lfdr"]]
    }  # fmt: skip
    # the probes were followed anew: nothing compared with a map of the other knobs
    assert STABILITY not in other.history[1]
    records = other.probes.state_dict()["records"]
    assert len(records) == 4 and all(torch.equal(r["first_keep"], r["last_keep"]) for r in records.values())

    # the new comparison goes on from its own checkpoint: compared within it, marked once
    again = _fit(tmp_path / "again", tiny_data(val_size=8), tmp_path / "other" / "last.ckpt", 3,
                 n_bootstrap=3, p_th=0.2, maps=["lfdr"])  # fmt: skip
    assert not again.resumed_warnings
    assert [row["comparison"] for row in again.history] == [0, 1, 1] and STABILITY in again.history[2]
    assert "changed" in again.history[1] and "changed" not in again.history[2]


def _with_world_size(path, world_size: int, ids: bool | None = None):
    """The checkpoint as a fit on ``world_size`` processes writes it (and whose batches carried ``ids``)."""
    checkpoint = torch.load(path, weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("AttentionRegularizationCallback")]
    state["world_size"] = world_size
    if ids is not None:
        state["ids"] = ids
    moved = path.with_name(f"{path.stem}_{world_size}_{ids}.ckpt")
    torch.save(checkpoint, moved)
    return moved


@pytest.mark.slow  # four fits
def test_a_resume_on_another_number_of_processes_without_sample_ids_starts_a_new_comparison(tmp_path):
    def without_ids():
        return MappedVal(lambda batch: (batch[0], batch[1], batch[2]))  # images, labels, masks: ids made up

    first = tmp_path / "first" / "last.ckpt"
    _fit(first.parent, without_ids())
    saved = [v for k, v in torch.load(first, weights_only=False)["callbacks"].items() if k.startswith("Attention")]
    assert (saved[0]["world_size"], saved[0]["ids"]) == (1, False)

    moved = _fit(tmp_path / "moved", without_ids(), _with_world_size(first, 2), 2)
    (said,) = moved.resumed_warnings
    assert "processes (batches without sample ids) 2 -> 1" in said
    assert [row["comparison"] for row in moved.history] == [0, 1] and STABILITY not in moved.history[1]
    # the same number of processes, or batches that carried ids: the same images, compared across
    for name, checkpoint in (("same", first), ("ids", _with_world_size(first, 2, ids=True))):
        resumed = _fit(tmp_path / name, without_ids(), checkpoint, 2)
        assert not resumed.resumed_warnings, name
        assert [row["comparison"] for row in resumed.history] == [0, 0] and STABILITY in resumed.history[1]


@pytest.mark.parametrize("statistics", ["inline", "background"])
def test_a_model_whose_attention_is_not_finite_is_blamed_not_the_images(tmp_path, statistics):
    def one_constant(batch):  # image 0 constant: degenerate; the others fine
        images = batch[0].clone()
        images[0] = 0.25
        return (images, *batch[1:])

    module = tiny_module()
    with torch.no_grad():
        module.vit.blocks[0].attn.qkv.weight.fill_(float("nan"))  # a training run gone NaN
    data = MappedVal(one_constant)
    data.inner = tiny_data(val_size=8)
    knobs = {**QUICK, "num_images": 8, "statistics": statistics}
    cb = AttentionRegularizationCallback(**knobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (logged,) = _trainer(tmp_path, [cb], False).validate(module, data, verbose=False)
    counts = [logged[f"attnreg/{k}"] for k in ("explained", "skipped_degenerate", "skipped_nonfinite_attention")]
    assert counts == [0, 1, 7] and cb.skipped_total == 8
    (model,) = _said(caught, "the model's attention is not finite")
    assert "on 7 image(s) whose pixels are finite and not constant" in model and "learning rate" in model
    assert "skipped_nonfinite_attention" in model
    (degenerate,) = _said(caught, "degenerate image(s)")
    assert degenerate.startswith("attnreg: 1 degenerate image(s) (pixels constant or non-finite")

    raising = AttentionRegularizationCallback(**{**knobs, "on_error": "raise"})
    with pytest.raises(ValueError, match=r"1 degenerate image.*; the model's attention is not finite on 7 image"):
        _trainer(tmp_path, [raising], False).validate(module, data, verbose=False)
