"""Every knob of the callback, run once off its default through a real ``Trainer``, keeps its own promise.

One cheap baseline (the tiny ViT, its biases and norms perturbed, validated with the callback at its defaults but
``n_bootstrap=3``, ``num_images=8``), then one run per knob compared with it: not "something differs", but what
the knob says (README's knob table). The runs note what the checks need beside the logged values: each explained
batch's result (``RecordingCallback``), every image's null images, the inputs of the callback's forwards and the
dtype they compute in. ``every_n_epochs``, ``sanity_check`` and ``sanity_draws`` act during a fit only: their
callbacks run beside a baseline callback in one fit. ``test_every_knob_is_run_off_its_default`` keeps a knob from
being added untested.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from attnreg_lightning import AttnRegConfig
from attnreg_lightning import engine as engine_module
from attnreg_lightning.bootstrap import NORMALIZATIONS
from attnreg_lightning.faithfulness import faithfulness_keys, random_tokens
from attnreg_lightning.metrics import head_score_keys
from tests.helpers import RecordingCallback, perturb, tiny_data, tiny_module

BASE = {"n_bootstrap": 3, "num_images": 8, "sanity_draws": 2}  # the defaults, but cheap
DEFAULTS = AttnRegConfig(**BASE)
HEADS = 3  # the tiny ViT's
PATCH = 8  # its patch size (48 px images: a 6 x 6 grid)
FAITHFUL = ("comprehensiveness", "sufficiency", "faithfulness_undefined", "_auc")
SANITY = ("attnreg/sanity/raw_spearman", "attnreg/sanity/lfdr_spearman")


class Probe(RecordingCallback):
    """The callback, noting also the inputs of the forwards it runs (``forwards``) and the dtype its last block's
    ``qkv`` computes in (``dtypes``): hooks on the model, counted only inside the callback's validation hooks."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.forwards: list[Tensor] = []
        self.dtypes: set[torch.dtype] = set()
        self._inside = False

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        pl_module.vit.patch_embed.register_forward_pre_hook(self._note_input)
        pl_module.vit.blocks[-1].attn.qkv.register_forward_hook(self._note_dtype)

    def _note_input(self, module, args):
        if self._inside:
            self.forwards.append(args[0].detach().clone())

    def _note_dtype(self, module, args, out):
        if self._inside:
            self.dtypes.add(out.dtype)

    def on_validation_batch_end(self, *args, **kwargs):
        self._inside = True
        try:
            super().on_validation_batch_end(*args, **kwargs)
        finally:
            self._inside = False

    def on_validation_epoch_end(self, *args, **kwargs):
        self._inside = True
        try:
            super().on_validation_epoch_end(*args, **kwargs)
        finally:
            self._inside = False


@dataclass(repr=False)
class Run:
    cb: Probe
    records: list[dict[str, float]]  # what the callback logged at each explained run (its history's values)
    returned: list[dict[str, float]]  # what trainer.validate returned ([] for a fit)
    nulls: list[tuple[Tensor, Tensor]]  # each explained image [C, H, W] and its null images [N, C, H, W]
    error: Exception | None = None
    warned: list[str] = dataclasses.field(default_factory=list)  # the callback's warnings

    @property
    def logged(self) -> dict[str, float]:
        """What the callback logged at its last explained run."""
        return self.records[-1] if self.records else {}

    @property
    def stages(self) -> list[str]:
        return [r["stage"] for r in self.cb.history]

    def __repr__(self) -> str:
        return f"Run({self.cb.config})"

    def cat(self, get: Callable[[Any], Tensor]) -> Tensor:
        """``get(result)`` of every batch explained at the (last) validation, concatenated over the batches."""
        return torch.cat([get(reg) for _, reg in self.cb.seen[max(self.cb.seen)]])

    def kept(self, name: str) -> Tensor:
        return self.cat(lambda reg: reg.maps[name]) > 0

    def sig(self, name: str) -> Tensor:
        return self.cat(lambda reg: getattr(reg.significance, name))

    @property
    def ids(self) -> list[int]:
        return self.cb.ids(max(self.cb.seen))


def _run(root, knobs: dict, data=None, raises: bool = False) -> Run:
    """A ``trainer.validate`` of the tiny ViT with the callback at ``knobs`` (and the baseline's others)."""
    cb = Probe(**{**BASE, **knobs})
    nulls: list[tuple[Tensor, Tensor]] = []
    real = engine_module.null_stream

    def spy(images, n, method, generator, **options):  # the engine's null images, as they stream by
        for image, drawn in zip(images, real(images, n, method, generator, **options), strict=True):
            nulls.append((image.clone(), drawn.clone()))
            yield drawn

    returned, error = [], None
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(engine_module, "null_stream", spy)
        try:
            returned = _trainer(root, [cb]).validate(
                perturb(tiny_module()), data or tiny_data(val_size=16), verbose=False
            )
        except Exception as err:
            if not raises:
                raise
            error = err
    warned = [str(w.message) for w in caught if str(w.message).startswith(cb.prefix)]
    return Run(cb, _records(cb), returned, nulls, error, warned)


def _trainer(root, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root, deterministic=True,
        max_epochs=3, limit_train_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip


def _records(cb: Probe, rename: bool = False) -> list[dict[str, float]]:
    """The logged values of the callback's history (its keys ``<name>/...``; ``rename``: as ``attnreg/...``)."""
    prefix = f"{cb.prefix}/"
    as_key = (lambda k: "attnreg/" + k.removeprefix(prefix)) if rename else (lambda k: k)
    return [{as_key(k): v for k, v in r.items() if k.startswith(prefix)} for r in cb.history]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny ViT's forwards gain nothing from a second intra-op thread, and on a shared machine two threads that
    wait for each other make the file several times slower: one, for this file's runs (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    base = _run(tmp_path_factory.mktemp("baseline"), {})
    # the harness sees what Lightning does: the callback's record is what trainer.validate returns
    assert base.logged == {k: v for k, v in base.returned[0].items() if k.startswith("attnreg/")}
    assert base.logged["attnreg/explained"] == 8 and len(base.cb._last_rows) == DEFAULTS.log_images
    assert not base.warned
    return base


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, Run]:
    """The knobs that act during a fit only, in one fit (3 epochs, 8 validation images): the baseline callback
    (key ``""``) beside one callback per such knob, each under the name ``attnreg_<knob>`` (its records are renamed
    back to ``attnreg/``). The callback does not change training, so they all explain the same model. One picture
    row each: every callback writes a report at the fit's end, and its PNG encoding is most of a fit's time."""
    knobs = {"": {}} | {k: {**v, "name": f"attnreg_{k}"} for k, (v, _, how) in CASES.items() if how["fit"]}
    cbs = {k: Probe(**{**BASE, "log_images": 1, **v}) for k, v in knobs.items()}
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path_factory.mktemp("fit"), list(cbs.values())).fit(
        perturb(tiny_module()), tiny_data(train_size=8, val_size=8)
    )
    runs = {}
    for knob, cb in cbs.items():
        runs[knob] = Run(cb, _records(cb, rename=True), [], [])
    assert runs[""].stages == ["epoch0", "epoch1", "epoch2"]
    return runs


# ---------------------------------------------------------------------------------------------------------- checks


def _faithful(key: str) -> bool:
    return key.endswith(FAITHFUL)


def _of_maps(key: str, *maps: str) -> bool:
    """A metric of one of these maps (not a faithfulness score: those follow ``faithfulness_maps``)."""
    return any(key.startswith(f"attnreg/{m}/") for m in maps) and not _faithful(key)


def _same(run: Run, base: Run, unless: Callable[[str], bool] = lambda _: False, rel: float = 0.0) -> None:
    """The run logged the baseline's keys (but those ``unless`` picks) with the baseline's values: exactly, or within
    ``rel`` where the forwards are batched otherwise (a matmul's last bits depend on its batch on the CPU)."""
    want = {k: v for k, v in base.logged.items() if not unless(k)}
    got = {k: v for k, v in run.logged.items() if not unless(k)}
    assert got.keys() == want.keys(), set(got) ^ set(want)
    if rel == 0:
        assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    else:
        assert got == pytest.approx(want, rel=rel, abs=1e-7)


def _removed(image: Tensor, tokens: Tensor) -> Tensor:
    """``image`` with the pixel blocks of ``tokens [T]`` (bool) set to its channel means (the default faithfulness
    baseline), as a faithfulness score forwards it."""
    out, mean, side = image.clone(), image.mean((1, 2), keepdim=True), image.shape[-1] // PATCH
    for t in tokens.nonzero().flatten().tolist():
        row, col = divmod(t, side)
        out[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = mean
    return out


def _forwarded(forwards: Tensor, image: Tensor) -> bool:
    return bool((forwards - image).abs().flatten(1).amax(1).min() <= 1e-6)


def _mean_over_images(values: Tensor) -> float:
    return float(values.to(torch.float64).mean())


def _channel_stats(images: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Mean and population std over pixels (and over channels unless ``per_channel``), broadcastable to ``images``."""
    dims = (-2, -1) if per_channel else (-3, -2, -1)
    return images.mean(dims, keepdim=True), images.std(dims, keepdim=True, correction=0)


CASES: dict[str, tuple[dict, Callable[[Run, Run], None], dict]] = {}


def case(knob: str, fit: bool = False, data: Callable[[], Any] | None = None, raises: bool = False, **knobs):
    """Register ``check(baseline, run)`` for ``knob`` run at ``knobs`` (the knob's own value among them)."""

    def register(check: Callable[[Run, Run], None]):
        assert knob in knobs and knob not in CASES
        CASES[knob] = (knobs, check, {"fit": fit, "data": data, "raises": raises})
        return check

    return register


@case("method", method="pixel")
def _pixel_nulls_are_resamples_of_the_image(base, run):
    def new_pixels(image: Tensor, nulls: Tensor) -> int:
        """How many distinct null pixels (a pixel's channels together) are not among the image's pixels."""
        own = image.flatten(1).T  # [H W, C]
        drawn = nulls.permute(0, 2, 3, 1).reshape(-1, image.shape[0])
        return len(torch.unique(torch.cat([own, drawn]), dim=0)) - len(torch.unique(own, dim=0))

    assert len(run.nulls) == len(base.nulls) == 8
    for (image, nulls), (_, normal) in zip(run.nulls, base.nulls, strict=True):
        assert nulls.shape == normal.shape and not torch.equal(nulls, normal)
        assert new_pixels(image, nulls) == 0  # drawn from the image's own pixels
        assert not torch.equal(nulls[0], image)  # with replacement, not the image itself
        assert new_pixels(image, normal) > 0.99 * normal[:, 0].numel()  # the normal nulls are new pixels
    assert run.logged["attnreg/null_srmsd"] != base.logged["attnreg/null_srmsd"]


@case("n_bootstrap", n_bootstrap=5)
def _five_nulls_per_image_in_the_pool(base, run):
    assert [n.shape[0] for _, n in run.nulls] == [5] * 8 and [n.shape[0] for _, n in base.nulls] == [3] * 8
    tokens = run.sig("z").shape[1]
    assert run.sig("z_null").shape == (8, 5, tokens)
    # p = 1 - #{pool <= |z|} / (T + N T): multiples of 1 / (6 T) now, of 1 / (4 T) before
    for r, n in ((run, 5), (base, 3)):
        scaled = r.sig("p").double() * tokens * (n + 1)
        torch.testing.assert_close(scaled, scaled.round(), rtol=0, atol=1e-4)
    assert run.logged["attnreg/null_srmsd"] != base.logged["attnreg/null_srmsd"]


@case("z_th", z_th=0.5)
def _zreg_keeps_only_tokens_with_z_at_least_z_th(base, run):
    z = run.sig("z")
    torch.testing.assert_close(z, base.sig("z"), rtol=0, atol=0)  # the same nulls, the same z
    for m in ("zreg", "p", "lfdr", "pi0", "q"):
        assert torch.equal(run.kept(m), base.kept(m) & (z >= 0.5)), m
    assert run.kept("zreg").sum() < base.kept("zreg").sum()
    assert torch.equal(run.cat(lambda r: r.maps["posterior"]), base.cat(lambda r: r.maps["posterior"]))
    _same(run, base, unless=lambda k: _of_maps(k, "p", "lfdr", "pi0") or _faithful(k) or k == "attnreg/topk/roi_f1")
    for m in ("p", "lfdr", "pi0"):
        assert run.logged[f"attnreg/{m}/sparsity"] >= base.logged[f"attnreg/{m}/sparsity"], m


@case("p_th", p_th=0.1)
def _a_lower_p_th_keeps_no_more_tokens_in_the_p_map(base, run):
    p = run.sig("p")
    assert torch.equal(run.kept("p"), base.kept("p") & (p <= 0.1))
    assert run.kept("p").sum() < base.kept("p").sum()
    for m in ("lfdr", "pi0", "posterior", "q"):
        assert torch.equal(run.kept(m), base.kept(m)), m
    assert run.logged["attnreg/p/sparsity"] > base.logged["attnreg/p/sparsity"]
    _same(run, base, unless=lambda k: _of_maps(k, "p"))


@case("lfdr_th", lfdr_th=0.1)
def _a_lower_lfdr_th_keeps_fewer_tokens_and_counts_fewer_discoveries(base, run):
    lfdr = run.sig("lfdr")
    assert torch.equal(run.kept("lfdr"), base.kept("lfdr") & (lfdr <= 0.1))
    assert run.kept("lfdr").sum() < base.kept("lfdr").sum()
    for m in ("p", "pi0", "posterior"):
        assert torch.equal(run.kept(m), base.kept(m)), m
    discoveries = _mean_over_images((lfdr <= 0.1).double().mean(1))
    assert run.logged["attnreg/discoveries"] == pytest.approx(discoveries, rel=1e-6)
    assert run.logged["attnreg/discoveries"] < base.logged["attnreg/discoveries"]
    # the lfdr map's metrics, its faithfulness and the top-k baseline (at its kept fraction) may move; nothing else
    moved = {"attnreg/discoveries", "attnreg/topk/roi_f1"}
    _same(run, base, unless=lambda k: _of_maps(k, "lfdr") or _faithful(k) or k in moved)


@case("q_th", q_th=0.5)
def _q_th_moves_the_q_map_which_the_default_maps_do_not_log(base, run):
    q, zreg = run.sig("q"), run.kept("zreg")
    assert torch.equal(run.kept("q"), zreg & (q <= 0.5))
    assert (base.kept("q") <= run.kept("q")).all() and run.kept("q").sum() > base.kept("q").sum()
    assert "q" not in DEFAULTS.maps
    _same(run, base)


@case("pi0", pi0=0.5)
def _a_fixed_pi0_is_used_and_scales_the_lfdr(base, run):
    assert (run.sig("pi0") == 0.5).all() and run.logged["attnreg/pi0"] == 0.5
    assert base.logged["attnreg/pi0"] != 0.5
    torch.testing.assert_close(run.sig("p"), base.sig("p"), rtol=0, atol=0)
    # lfdr = clip(pi0 phi(z) / f(z), 0, 1), f fitted to z alone: where neither is clipped, it scales by 0.5 / pi0
    lfdr, before = run.sig("lfdr").double(), base.sig("lfdr").double()
    ok = (run.sig("fit_ok") & base.sig("fit_ok") & (base.sig("pi0") > 0))[:, None] & (lfdr < 1) & (before < 1)
    ratio = (0.5 / base.sig("pi0").double())[:, None].expand_as(lfdr)
    assert ok.sum() > 20
    torch.testing.assert_close(lfdr[ok] / before[ok], ratio[ok], rtol=1e-5, atol=0)


@case("num_images", num_images=3)
def _the_first_num_images_images_are_explained(base, run):
    assert run.logged["attnreg/explained"] == 3 and run.ids == base.ids[:3]
    # an image's maps do not depend on the others explained with it
    torch.testing.assert_close(run.cat(lambda r: r.attention), base.cat(lambda r: r.attention)[:3])
    for m in ("p", "lfdr", "pi0"):
        assert torch.equal(run.kept(m), base.kept(m)[:3]), m
    assert len(run.cb._last_rows) == 3  # log_images is at most what is explained


@case("every_n_epochs", fit=True, every_n_epochs=2)
def _every_second_validation_run_of_a_fit_is_explained(base, run):
    assert run.stages == ["epoch0", "epoch2"]
    assert sorted(run.cb.seen) == [0, 2]
    assert run.records[0] == base.records[0]  # the callback does not change training: the same model
    # at epoch 2, the previous explained run is the first one
    moved = ("attnreg/stability/lfdr_iou", "attnreg/stability/z_spearman")
    again, want = run.records[1], base.records[2]
    assert {k: v for k, v in again.items() if k not in moved} == {k: v for k, v in want.items() if k not in moved}
    assert again["attnreg/stability/lfdr_iou"] == again["attnreg/stability/lfdr_iou_first"]


class TwoLoaders(L.LightningDataModule):
    """Loader 1 is the baseline's validation loader; loader 0 other images, numbered alike."""

    def __init__(self):
        super().__init__()
        self.other, self.same = tiny_data(val_size=16, object_fraction=0.5), tiny_data(val_size=16)

    def setup(self, stage=None):
        self.other.setup(stage)
        self.same.setup(stage)

    def val_dataloader(self):
        return [self.other.val_dataloader(), self.same.val_dataloader()]


@case("dataloader_idx", data=TwoLoaders, dataloader_idx=1)
def _the_second_loader_is_explained(base, run):
    # the loader left unexplained is said once (the only word this knob may cause)
    assert len(run.warned) == 1 and "loader(s) [0] are not explained" in run.warned[0]
    assert run.ids == base.ids
    assert torch.equal(run.cat(lambda r: r.attention), base.cat(lambda r: r.attention))
    _same(run, base)


@case("maps", maps=["p"])
def _only_the_p_maps_metrics_and_panels(base, run):
    dropped = ("lfdr", "pi0", "posterior")
    assert not [k for k in run.logged if _of_maps(k, *dropped)]
    assert [k for k in base.logged if _of_maps(k, *dropped)]
    _same(run, base, unless=lambda k: _of_maps(k, *dropped))  # the p map's values (and the rest) as they were
    # a picture has a panel per map after its five fixed ones: three panels fewer
    for mine, theirs in zip(run.cb._last_rows, base.cb._last_rows, strict=True):
        assert mine.image.shape[0] == theirs.image.shape[0] and mine.image.shape[1] < 0.8 * theirs.image.shape[1]


@case("max_images_per_forward", max_images_per_forward=5)
def _smaller_forwards_the_same_values(base, run):
    sizes, before = [len(x) for x in run.cb.forwards], [len(x) for x in base.cb.forwards]
    assert max(sizes) == 5 and max(before) > 5
    assert sum(sizes) == sum(before)  # the same images, cut into smaller forwards
    _same(run, base, rel=1e-5)
    torch.testing.assert_close(run.cat(lambda r: r.attention), base.cat(lambda r: r.attention))
    for m in ("p", "lfdr", "pi0"):
        assert torch.equal(run.kept(m), base.kept(m)), m


@case("autocast_dtype", autocast_dtype="bfloat16")
def _forwards_in_bfloat16_statistics_in_float32(base, run):
    assert run.cb.dtypes == {torch.bfloat16} and base.cb.dtypes == {torch.float32}
    assert run.cat(lambda r: r.attention).dtype == torch.float32 and run.sig("valid").all()
    assert run.logged.keys() == base.logged.keys() and run.logged != base.logged
    torch.testing.assert_close(run.cat(lambda r: r.attention), base.cat(lambda r: r.attention), rtol=0.1, atol=1e-3)


@case("seed", seed=1)
def _another_seed_draws_other_nulls_and_other_random_tokens(base, run):
    for (image, nulls), (before, normal) in zip(run.nulls, base.nulls, strict=True):
        assert torch.equal(image, before) and not torch.equal(nulls, normal)
    assert torch.equal(run.cat(lambda r: r.attention), base.cat(lambda r: r.attention))
    assert not torch.equal(run.sig("z_null"), base.sig("z_null"))
    assert run.logged["attnreg/null_srmsd"] != base.logged["attnreg/null_srmsd"]
    # the faithfulness scores' random token sets, a function of (seed, id, token): the images with the seed-1 set of
    # the lfdr map's size removed were forwarded, not all of those with the seed-0 set removed
    kept = run.kept("lfdr")
    size = kept.sum(1)
    defined = ((size > 0) & (size < kept.shape[1])).nonzero().flatten().tolist()
    assert len(defined) >= 4
    forwarded = torch.cat(run.cb.forwards)
    found = {}
    for seed in (1, 0):
        drawn = random_tokens(seed, torch.tensor(run.ids), size, kept.shape[1])
        found[seed] = [_forwarded(forwarded, _removed(run.nulls[b][0], drawn[b])) for b in defined]
    assert all(found[1]) and not all(found[0])


@case("log_images", log_images=1)
def _one_picture_row_the_same_values(base, run):
    assert len(run.cb._last_rows) == 1 and len(base.cb._last_rows) == 4
    assert run.cb._last_rows[0].caption == base.cb._last_rows[0].caption
    _same(run, base)


class Degenerate(L.LightningDataModule):
    """The baseline's validation data, its first image constant (no null distribution to test against)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_data(val_size=16)

    def setup(self, stage=None):
        self.inner.setup(stage)

    def val_dataloader(self):
        batches = list(self.inner.val_dataloader())
        batches[0][0][0] = 0.25
        return DataLoader(batches, batch_size=None)


@case("on_error", data=Degenerate, raises=True, on_error="raise")
def _a_degenerate_image_fails_the_run(base, run):
    assert isinstance(run.error, ValueError) and "degenerate" in str(run.error)
    assert not run.cb.history


@case("std_factor", std_factor=2.0)
def _normal_nulls_spread_twice_as_wide(base, run):
    for r, factor in ((run, 2.0), (base, 1.0)):
        for image, nulls in r.nulls:
            mean, std = _channel_stats(image, per_channel=True)
            null_mean, null_std = _channel_stats(nulls, per_channel=True)
            torch.testing.assert_close(null_std / std, torch.full_like(null_std, factor), rtol=0.1, atol=0)
            assert ((null_mean - mean).abs() < 0.2 * factor * std).all()


@case("all_channels", all_channels=False)
def _normal_nulls_of_one_mean_and_std_per_image(base, run):
    for r, per_channel in ((run, False), (base, True)):
        # each channel's null pixels: mean and std those of the image over all its pixels (or over the channel's)
        right, wrong = [], []
        for image, nulls in r.nulls:
            mean, std = _channel_stats(image, per_channel)
            drawn = nulls.transpose(0, 1).flatten(1)  # [C, N * H * W]
            null_mean, null_std = drawn.mean(1)[:, None, None], drawn.std(1, correction=0)[:, None, None]
            se = std / drawn.shape[1] ** 0.5
            right.append(((null_mean - mean) / se).flatten())
            wrong.append(((null_mean - _channel_stats(image, not per_channel)[0]) / se).flatten())
            torch.testing.assert_close(null_std, std.expand_as(null_std), rtol=0.05, atol=0)
        right, wrong = torch.cat(right), torch.cat(wrong)
        # chi-square of 24 standardized means: about 24 for the right statistics, far more for the wrong ones
        assert right.square().sum() < 3 * right.numel() and wrong.square().sum() > 10 * wrong.numel()


@case("patch_size", method="patch", patch_size=16)
def _patch_nulls_permute_the_images_16px_tiles(base, run):
    def tiles(x: Tensor, p: int) -> Tensor:  # [C, H, W] -> [tiles, C * p * p]
        c, h, w = x.shape
        return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c * p * p)

    moved = 0
    for image, nulls in run.nulls:
        own = tiles(image, 16)
        for null in nulls:
            same = (tiles(null, 16)[:, None] == own[None]).all(-1)  # [null tile, image tile]
            assert (same.sum(0) == 1).all() and (same.sum(1) == 1).all()  # each of the image's tiles, once
            moved += not torch.equal(null, image)
    assert moved > 0.9 * 8 * 3


@case("normalization", method="uniform", normalization="imagenet")
def _uniform_nulls_renormalized_with_imagenets_statistics(base, run):
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    for image, nulls in run.nulls:
        lo, hi = image.amin((1, 2), keepdim=True), image.amax((1, 2), keepdim=True)
        bottom, top = (lo - mean) / std, (hi - mean) / std  # the range of (U(lo, hi) - mean) / std
        low, high = nulls.amin((0, 2, 3))[:, None, None], nulls.amax((0, 2, 3))[:, None, None]
        assert ((low >= bottom - 1e-5) & (high <= top + 1e-5)).all()
        assert (((low - bottom) < 0.01 * (top - bottom)) & ((top - high) < 0.01 * (top - bottom))).all()
        assert (bottom < lo - 0.5).any()  # normalized twice: no longer the image's range


PROBES = [10_000_002, 10_000_005, 10_000_011, 10_000_014]  # two of the baseline's, two of the second batch


@case("probe_ids", probe_ids=PROBES)
def _the_probe_ids_are_explained_wherever_they_are(base, run):
    assert run.ids == PROBES and run.logged["attnreg/explained"] == 4
    assert len(run.cb.seen[0]) == 2  # one job per batch that holds probes
    rows = [base.ids.index(i) for i in PROBES[:2]]
    torch.testing.assert_close(run.cat(lambda r: r.attention)[:2], base.cat(lambda r: r.attention)[rows])
    assert torch.equal(run.kept("lfdr")[:2], base.kept("lfdr")[rows])


@case("heads", heads="all")
def _per_head_keys_and_a_row_of_per_head_maps(base, run):
    added = {f"attnreg/{k}" for k in head_score_keys(HEADS)}
    assert run.logged.keys() == base.logged.keys() | added
    _same(run, base, unless=lambda k: k in added)  # the mean path is what heads="mean" reports
    per_head = run.cat(lambda r: r.per_head.significance.lfdr).view(8, HEADS, -1)
    for h in range(HEADS):
        found = _mean_over_images((per_head[:, h] <= DEFAULTS.lfdr_th).double().mean(1))
        assert run.logged[f"attnreg/head{h}/discoveries"] == pytest.approx(found, rel=1e-6)
    for mine, theirs in zip(run.cb._last_rows, base.cb._last_rows, strict=True):
        assert mine.image.shape[0] > 1.8 * theirs.image.shape[0]


@case("statistics", statistics="background")
def _background_statistics_log_what_inline_ones_do(base, run):
    assert base.cb._background is False and run.cb._background is True
    _same(run, base, unless=_faithful)
    # the faithfulness forwards run in the statistics thread (one intra-op thread): their last bits may move
    faithful = {k: v for k, v in base.logged.items() if _faithful(k)}
    assert {k: run.logged[k] for k in faithful} == pytest.approx(faithful, rel=1e-6)
    assert [r.caption for r in run.cb._last_rows] == [r.caption for r in base.cb._last_rows]


@case("faithfulness", faithfulness="off")
def _no_faithfulness_keys_and_the_rest_as_it_was(base, run):
    assert not [k for k in run.logged if _faithful(k)] and [k for k in base.logged if _faithful(k)]
    # and no forward for it: the images and their nulls, packed into one forward (the baseline's images run apart,
    # on to the classification head)
    assert [len(x) for x in run.cb.forwards] == [8 * 4] and len(base.cb.forwards) > 2
    # without faithfulness the images and their nulls share forwards: the attention's last bits may move
    _same(run, base, unless=_faithful, rel=1e-5)


@case("faithfulness_maps", faithfulness_maps=["p", "pi0"])
def _faithfulness_of_the_p_and_pi0_maps(base, run):
    scores, undefined = faithfulness_keys("kept", ["p", "pi0"])
    assert {k for k in run.logged if _faithful(k)} == {f"attnreg/{k}" for k in scores + undefined}
    for m in ("p", "pi0"):  # undefined: the images whose map keeps no token or every token
        kept = run.kept(m)
        count = kept.sum(1)
        assert run.logged[f"attnreg/{m}/faithfulness_undefined"] == int(((count == 0) | (count == kept.shape[1])).sum())
    _same(run, base, unless=_faithful)


@case("faithfulness_steps", faithfulness="curves", faithfulness_steps=1)
def _one_step_curves_deletion_and_insertion_alike(base, run):
    # one step: deletion is [P(x), P(baseline)], insertion [P(baseline), P(x)]: the same area, whatever the map
    areas = [run.logged[f"attnreg/{m}/{c}_auc"] for m in ("raw", "posterior") for c in ("deletion", "insertion")]
    assert areas == pytest.approx([areas[0]] * 4, rel=1e-6)
    _same(run, base, unless=lambda k: k.endswith("_auc"), rel=1e-6)


@case("faithfulness_baseline", faithfulness_baseline="zeros")
def _removed_tokens_become_zeros(base, run):
    def zero_blocks(r: Run) -> int:
        x = torch.cat(r.cb.forwards)
        blocks = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, C, 6, 6, 8, 8]
        return int((blocks == 0).all(-1).all(-1).all(1).any(-1).any(-1).sum())

    assert zero_blocks(run) > 8 and zero_blocks(base) == 0
    assert run.logged["attnreg/lfdr/comprehensiveness"] != base.logged["attnreg/lfdr/comprehensiveness"]
    # which tokens are removed does not change: the same undefined images, the same maps
    _same(run, base, unless=lambda k: _faithful(k) and not k.endswith("faithfulness_undefined"))


def _sanity(key: str) -> bool:
    return key.startswith("attnreg/sanity/")


@case("faithfulness_prediction", faithfulness_prediction="module")
def _the_modules_forward_scores_what_the_vit_head_did(base, run):
    # the tiny module predicts with its ViT's head: its own forward gives the same numbers, from a clean forward of
    # its own (the engine's forward no longer runs on to the head)
    assert base.cb._prediction_source == "vit" and base.cb.engine.classify
    assert run.cb._prediction_source == "module" and not run.cb.engine.classify
    _same(run, base, rel=1e-6)


@case("faithfulness_regions", faithfulness_regions=["roi"])
def _reliance_on_the_object_region(base, run):
    # the baseline's data mark no shortcut (its default region): only this run scores a region, the object
    reliance = {"attnreg/roi/reliance", "attnreg/same_k_random@roi/reliance"}
    assert reliance <= set(run.logged) and not {k for k in base.logged if k.endswith("/reliance")}
    assert all(-1 <= run.logged[k] <= 1 for k in reliance)  # a drop of a probability
    _same(run, base, unless=lambda k: k in reliance)


@case("sanity_check", fit=True, sanity_check=False)
def _no_sanity_check_at_the_fits_end(base, run):
    assert all(k in base.logged for k in SANITY)
    assert not [k for r in run.records for k in r if _sanity(k)]
    assert not run.cb._sanity_images  # no probe images kept for it either
    assert run.records == [{k: v for k, v in r.items() if not _sanity(k)} for r in base.records]


@case("sanity_draws", fit=True, sanity_draws=9)
def _nine_re_initializations_their_mean_and_spread(base, run):
    # every draw's raw maps; the lfdr maps of the first ceil(draws / 8) draws; the spread from two draws
    raw, lfdr = SANITY
    assert (run.logged[f"{raw}_draws"], run.logged[f"{lfdr}_draws"]) == (9, 2)
    assert (base.logged[f"{raw}_draws"], base.logged[f"{lfdr}_draws"]) == (2, 1)
    assert f"{lfdr}_sd" in run.logged and f"{lfdr}_sd" not in base.logged and f"{raw}_sd" in base.logged
    assert run.logged[raw] != base.logged[raw]
    assert run.records[:-1] == base.records[:-1]  # the runs before the fit's end as they were
    assert {k: v for k, v in run.logged.items() if not _sanity(k)} == {
        k: v for k, v in base.logged.items() if not _sanity(k)
    }


@case("name", name="x")
def _every_key_under_the_name(base, run):
    assert run.logged == {"x/" + k.removeprefix("attnreg/"): v for k, v in base.logged.items()}
    assert not [k for k in run.returned[0] if k.startswith("attnreg/")]
    assert run.cb.state_key != base.cb.state_key and "x" in run.cb.state_key


NOT_HERE: dict[str, str] = {
    # knob -> where it is tested instead, or why nothing it does can be seen in a run (none so far: every knob of
    # AttnRegConfig is run off its default above)
}


def test_every_knob_is_run_off_its_default():
    knobs = {f.name for f in dataclasses.fields(AttnRegConfig)}
    assert not set(CASES) & set(NOT_HERE)
    assert set(CASES) | set(NOT_HERE) == knobs, f"untested: {knobs - set(CASES) - set(NOT_HERE)}"
    for knob, (values, _, _) in CASES.items():
        assert values[knob] != getattr(DEFAULTS, knob), f"{knob} is run at its default"
        AttnRegConfig(**{**BASE, **values})  # a valid configuration


@pytest.mark.parametrize(
    "knob", [pytest.param(k, marks=pytest.mark.slow) if how["fit"] else k for k, (_, _, how) in CASES.items()]
)  # the knobs that act during a fit share one 3-epoch fit: the whole suite runs it
def test_a_knob_off_its_default_keeps_its_promise(knob, request, tmp_path):
    values, check, how = CASES[knob]
    if how["fit"]:
        runs = request.getfixturevalue("fits")
        check(runs[""], runs[knob])
    else:
        data = how["data"]() if how["data"] else None
        run = _run(tmp_path, values, data=data, raises=how["raises"])
        # off its default, the knob runs without a complaint (but the one its check asks for)
        assert how["raises"] or knob == "dataloader_idx" or not run.warned
        check(request.getfixturevalue("baseline"), run)
