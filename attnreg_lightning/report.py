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
    "lfdr/roi_f1": "F1 of the tokens the lfdr map keeps against the object's tokens, mean over images",
    "topk/roi_f1": "F1 of a global top-k at the lfdr map's mean kept fraction: the baseline for lfdr/roi_f1",
    "null_srmsd": "signed RMSD of the null images' p-values from uniform (0 = calibrated, > 0 anti-conservative)",
    "stability/lfdr_iou": "IoU of the probes' lfdr-kept tokens with the previous explained run (1 = unchanged)",
    "stability/lfdr_iou_first": "the same against the first explained run: how far the maps moved in all",
    "stability/z_spearman": "Spearman correlation of the probes' z with the previous run's",
    "lfdr/comprehensiveness": "drop of the predicted class's probability when the lfdr map's tokens are removed",
    "topk@lfdr/comprehensiveness": "the same for the k tokens of highest raw attention (k = the lfdr map's size)",
    "random@lfdr/comprehensiveness": "the same for k random tokens: the floor a faithful map must beat",
    "lfdr/sufficiency": "drop of that probability when only the lfdr map's tokens are kept (lower is better)",
    "raw/deletion_auc": "area under the probability as raw attention's top tokens are removed (lower is better)",
    "sanity/raw_spearman": "Spearman of raw maps with a last-block-randomized model's (near 1: the map ignores it)",
    "sanity/lfdr_spearman": "the same for the lfdr maps",
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


def metric_plots(history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> Figure | None:
    """Small multiples: each key's value at every explained run (``history`` rows carry a ``stage``)."""
    keys = [k for k in keys if any(math.isfinite(row.get(k, math.nan)) for row in history)]
    if not keys:
        return None
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 2.6 * rows), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols)).reshape(-1)
    labels = [str(row["stage"]) for row in history]
    for ax, key in zip(axes, keys, strict=False):
        ax.plot(range(len(history)), [row.get(key, math.nan) for row in history], marker="o")
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(history)), labels, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return fig


def write_report(
    path: str | Path,
    history: Sequence[Mapping[str, float]],
    pictures: Sequence[tuple[np.ndarray, str]],
    config: Mapping,
    prefix: str = "attnreg",
    title: str = "Attention regularization report",
) -> Path:
    """Write the report; ``history`` holds each explained run's logged values (``<prefix>/...`` keys and a
    ``stage``), ``pictures`` the ``(uint8 image, caption)`` to show (evolution first, then the latest rows)."""
    path = Path(path)
    keys = [f"{prefix}/{k}" for k in HEADLINE]
    last = history[-1] if history else {}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1800px}img{max-width:100%}"
        "td,th{padding:2px 10px;text-align:left;vertical-align:top}pre{background:#f4f4f4;padding:1em}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>{len(history)} explained run(s): {html.escape(', '.join(str(r['stage']) for r in history))}.</p>",
        "<h2>Headline metrics</h2><table><tr><th>metric</th><th>last run</th><th>what it means</th></tr>",
    ]
    for key, meaning in HEADLINE.items():
        value = last.get(f"{prefix}/{key}")
        shown = "–" if value is None or not math.isfinite(value) else f"{value:.4g}"
        parts.append(f"<tr><td><code>{prefix}/{key}</code></td><td>{shown}</td><td>{html.escape(meaning)}</td></tr>")
    parts.append("</table>")
    plots = metric_plots(history, keys)
    if plots is not None:
        parts.append(f"<h2>By explained run</h2><img src='{_png(plots)}' alt='headline metrics by run'>")
    if pictures:
        parts.append("<h2>Pictures</h2>")
        for image, caption in pictures:
            parts.append(f"<figure><img src='{_png(image)}' alt='{html.escape(caption)}'>")
            parts.append(f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
