"""Hydra config tree: every group option composes, and bad values fail at start-up with the key named."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from attnreg_lightning import AttnRegConfig
from attnreg_lightning.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _compose(*overrides: str, return_hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_promised_options():
    assert {"vit_tiny", "vit_small_dino", "deit_small", "hf_vit", "hf_dinov2"} <= set(_options("model"))
    assert {"shapes", "image_folder"} <= set(_options("data"))
    assert {"default", "paper"} <= set(_options("attnreg"))
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(_options("trainer"))
    assert {"wandb", "tensorboard", "csv", "none"} <= set(_options("logger"))
    assert _options("experiment") and _options("hparams_search")


@pytest.mark.parametrize("option", _options("model"))
def test_model_options_compose(option):
    cfg = _compose(f"model={option}")
    assert cfg.model._target_ in ("attnreg_lightning.models.ViTClassifier", "attnreg_lightning.models.HFViTClassifier")
    assert cfg.model.num_classes == cfg.data.num_classes


@pytest.mark.parametrize(
    ("option", "built"), [("hf_vit", "ViTForImageClassification"), ("hf_dinov2", "Dinov2ForImageClassification")]
)
def test_hugging_face_models_build_at_the_datas_size(option, built):
    pytest.importorskip("transformers")
    cfg = _compose(f"model={option}", "data.image_size=48")
    model = instantiate(cfg.model, _convert_="all")
    assert type(model.model).__name__ == built
    assert model.model.config.image_size == 48 and model.model.config.num_labels == cfg.data.num_classes


def test_vit_small_dino_is_the_papers_model():
    cfg = _compose("model=vit_small_dino")
    assert cfg.model.model_name.startswith("vit_small_patch8_224") and cfg.model.pretrained is True


@pytest.mark.parametrize("option", _options("data"))
def test_data_options_compose(option):
    extra = ["data.root=/tmp/images", "data.num_classes=3"] if option == "image_folder" else []
    cfg = _compose(f"data={option}", *extra)
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


def test_shapes_and_default_model_instantiate():
    cfg = _compose()
    data = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    assert data.num_classes == model.vit.num_classes == 4


@pytest.mark.parametrize("option", _options("attnreg"))
def test_attnreg_options_validate(option):
    cfg = _compose(f"attnreg={option}")
    AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))


def test_paper_preset_is_the_reference_defaults():
    a = _compose("attnreg=paper").attnreg
    assert (a.method, a.n_bootstrap, a.z_th, a.p_th, a.lfdr_th, a.pi0) == ("normal", 10, 0.0, 0.3, 0.3, None)
    assert a.normalization == "imagenet" and _compose().attnreg.normalization is None
    with pytest.raises(ValueError, match=r"attnreg\.normalization"):
        AttnRegConfig(**{**OmegaConf.to_container(a, resolve=True), "normalization": "cifar"})
    uniform = AttnRegConfig(**{**OmegaConf.to_container(a, resolve=True), "method": "uniform"})
    assert uniform.method_options()["normalization"] == "imagenet"


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_options_compose(option):
    cfg = _compose(f"trainer={option}", return_hydra_config=True)
    assert cfg.trainer._target_ == "lightning.Trainer"
    if option == "ddp_cpu":
        assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.devices) == ("ddp", "cpu", 2)


LOGGER_TARGETS = {
    "wandb": "attnreg_lightning.loggers.WandbAppLogger",  # Lightning's WandbLogger, minus a setting wandb warns of
    "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
    "csv": "lightning.pytorch.loggers.CSVLogger",
}


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_options_build_what_they_name(option):
    cfg = _compose(f"logger={option}", return_hydra_config=True)
    if option == "none":
        assert not cfg.logger
        return
    assert cfg.logger._target_ == LOGGER_TARGETS[option]
    # everything of a run lands in its output folder
    assert OmegaConf.to_container(cfg.logger)["save_dir"].startswith("${paths.output_dir}")
    if option == "wandb":
        assert cfg.logger.offline is True


def test_linear_probe_is_the_papers_protocol():
    cfg = _compose("experiment=linear_probe")
    assert cfg.model.freeze_backbone is True
    assert cfg.model.model_name == _compose("model=vit_small_dino").model.model_name
    assert cfg.attnreg == _compose("attnreg=paper").attnreg
    assert cfg.trainer.max_epochs == 10


def test_no_noise_removes_the_noise_squares():
    assert _compose().data.noise_squares > 0
    assert _compose("experiment=no_noise").data.noise_squares == 0


@pytest.mark.parametrize("option", _options("hparams_search"))
def test_hparams_search_options_compose(option):
    cfg = _compose(f"hparams_search={option}", return_hydra_config=True)
    assert cfg.hydra.sweeper.params
    assert cfg.optimized_metric.startswith("attnreg/")


def test_typo_and_wrong_type_fail_at_composition_with_the_key():
    with pytest.raises(ConfigCompositionException, match="n_bootstrapp"):
        _compose("attnreg.n_bootstrapp=3")
    with pytest.raises((ConfigCompositionException, ValidationError), match="n_bootstrap"):
        _compose("attnreg.n_bootstrap=ten")
    with pytest.raises(ConfigCompositionException, match="lrr"):
        _compose("model.lrr=0.1")
    with pytest.raises(ConfigCompositionException, match="trainer"):
        _compose("trainer=tpu")  # an option the group does not have


@pytest.mark.parametrize(
    ("override", "named"), [("attnreg.p_th=1.5", r"attnreg\.p_th"), ("attnreg.method=gauss", r"attnreg\.method")]
)
def test_out_of_range_fails_at_validation_with_the_key(override, named):
    cfg = _compose(override)
    with pytest.raises(ValueError, match=named):
        AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))


def test_struct_mode_rejects_unknown_top_level_keys():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose("seedd=1")


def _explain_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("explain", overrides=list(overrides))


def test_callbacks_group_builds_its_callbacks_by_name_and_trainer_callbacks_is_refused(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    import train
    from attnreg_lightning import AttentionRegularizationCallback
    from attnreg_lightning.loggers import EpochLine

    cfg = _compose("callbacks=early_stopping", f"paths.output_dir={tmp_path}", "checkpoint.monitor=val/acc",
                   "checkpoint.mode=max")  # fmt: skip
    attnreg = AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))
    built = train.build_callbacks(cfg, attnreg, logger=None)
    kinds = [type(c) for c in built]
    assert kinds == [ModelCheckpoint, EarlyStopping, AttentionRegularizationCallback, EpochLine]
    checkpoint, stopping = built[0], built[1]
    assert checkpoint.dirpath == str(tmp_path / "checkpoints") and checkpoint.save_last
    assert (checkpoint.monitor, checkpoint.mode, stopping.monitor, stopping.mode) == ("val/acc", "max") * 2
    dropped = _compose("callbacks.model_checkpoint=null", f"paths.output_dir={tmp_path}")
    kinds = [type(c) for c in train.build_callbacks(dropped, attnreg, None)]
    assert kinds == [AttentionRegularizationCallback, EpochLine]
    # Lightning's own key would be silently replaced by the app's callbacks: refused, naming the way
    sneaky = _compose("+trainer.callbacks=[{_target_: lightning.pytorch.callbacks.EarlyStopping, monitor: val/loss}]")
    with pytest.raises(ValueError, match=r"trainer\.callbacks is not read.*callbacks=early_stopping"):
        train.build_callbacks(sneaky, attnreg, None)


def test_explain_config_keys_override_the_attnreg_group():
    cfg = _explain_config()
    assert (cfg.attnreg.num_images, cfg.attnreg.log_images) == (64, 8)
    assert _explain_config("attnreg.log_images=2").attnreg.log_images == 2


def test_a_hugging_face_model_on_an_image_folder_composes_and_builds(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    cfg = _compose("model=hf_vit", "data=image_folder", f"data.root={tmp_path}", "data.num_classes=1",
                   "data.image_size=32")  # fmt: skip
    data = instantiate(cfg.data, _convert_="all")
    normalize = data.transform.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx((0.485, 0.456, 0.406))  # ImageNet's: no timm name to ask
    own = instantiate(_compose("model=hf_vit", "data=image_folder", f"data.root={tmp_path}", "data.num_classes=1",
                               "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]").data, _convert_="all")  # fmt: skip
    assert tuple(own.transform.transforms[-1].std) == (0.5, 0.5, 0.5)
    with pytest.raises(InstantiationException, match="data.mean and data.std go together"):
        instantiate(_compose("data=image_folder", f"data.root={tmp_path}", "data.num_classes=1",
                             "data.mean=[0.5,0.5,0.5]").data, _convert_="all")  # fmt: skip


def test_a_sweeps_run_names_hold_the_keys_it_varies(monkeypatch):
    """Each job of ``train.py -m a=1,2 b=x,y c=3`` is named by its values of the swept keys, in the order given
    (``c``, the same in every job, is left out); an Optuna search space counts as swept; outside a sweep every
    override names the run."""
    from hydra.types import RunMode

    import train

    task = ["attnreg.method=pixel", "attnreg.n_bootstrap=10", "data.val_size=16"]
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "attnreg.method=normal,pixel", "attnreg.n_bootstrap=1,10",
                                     "data.val_size=16"])  # fmt: skip
    job = OmegaConf.create({"mode": RunMode.MULTIRUN, "overrides": {"task": task}, "sweeper": {}})
    assert train.run_name(job) == "attnreg.method=pixel,attnreg.n_bootstrap=10"
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "data.val_size=16"])
    job.sweeper = {"params": {"attnreg.n_bootstrap": "range(1, 20)"}}
    assert train.run_name(job) == "attnreg.n_bootstrap=10"
    job.mode = RunMode.RUN
    assert train.run_name(job) == ",".join(task)


def test_the_shortcut_preset_builds_data_that_leak_the_label_through_a_marker():
    cfg = _compose("experiment=shortcut", "data.train_size=4", "data.val_size=4")
    data = instantiate(cfg.data, _convert_="all")
    assert (data.spec.shortcut_size, data.spec.shortcut_leak, data.spec.shortcut_honest) == (8, 1.0, 0.6)
    data.setup("fit")
    assert len(data.val_set[0]) == 6 and data.val_set[0][5].sum() == 64  # the marker's own mask
    assert "shortcut" in AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True)).faithfulness_regions
