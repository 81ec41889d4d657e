"""How stable the model-randomization sanity check is, and what it costs, on the tests' tiny ViT (perturbed).

1. The spread of one draw: the mean Spearman over the probes of the raw (lfdr) maps for each of ``--spread-draws``
   single re-initializations of the last block (``spread``: their sd over draws).
2. The check as the callback runs it (:func:`attnreg_lightning.sanity.model_randomization` then ``summarize``) at
   each of ``--draws``, for ``--seeds`` seeds (the re-initializations' seeds; the nulls stay those of ``--null-seed``):
   each seed's means, the largest difference between two seeds' means, and the share of seed pairs within 0.1;
   ``predicted_within_0.1`` is the normal prediction from the one-draw sd (``P(|Z| <= 0.1 / (sd sqrt(2 / D)))``).
3. ``seconds``: the wall time of one check (median over the seeds), what a fit's end spends on it.

One JSON line per row. ``--threads`` bounds torch's intra-op threads (on a shared CPU, several threads on these
small forwards are many times slower than one).

    python benchmarks/bench_sanity.py                       # 16 probes, N = 10 (the callback's defaults)
    python benchmarks/bench_sanity.py --probes 8 --n-bootstrap 3 --draws 1 8 32 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.engine import AttentionRegularizer  # noqa: E402
from attnreg_lightning.metrics import MeanScores  # noqa: E402
from attnreg_lightning.sanity import (  # noqa: E402
    draw_keys,
    map_spearman,
    model_randomization,
    per_draw_scores,
    randomized_last_block,
    summarize,
)
from tests.helpers import perturb, tiny_data, tiny_module  # noqa: E402


def probes(n: int) -> tuple[torch.Tensor, list[int]]:
    data = tiny_data(val_size=n, batch_size=n)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    return batch[0], [int(i) for i in batch[3]]


def check(model, images, ids, n_bootstrap: int, null_seed: int, seed: int, draws: int) -> tuple[dict, float]:
    """The callback's check (one rank): per-draw means over the probes, summarized over draws; and its seconds."""
    engine = AttentionRegularizer(model, n_bootstrap=n_bootstrap, seed=null_seed)
    start = time.perf_counter()
    rho = model_randomization(
        model, engine, lambda m: AttentionRegularizer(m, n_bootstrap=n_bootstrap, seed=null_seed), images, ids,
        seed, draws,
    )  # fmt: skip
    metric = MeanScores(draw_keys(draws))
    metric.update(per_draw_scores(rho))
    values = summarize({k: float(v) for k, v in metric.compute().items() if torch.isfinite(v)}, draws)
    return values, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--null-seed", type=int, default=0)
    ap.add_argument("--spread-draws", type=int, default=200)
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--untrained", action="store_true", help="the tiny ViT as initialized, not perturbed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_module() if args.untrained else perturb(tiny_module())
    images, ids = probes(args.probes)
    engine = AttentionRegularizer(model, n_bootstrap=args.n_bootstrap, seed=args.null_seed)
    trained = engine(images, ids)
    one = {"raw": [], "lfdr": []}
    for s in range(args.spread_draws):
        randomized = AttentionRegularizer(randomized_last_block(model, 10_000 + s), n_bootstrap=args.n_bootstrap,
                                          seed=args.null_seed)  # fmt: skip
        rho = map_spearman(trained, randomized(images, ids))
        for name in one:
            one[name].append(float(torch.nanmean(rho[name])))
    sd = {name: statistics.stdev(v) for name, v in one.items()}
    common = {"probes": args.probes, "n_bootstrap": args.n_bootstrap, "untrained": args.untrained}
    print(json.dumps({"row": "one draw", **common, "draws": args.spread_draws,
                      **{f"{n}_mean": round(statistics.fmean(v), 4) for n, v in one.items()},
                      **{f"{n}_sd": round(sd[n], 4) for n in one}}))  # fmt: skip
    for draws in args.draws:
        runs = [check(model, images, ids, args.n_bootstrap, args.null_seed, seed, draws) for seed in range(args.seeds)]
        row = {"row": "check", **common, "sanity_draws": draws, "seeds": args.seeds}
        for name in ("raw", "lfdr"):
            key = f"sanity/{name}_spearman"
            means = [values[key] for values, _ in runs]
            gaps = [abs(a - b) for a, b in itertools.combinations(means, 2)]
            n = runs[0][0][f"{key}_draws"]
            z = 0.1 / (sd[name] * math.sqrt(2 / n))
            row[name] = {
                "per_seed_means": [round(m, 3) for m in means],
                "sd_over_draws": [round(values.get(f"{key}_sd", math.nan), 3) for values, _ in runs],
                "draws": n,
                "largest_gap": round(max(gaps), 3),
                "pairs_within_0.1": round(float(np.mean([g <= 0.1 for g in gaps])), 3),
                "predicted_within_0.1": round(math.erf(z / math.sqrt(2)), 3),
            }
        row["seconds"] = round(statistics.median(t for _, t in runs), 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
