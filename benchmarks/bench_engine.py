"""Engine time per explained image against the forward-pass floor, one JSON line per setting.

The floor is a plain batched forward (``model(x)``, fused attention, same dtype) of the same ``(N + 1) * B``
images in chunks of ``max_images_per_forward``; nothing that explains ``B`` images with ``N`` nulls can do
less forward work. The engine time includes null generation, the attention read-out and the statistics.

    python benchmarks/bench_engine.py                                   # CPU, small settings
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16    # GPU, the paper's settings
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnreg_lightning.engine import AttentionRegularizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak device memory since the last reset; None on CPU, where no per-phase peak is available."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(model, images: torch.Tensor, n: int, dtype: torch.dtype, chunk: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds and peak memory of the floor and of the engine for one setting."""
    device = images.device
    amp = dtype != torch.float32
    engine = AttentionRegularizer(
        model, n_bootstrap=n, max_images_per_forward=chunk, autocast_dtype=dtype if amp else None
    )
    floor_images = images.repeat(n + 1, 1, 1, 1)

    def floor():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype) if amp else nullcontext():
            for part in floor_images.split(chunk):
                model(part)

    def run_engine():
        engine(images)

    floor(), run_engine()  # warm-up
    floor_t, engine_t = [], []
    for _ in range(repeats):  # interleaved so drift hits both alike
        floor_t.append(timed(floor, device))
        engine_t.append(timed(run_engine, device))
    reset_peak(device)
    floor()
    floor_mem = peak_mib(device)
    reset_peak(device)
    run_engine()
    return {"floor_s": min(floor_t), "engine_s": min(engine_t), "floor_mib": floor_mem, "engine_mib": peak_mib(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch8_224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (CPU: 112 224; GPU: 224 488)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 10, 50], help="bootstrap sizes N")
    ap.add_argument("--batch", type=int, default=None, help="explained images B (CPU: 1; GPU: 32)")
    ap.add_argument("--max-images-per-forward", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    ap.add_argument("--skip", nargs="*", default=["224:50"], help="size:N pairs to skip (CPU time)")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.sizes or ([224, 488] if gpu else [112, 224])
    batch = args.batch or (32 if gpu else 1)
    skip = set() if gpu and args.skip == ap.get_default("skip") else set(args.skip)
    dtype = getattr(torch, args.dtype)
    for size in sizes:
        model = timm.create_model(args.model, img_size=size).to(device).eval()
        images = torch.randn(batch, 3, size, size, device=device)
        for n in args.n:
            if f"{size}:{n}" in skip:
                continue
            m = measure(model, images, n, dtype, args.max_images_per_forward, args.repeats)
            f, e = m["floor_s"], m["engine_s"]
            row = {
                "model": args.model, "device": torch.cuda.get_device_name(device) if gpu else "cpu",
                "dtype": args.dtype, "size": size, "N": n, "B": batch,
                "floor_ms_per_image": round(f / batch * 1e3, 2), "engine_ms_per_image": round(e / batch * 1e3, 2),
                "engine_over_floor": round(e / f, 3),
                "peak_mib_floor": m["floor_mib"] and round(m["floor_mib"]),
                "peak_mib_engine": m["engine_mib"] and round(m["engine_mib"]),
                "process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
