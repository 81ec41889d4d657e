"""One picture row's drawing time (``viz.picture_row``: input, raw, z, -log10 p, local FDR and four maps, each
with its title and colour bar), median of repeated draws, one JSON line per image size. Target: <= 50 ms.

    python benchmarks/bench_pictures.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.engine import AttentionRegularizer  # noqa: E402
from attnreg_lightning.viz import evolution_picture, picture_row  # noqa: E402

MAPS = ["p", "lfdr", "pi0", "posterior"]


def main(repeats: int = 20) -> None:
    torch.manual_seed(0)
    for size, patch in ((64, 8), (224, 8)):
        vit = timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=patch, depth=1, num_classes=0)
        images = torch.randn(2, 3, size, size)
        reg = AttentionRegularizer(vit.eval(), n_bootstrap=5)(images, [0, 1])
        history = [(f"epoch{i}", reg.attention[0].numpy().reshape(reg.grid), reg.maps["lfdr"][0].numpy().reshape(
            reg.grid)) for i in range(4)]  # fmt: skip
        rows, evolutions = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            picture_row(images[0], reg, 0, MAPS, title="id 0 · epoch 3 · pi0 0.93 · lfdr keeps 12/64")
            rows.append(time.perf_counter() - start)
            start = time.perf_counter()
            evolution_picture((images[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy(), history, (0.0, 0.05))
            evolutions.append(time.perf_counter() - start)
        print(json.dumps({
            "image_px": size, "grid": list(reg.grid), "panels": 5 + len(MAPS), "repeats": repeats,
            "picture_row_ms": round(statistics.median(rows) * 1e3, 1),
            "evolution_4_runs_ms": round(statistics.median(evolutions) * 1e3, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
