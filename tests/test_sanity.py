"""The model-randomization sanity check as a distribution over re-initializations of the last block (issue 29, item
2): the logged mean and spread against scipy over re-initializations made here by hand, draws that really differ,
two seeds that agree within 0.1 on the test model where one draw does not, the global random state and the model
untouched, a failing or probe-less rank still reaching the reduction, and Hugging Face ViTs."""

from __future__ import annotations

import copy
import csv
import math
import random
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from scipy.stats import t as student_t

from attnreg_lightning import AttentionRegularizationCallback, AttentionRegularizer
from attnreg_lightning import sanity as sanity_module
from attnreg_lightning.attention import resolve_vit
from attnreg_lightning.config import AttnRegConfig
from attnreg_lightning.run_metrics import quiet_compute
from attnreg_lightning.sanity import (
    SANITY_KEYS,
    draw_keys,
    draw_seed,
    intervals,
    lfdr_draws,
    model_randomization,
    read_raw,
    summarize,
)
from tests.helpers import csv_trainer, perturb, tiny_data, tiny_module, val_images

RAW, LFDR = SANITY_KEYS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny ViT's forwards gain nothing from a second intra-op thread, and on a shared machine two threads that
    wait for each other make the check's hundreds of small forwards several times slower (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_hand(module, seed: int, draw: int) -> torch.nn.Module:
    """Draw ``draw`` of a check seeded ``seed``, made here: a deep copy of the ViT whose last timm block's layers are
    reset from the seed SeedSequence([seed, draw]) gives (the global random state restored)."""
    vit = copy.deepcopy(module.vit)
    state = int(np.random.SeedSequence([seed, draw]).generate_state(1, np.uint64)[0]) % 2**63
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(state)
        for layer in vit.blocks[-1].modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return vit.eval()


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Spearman; an empty map against a structured one is 0, two constant maps are undefined."""
    flat = int(np.ptp(x) == 0) + int(np.ptp(y) == 0)
    return float(spearmanr(x, y).statistic) if flat == 0 else {1: 0.0, 2: math.nan}[flat]


def _per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([_rho(x, y) for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True)])


def test_the_logged_check_is_scipy_over_draws_made_by_hand(tmp_path):
    draws, seed = 10, 5  # 10 draws read for raw maps, the first 2 also explained for lfdr maps
    assert lfdr_draws(draws) == 2
    module, data = perturb(tiny_module()), tiny_data(val_size=8, batch_size=4)
    cb = AttentionRegularizationCallback(
        n_bootstrap=3, num_images=8, log_images=0, faithfulness="off", seed=seed, sanity_draws=draws
    )
    csv_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2).fit(module, data)
    images, ids = val_images(data)
    trained = AttentionRegularizer(module, n_bootstrap=3, seed=seed)(images, ids)
    raw, lfdr = [], []  # [draw][image]
    for d in range(draws):
        randomized = AttentionRegularizer(_by_hand(module, seed, d), n_bootstrap=3, seed=seed)(images, ids)
        raw.append(_per_image(trained.attention, randomized.attention))
        if d < 2:
            lfdr.append(_per_image(trained.maps["lfdr"], randomized.maps["lfdr"]))
    raw, lfdr = np.array(raw), np.array(lfdr)
    per_draw = {"raw": np.nanmean(raw, axis=1), "lfdr": np.nanmean(lfdr, axis=1)}
    want = {}
    for name, key in (("raw", RAW), ("lfdr", LFDR)):
        want |= {key: per_draw[name].mean(), f"{key}_sd": per_draw[name].std(ddof=1),
                 f"{key}_draws": float(len(per_draw[name]))}  # fmt: skip
    with open(next(tmp_path.glob("csv/**/metrics.csv"))) as f:
        (row,) = [r for r in csv.DictReader(f) if r.get(f"attnreg/{RAW}")]
    logged = {k.removeprefix("attnreg/"): float(v) for k, v in row.items() if v and k.startswith("attnreg/sanity/")}
    assert logged == pytest.approx(want, abs=1e-9)
    assert cb.history[-1][f"attnreg/{RAW}_sd"] == pytest.approx(want[f"{RAW}_sd"], abs=1e-9)
    # the means' 95% intervals over draws, beside the run's other intervals
    for key in SANITY_KEYS:
        n = want[f"{key}_draws"]
        half = student_t.ppf(0.975, n - 1) * want[f"{key}_sd"] / math.sqrt(n)
        lo, hi = cb.history[-1]["intervals"][f"attnreg/{key}"]
        assert (lo, hi) == pytest.approx((want[key] - half, want[key] + half), abs=1e-6)
    # each probe's row: its mean over the draws
    rows = {r["id"]: r for r in cb.sanity_rows}
    assert sorted(rows) == sorted(ids)
    got = np.array([[rows[i][RAW], rows[i][LFDR]] for i in ids])
    np.testing.assert_allclose(got, np.stack([np.nanmean(raw, 0), np.nanmean(lfdr, 0)], 1), atol=1e-9)
    assert want[f"{RAW}_sd"] > 0.05  # the draws really spread


def test_the_draws_are_different_re_initializations():
    module = perturb(tiny_module())
    images, ids = val_images(tiny_data(val_size=4, batch_size=4))
    engine = AttentionRegularizer(module, n_bootstrap=2, seed=0)
    seen: list[torch.Tensor] = []  # the last block's qkv weight at each raw read: the trained model's, then each draw's
    real = sanity_module.read_raw

    def reading(engine, images):
        seen.append(resolve_vit(engine.model).blocks[-1].attn.qkv.weight.detach().clone())
        return real(engine, images)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sanity_module, "read_raw", reading)
        rho = model_randomization(module, engine, lambda m: AttentionRegularizer(m, n_bootstrap=2), images, ids, 0, 4)
    assert len(seen) == 5 and torch.equal(seen[0], module.vit.blocks[-1].attn.qkv.weight)
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert rho["raw"].shape == (4, 4) and rho["lfdr"].shape == (1, 4)
    assert len({tuple(r.tolist()) for r in rho["raw"]}) == 4  # four draws, four sets of correlations
    # the seeds of the draws: distinct, and two check seeds share none (not shifted copies of one sequence)
    seeds = {(s, d): draw_seed(s, d) for s in (-1, 0, 1, 2) for d in range(64)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())


def test_the_spread_is_the_sd_of_the_per_draw_means():
    means = {"raw@0": 0.3, "raw@1": -0.5, "raw@2": 0.1, "raw@3": 0.2, "lfdr@0": 0.05}  # lfdr@1.. gave no mean
    got = summarize(means, draws=4)
    raw = np.array([0.3, -0.5, 0.1, 0.2])
    assert got[RAW] == pytest.approx(raw.mean()) and got[f"{RAW}_sd"] == pytest.approx(raw.std(ddof=1))
    assert got[f"{RAW}_draws"] == 4 and got[LFDR] == 0.05 and got[f"{LFDR}_draws"] == 1
    assert f"{LFDR}_sd" not in got  # one draw has no spread
    got = summarize({k: v for k, v in means.items() if k != "raw@2"}, draws=4)  # a draw without a mean: left out
    assert got[f"{RAW}_draws"] == 3 and got[RAW] == pytest.approx(np.mean([0.3, -0.5, 0.2]))
    (lo, hi) = intervals(got)[RAW]
    half = student_t.ppf(0.975, 2) * np.std([0.3, -0.5, 0.2], ddof=1) / math.sqrt(3)
    want = (max(-1.0, got[RAW] - half), min(1.0, got[RAW] + half))  # a correlation's interval stays in [-1, 1]
    assert (lo, hi) == pytest.approx(want, abs=1e-6)
    assert LFDR not in intervals(got)
    assert draw_keys(9) == [f"raw@{d}" for d in range(9)] + ["lfdr@0", "lfdr@1"]


@pytest.mark.slow  # a fit or several: the whole suite runs it
def test_two_seeds_agree_within_a_tenth_on_the_test_model_where_one_draw_does_not(tmp_path):
    default = AttnRegConfig().sanity_draws
    knobs = {"n_bootstrap": 3, "num_images": 16, "log_images": 0, "faithfulness": "off"}
    cbs = {
        (seed, draws): AttentionRegularizationCallback(**knobs, seed=seed, sanity_draws=draws, name=f"s{seed}_{draws}")
        for seed in (0, 1)
        for draws in (1, default)
    }
    csv_trainer(tmp_path, list(cbs.values()), max_epochs=1, limit_train_batches=1).fit(
        perturb(tiny_module()), tiny_data(val_size=16, batch_size=16)
    )

    def mean(seed: int, draws: int, key: str) -> float:
        cb = cbs[(seed, draws)]
        return cb.history[-1][f"{cb.prefix}/{key}"]

    for key in SANITY_KEYS:
        print(key, {k: round(mean(*k, key), 3) for k in cbs})
        assert abs(mean(0, default, key) - mean(1, default, key)) <= 0.1, key
    # the same two seeds, one draw each: their raw means are far apart (this is what the draws are for)
    assert abs(mean(0, 1, RAW) - mean(1, 1, RAW)) > 0.3


def test_the_check_leaves_the_global_random_state_and_the_model_as_they_were(tmp_path):
    module = perturb(tiny_module())
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, faithfulness="off", sanity_draws=9)
    csv_trainer(tmp_path, [cb]).validate(module, tiny_data(val_size=4, batch_size=4), verbose=False)
    weights = copy.deepcopy(module.state_dict())
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    values = cb.sanity_check(module)
    assert values[f"{RAW}_draws"] == 9 and values[f"{LFDR}_draws"] == 2
    assert random.getstate() == states[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1], strict=True))
    assert torch.equal(torch.get_rng_state(), states[2])
    assert all(torch.equal(weights[k], v) for k, v in module.state_dict().items())
    assert cb.sanity_check(module) == values  # and so the same check gives the same numbers


def test_a_failing_rank_and_a_rank_without_probes_still_reach_the_reduction(tmp_path, monkeypatch):
    reduced: list[list[str]] = []  # the keys of each metric the check reduces (over ranks)

    def compute(metric):
        reduced.append(list(metric.keys))
        return quiet_compute(metric)

    monkeypatch.setattr("attnreg_lightning.callback.quiet_compute", compute)
    # no probes (nothing explained on this rank): the same states, reduced
    idle = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, sanity_draws=3)
    assert idle.sanity_check(perturb(tiny_module())) == {}
    assert reduced == [draw_keys(3)]

    def failing(*args, **kwargs):
        raise RuntimeError("no memory for a copy, on purpose")

    monkeypatch.setattr("attnreg_lightning.callback.model_randomization", failing)
    cb = AttentionRegularizationCallback(n_bootstrap=2, num_images=4, log_images=0, faithfulness="off", sanity_draws=3)
    module = perturb(tiny_module())
    csv_trainer(tmp_path, [cb]).validate(module, tiny_data(val_size=4, batch_size=4), verbose=False)
    reduced.clear()
    with pytest.warns(UserWarning, match="sanity_check failed on this rank.*on purpose"):
        assert cb.sanity_check(module) == {}
    assert reduced == [draw_keys(3)] and cb.sanity_rows == []


def test_raw_maps_read_without_nulls_are_the_engines_own(tmp_path):
    images, ids = val_images(tiny_data(val_size=4, batch_size=4))
    for heads in ("mean", "all"):
        engine = AttentionRegularizer(perturb(tiny_module()), n_bootstrap=2, heads=heads)
        torch.testing.assert_close(read_raw(engine, images), engine(images, ids).attention, rtol=1e-5, atol=1e-7)


def test_hugging_face_vits_are_checked_too():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, attn_implementation="eager")  # fmt: skip
    model = perturb(ViTForImageClassification(config).eval())
    weights = copy.deepcopy(model.state_dict())
    images, ids = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), [0, 1, 2]
    engine = AttentionRegularizer(model, n_bootstrap=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = model_randomization(model, engine, lambda m: AttentionRegularizer(m, n_bootstrap=2), images, ids, 0, 3)
    assert rho["raw"].shape == (3, 3) and bool(torch.isfinite(rho["raw"]).all())
    assert len({tuple(r.tolist()) for r in rho["raw"]}) == 3  # each draw its own re-initialization
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: each holds four of the eight probes and checks them, first as it is, then with rank 1
    failing inside the check; what each returned (and warned) goes to ``out.rank<r>.json``."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        module = perturb(tiny_module())
        images, ids = val_images(tiny_data(val_size=8, batch_size=8))
        cb = AttentionRegularizationCallback(**DDP_KNOBS)
        cb.engine = cb._new_engine(module)
        cb._sanity_images = dict(zip(ids[4 * rank : 4 * rank + 4], images[4 * rank : 4 * rank + 4], strict=True))
        record = {"whole": cb.sanity_check(module)}
        if rank == 1:

            def failing(*args, **kwargs):
                raise RuntimeError("on purpose")

            pytest.MonkeyPatch().setattr("attnreg_lightning.callback.model_randomization", failing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record["one_failing"] = cb.sanity_check(module)
        record["warned"] = any("sanity_check failed on this rank" in str(w.message) for w in caught)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


DDP_KNOBS = {"n_bootstrap": 2, "num_images": 4, "log_images": 0, "faithfulness": "off", "sanity_draws": 9}


@pytest.mark.slow
def test_two_ranks_pool_each_draw_and_a_failing_rank_leaves_none_waiting(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "sanity")
    context = mp.start_processes(_ddp_worker, args=(port, out), nprocs=2, join=False, start_method="spawn")
    for _ in range(240):  # a rank left waiting in the reduction would hang: a failure here, not a stuck suite
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("a rank never left the sanity check's reduction")
    ranks = [json.loads((tmp_path / f"sanity.rank{r}.json").read_text()) for r in (0, 1)]
    # one process over all eight probes, and over rank 0's four: what the two ranks must report
    module = perturb(tiny_module())
    images, ids = val_images(tiny_data(val_size=8, batch_size=8))
    reference = {}
    for name, rows in (("whole", slice(0, 8)), ("one_failing", slice(0, 4))):
        cb = AttentionRegularizationCallback(**DDP_KNOBS)
        cb.engine = cb._new_engine(module)
        cb._sanity_images = dict(zip(ids[rows], images[rows], strict=True))
        reference[name] = cb.sanity_check(module)
    for record in ranks:
        for name in ("whole", "one_failing"):
            assert record[name] == pytest.approx(reference[name], rel=1e-9, abs=1e-12), name
    assert reference["whole"] != pytest.approx(reference["one_failing"])  # rank 1's probes counted, then not
    assert [r["warned"] for r in ranks] == [False, True]


def test_an_interval_from_few_draws_stays_within_a_correlations_range():
    # two lfdr draws: t(1) = 12.7 times the sd over sqrt(2) reaches far past [-1, 1]
    (lo, hi) = intervals({RAW: -0.04, f"{RAW}_sd": 0.45, f"{RAW}_draws": 2.0})[RAW]
    assert (lo, hi) == (-1.0, 1.0)
    (lo, hi) = intervals({RAW: 0.2, f"{RAW}_sd": 0.1, f"{RAW}_draws": 64.0})[RAW]
    assert -1 < lo < 0.2 < hi < 1
