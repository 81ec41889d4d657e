"""Fine-tune a timm ViT with bootstrap-regularized attention maps logged while it trains (Hydra app).

python train.py                                         # ViT-tiny on planted shapes, CPU, W&B offline
python train.py trainer=ddp_cpu                         # 2 CPU processes (gloo)
python train.py -m attnreg.method=normal,pixel attnreg.n_bootstrap=1,10
python train.py hparams_search=attnreg_optuna           # Optuna over the method's knobs
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from attnreg_lightning import AttentionRegularizationCallback, AttnRegConfig
from attnreg_lightning.config import register_configs

register_configs()

SUMMARY_KEYS = (
    "val/acc",
    "attnreg/raw/roi_mass",
    "attnreg/lfdr/roi_mass",
    "attnreg/posterior/roi_mass",
    "attnreg/raw/noise_percentile",
    "attnreg/lfdr/noise_percentile",
    "attnreg/lfdr/noise_d",
    "attnreg/lfdr/sparsity",
    "attnreg/lfdr/roi_f1",
    "attnreg/topk/roi_f1",
    "attnreg/null_srmsd",
)


def build_logger(cfg: DictConfig):
    node = cfg.get("logger")
    return instantiate(node) if node and "_target_" in node else None


def train(cfg: DictConfig) -> float:
    """Fit, validate the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``."""
    attnreg = AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    logger = build_logger(cfg)
    callbacks = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints", monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode, save_last=True
        ),
        AttentionRegularizationCallback(attnreg),
    ]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger if logger is not None else False)
    trainer.fit(model, datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path
    if cfg.validate_best and best:
        (validated,) = trainer.validate(model, datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in validated.items()})
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        report(metrics, output_dir, logger, best)
    if cfg.optimized_metric not in metrics:
        raise ValueError(f"optimized_metric={cfg.optimized_metric!r} was not logged; logged: {sorted(metrics)}")
    return metrics[cfg.optimized_metric]


def report(metrics: dict[str, float], output_dir: Path, logger, best: str) -> None:
    print("\nattnreg-lightning results")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:32s} {metrics[key]:.4f}")
    print(f"  all metrics: {output_dir / 'metrics.json'}")
    if best:
        print(f"  best checkpoint: {best}")
    if isinstance(logger, WandbLogger):
        run_dir = Path(logger.experiment.dir).parent
        print(f"  W&B run (offline): {run_dir}\n  upload it with: wandb sync {run_dir}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
