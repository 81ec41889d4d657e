"""What a user reads off the pictures and the loggers: the colour bars' ranges and pointed ends, the title's count of
kept tokens, every image's per-head picture, a row's own numbers after a skipped image, and the null z histogram.

Pictures are read on the rendered uint8 arrays: panels are found by their ink on the white figure and a token's colour
is read at its centre (as in test_pictures.py). Loggers are read back from what they wrote to disk: TensorBoard's event
file, W&B's offline run.
"""

from __future__ import annotations

import json

import lightning as L
import matplotlib
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.colors import to_rgb
from torch.utils.data import DataLoader

from attnreg_lightning.data.shapes import ShapesDataModule
from attnreg_lightning.models import ViTClassifier
from attnreg_lightning.regularize import regularize
from attnreg_lightning.stats import Significance, significance
from attnreg_lightning.viz import REMOVED_COLOUR, attention_scale, picture_row
from tests.helpers import RecordingCallback, perturb, tiny_data, tiny_module
from tests.test_pictures import _colour
from tests.wandb_reader import history_rows

F64 = torch.float64
CYAN = np.round(np.array(to_rgb(REMOVED_COLOUR)) * 255).astype(int)
GRID = (4, 4)
BLACK = torch.zeros(3, 32, 32)  # a constant input: drawn black
QUICK = {"faithfulness": "off", "sanity_check": False}  # neither is looked at here


# --- reading a picture ----------------------------------------------------------------------------------------------


def _ink(pic: np.ndarray) -> np.ndarray:
    return pic.min(axis=2) < 245


def _runs(ink: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, ink.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2], strict=True))


def _panels(pic: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """``(x0, x1, y0, y1)`` (frames included, ends exclusive) of the ``n`` panels of a row: the rows that cross
    exactly ``n`` long inked runs (titles cross short ones; colour bars are one fewer, the input has none)."""
    ink = _ink(pic)
    rows = [y for y in range(pic.shape[0]) if len([r for r in _runs(ink[y]) if r[1] - r[0] > 80]) == n]
    assert rows, "no row crosses every panel"
    block = max(np.split(np.array(rows), np.flatnonzero(np.diff(rows) > 1) + 1), key=len)
    xs = [r for r in _runs(ink[block[len(block) // 2]]) if r[1] - r[0] > 80]
    return [(int(x0), int(x1), int(block[0]), int(block[-1]) + 1) for x0, x1 in xs]


def _on(name: str, value: float, lo: float, hi: float) -> np.ndarray:
    """The colour of ``value`` on colour map ``name`` over ``[lo, hi]``."""
    return np.array(matplotlib.colormaps[name]((value - lo) / (hi - lo), bytes=True)[:3], dtype=int)


def _close(a: np.ndarray, b: np.ndarray, tol: int = 2) -> bool:
    return bool(np.abs(np.asarray(a) - np.asarray(b)).max() <= tol)


def _pointed_ends(pic: np.ndarray, box) -> tuple[bool, bool]:
    """Whether the colour bar under a panel has a pointed end at its low (left) and at its high (right) end.

    The bar is the first block of rows under the panel inked across its width (frame and strip); a pointed end
    is ink just beside the frame on the bar's middle row, and it must be the colour of that end of the strip."""
    x0, x1, _, y1 = box
    across = [y for y in range(y1, min(y1 + 40, pic.shape[0])) if _ink(pic[y : y + 1, x0:x1]).mean() > 0.95]
    assert across, "no colour bar under the panel"
    bar = [across[0]]
    while bar[-1] + 1 in across:
        bar.append(bar[-1] + 1)
    mid = bar[len(bar) // 2]
    ends = []
    # the frame is the run's first and last column; the strip's end colours sit just inside it
    for outside, inside in ((x0 - 2, x0 + 1), (x1 + 1, x1 - 2)):
        pointed = bool(_ink(pic[mid : mid + 1, outside : outside + 1]).all())
        if pointed:
            assert _close(pic[mid, outside], pic[mid, inside]), "a pointed end not in its end's colour"
        ends.append(pointed)
    return ends[0], ends[1]


def _crafted(raw: np.ndarray, p: np.ndarray, lfdr: np.ndarray, nulls: int = 4):
    """One image's result on a 4x4 grid from given statistics (z = 1: every map but lfdr/p keeps every token)."""
    t = raw.size
    sig = Significance(
        z=torch.ones(1, t, dtype=F64),
        z_null=torch.zeros(1, nulls, t, dtype=F64),
        p=torch.tensor(p[None], dtype=F64),
        pi0=torch.ones(1, dtype=F64),
        lfdr=torch.tensor(lfdr[None], dtype=F64),
        q=torch.ones(1, t, dtype=F64),
        valid=torch.ones(1, dtype=torch.bool),
        fit_ok=torch.ones(1, dtype=torch.bool),
        clamped=torch.zeros(1, dtype=torch.long),
    )
    return regularize(torch.tensor(raw[None], dtype=F64), sig, grid=GRID)


# --- 1. the -log10 p colour bar spans the pooled null ---------------------------------------------------------------


def test_minus_log10_p_bar_spans_the_pooled_null_range():
    # T observed and N * T null |z| make each image's pool, so p >= 1 / ((1 + N) T) and the bar runs from 0 to
    # log10((1 + N) T): the smallest p at its top, p = 0.1 at 1 / log10(pool) of it. A bar to log10(T) would draw
    # every p below 1 / T alike (its top) and could not depend on N.
    t = 16
    tenth = {}
    for n in (4, 20):
        pool = (1 + n) * t
        top = float(np.log10(pool))
        p = np.ones(t)
        p[[0, 1, 2]] = 1 / pool, 1 / t, 0.1
        pic = picture_row(BLACK, _crafted(np.linspace(0.01, 0.16, t), p, np.full(t, 0.9), nulls=n), 0, [])
        box = _panels(pic, 5)[3]  # input, raw, z, -log10 p, lfdr
        for token, value in ((0, top), (1, np.log10(t)), (2, 1.0), (3, 0.0)):
            assert _close(_colour(pic, box, divmod(token, 4), GRID), _on("magma", value, 0.0, top)), (n, token)
        assert not _close(_colour(pic, box, (0, 1), GRID), _on("magma", top, 0.0, top), tol=10), n  # 1/T: not the top
        assert _pointed_ends(pic, box) == (False, False), n  # no p beyond the bar
        tenth[n] = _colour(pic, box, (0, 2), GRID)
    assert not _close(tenth[4], tenth[20], tol=10)  # the bar's range is N's


# --- 2. a colour bar's pointed end is where its panel's values overflow ---------------------------------------------


def test_colour_bar_points_at_the_end_its_values_overflow():
    raw = np.linspace(0.01, 0.16, 16)
    keep = np.zeros(16, bool)
    keep[[0, 7, 15]] = True  # the lowest, a middle and the highest token
    reg = _crafted(raw, np.full(16, 0.5), np.where(keep, 0.05, 0.9))
    # (scale, ends of the raw and the lfdr map's bars): its own range -- the lfdr map's removed tokens (zero, drawn
    # cyan) are not values below it; a scale under the values; above them; inside them
    cases = [
        (None, (False, False)),
        ((0.0, 0.1), (False, True)),
        ((0.05, 0.3), (True, False)),
        ((0.05, 0.1), (True, True)),
    ]
    for scale, ends in cases:
        pic = picture_row(BLACK, reg, 0, ["lfdr"], scale=scale)
        boxes = _panels(pic, 6)  # input, raw, z, -log10 p, lfdr, lfdr map
        assert _pointed_ends(pic, boxes[1]) == ends, scale
        assert _pointed_ends(pic, boxes[5]) == ends, scale
        for panel in (2, 3, 4):  # z (+-max |z|), -log10 p, local FDR: nothing beyond their bars
            assert _pointed_ends(pic, boxes[panel]) == (False, False), (scale, panel)


@pytest.mark.parametrize(("tokens", "nulls"), [(16, 2), (36, 3)])
def test_the_smallest_possible_p_is_the_bar_top_not_beyond_it(tokens, nulls):
    # The engine's p = 1 - count / pool in float32: at its smallest positive value, 1 / pool, it rounds a little
    # below it (for these T and N), so -log10 p lands a hair above the bar's top. That token is at the top, not
    # beyond it: no pointed end. A token that beats the whole pool (p = 0) is beyond it.
    side = int(np.sqrt(tokens))
    obs = torch.linspace(0.01, 0.02, tokens)[None].repeat(2, 1)
    null = 0.01 + 0.01 * torch.rand(2, nulls, tokens, generator=torch.Generator().manual_seed(0))
    null[0, 0, 0] = 0.05  # image 0: one null value above every observed one; image 1: the top observed beats all
    sig = significance(obs, null)
    pool = (1 + nulls) * tokens
    assert sig.p.dtype == torch.float32 and float(sig.p[1].min()) == 0.0
    smallest = float(sig.p[0].min())
    assert smallest == pytest.approx(1 / pool, rel=1e-5) and -np.log10(smallest) > np.log10(pool)  # the hair above
    reg = regularize(obs, sig, grid=(side, side))
    image = torch.randn(3, 8 * side, 8 * side, generator=torch.Generator().manual_seed(1))
    for index, beyond in ((0, False), (1, True)):
        pic = picture_row(image, reg, index, [])
        assert _pointed_ends(pic, _panels(pic, 5)[3]) == (False, beyond), index


# --- real runs --------------------------------------------------------------------------------------------------------


class FirstImageConstant(L.LightningDataModule):
    """One validation batch of the tiny shapes data whose first image is constant: degenerate, skipped and counted,
    so the explained images are the batch's rows 1, 2, ... (their valid-image index one less)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.inner = tiny_data(val_size=batch_size, batch_size=batch_size)

    def setup(self, stage=None):
        self.inner.setup(stage)

    def val_dataloader(self):
        x, *rest = next(iter(self.inner.val_dataloader()))
        x = x.clone()
        x[0] = 0.25
        return DataLoader([(x, *rest)], batch_size=None)


def _validate(tmp_path, callback, data, logger=False, module=None) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.validate(module if module is not None else perturb(tiny_module()), data, verbose=False)


def _explained(cb: RecordingCallback):
    """The one explained batch's ids and result (a validate runs at epoch 0)."""
    ((ids, reg),) = cb.seen[0]
    return ids, reg


# --- 3. the title's "lfdr keeps k/T" --------------------------------------------------------------------------------


def test_title_counts_kept_tokens_out_of_the_images_own_token_count(tmp_path):
    # 56 px images in patches of 8: 49 tokens, a number nothing else in the run is (3 nulls, 147 null and 196 pooled
    # values per image, 3 heads, 4 images, 36 tokens of the 48 px helpers)
    size, tokens = 56, 49
    torch.manual_seed(0)
    kwargs = {"img_size": size, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    module = perturb(ViTClassifier("vit_tiny_patch16_224", num_classes=4, model_kwargs=kwargs))
    data = ShapesDataModule(train_size=4, val_size=4, batch_size=4, image_size=size)
    cb = RecordingCallback(n_bootstrap=3, num_images=4, log_images=4, lfdr_th=0.9, **QUICK)
    _validate(tmp_path, cb, data, module=module)
    ids, reg = _explained(cb)
    assert reg.attention.shape == (4, tokens)
    images = {int(item[3]): item[0] for item in data.val_set}
    rows = cb._last_rows
    assert [r.stats["id"] for r in rows] == ids
    kept = [int((reg.maps["lfdr"][i] > 0).sum()) for i in range(4)]
    assert any(0 < k < tokens for k in kept)  # a count that is neither none nor all
    for i, row in enumerate(rows):
        pi0 = float(reg.significance.pi0[i])
        title = f"id {ids[i]} · validate · pi0 {pi0:.2f} · lfdr keeps {kept[i]}/{tokens}"
        assert row.caption == title
        # and drawn: the picture is the one drawn with that title, pixel for pixel
        redrawn = picture_row(images[ids[i]], reg, i, cb.config.maps, title=title, scale=cb.probes.scale(ids[i]))
        assert np.array_equal(row.image, redrawn), i


# --- 4. every image's per-head picture is its own ---------------------------------------------------------------------


def test_every_pictured_image_shows_its_own_heads(tmp_path):
    # heads="all": under each image's picture row, each head's lfdr map of that image (per-head rows image-major,
    # b * H + h), on one scale: the range of that image's per-head raw attention
    cb = RecordingCallback(n_bootstrap=3, num_images=3, log_images=3, heads="all", lfdr_th=0.9, **QUICK)
    _validate(tmp_path, cb, tiny_data(val_size=3, batch_size=3))
    ids, reg = _explained(cb)
    per, heads, grid = reg.per_head, 3, reg.grid
    rows = cb._last_rows
    assert len(rows) == 3 and grid == (6, 6)
    expected = []
    for i in range(3):
        scale = attention_scale(per.attention[i * heads : (i + 1) * heads].double().numpy())
        colours = []
        for h in range(heads):
            kept = per.maps["lfdr"][i * heads + h].double().numpy()
            colours.append([_on("inferno", v, *scale) if v > 0 else CYAN for v in kept])
        expected.append(np.array(colours))
    # the images' and the heads' maps differ, so a picture of another image or head is caught
    assert len({e.tobytes() for e in expected}) == 3
    assert all(len({e[h].tobytes() for h in range(heads)}) == heads for e in expected)
    for i, row in enumerate(rows):
        picture = row.image
        # the heads' row under the picture row: the only row of 1 + heads panels (the picture row has more)
        boxes = _panels(picture, 1 + heads)[1:]  # the input, then each head
        assert min(y0 for *_, y0, _ in boxes) > picture.shape[0] // 2
        for h, box in enumerate(boxes):
            for t in range(grid[0] * grid[1]):
                drawn = _colour(picture, box, divmod(t, grid[1]), grid)
                assert _close(drawn, expected[i][h, t]), (i, h, t)


# --- 5. a row after a skipped image carries its own numbers, in the picture and in W&B ------------------------------


def test_rows_after_a_degenerate_image_carry_their_own_numbers_in_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="attnreg-test", save_dir=str(tmp_path), offline=True)
    cb = RecordingCallback(n_bootstrap=3, num_images=3, log_images=2, **QUICK)
    with pytest.warns(UserWarning, match="degenerate"):
        _validate(tmp_path, cb, FirstImageConstant(batch_size=3), logger=logger)
    wandb.finish()
    ids, reg = _explained(cb)
    sig = reg.significance
    assert sig.valid.tolist() == [False, True, True]
    # what each explained image's row must say, from its own statistics and maps (batch rows 1 and 2)
    want = []
    for i in (1, 2):
        raw = reg.attention[i].double()
        numbers = {
            "pi0": float(sig.pi0[i]),
            "discoveries": float((sig.lfdr[i] <= reg.thresholds.lfdr_th).double().mean()),
        }
        for name in cb.config.maps:
            kept = reg.maps[name][i].double()
            numbers[f"{name}/sparsity"] = float((kept == 0).double().mean())
            numbers[f"{name}/retained_mass"] = float(kept.sum() / raw.sum())
        kept = int((reg.maps["lfdr"][i] > 0).sum())
        caption = f"id {ids[i]} · validate · pi0 {float(sig.pi0[i]):.2f} · lfdr keeps {kept}/36"
        want.append((ids[i], numbers, caption))
    # the two images differ from each other and from the skipped one's placeholders (pi0 1, nothing kept)
    assert want[0][2] != want[1][2] and "pi0 1.00" not in want[0][2] + want[1][2]
    assert want[0][1]["discoveries"] != want[1][1]["discoveries"]
    assert want[0][1]["p/sparsity"] != want[1][1]["p/sparsity"]

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    (logged,) = [r for r in history_rows(run_file) if "attnreg/images/_type" in r]
    assert logged["attnreg/maps/captions"] == [caption for *_, caption in want]
    table = json.loads((run_file.parent / "files" / logged["attnreg/images/path"]).read_text())
    assert len(table["data"]) == 2
    for values, (sample_id, numbers, caption) in zip(table["data"], want, strict=True):
        row = dict(zip(table["columns"], values, strict=True))
        assert (row["stage"], row["id"]) == ("validate", sample_id)
        for key, value in numbers.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (caption, key)
    # the pictures' own rows say the same
    assert [r.caption for r in cb._last_rows] == [caption for *_, caption in want]
    for r, (sample_id, numbers, _) in zip(cb._last_rows, want, strict=True):
        assert r.stats["id"] == sample_id and r.stats["pi0"] == pytest.approx(numbers["pi0"], rel=1e-6)


# --- 6. TensorBoard's z_null histogram holds the null z-scores -------------------------------------------------------


def test_tensorboard_z_null_histogram_holds_the_explained_images_null_z(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = RecordingCallback(n_bootstrap=3, num_images=4, log_images=1, **QUICK)
    with pytest.warns(UserWarning, match="degenerate"):
        _validate(tmp_path, cb, FirstImageConstant(batch_size=4), logger=logger)
    logger.experiment.flush()
    _, reg = _explained(cb)
    sig = reg.significance
    valid = sig.valid
    assert valid.tolist() == [False, True, True, True]
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    # every explained (valid) image's values, null and observed; the skipped image's placeholders are not
    for tag, values in (("attnreg/z_null", sig.z_null[valid]), ("attnreg/z_observed", sig.z[valid])):
        (event,) = events.Histograms(tag)
        hist = event.histogram_value
        v = values.float().double().flatten()
        assert hist.num == v.numel(), tag
        assert (hist.min, hist.max) == pytest.approx((float(v.min()), float(v.max())), rel=1e-6), tag
        assert hist.sum == pytest.approx(float(v.sum()), rel=1e-6, abs=1e-6), tag
        assert hist.sum_squares == pytest.approx(float((v * v).sum()), rel=1e-6), tag
    assert sig.z_null[valid].numel() == 3 * 3 * 36 and sig.z[valid].numel() == 3 * 36
