"""What users see: per-head metric keys describe their head, the pictures' colours, and the W&B mask overlays.

Pictures are checked on the rendered uint8 arrays: panels are found by their ink on the white figure, and a
token's colour is read at its centre in the panel (tokens are ~40 px squares, so the read has ample margin).
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import timm
import torch
from matplotlib.colors import to_rgb

from attnreg_lightning import loggers as loggers_module
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.loggers import MASK_KEY, PictureRow, log_pictures
from attnreg_lightning.metrics import MeanScores, head_score_keys, head_scores
from attnreg_lightning.probes import ProbeBook
from attnreg_lightning.regularize import RegularizedAttention, Thresholds, regularize
from attnreg_lightning.stats import Significance, significance
from attnreg_lightning.viz import (
    MASK_CLASSES,
    REMOVED_COLOUR,
    attention_scale,
    display_uint8,
    evolution_picture,
    heads_picture,
    mask_classes,
    picture_row,
)

F64 = torch.float64
CYAN = np.round(np.array(to_rgb(REMOVED_COLOUR)) * 255).astype(int)


def _sig(z, p, lfdr, valid=None) -> Significance:
    """A crafted significance for ``[B, T]`` statistics (q = 1: the q map keeps nothing)."""
    z, p, lfdr = (torch.as_tensor(v, dtype=F64) for v in (z, p, lfdr))
    b, t = z.shape
    return Significance(
        z=z,
        z_null=torch.zeros(b, 4, t, dtype=F64),
        p=p,
        pi0=torch.ones(b, dtype=F64),
        lfdr=lfdr,
        q=torch.ones(b, t, dtype=F64),
        valid=torch.ones(b, dtype=torch.bool) if valid is None else torch.as_tensor(valid),
        fit_ok=torch.ones(b, dtype=torch.bool),
        clamped=torch.zeros(b, dtype=torch.long),
    )


# --- 1. per-head keys describe their head ------------------------------------------------------------------


def test_head_scores_describe_their_own_head_on_crafted_per_head_results():
    # 3 images x 3 heads, image-major rows (b * H + h); head h of image b keeps kept[b][h] of 10 tokens and
    # has found[b][h] tokens with lfdr <= lfdr_th. Image 2 is invalid for one head: left out of every head.
    b, heads, t = 3, 3, 10
    kept = [[1, 5, 9], [2, 6, 10], [7, 7, 7]]
    found = [[0, 3, 8], [4, 4, 9], [1, 1, 1]]
    attention = torch.rand(b * heads, t, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.1
    lfdr = torch.ones(b * heads, t, dtype=F64)
    lfdr_map = torch.zeros(b * heads, t, dtype=F64)
    for i in range(b):
        for h in range(heads):
            lfdr[i * heads + h, : found[i][h]] = 0.1
            lfdr_map[i * heads + h, : kept[i][h]] = attention[i * heads + h, : kept[i][h]]
    valid = torch.ones(b * heads, dtype=torch.bool)
    valid[2 * heads + 1] = False
    zeros = torch.zeros(b * heads, t)
    per = RegularizedAttention(attention, _sig(zeros, zeros + 1, lfdr, valid), {"lfdr": lfdr_map}, Thresholds())
    reg = RegularizedAttention(
        attention.view(b, heads, t).mean(1), _sig(zeros[:b], zeros[:b] + 1, zeros[:b] + 1), {}, Thresholds()
    )
    reg.per_head = per

    scores = head_scores(reg, heads)
    assert set(scores) == set(head_score_keys(heads))
    for h in range(heads):
        sparsity = [1 - kept[i][h] / t for i in range(2)]  # images 0 and 1: image 2 is invalid
        discoveries = [found[i][h] / t for i in range(2)]
        np.testing.assert_allclose(scores[f"head{h}/lfdr/sparsity"].numpy(), sparsity)
        np.testing.assert_allclose(scores[f"head{h}/discoveries"].numpy(), discoveries)
    # the logged means (the callback prefixes these keys with "attnreg/")
    mean = MeanScores(head_score_keys(heads))
    mean.update(scores)
    logged = {k: float(v) for k, v in mean.compute().items()}
    assert logged["head0/lfdr/sparsity"] == pytest.approx((0.9 + 0.8) / 2)
    assert logged["head2/lfdr/sparsity"] == pytest.approx((0.1 + 0.0) / 2)
    assert logged["head1/discoveries"] == pytest.approx((0.3 + 0.4) / 2)


def test_engine_per_head_rows_and_head_keys_follow_each_head_of_a_real_vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=3
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine = AttentionRegularizer(model, n_bootstrap=30, heads="all")
    reg = engine(images, [0, 1])
    heads, b = 3, 2
    # the oracle: each head on its own, from the same forward passes (observe is seeded by the sample ids)
    obs, null = engine.observe(images, [0, 1])  # [B, H, T], [B, N, H, T]
    assert obs.shape == (b, heads, 16)
    np.testing.assert_allclose(reg.per_head.attention.view(b, heads, -1).numpy(), obs.numpy())
    oracle = {}
    for h in range(heads):
        sig = significance(obs[:, h], null[:, :, h])
        one = regularize(obs[:, h], sig, grid=(4, 4), pixels_per_token=64)
        assert bool(sig.valid.all())
        oracle[f"head{h}/lfdr/sparsity"] = (one.maps["lfdr"] == 0).double().mean(1)
        oracle[f"head{h}/discoveries"] = (sig.lfdr <= one.thresholds.lfdr_th).double().mean(1)
    scores = head_scores(reg, heads)
    for key, expected in oracle.items():
        np.testing.assert_allclose(scores[key].numpy(), expected.numpy(), err_msg=key)
    # the heads differ here, so a head swap or a heads/images transpose gives other numbers
    table = torch.stack([oracle[f"head{h}/discoveries"] for h in range(heads)], 1)  # [B, H]
    head_major = table.flatten().view(heads, b).t()  # the rows read as if they were head-major
    assert not torch.equal(table, head_major)
    assert len({tuple(table[:, h].tolist()) for h in range(heads)}) == heads


# --- 2. pictures: a probe's fixed colour scale, removed tokens in cyan -------------------------------------


def _runs(ink: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, ink.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2], strict=True))


def _panels(pic: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """``(x0, x1, y0, y1)`` of the ``n`` panel images of a row of panels: the rows that cross exactly ``n`` long
    inked runs (titles and colour bars cross fewer or shorter ones)."""
    ink = pic.min(axis=2) < 245
    rows = [y for y in range(pic.shape[0]) if len([r for r in _runs(ink[y]) if r[1] - r[0] > 80]) == n]
    assert rows, "no row crosses every panel"
    block = np.split(np.array(rows), np.flatnonzero(np.diff(rows) > 1) + 1)
    ys = max(block, key=len)
    xs = [r for r in _runs(ink[ys[len(ys) // 2]]) if r[1] - r[0] > 80]
    return [(x0, x1, int(ys[0]), int(ys[-1]) + 1) for x0, x1 in xs]


def _colour(pic: np.ndarray, box, token: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """The colour drawn at a token's centre; the 7x7 pixels around it must agree (else the read is off)."""
    x0, x1, y0, y1 = box
    y = int(y0 + (token[0] + 0.5) * (y1 - y0) / grid[0])
    x = int(x0 + (token[1] + 0.5) * (x1 - x0) / grid[1])
    patch = pic[y - 3 : y + 4, x - 3 : x + 4].reshape(-1, 3)
    assert (patch == patch[0]).all(), f"token {token} is not uniform around ({x}, {y})"
    return patch[0].astype(int)


def _inferno(value: float, scale: tuple[float, float]) -> np.ndarray:
    lo, hi = scale
    return np.array(matplotlib.colormaps["inferno"]((value - lo) / (hi - lo), bytes=True)[:3], dtype=int)


def _close(a: np.ndarray, b: np.ndarray, tol: int = 2) -> bool:
    return bool(np.abs(a - b).max() <= tol)


GRID = (4, 4)
BLACK = torch.zeros(3, 32, 32)  # a constant input: drawn black


def _one_image(raw: np.ndarray, lfdr_keep: np.ndarray) -> RegularizedAttention:
    """Image of raw attention ``raw`` [16] whose lfdr map keeps ``lfdr_keep`` (z >= 0 everywhere)."""
    lfdr = np.where(lfdr_keep, 0.05, 0.9)
    return regularize(torch.tensor(raw[None]), _sig(np.ones((1, 16)), np.full((1, 16), 0.5), lfdr[None]), grid=GRID)


def test_geometry_reads_the_token_it_aims_at():
    # one distinct token on each map: the sampler must find it where it is, not mirrored or transposed, and
    # the token maps line up with the input panel
    raw = np.full(16, 0.01)
    raw[1 * 4 + 3] = 0.2  # row 1, column 3: the raw panel's only bright token
    keep = np.ones(16, bool)
    keep[2 * 4 + 0] = False  # row 2, column 0: the lfdr map's only removed token
    image = torch.zeros(3, 32, 32)
    image[0, 8:16, 24:32] = 1  # the input's patch at row 1, column 3: drawn red on black
    pic = picture_row(image, _one_image(raw, keep), 0, ["lfdr"])
    boxes = _panels(pic, 6)
    scale = attention_scale(raw)
    for r in range(4):
        for c in range(4):
            assert (_colour(pic, boxes[0], (r, c), GRID) == ([255, 0, 0] if (r, c) == (1, 3) else [0, 0, 0])).all()
            bright = (r, c) == (1, 3)
            assert _close(_colour(pic, boxes[1], (r, c), GRID), _inferno(raw[r * 4 + c], scale)), (r, c)
            assert bright == _close(_colour(pic, boxes[1], (r, c), GRID), _inferno(0.2, scale))
            assert ((r, c) == (2, 0)) == _close(_colour(pic, boxes[5], (r, c), GRID), CYAN), (r, c)


def test_probe_colour_scale_is_the_first_runs_at_every_run():
    # a probe seen at three runs: token 5 holds 0.05 throughout while the rest of the map changes range
    rng = np.random.default_rng(0)
    runs = [rng.uniform(0.01, 0.09, 16), rng.uniform(0.02, 0.06, 16), rng.uniform(0.03, 0.2, 16)]
    for raw in runs:
        raw[5] = 0.05
    keep = np.ones(16, bool)
    book, pictures = ProbeBook(), []
    for epoch, raw in enumerate(runs):
        # the callback's order: observe (the run's own scale offered), then draw with the probe's scale
        book.observe(7, keep, np.zeros(16), attention_scale(raw))
        book.add_history(7, f"epoch{epoch}", raw.reshape(GRID), raw.reshape(GRID), display_uint8(BLACK))
        if epoch != 1:  # drawn at the first and the third run
            pictures.append(picture_row(BLACK, _one_image(raw, keep), 0, ["lfdr"], scale=book.scale(7)))
        book.end_run()
    first = attention_scale(runs[0])
    assert book.scale(7) == first
    assert attention_scale(runs[2]) != first  # the third run's own range is another one
    expected = _inferno(0.05, first)
    assert not _close(expected, _inferno(0.05, attention_scale(runs[2])), tol=10)
    for pic in pictures:
        boxes = _panels(pic, 6)
        for panel in (1, 5):  # raw attention and the lfdr map: one scale
            assert _close(_colour(pic, boxes[panel], (1, 1), GRID), expected), panel
    # the end-of-fit evolution picture: the record's scale for every run's column
    record = book.records[7]
    evo = evolution_picture(record.image, record.history, record.scale)
    top, bottom = evo[: evo.shape[0] // 2], evo[evo.shape[0] // 2 :]
    for half in (top, bottom):
        boxes = _panels(half, 4)
        for col in (1, 2, 3):
            assert _close(_colour(half, boxes[col], (1, 1), GRID), expected), col


def test_removed_tokens_are_cyan_and_kept_low_tokens_the_low_end():
    raw = np.linspace(0.01, 0.16, 16)
    keep = np.zeros(16, bool)
    keep[[0, 6, 15]] = True  # the lowest token (the scale's low end), a middle one and the highest
    reg = _one_image(raw, keep)
    scale = attention_scale(raw)
    low = _inferno(raw[0], scale)
    assert min(np.abs(_inferno(v, (0, 1)) - CYAN).max() for v in np.linspace(0, 1, 256)) > 40  # not in inferno
    pic = picture_row(BLACK, reg, 0, ["lfdr", "zreg"])
    boxes = _panels(pic, 7)
    for t in range(16):
        token = divmod(t, 4)
        lfdr_colour, zreg_colour = _colour(pic, boxes[5], token, GRID), _colour(pic, boxes[6], token, GRID)
        assert _close(zreg_colour, _inferno(raw[t], scale)), t  # z >= 0 everywhere: zreg keeps every token
        if keep[t]:
            assert _close(lfdr_colour, _inferno(raw[t], scale)), t
        else:
            assert _close(lfdr_colour, CYAN), t
            assert not _close(lfdr_colour, low, tol=40), t
    assert _close(_colour(pic, boxes[5], (0, 0), GRID), low)  # kept at the low end: black, not cyan

    # the evolution picture's lfdr row, and each head's lfdr map, alike
    history = [("epoch0", raw.reshape(GRID), reg.maps["lfdr"][0].numpy().reshape(GRID))]
    evo = evolution_picture(display_uint8(BLACK), history, scale)
    bottom = evo[evo.shape[0] // 2 :]
    heads = 3
    per = regularize(
        torch.tensor(np.tile(raw, (heads, 1))),
        _sig(np.ones((heads, 16)), np.full((heads, 16), 0.5), np.tile(np.where(keep, 0.05, 0.9), (heads, 1))),
        grid=GRID,
    )
    hp = heads_picture(BLACK, per, 0, heads)
    for pic_, box in [(bottom, _panels(bottom, 2)[1]), *((hp, b) for b in _panels(hp, 1 + heads)[1:])]:
        for t in range(16):
            colour = _colour(pic_, box, divmod(t, 4), GRID)
            assert _close(colour, _inferno(raw[t], scale) if keep[t] else CYAN), t


# --- 3. W&B mask overlays: every class is the class its name says -------------------------------------------


class _CaptureWandb(loggers_module.WandbLogger):
    """A WandbLogger that keeps what it is asked to log (no run)."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(metrics)


def test_mask_overlay_classes_are_what_their_names_say(monkeypatch):
    # a 2x3 grid, one token per case; "kept by p" is the p map keeping it (p <= p_th and z >= z_th)
    #            token:   0      1      2      3      4      5
    p = np.array([[0.9, 0.01, 0.9, 0.01, 0.01, 0.01]])
    lfdr = np.array([[0.9, 0.9, 0.05, 0.05, 0.9, 0.05]])
    z = np.array([[1.0, 1.0, 1.0, 1.0, -1.0, 1.0]])  # token 4: p small but z below z_th, so removed by p
    names = {
        0: "removed by p and lfdr",
        1: "kept by p only",
        2: "kept by lfdr only",
        3: "kept by p and lfdr",
        4: "removed by p and lfdr",
        5: "kept by p and lfdr",
    }
    reg = regularize(torch.tensor([[0.1, 0.2, 0.15, 0.25, 0.12, 0.18]]), _sig(z, p, lfdr), grid=(2, 3))
    assert ((reg.maps["p"][0] > 0).tolist(), (reg.maps["lfdr"][0] > 0).tolist()) == (
        [False, True, False, True, False, True],
        [False, False, True, True, False, True],
    )
    image = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))  # patches of 8 px
    base = display_uint8(image)
    mask = mask_classes(reg, 0, base.shape[:2])
    assert mask.shape == base.shape[:2] and mask.dtype == np.uint8
    tile = (base.shape[0] // 2, base.shape[1] // 3)
    for t, name in names.items():
        r, c = divmod(t, 3)
        block = mask[r * tile[0] : (r + 1) * tile[0], c * tile[1] : (c + 1) * tile[1]]
        assert (block == block[0, 0]).all(), t
        assert MASK_CLASSES[int(block[0, 0])] == name, t

    # what W&B is given: the same class ids and labels, over the input as drawn
    import wandb

    given = []

    class Image(wandb.Image):
        def __init__(self, data, *args, **kwargs):
            given.append((data, kwargs))
            super().__init__(data, *args, **kwargs)

    monkeypatch.setattr(wandb, "Image", Image)
    logger = _CaptureWandb()
    row = PictureRow(np.zeros((8, 8, 3), np.uint8), "id 0", {"x": 1.0}, base, mask)
    log_pictures([logger], [row], torch.zeros(6), torch.zeros(24), step=3, stage="epoch0")
    assert len(logger.logged[0][f"attnreg/{MASK_KEY}"]) == 1
    overlays = [(data, kw) for data, kw in given if "masks" in kw]
    assert len(overlays) == 1
    data, kwargs = overlays[0]
    assert data is base
    (layer,) = kwargs["masks"].values()
    np.testing.assert_array_equal(layer["mask_data"], mask)
    labels = layer["class_labels"]
    assert all(isinstance(k, int) for k in labels)
    for t, name in names.items():
        r, c = divmod(t, 3)
        assert labels[int(layer["mask_data"][r * tile[0], c * tile[1]])] == name, t


def test_colour_bar_labels_read_as_the_values_they_mark():
    # a label rounded to too few decimals (0.25 drawn as "0.2") would misstate where the bar's colours lie
    from attnreg_lightning.viz import _ticks

    for lo, hi in [(0.0, 1.0), (0.0144, 0.0168), (0.0148, 0.0165), (-2.7, 2.7), (1e-6, 3e-6), (1.02e-7, 1.09e-7),
                   (0.0, 2.4), (3.0, 7.0)]:  # fmt: skip
        ticks = _ticks(lo, hi)
        assert len(ticks) >= 2, (lo, hi)
        assert len({label for _, label in ticks}) == len(ticks), ticks  # no two ticks read alike
        step = ticks[1][0] - ticks[0][0]
        for value, label in ticks:
            assert lo - 1e-12 <= value <= hi + 1e-12
            assert abs(float(label) - value) <= step * 1e-3, (lo, hi, value, label)
