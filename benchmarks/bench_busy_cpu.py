"""``significance()`` on an idle and on a busy CPU: torch's threads (the old behaviour) against the
statistics' bounded threads (``cpu_threads=1``, the default), interleaved in one run.

A training loop's data workers keep the cores busy; the statistics are thousands of small ops whose
intra-op threads wait for each other when a core is taken. The load here is ``--load`` processes running
torch matrix products on all their threads. Targets (issue 12): loaded/idle <= 5x, and idle no slower than
torch's threads by more than 1.5x. Run alone: ``python benchmarks/bench_busy_cpu.py [--load 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.stats import significance  # noqa: E402

BUSY = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
VARIANTS = {"torch_threads": None, "bounded": 1}


def attention(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    logits = rng.standard_t(3, size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return torch.from_numpy(e / e.sum(-1, keepdims=True)).float()


def medians(obs: torch.Tensor, null: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per call of each variant, the variants alternating round by round."""
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        for name, threads in VARIANTS.items():
            start = time.perf_counter()
            significance(obs, null, cpu_threads=threads)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=784)
    ap.add_argument("--load", type=int, default=3, help="busy torch processes in the loaded phase")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    obs = attention(rng, args.batch, args.tokens)
    null = attention(rng, args.batch, args.n_bootstrap, args.tokens)
    threads_before = torch.get_num_threads()
    significance(obs, null)  # warm-up
    idle = medians(obs, null, args.rounds)
    workers = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.load)]
    try:
        time.sleep(3)  # let the load settle
        loaded = medians(obs, null, args.rounds)
    finally:
        for w in workers:
            w.kill()
    assert torch.get_num_threads() == threads_before, "the caller's thread setting was not restored"
    for name in VARIANTS:
        row = {"variant": name, "idle_ms": round(idle[name], 1), "loaded_ms": round(loaded[name], 1)}
        row["loaded_over_idle"] = round(loaded[name] / idle[name], 2)
        print(json.dumps(row))
    print(
        json.dumps(
            {
                "summary": f"B={args.batch} N={args.n_bootstrap} T={args.tokens}, {args.load} busy processes",
                "cpu_threads": threads_before,
                "bounded_idle_over_torch_threads_idle": round(idle["bounded"] / idle["torch_threads"], 2),
                "bounded_loaded_over_torch_threads_loaded": round(loaded["bounded"] / loaded["torch_threads"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
