"""Time of ``significance()`` against the reference way of computing the same statistics.

The reference (the paper's code) works one image at a time in numpy/statsmodels at pixel resolution;
we also time that oracle at token resolution. The three are timed in interleaved rounds and the medians
reported, so that they share the machine's slow and fast spells. Heavy-tailed batches differ a lot in how
long the local FDR's IRLS runs (``--seed``). Run: ``python benchmarks/bench_stats.py [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.stats import significance  # noqa: E402
from tests.oracle import oracle_image, oracle_pixel_level  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--grid", type=int, default=28, help="tokens per side (28 = ViT-S/8 at 224 px)")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=16, help="interleaved timing rounds (medians are reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verbose", action="store_true", help="also print every round's times")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic attention")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    b, n, t = args.batch, args.n_bootstrap, args.grid * args.grid

    def attention(*shape):
        logits = rng.standard_t(3, size=(*shape, t))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    obs, null = attention(b), attention(b, n)
    obs_t = torch.from_numpy(obs).float().to(args.device)
    null_t = torch.from_numpy(null).float().to(args.device)

    def run_torch():
        significance(obs_t, null_t)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: the first calls also grow the allocator's heap
        run_torch()
    # Interleaved rounds: this machine has slow spells lasting seconds, and side by side each of the
    # three is timed in the same spells. Per round: the batch ours and token level, one image pixel level.
    grid = (args.grid, args.grid)
    ours, token, pixel = [], [], []
    for r in range(args.rounds):
        ours.append(timed(run_torch, 1) / b)
        token.append(timed(lambda: [oracle_image(obs[i], null[i]) for i in range(b)], 1) / b)
        i = r % b
        pixel.append(timed(lambda i=i: oracle_pixel_level(obs[i], null[i], grid, args.patch), 1))
    if args.verbose:
        print({"ours_ms": [round(v * b * 1e3, 1) for v in ours], "pixel_ms": [round(v * 1e3) for v in pixel]})
    ours, token, pixel = (statistics.median(v) for v in (ours, token, pixel))
    row = {
        "B": b, "N": n, "T": t, "seed": args.seed, "rounds": args.rounds,
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "significance_ms_per_image": round(ours * 1e3, 3),
        "oracle_token_ms_per_image": round(token * 1e3, 2),
        "oracle_pixel_ms_per_image": round(pixel * 1e3, 1),
        "speedup_vs_pixel_oracle": round(pixel / ours, 1),
        "speedup_vs_token_oracle": round(token / ours, 1),
    }  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
