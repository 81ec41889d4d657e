"""Explain a trained checkpoint's attention without training (Hydra app, the same ``conf/`` as train.py).

python explain.py ckpt_path=outputs/train/<time>/checkpoints/last.ckpt            # its validation images
python explain.py ckpt_path=... images=/path/to/pngs                              # a folder of images
python explain.py ckpt_path=... data=image_folder data.root=/data/imagenette data.num_classes=10

Writes into the run folder: ``csv/attnreg/*.png`` (titled pictures; with ``images=``, named by their files),
``csv/metrics.csv``, ``explain_stats.json`` (per-image statistics), ``explain_summary.json`` (the headline values with
their 95% intervals over the images) and ``attnreg_report.html``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from attnreg_lightning import AttentionRegularizationCallback, AttnRegConfig
from attnreg_lightning.config import register_configs
from attnreg_lightning.data.folder import ImageFiles
from attnreg_lightning.loggers import route_lightning_logs
from attnreg_lightning.models import HFViTClassifier, ImageClassifier, ViTClassifier
from attnreg_lightning.sanity import describe as describe_sanity

register_configs()


class Explained(L.LightningModule):
    """The checkpoint's ViT, validated for the callback alone: no labels needed, no loss computed."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def validation_step(self, batch, batch_idx: int) -> None:
        return None


def load_checkpoint(path: str) -> ImageClassifier:
    """The checkpoint's model (timm or Hugging Face); a missing file or another kind of checkpoint is named in
    the error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path!r}: no such file")
    try:
        # a checkpoint the user names is trusted, as Lightning's own loading trusts it
        state = torch.load(path, map_location="cpu", weights_only=False)
        hparams = state["hyper_parameters"]
        if "model_type" in hparams:  # HFViTClassifier: its architecture is its config (or its local directory)
            model = HFViTClassifier(**hparams)
        else:  # the weights are the checkpoint's: nothing to download or read besides it
            model = ViTClassifier(**{**hparams, "pretrained": False, "checkpoint_path": None})
        model.load_state_dict(state["state_dict"])
        return model
    except Exception as err:
        raise ValueError(
            f"ckpt_path={path!r} is not a checkpoint of attnreg_lightning's ViTClassifier or HFViTClassifier "
            f"(train.py writes them): {type(err).__name__}: {err}"
        ) from err


def explain(cfg: DictConfig) -> Path:
    attnreg = AttnRegConfig(**OmegaConf.to_container(cfg.attnreg, resolve=True))
    L.seed_everything(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    model = load_checkpoint(cfg.ckpt_path)
    if cfg.images:
        if not isinstance(model, ViTClassifier):
            raise ValueError(
                "images= takes its resizing and normalization from a timm model's pretrained config: for a Hugging "
                "Face checkpoint explain a data= set instead (e.g. data=image_folder data.root=... data.model_name=...)"
            )
        files = ImageFiles(cfg.images, model.hparams.model_name, model.vit.patch_embed.img_size[0])
        data, batch_size = {"dataloaders": DataLoader(files, batch_size=cfg.batch_size)}, cfg.batch_size
        cropped = files.cropped(range(min(len(files), attnreg.num_images)))
        if cropped:
            warnings.warn(
                f"images={cfg.images}: {len(cropped)} of the explained images are not square; each keeps its aspect, "
                f"resized by its shorter side to {files.image_size} px and centre-cropped, so its maps cover its "
                f"middle square only (crop_box in explain_stats.json): {', '.join(cropped[:5])}"
                + (f" and {len(cropped) - 5} more" if len(cropped) > 5 else ""),
                stacklevel=2,
            )
    else:
        datamodule = instantiate(cfg.data, _convert_="all")
        files, data, batch_size = None, {"datamodule": datamodule}, getattr(datamodule, "batch_size", None)
    callback = AttentionRegularizationCallback(attnreg)
    if files is not None:  # pictures and their files named by the image files, not by their place in the folder
        callback.pictures.names = {i: files.name(i) for i in range(len(files))}
    # a folder of its own: the run folder already holds Hydra's files, which the CSV logger would warn it deletes
    logger = CSVLogger(output_dir, name="csv", version="")
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        # the first num_images are explained: no need to validate past them
        limit_val_batches=-(-attnreg.num_images // batch_size) if batch_size else 1.0,
    )
    explained = Explained(model.attention_model())
    trainer.validate(explained, verbose=False, **data)
    stats = callback.image_stats
    explained.to(trainer.strategy.root_device)  # the validation's teardown left it on the CPU
    sanity = callback.sanity_check(explained) if attnreg.sanity_check else {}
    by_id = {row["id"]: row for row in callback.sanity_rows}
    for row in stats:  # each probe's own sanity correlations beside its other statistics
        row.update({k: v for k, v in by_id.get(row["id"], {}).items() if k != "id"})
    if sanity:
        callback.record_sanity(sanity)
    if files is not None:
        for row in stats:
            row["path"] = str(files.paths[row["id"]])
            width, height, *box = files.crop_box(row["id"])
            row["size"], row["crop_box"] = [width, height], box  # the part of the file the maps cover
    (output_dir / "explain_stats.json").write_text(json.dumps(stats, indent=2))
    # the run's headline values with their 95% intervals over the images (the report's table, as JSON)
    from attnreg_lightning.report import headline_summary

    run = callback.history[-1] if callback.history else {}
    summary = {
        "stage": run.get("stage"),
        "ci95": "95% interval over the images (sanity/*: over draws), docs/method.md section 10; null for counts",
        "metrics": headline_summary(run, attnreg.name),
    }
    (output_dir / "explain_summary.json").write_text(json.dumps(summary, indent=2))
    # one run: no evolution to show, the pictures are the run's
    report = callback.write_report(output_dir / f"{attnreg.name}_report.html", evolution=[])
    print(f"\nexplained {len(stats)} image(s) of {cfg.ckpt_path}")
    print(f"  pictures: {Path(logger.log_dir) / attnreg.name}")
    print(f"  per-image statistics: {output_dir / 'explain_stats.json'}")
    print(f"  headline values with 95% intervals: {output_dir / 'explain_summary.json'}")
    print(f"  report: {report}")
    for line in describe_sanity(sanity):
        print(f"  {line}")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    route_lightning_logs()
    explain(cfg)


if __name__ == "__main__":
    main()
