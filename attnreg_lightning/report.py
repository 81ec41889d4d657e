"""A self-contained HTML report of a run's explanations: headline metrics by run (plots), the evolution and
latest pictures, the config and what each metric means. Images are embedded; no logger knowledge.

    write_report("report.html", history, pictures, config, prefix="attnreg")
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HEADLINE = {
    "discoveries": "fraction of tokens with lfdr ≤ lfdr_th, mean over images",
    "pi0": "Storey's estimate of the share of null tokens, mean over images",
    "lfdr/sparsity": "fraction of tokens the lfdr map removes, mean over images",
    "raw/roi_mass": "share of the raw attention on the object, pooled over images",
    "lfdr/roi_mass": "share of the lfdr map's attention on the object, pooled",
    "lfdr/roi_kept": "share of the object's raw attention the lfdr map keeps, pooled",
    "lfdr/noise_kept": "share of the noise squares' raw attention the lfdr map keeps, pooled (lower is better)",
    "raw/shortcut_mass": "share of the raw attention on the marked shortcut cue, pooled over images",
    "lfdr/shortcut_kept": "share of the cue's raw attention the lfdr map keeps, pooled",
    "shortcut/reliance": "drop of the predicted class's probability when the cue's tokens are removed: does the "
    "prediction use the cue, whatever the attention shows?",
    "same_k_random@shortcut/reliance": "the same for as many random tokens: the floor",
    "lfdr/roi_f1": "F1 of the tokens the lfdr map keeps against the object's tokens, mean over images",
    "topk/roi_f1": "F1 of a global top-k at the lfdr map's mean kept fraction: the baseline for lfdr/roi_f1",
    "null_srmsd": "signed RMSD of the null images' p-values from uniform (0 = calibrated, > 0 anti-conservative)",
    "stability/lfdr_iou": "IoU of the probes' lfdr-kept tokens with the previous explained run (1 = unchanged)",
    "stability/lfdr_iou_first": "the same against the first explained run: how far the maps moved in all",
    "stability/z_spearman": "Spearman correlation of the probes' z with the previous run's",
    "lfdr/comprehensiveness": "drop of the predicted class's probability when the lfdr map's tokens are removed",
    "fixed_k_top@lfdr/comprehensiveness": "the same for each image's top k raw tokens, one k for all (the run's mean "
    "lfdr kept fraction): what the per-image k must beat",
    "same_k_random@lfdr/comprehensiveness": "the same for k random tokens (k = the image's lfdr map size): the floor",
    "lfdr/sufficiency": "drop of that probability when only the lfdr map's tokens are kept (lower is better)",
    "raw/deletion_auc": "area under the probability as raw attention's top tokens are removed (lower is better)",
    "sanity/raw_spearman": "Spearman of raw maps with those of the model with its last block re-initialized, mean over "
    "draws (interval: over draws): near 0 the maps follow the block, trained or not (measured: 0.01 trained, 0.01 "
    "untrained); near 1 they ignore it",
    "sanity/lfdr_spearman": "the same for the lfdr maps (measured: 0.06 trained, -0.01 untrained; method.md)",
    "lfdr_fit_failed": "images whose local-FDR density fit diverged (their lfdr is 1)",
    "explained": "images explained in the run",
}
"""Headline metrics (keys after the callback's prefix) and one line on what each means."""


def _png(image: np.ndarray | Figure) -> str:
    """An embeddable ``data:`` URL of a uint8 ``[H, W, 3]`` array or a matplotlib figure."""
    buffer = io.BytesIO()
    if isinstance(image, Figure):
        FigureCanvasAgg(image)
        image.savefig(buffer, format="png")
    else:
        from PIL import Image

        Image.fromarray(image).save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


COUNTS = (
    "explained", "lfdr_fit_failed", "skipped_degenerate", "skipped_nonfinite_attention", "skipped_error",
    "clamped_tokens", "_undefined", "_draws",
)  # fmt: skip
NO_INTERVAL_SPAN = 0.05
"""Without an interval, a plot's y axis spans at least this share of the metric's natural range."""
INTERVAL_SPAN = 0.01
"""With intervals, at least this share of it (besides the intervals' own span)."""


def natural_range(key: str) -> tuple[float, float] | None:
    """The range a metric's values take by definition (counts: ``[0, inf)``); None where unbounded (entropy)."""
    name = key.rsplit("/", 1)[-1]
    if name.endswith(COUNTS):
        return (0.0, math.inf)
    if name == "entropy":
        return None
    if name.endswith("_percentile"):
        return (0.0, 100.0)
    if name.endswith(("spearman", "comprehensiveness", "sufficiency", "reliance", "srmsd")):
        return (-1.0, 1.0)
    return (0.0, 1.0)  # shares, fractions, F1, IoU, Gini, pi0, AUCs of probabilities


def interval_of(row: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """The row's 95% interval of ``key`` (``row["intervals"]``), None where it has none (older rows, counts); kept
    inside the metric's natural range (a t interval of a mean over few images can reach past it: pi0 [0.33, 1.02])."""
    bounds = (row.get("intervals") or {}).get(key)
    if bounds is None or not all(math.isfinite(b) for b in bounds):
        return None
    lo, hi = float(bounds[0]), float(bounds[1])
    natural = natural_range(key)
    if natural is not None:
        lo, hi = max(lo, natural[0]), min(hi, natural[1])
    return lo, hi


def y_limits(key: str, values: Sequence[float], intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """A plot's y range: all values and intervals, spanning at least the intervals' span and
    ``INTERVAL_SPAN`` of the natural range (``NO_INTERVAL_SPAN`` without an interval of any width; 10% of the
    largest value for an unbounded metric), inside the natural range where the data are, plus 5% margins. A count
    is drawn from 0 (64 images explained at two runs is not a change of 0 on a 63-65 axis)."""
    values = [v for v in values if math.isfinite(v)]
    points = values + [b for bounds in intervals for b in bounds]
    low, high = min(points), max(points)
    natural = natural_range(key)
    if key.rsplit("/", 1)[-1].endswith(COUNTS):
        span = max(high, 1.0)
        return -0.05 * span, 1.05 * span
    # an interval of no width (every image alike, or a single image) says nothing of the scale of the noise
    widths = any(hi > lo for lo, hi in intervals)
    if natural is not None:
        floor = (INTERVAL_SPAN if widths else NO_INTERVAL_SPAN) * (natural[1] - natural[0])
    else:
        floor = 0.1 * max(abs(v) for v in points) or 1.0
    span = max(high - low, floor)
    mid = (low + high) / 2
    lo, hi = mid - span / 2, mid + span / 2
    if natural is not None:  # keep the axis inside the natural range while the data are
        if lo < natural[0] <= low:
            lo, hi = natural[0], natural[0] + span
        elif hi > natural[1] >= high:
            lo, hi = natural[1] - span, natural[1]
    return lo - 0.05 * span, hi + 0.05 * span


def metric_plots(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Figure | None:
    """Small multiples: each key's value at every explained run (``history`` rows carry a ``stage`` and, where
    known, ``intervals``: ``{key: [lo, hi]}``, drawn as error bars). The y axis never zooms below the
    intervals' span (nor below a share of the metric's natural range, :func:`y_limits`), so a change inside the
    noise does not look like a cliff."""
    keys = [k for k in keys if any(math.isfinite(row.get(k, math.nan)) for row in history)]
    if not keys:
        return None
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 2.6 * rows), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols)).reshape(-1)
    labels = [str(row["stage"]) for row in history]
    for ax, key in zip(axes, keys, strict=False):
        values = [row.get(key, math.nan) for row in history]
        ax.plot(range(len(history)), values, marker="o")
        known = []  # (run, value, interval) where the run has both
        for x, (row, v) in enumerate(zip(history, values, strict=True)):
            bounds = interval_of(row, key)
            if bounds is not None and math.isfinite(v):
                known.append((x, v, bounds))
        if known:
            x, v, bounds = zip(*known, strict=True)
            below = [max(0.0, vi - lo) for vi, (lo, _) in zip(v, bounds, strict=True)]
            above = [max(0.0, hi - vi) for vi, (_, hi) in zip(v, bounds, strict=True)]
            ax.errorbar(x, v, yerr=[below, above], fmt="none", ecolor="C0", elinewidth=1, capsize=3, alpha=0.7)
        ax.set_ylim(*y_limits(key, values, [bounds for _, _, bounds in known]))
        ax.set_xlim(-0.4, len(history) - 0.6)  # every run's place, bars clear of the frame
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(history)), labels, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return fig


def headline_summary(row: Mapping[str, Any], prefix: str = "attnreg") -> dict[str, dict[str, Any]]:
    """One history row's headline metrics: ``{"<prefix>/<key>": {"value", "ci95": [lo, hi] or None, "meaning"}}``
    (JSON-ready; the keys the row has)."""
    out = {}
    for key, meaning in HEADLINE.items():
        value = row.get(f"{prefix}/{key}")
        if value is None or not math.isfinite(value):
            continue
        bounds = interval_of(row, f"{prefix}/{key}")
        out[f"{prefix}/{key}"] = {"value": value, "ci95": None if bounds is None else list(bounds), "meaning": meaning}
    return out


def write_report(
    path: str | Path,
    history: Sequence[Mapping[str, Any]],
    pictures: Sequence[tuple[np.ndarray, str]],
    config: Mapping,
    prefix: str = "attnreg",
    title: str = "Attention regularization report",
) -> Path:
    """Write the report; ``history`` holds each explained run's logged values (``<prefix>/...`` keys and a
    ``stage``), ``pictures`` the ``(uint8 image, caption)`` to show (evolution first, then the latest rows)."""
    path = Path(path)
    keys = [f"{prefix}/{k}" for k in HEADLINE]
    last = str(history[-1]["stage"]) if history else ""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1800px}img{max-width:100%}"
        "td,th{padding:2px 10px;text-align:left;vertical-align:top}td:nth-child(2),td:nth-child(3){white-space:nowrap}"
        "pre{background:#f4f4f4;padding:1em}figure{margin:1.5em 0}figcaption{font-weight:bold;margin-bottom:4px}"
        "</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>{len(history)} explained run(s): {html.escape(', '.join(str(r['stage']) for r in history))}.</p>",
        f"<h2>Headline metrics</h2><p>Each metric's value at the last run ({html.escape(last)}; another run where "
        "named: the last that computed it) with its 95% interval over the run's images in brackets (Student t for "
        "means, the delta method for pooled shares and the sRMSD; none for counts).</p>",
        "<table><tr><th>metric</th><th>value</th><th>95% interval</th><th>what it means</th></tr>",
    ]
    for key, meaning in HEADLINE.items():
        computed = [row for row in history if math.isfinite(row.get(f"{prefix}/{key}", math.nan))]
        if not computed:
            continue  # a key no run computed (e.g. a region the data do not mark): no row
        row = computed[-1]  # e.g. the sanity check, which only a fit's end runs, after a later validation
        value, bounds = row[f"{prefix}/{key}"], interval_of(row, f"{prefix}/{key}")
        stage = "" if row is history[-1] else f" ({html.escape(str(row['stage']))})"
        interval = "" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"
        parts.append(
            f"<tr><td><code>{prefix}/{key}</code></td><td>{value:.4g}{stage}</td><td>{interval}</td>"
            f"<td>{html.escape(meaning)}</td></tr>"
        )
    parts.append("</table>")
    plots = metric_plots(history, keys)
    if plots is not None:
        parts.append(
            "<h2>By explained run</h2><p>Bars: each run's 95% interval over its images, how far its mean could move "
            "with other images of the same kind: a change between runs well inside them is not worth reading as a "
            "trend. (The same probe images are explained at every run, so a change consistent over the images can "
            "matter even where bars overlap.)</p>"
        )
        parts.append(f"<img src='{_png(plots)}' alt='headline metrics by run'>")
    if pictures:
        parts.append("<h2>Pictures</h2>")
        for image, caption in pictures:  # the caption above its picture: below, it would read as the next one's
            parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption>")
            parts.append(f"<img src='{_png(image)}' alt='{html.escape(caption)}'></figure>")
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
