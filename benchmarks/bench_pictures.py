"""One picture row's drawing time (``viz.picture_row``: input, raw, z, -log10 p, local FDR and four maps, each
with its title and colour bar), median of repeated draws, one JSON line per image size. Target: <= 50 ms.

Also what W&B costs the training thread per row at a run's end (the picture and the input with its significance
mask, as ``loggers.py`` makes them): ``wandb.Image`` of the arrays (W&B encodes the PNGs there) against
``wandb.Image`` of the PNG files the pictures book wrote where the row was drawn (``png_write_ms``, off the
training thread), interleaved.

    python benchmarks/bench_pictures.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import wandb
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.engine import AttentionRegularizer  # noqa: E402
from attnreg_lightning.viz import MASK_CLASSES, display_uint8, evolution_picture, mask_classes, picture_row  # noqa: E402

MAPS = ["p", "lfdr", "pi0", "posterior"]


def main(repeats: int = 20) -> None:
    torch.manual_seed(0)
    for size, patch in ((64, 8), (224, 8)):
        vit = timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=patch, depth=1, num_classes=0)
        images = torch.randn(2, 3, size, size)
        reg = AttentionRegularizer(vit.eval(), n_bootstrap=5)(images, [0, 1])
        history = [(f"epoch{i}", reg.attention[0].numpy().reshape(reg.grid), reg.maps["lfdr"][0].numpy().reshape(
            reg.grid)) for i in range(4)]  # fmt: skip
        rows, evolutions, writes, from_arrays, from_files = [], [], [], [], []
        folder = tempfile.TemporaryDirectory()
        for r in range(repeats):
            start = time.perf_counter()
            picture = picture_row(images[0], reg, 0, MAPS, title="id 0 · epoch 3 · pi0 0.93 · lfdr keeps 12/64")
            rows.append(time.perf_counter() - start)
            start = time.perf_counter()
            evolution_picture((images[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy(), history, (0.0, 0.05))
            evolutions.append(time.perf_counter() - start)
            base = display_uint8(images[0])
            masks = {"significance": {"mask_data": mask_classes(reg, 0, base.shape[:2]), "class_labels": MASK_CLASSES}}
            start = time.perf_counter()
            paths = [os.path.join(folder.name, f"{r}_{name}.png") for name in ("image", "input")]
            Image.fromarray(picture).save(paths[0])
            Image.fromarray(base).save(paths[1])
            writes.append(time.perf_counter() - start)
            for given, times in (((picture, base), from_arrays), (paths, from_files)):
                start = time.perf_counter()
                wandb.Image(given[0], caption="row"), wandb.Image(given[1], caption="row", masks=masks)
                times.append(time.perf_counter() - start)
        folder.cleanup()
        print(json.dumps({
            "image_px": size, "grid": list(reg.grid), "panels": 5 + len(MAPS), "repeats": repeats,
            "picture_row_ms": round(statistics.median(rows) * 1e3, 1),
            "evolution_4_runs_ms": round(statistics.median(evolutions) * 1e3, 1),
            "png_write_ms": round(statistics.median(writes) * 1e3, 1),
            "wandb_from_arrays_ms": round(statistics.median(from_arrays) * 1e3, 1),
            "wandb_from_files_ms": round(statistics.median(from_files) * 1e3, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
