"""Validate a tiny ViT with the callback on 1 or 2 CPU processes (DDP, gloo); rank 0 writes the metrics.

Run as a script (Lightning's DDP launcher re-executes it for each rank):
    python tests/ddp_run.py OUT.json --devices 2 [--uneven]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from attnreg_lightning import AttentionRegularizationCallback  # noqa: E402
from tests.helpers import tiny_data, tiny_module  # noqa: E402


class UnevenVal(L.LightningDataModule):
    """Rank r validates on 4 * (3 - 2 r) images: ranks see different numbers of batches."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_data(val_size=24, batch_size=4)

    def setup(self, stage=None):
        self.inner.setup(stage)

    def val_dataloader(self):
        rank = self.trainer.global_rank
        start, count = (0, 12) if rank == 0 else (12, 4)
        return DataLoader(Subset(self.inner.val_set, range(start, start + count)), batch_size=4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--uneven", action="store_true")
    args = ap.parse_args()
    L.seed_everything(0)
    callback = AttentionRegularizationCallback(n_bootstrap=3, num_images=100, log_images=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=not args.uneven,
    )
    data = UnevenVal() if args.uneven else tiny_data(val_size=24, batch_size=4)
    (metrics,) = trainer.validate(tiny_module(), data)
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
