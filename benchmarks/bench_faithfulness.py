"""What faithfulness costs: the engine alone against the engine followed by faithfulness ``kept`` (default map) and
``curves``, on the same batch, interleaved in one process, one JSON line per mode. Each mode also scores the fixed-k
baseline of the lfdr map as the callback does at a run's end (a second call, ``kappa`` the batch's mean kept fraction).

``ratio`` is (engine + faithfulness) / engine, the factor a validation run's explanation time grows by; the target
for ``kept`` with the default map is <= 1.4 at N = 10. ``forwards_per_image`` counts the images faithfulness forwarded
per explained image, as run: at most 6 for ``kept``, 2 of them the fixed-k baseline's (the clean image's logits come
from the engine's forward, which runs on to the head), fewer where a value is undefined or two sets hold the same
tokens (the fixed-k sets, scored apart, share no forward with the map's); ``lfdr_undefined_fraction``
is the share of images whose lfdr map keeps no token or every token (no forwards). ``kept-worst`` is the upper bound of
``kept``'s cost on the same images: its lfdr map keeps a random quarter of each image's tokens, so every image is
defined and no two sets are the same (6 forwards per image).

    python benchmarks/bench_faithfulness.py                          # CPU: the app's default model, 64 px
    python benchmarks/bench_faithfulness.py --device cuda --model vit_small_patch8_224 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import timed  # noqa: E402

from attnreg_lightning.engine import AttentionRegularizer  # noqa: E402
from attnreg_lightning.faithfulness import classifier_forward, faithfulness  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default", help="'default' (ViT-tiny, 8-px patches, 64 px) or a timm name")
    ap.add_argument("--n-bootstrap", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--max-images", type=int, nargs="+", default=[256],
        help="max_images_per_forward of the engine and faithfulness; several sizes are timed side by side",
    )  # fmt: skip
    ap.add_argument(
        "--baseline", nargs="+", default=["mean"], choices=["mean", "blur", "zeros", "drop"],
        help="what removed tokens become; several are timed side by side ('drop': dropped from the sequence)",
    )  # fmt: skip
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "default":
        vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=6, num_classes=4)
    else:
        vit = timm.create_model(args.model, num_classes=10)
    vit = vit.to(device).eval()
    size = vit.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=device)
    ids = list(range(args.batch))
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    classify = classifier_forward(vit)

    # kept-worst: the same cost with an lfdr map that keeps a random quarter of each image's tokens, so that every
    # image is defined and no set equals another (the upper bound of kept's cost: 6 forwards per image)
    shape = AttentionRegularizer(vit, n_bootstrap=1)(images, ids).attention.shape
    quarter = torch.rand(shape, generator=torch.Generator().manual_seed(1)).argsort(1) < shape[1] // 4
    faithful = ("kept", "kept-worst", "curves")
    modes = [("off", size, "-") for size in args.max_images]
    modes += [(m, size, b) for size in args.max_images for b in args.baseline for m in faithful]
    forwarded: dict[tuple, list[float]] = {m: [] for m in modes}  # images faithfulness forwarded per image, per call
    undefined: dict[tuple, list[float]] = {m: [] for m in modes}

    def run(key: tuple[str, int, str]):
        mode, size, baseline = key
        kwargs = {"n_bootstrap": args.n_bootstrap, "autocast_dtype": dtype, "max_images_per_forward": size}
        engine = AttentionRegularizer(vit, **kwargs)
        # as the callback scores faithfulness: the engine's forward of the clean images runs on to the head
        classifying = AttentionRegularizer(vit, **kwargs, classify=True)

        def forward(x: torch.Tensor) -> torch.Tensor:
            forwarded[key][-1] += len(x) / args.batch
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                return classify(x)

        def go() -> None:
            if mode == "off":
                engine(images, ids)
                return
            reg = classifying(images, ids)
            maps = reg.maps if mode != "kept-worst" else {**reg.maps, "lfdr": quarter.to(device).float()}
            forwarded[key].append(0.0)
            with torch.no_grad():
                got = faithfulness(
                    forward, images, reg.attention, maps, reg.grid, ids, mode=mode.removesuffix("-worst"),
                    steps=args.steps, clean_logits=reg.logits, max_images_per_forward=size, baseline=baseline,
                    model=vit,
                )  # fmt: skip
                # as the callback does at the run's end: the fixed-k baseline, kappa the mean lfdr kept fraction
                kappa = float((maps["lfdr"] > 0).double().mean())
                faithfulness(
                    forward, images, reg.attention, {}, reg.grid, ids, kept_maps=(), fixed_k={"lfdr": kappa},
                    clean_logits=got.clean_logits, max_images_per_forward=size, baseline=baseline, model=vit,
                )  # fmt: skip
            undefined[key].append(got.undefined["lfdr"] / args.batch)

        return go

    for key in modes:  # warm-up
        run(key)()
    times: dict[tuple, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved: drift hits every mode alike
        for key in modes:
            times[key].append(timed(run(key), device))
    for key in modes:
        mode, size, baseline = key
        t = statistics.median(times[key])
        row = {
            "model": args.model, "device": str(device), "dtype": args.dtype, "B": args.batch, "N": args.n_bootstrap,
            "max_images_per_forward": size, "faithfulness": mode, "baseline": baseline, "steps": args.steps,
            "engine_forwards_per_image": args.n_bootstrap + 1,
            "forwards_per_image": round(statistics.mean(forwarded[key] or [0]), 2),
            "lfdr_undefined_fraction": round(statistics.mean(undefined[key] or [0]), 3),
            "ms_per_image": round(t / args.batch * 1e3, 2),
            # against the engine alone at the same size, and at the first size given
            "ratio": round(t / statistics.median(times[("off", size, "-")]), 3),
            "ratio_to_first_engine": round(t / statistics.median(times[("off", args.max_images[0], "-")]), 3),
        }  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
