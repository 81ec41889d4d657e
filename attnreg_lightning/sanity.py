"""The model-randomization sanity check (Adebayo et al., 2018): a map that does not change when the model does
explains nothing about the model. Its answer is a distribution over re-initializations, not one draw.

    rho = model_randomization(model, engine, new_engine, images, ids, seed=0, draws=128)  # {"raw": [128, B], ...}
    metric = MeanScores(draw_keys(128))  # each draw's mean over the images of every rank
    metric.update(per_draw_scores(rho))
    values = summarize({k: float(v) for k, v in metric.compute().items()}, draws=128)  # mean, _sd, _draws
    rows, spans = per_image(rho), intervals(values)  # each image's mean over the draws; 95% intervals

The probes are explained by the trained model and by a deep copy whose last block (the one whose attention is read)
is re-initialized ``draws`` times, independently (draw ``d`` from :func:`draw_seed`), with the same nulls (same seed
and sample ids). Each image's raw and lfdr maps are compared by Spearman's rank correlation, per draw; the logged
value is the mean over draws of each draw's mean over images, with the spread of those per-draw means.

Why several draws of the last block, not one, and not a cascade. One draw is noise: on the tests' tiny ViT a draw's
mean raw correlation has a standard deviation of about 0.4 over draws (seeds 0-5 gave 0.31, 0.39, 0.13, -0.48,
0.08, 0.11 in issue 29), whatever the number of probes, because all probes share the draw. The reason is a
symmetry: PyTorch's re-initialization is symmetric about 0, and negating the block's query weights (an equally
likely draw) negates every attention logit, which reverses each head's ranking of the tokens; a draw and its
mirror give correlations of opposite sign (measured: +0.25 and -0.25, -0.53 and +0.53, ...). So the mean over draws
of a map that follows the block is about 0 for any model, trained or not, and its sign in one draw means nothing;
a map that ignores the block gives 1 at every draw. A cascade (Adebayo et al.'s top-down re-initialization, one
more block per step) re-initializes the last block at every step, so every step has the same spread and needs the
same number of draws, times the depth; and the attention the engine reads is the last block's, so the last block
is where the question is. Several independent draws of it answer the question at the least cost.

How many draws. The sd of a mean over ``D`` draws is ``sd / sqrt(D)``. Measured on the tests' tiny ViT (16
probes, N = 10, 2026-12-04; benchmarks/bench_sanity.py, docs/method.md): a draw's mean raw correlation has sd
0.39-0.40 over draws, its mean lfdr correlation 0.09 (0.15 on a ViT four times wider). Two checks with different
seeds agree within 0.1 in 95% of seed pairs when ``1.96 * sd * sqrt(2 / D) <= 0.1``: ``D >= 123`` for the raw maps,
``D >= 7`` (17 on the wider ViT) for the lfdr maps; at the default 128 draws, 95% of 2,016 pairs of 64 seeds did.
A draw's raw maps need one forward per probe (:func:`read_raw`), its lfdr maps the ``N`` null forwards as well
(``N + 1`` per probe); so every draw is read for its raw maps and the first ``ceil(draws / LFDR_EVERY)`` draws are
explained in full for their lfdr maps (16 of the default 128): 316 forwards per probe at N = 10.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from attnreg_lightning.attention import resolve_vit
from attnreg_lightning.bootstrap import rechunk
from attnreg_lightning.engine import AttentionRegularizer, eval_mode
from attnreg_lightning.metrics import spearman, t_quantile
from attnreg_lightning.readers import hf as hf_reader
from attnreg_lightning.readers import timm as timm_reader
from attnreg_lightning.regularize import RegularizedAttention

SANITY_KEYS = ("sanity/raw_spearman", "sanity/lfdr_spearman")
"""The logged means (over draws of the mean over images); ``<key>_sd`` is the sd over draws of the per-draw means and
``<key>_draws`` the number of draws that gave a mean."""
MAPS = ("raw", "lfdr")
LFDR_EVERY = 8
"""One draw in this many is explained in full (nulls and statistics) for its lfdr maps; every draw gives raw maps."""


def last_block(vit: nn.Module) -> nn.Module | None:
    """The block that holds the attention the engine reads (timm and Hugging Face ViTs), None if unknown."""
    if timm_reader.READER.matches(vit):
        attention = timm_reader.last_attention(vit)
    elif hf_reader.READER.matches(vit):
        attention = hf_reader._last_attention(hf_reader.tower(vit))
    else:
        return None
    if attention is None:
        return None
    parents = {id(child): module for module in vit.modules() for child in module.children()}
    return parents.get(id(attention))


def reinitialize(block: nn.Module, seed: int) -> None:
    """Re-initialize ``block``'s layers in place (every submodule with ``reset_parameters``: linear layers, norms),
    from ``seed`` and without touching the global (CPU and CUDA) random state."""
    devices = [p.device for p in block.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        for module in block.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def randomizable_copy(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A deep copy of the ViT in ``model`` (in eval mode) and its last block, None when the last block is unknown."""
    vit = copy.deepcopy(resolve_vit(model))
    block = last_block(vit)
    return None if block is None else (vit.eval(), block)


def randomized_last_block(model: nn.Module, seed: int) -> nn.Module | None:
    """A deep copy of the ViT in ``model`` whose last block is re-initialized from ``seed`` (:func:`reinitialize`);
    None when the last block is unknown."""
    made = randomizable_copy(model)
    if made is None:
        return None
    vit, block = made
    reinitialize(block, seed)
    return vit


def draw_seed(seed: int, draw: int) -> int:
    """The re-initialization seed of draw ``draw`` of a check seeded ``seed``: a hash of the pair, so the draws of two
    seeds never share a re-initialization (``seed`` and ``seed + 1`` do not give shifted copies of one sequence)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(draw)]).generate_state(1, np.uint64)
    return int(state[0]) % 2**63


def lfdr_draws(draws: int) -> int:
    """How many of ``draws`` are explained in full for their lfdr maps (the first ones)."""
    return math.ceil(draws / LFDR_EVERY)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's correlation; 0 when exactly one map is constant (e.g. the randomized model's lfdr map is empty
    where the trained one keeps tokens: nothing of the trained map's order survives), NaN when both are or when a map
    is not finite."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    flat_a, flat_b = bool(a.max() == a.min()), bool(b.max() == b.min())
    if flat_a or flat_b:
        return float("nan") if flat_a and flat_b else 0.0
    return spearman(a, b)


def _rows(a: Tensor, b: Tensor, valid: np.ndarray) -> Tensor:
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    rho = [rank_correlation(x[i], y[i]) if valid[i] else float("nan") for i in range(len(x))]
    return torch.tensor(np.asarray(rho, dtype=np.float64))


def map_spearman(trained: RegularizedAttention, randomized: RegularizedAttention) -> dict[str, Tensor]:
    """Per image, the :func:`rank_correlation` of the raw and of the lfdr maps (NaN for an image either model could
    not test)."""
    valid = (trained.significance.valid & randomized.significance.valid).cpu().numpy()
    return {
        "raw": _rows(trained.attention, randomized.attention, valid),
        "lfdr": _rows(trained.maps["lfdr"], randomized.maps["lfdr"], valid),
    }


@torch.no_grad()
def read_raw(engine: AttentionRegularizer, images: Tensor) -> Tensor:
    """The raw maps ``[B, T]`` that ``engine`` gives ``images`` (its explanation's ``attention``: the same read,
    autocast, chunks and head mean) from the images' own forwards alone, without their nulls: one forward per image
    instead of ``N + 1``."""
    with eval_mode(engine.model):
        attention = engine._attention(rechunk([images], engine.per_forward(images.device)))
    return attention.mean(1) if attention.dim() == 3 else attention  # heads="all": the mean over heads


def model_randomization(
    model: nn.Module,
    engine: AttentionRegularizer,
    new_engine: Callable[[nn.Module], AttentionRegularizer],
    images: Tensor,
    ids: Sequence[int],
    seed: int,
    draws: int,
) -> dict[str, Tensor] | None:
    """The per-draw, per-image correlations ``{"raw": [draws, B], "lfdr": [lfdr_draws(draws), B]}`` (float64, CPU;
    NaN where undefined) of the maps ``engine`` gives ``images`` (of ``model``) with those of ``draws``
    re-initializations of the last block of one deep copy (draw ``d`` from ``draw_seed(seed, d)``), explained by
    ``new_engine(copy)`` with the same nulls; None when the last block is unknown. The global random state is left
    as it was."""
    made = randomizable_copy(model)
    if made is None:
        return None
    vit, block = made
    randomized = new_engine(vit)  # it reads the copy's weights at each forward: re-initialized in place, draw by draw
    trained = engine(images, ids)
    trained_raw = read_raw(engine, images)
    valid = trained.significance.valid.cpu().numpy()  # as the lfdr maps: the images the trained model could test
    raw, lfdr = [], []
    for d in range(draws):
        reinitialize(block, draw_seed(seed, d))
        raw.append(_rows(trained_raw, read_raw(randomized, images), valid))
        if d < lfdr_draws(draws):
            lfdr.append(map_spearman(trained, randomized(images, ids))["lfdr"])
    empty = torch.empty(0, len(ids), dtype=torch.float64)
    return {"raw": torch.stack(raw) if raw else empty, "lfdr": torch.stack(lfdr) if lfdr else empty}


def draw_keys(draws: int) -> list[str]:
    """The names of the per-draw means (``raw@0``, ..., ``lfdr@0``, ...): fixed by ``draws``, so every rank holds the
    same states."""
    return [f"raw@{d}" for d in range(draws)] + [f"lfdr@{d}" for d in range(lfdr_draws(draws))]


def per_draw_scores(rho: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each draw's per-image correlations under its :func:`draw_keys` name (their mean over images, NaNs left out,
    is the draw's mean; summed over ranks by :class:`~attnreg_lightning.metrics.MeanScores`)."""
    return {f"{name}@{d}": values for name in MAPS for d, values in enumerate(rho[name])}


def per_image(rho: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each image's mean correlation over the draws (NaN draws left out; NaN if none), under the logged keys."""
    return {key: torch.nanmean(rho[name], dim=0) for name, key in zip(MAPS, SANITY_KEYS, strict=True)}


def summarize(means: dict[str, float], draws: int) -> dict[str, float]:
    """From the per-draw means over images (``{"raw@d": ...}``, finite ones), each map's mean over draws, the sd of
    the per-draw means over draws (``_sd``, ``ddof=1``; from two draws) and their number (``_draws``)."""
    out: dict[str, float] = {}
    for name, key in zip(MAPS, SANITY_KEYS, strict=True):
        n = draws if name == "raw" else lfdr_draws(draws)
        values = np.asarray([means[f"{name}@{d}"] for d in range(n) if f"{name}@{d}" in means], dtype=np.float64)
        if values.size:
            out[key] = float(values.mean())
            out[f"{key}_draws"] = float(values.size)
        if values.size > 1:
            out[f"{key}_sd"] = float(values.std(ddof=1))
    return out


def intervals(values: dict[str, float]) -> dict[str, tuple[float, float]]:
    """The 95% interval of each logged mean over draws (from two draws), Student's as the run's other intervals
    (docs/method.md, section 10) with the draws in place of the images: ``mean +- t(n - 1) * sd / sqrt(n)``, ``n``
    the draws, clipped to a correlation's [-1, 1]. It is the draws' randomness, for these probes: the mean over all
    re-initializations lies in it with 95% confidence (another seed's mean, within ``sqrt(2)`` times its
    half-width)."""
    out = {}
    for key in SANITY_KEYS:
        if f"{key}_sd" in values:
            n = round(values[f"{key}_draws"])
            half = t_quantile(n - 1) * values[f"{key}_sd"] / math.sqrt(n)
            # a correlation's: clipped to [-1, 1] (from few draws, t's tail reaches far beyond)
            out[key] = (max(-1.0, values[key] - half), min(1.0, values[key] + half))
    return out


def describe(values: dict[str, float]) -> list[str]:
    """One line per logged mean of ``values`` (:func:`summarize`'s), for people: the mean, its 95% interval over
    draws, the draws and one draw's sd; then what the numbers mean."""
    spans = intervals(values)
    lines = []
    for key in SANITY_KEYS:
        if key not in values:
            continue
        line = f"{key}: {values[key]:.3f}"
        if key in spans:
            lo, hi = spans[key]
            line += f", 95% interval [{lo:.3f}, {hi:.3f}] over {values[f'{key}_draws']:.0f} draws"
            line += f" (one draw's sd {values[f'{key}_sd']:.2f})"
        else:
            line += f" (over {values[f'{key}_draws']:.0f} draw: no spread)"
        lines.append(line)
    if lines:
        lines.append(
            "(model randomization: near 0, the maps follow the last block's weights, trained or not; near 1, they "
            "ignore them; docs/method.md)"
        )
    return lines
