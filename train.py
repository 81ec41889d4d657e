"""Fine-tune a timm ViT with bootstrap-regularized attention maps logged while it trains (Hydra app).

python train.py                                         # ViT-tiny on planted shapes, CPU, W&B offline
python train.py trainer=ddp_cpu                         # 2 CPU processes (gloo)
python train.py -m attnreg.method=normal,pixel attnreg.n_bootstrap=1,10
python train.py hparams_search=attnreg_optuna           # Optuna over the method's knobs
python train.py ckpt_path=outputs/train/<time>/checkpoints/last.ckpt   # resume a fit

Each Hydra job gets its own W&B run, named after the job's overrides and grouped by sweep, holding the
whole resolved config; it is finished when the job ends (marked failed if the job raised).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from attnreg_lightning import AttentionRegularizationCallback, AttnRegConfig
from attnreg_lightning.config import register_configs
from attnreg_lightning.loggers import EpochLine, log_report, route_lightning_logs

register_configs()

SUMMARY_KEYS = (
    "val/acc",
    "attnreg/raw/roi_mass",
    "attnreg/lfdr/roi_mass",
    "attnreg/posterior/roi_mass",
    "attnreg/raw/noise_percentile",
    "attnreg/lfdr/noise_percentile",
    "attnreg/lfdr/noise_kept",
    "attnreg/lfdr/sparsity",
    "attnreg/lfdr/roi_f1",
    "attnreg/topk/roi_f1",
    "attnreg/shortcut/reliance",
    "attnreg/same_k_random@shortcut/reliance",
    "attnreg/null_srmsd",
)


def build_logger(cfg: DictConfig):
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return None
    if issubclass(get_class(node._target_), WandbLogger):  # Lightning's, or a subclass (the app's)
        # a sweep's runs read "attnreg.method=pixel" in the W&B table, side by side in the sweep's group
        hydra_cfg = HydraConfig.get()
        name = node.get("name") or run_name(hydra_cfg) or None
        group = node.get("group") or (Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else "")
        return instantiate(node, name=name, group=group)
    return instantiate(node)


def run_name(hydra_cfg) -> str:
    """The job's overrides of the keys a sweep varies (all of them outside a sweep): ``attnreg.method=pixel``."""
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ",".join(overrides)
    swept = set(hydra_cfg.sweeper.get("params") or {})  # an Optuna search space
    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    swept |= {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    return ",".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept)


def finish_wandb(logger, failed: bool) -> None:
    """End this job's W&B run, so the next job of a sweep starts its own (Lightning would reuse a live one)."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


def check_resume(cfg: DictConfig) -> None:
    """A fit resumed from ``ckpt_path`` trains only up to ``trainer.max_epochs``: refuse one that has nothing left to
    train (Lightning would stop at once), and say what the resumed learning-rate schedule does."""
    if not cfg.ckpt_path:
        return
    import torch

    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such file")
    # mmap: the weights and the optimizer's moments are not read, only the loop's counters and the schedule
    state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1 and epochs >= max_epochs:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path!r} has trained {epochs} epoch(s) and trainer.max_epochs={max_epochs}: nothing "
            f"is left to train. To train on, raise it (e.g. trainer.max_epochs={epochs + max(1, epochs)}); the "
            "learning-rate schedule then goes on from the checkpoint's, it is not planned anew (docs/app.md)"
        )
    schedulers = state.get("lr_schedulers", [])
    lr = ", ".join(f"{v:.3g}" for s in schedulers for v in s.get("_last_lr", [])) or "unknown"
    # the app's models: a linear warm-up, then a cosine over the rest of the first fit's steps (models.py)
    cosine = next((s["T_max"] for c in schedulers for s in c.get("_schedulers", [c]) if "T_max" in s), None)
    after = (
        f"past the end of its {cosine} cosine steps it rises again along the same cosine, back to model.lr {cosine} "
        "steps later, then falls again"
        if cosine
        else "past its end it goes on as that schedule goes on"
    )
    rank_zero_info(
        f"Resuming {cfg.ckpt_path} after {epochs} epoch(s), global step {state['global_step']}, up to "
        f"trainer.max_epochs={max_epochs}. The optimizer and its learning-rate schedule go on from the checkpoint's, "
        f"at learning rate {lr}: the schedule was planned over the first fit's steps and is not planned anew; {after}"
    )


def train(cfg: DictConfig) -> float:
    """Fit, validate the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``."""
    attnreg = AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))
    check_resume(cfg)
    logger = build_logger(cfg)
    try:
        result = _fit(cfg, attnreg, logger)
    except BaseException:
        finish_wandb(logger, failed=True)
        raise
    finish_wandb(logger, failed=False)
    return result


def build_callbacks(cfg: DictConfig, attnreg: AttnRegConfig, logger) -> list[Callback]:
    """The ``callbacks`` group's callbacks (by name; a null entry is dropped), the attention-regularization
    callback, and a learning-rate monitor when there is a logger."""
    if cfg.trainer.get("callbacks") is not None:
        raise ValueError(
            "trainer.callbacks is not read (the app passes its own callbacks to the Trainer): give callbacks by "
            "name under callbacks., e.g. +callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping "
            "or the preset callbacks=early_stopping (conf/callbacks/)"
        )
    callbacks = [instantiate(node, _convert_="all") for node in (cfg.get("callbacks") or {}).values() if node]
    callbacks.append(AttentionRegularizationCallback(attnreg))
    callbacks.append(EpochLine())
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def _fit(cfg: DictConfig, attnreg: AttnRegConfig, logger) -> float:
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    if logger is not None:  # the run's config is the whole experiment, resolved
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = build_callbacks(cfg, attnreg, logger)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger if logger is not None else False)
    trainer.fit(model, datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (explainer,) = [c for c in callbacks if isinstance(c, AttentionRegularizationCallback)]
    checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
    report = Path(checkpoints or trainer.default_root_dir) / f"{attnreg.name}_report.html"  # where the fit's went
    if cfg.validate_best and best:
        (validated,) = trainer.validate(model, datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in validated.items()})
        if trainer.is_global_zero and explainer.history:
            # the fit's end wrote the report before this validation, whose values metrics.json holds: written
            # again, it ends with them
            explainer.write_report(report)
            log_report(trainer.loggers, report)
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print_summary(metrics, output_dir, logger, best, report)
    if cfg.optimized_metric not in metrics:
        raise ValueError(f"optimized_metric={cfg.optimized_metric!r} was not logged; logged: {sorted(metrics)}")
    return metrics[cfg.optimized_metric]


def print_summary(metrics: dict[str, float], output_dir: Path, logger, best: str, html_report: Path) -> None:
    print("\nattnreg-lightning results")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:32s} {metrics[key]:.4f}")
    print(f"  all metrics: {output_dir / 'metrics.json'}")
    if best:
        print(f"  best checkpoint: {best}")
    if html_report.is_file():
        print(f"  explanation report: {html_report}")
    if isinstance(logger, WandbLogger):
        run_dir = Path(logger.experiment.dir).parent
        print(f"  W&B run (offline): {run_dir}\n  upload it with: wandb sync {run_dir}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    route_lightning_logs()
    return train(cfg)


if __name__ == "__main__":
    main()
