"""The report's plots and table as a reader takes them: axes that do not make a non-change look like one, the value of
each metric with the run it comes from, captions above their pictures. (test_app_run.py reads a real report as
Chromium lays it out.)"""

from __future__ import annotations

import re

import numpy as np

from attnreg_lightning.report import metric_plots, write_report


def _ylim(history, key):
    (ax,) = [ax for ax in metric_plots(history, [key]).axes if ax.get_visible()]
    return ax.get_ylim()


def test_axes_of_counts_start_at_zero_and_equal_values_do_not_zoom_in():
    # 64 images explained at both runs: drawn on 0..64, not on 63..65 where any wobble would fill the plot
    rows = [{"stage": s, "attnreg/explained": 64.0, "attnreg/lfdr_fit_failed": 0.0} for s in ("epoch0", "validate")]
    lo, hi = _ylim(rows, "attnreg/explained")
    assert lo <= 0 < 64 <= hi and hi - lo < 80
    lo, hi = _ylim(rows, "attnreg/lfdr_fit_failed")
    assert lo <= 0 and hi >= 1  # none failed: an axis of a count, not of nothing
    # a share whose intervals have no width (every image alike) and a change in the 4th decimal: no interval scale to
    # zoom to, so the axis spans NO_INTERVAL_SPAN of the share's range and the change stays a hair
    rows = [
        {"stage": "epoch0", "attnreg/lfdr/sparsity": 0.5, "intervals": {"attnreg/lfdr/sparsity": [0.5, 0.5]}},
        {"stage": "epoch1", "attnreg/lfdr/sparsity": 0.5001, "intervals": {"attnreg/lfdr/sparsity": [0.5001, 0.5001]}},
    ]
    lo, hi = _ylim(rows, "attnreg/lfdr/sparsity")
    assert hi - lo >= 0.05 and 1e-4 / (hi - lo) < 0.01


def test_each_metrics_value_names_an_earlier_run_and_captions_come_before_their_pictures(tmp_path):
    history = [
        {"stage": "epoch0", "attnreg/pi0": 0.7, "attnreg/sanity/lfdr_spearman": 0.06, "attnreg/null_srmsd": np.nan,
         "intervals": {"attnreg/pi0": [0.6, 0.8], "attnreg/sanity/lfdr_spearman": [0.01, 0.11]}},
        {"stage": "validate", "attnreg/pi0": 0.71, "intervals": {"attnreg/pi0": [0.65, 0.77]}},
    ]  # fmt: skip
    pictures = [(np.full((4, 6, 3), i * 60, np.uint8), f"picture {i}") for i in range(3)]
    page = write_report(tmp_path / "r.html", history, pictures, {}).read_text()
    rows = re.findall(r"<tr><td><code>([^<]*)</code></td><td>([^<]*)</td><td>([^<]*)</td>", page)
    # a row for each key some run computed (the sRMSD, NaN at its only run, has none); the last run's value, or the
    # last value of a key the last run did not compute, said to be of its run
    assert rows == [
        ("attnreg/pi0", "0.71", "[0.65, 0.77]"),
        ("attnreg/sanity/lfdr_spearman", "0.06 (epoch0)", "[0.01, 0.11]"),
    ]
    assert "last run (validate" in page
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert len(figures) == 3
    for i, figure in enumerate(figures):
        assert re.fullmatch(rf"\s*<figcaption>picture {i}</figcaption>\s*<img [^>]*alt='picture {i}'>\s*", figure)


def test_intervals_stay_inside_a_metrics_natural_range():
    """A t interval of a mean over few images can reach past what the metric can take (pi0 [0.33, 1.02]); shown, it
    stops at the range's end. A reliance is a probability drop, negative too."""
    from attnreg_lightning.report import interval_of, natural_range

    row = {"intervals": {"attnreg/pi0": [0.33, 1.02], "attnreg/shortcut/reliance": [-0.2, 0.1]}}
    assert interval_of(row, "attnreg/pi0") == (0.33, 1.0)
    assert interval_of(row, "attnreg/shortcut/reliance") == (-0.2, 0.1)
    assert natural_range("attnreg/sanity/raw_spearman_draws") == (0.0, np.inf)
