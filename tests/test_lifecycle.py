"""The callback's lifecycle in a real Trainer: a stopped run, several loaders, sharded strategies, a resume with
other knobs, a model whose attention is not finite."""

import threading
import time
import warnings

import lightning as L
import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from attnreg_lightning import AttentionRegularizationCallback
from tests.helpers import tiny_data, tiny_module
from tests.test_callback import TwoLoaders, _trainer

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
