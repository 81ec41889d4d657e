import numpy as np
import pytest
import torch

from attnreg_lightning import stats
from attnreg_lightning.regularize import MAP_NAMES, regularize
from attnreg_lightning.stats import pooled_pvalues, significance
from tests.oracle import oracle_image, oracle_maps, oracle_pixel_level


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_case(kind: str, b: int, n: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention-like inputs: obs ``[B, T]`` and null ``[B, N, T]``, rows summing to one."""
    rng = np.random.default_rng(seed)
    if kind == "heavy":
        null = _softmax_rows(rng.standard_t(2, size=(b, n, t)) * 1.5)
        logits = rng.standard_t(2, size=(b, t)) * 1.5
        logits[:, rng.choice(t, size=max(1, t // 20), replace=False)] += 6.0
        obs = _softmax_rows(logits)
    elif kind == "uniform":
        null = _softmax_rows(rng.normal(0, 1e-3, size=(b, n, t)))
        obs = _softmax_rows(rng.normal(0, 1e-3, size=(b, t)))
    elif kind == "ties":
        null = _softmax_rows(np.round(rng.normal(0, 1, size=(b, n, t)) * 2) / 2)
        obs = _softmax_rows(np.round(rng.normal(0.3, 1, size=(b, t)) * 2) / 2)
    else:
        raise AssertionError(kind)
    return obs, null


CASES = [
    ("heavy", 3, 10, 64, 0),
    ("heavy", 1, 1, 196, 1),
    ("heavy", 5, 4, 49, 2),
    ("uniform", 4, 10, 100, 3),
    ("ties", 3, 6, 144, 4),
    ("heavy", 2, 25, 784, 5),
]


@pytest.mark.parametrize(("kind", "b", "n", "t", "seed"), CASES)
@pytest.mark.parametrize("pi0", ["estimate", 0.8])
def test_matches_numpy_statsmodels_oracle(kind, b, n, t, seed, pi0):
    obs, null = make_case(kind, b, n, t, seed)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null), pi0=pi0)
    assert sig.valid.all()
    reg = regularize(torch.from_numpy(obs), sig)
    for i in range(b):
        ref = oracle_image(obs[i], null[i], pi0=pi0)
        np.testing.assert_allclose(sig.z[i].numpy(), ref["z"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(sig.z_null[i].numpy(), ref["z_null"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(sig.p[i].numpy(), ref["p"])
        assert sig.pi0[i].item() == ref["pi0"]
        np.testing.assert_allclose(sig.q[i].numpy(), ref["q"], rtol=0, atol=1e-12)
        maps = oracle_maps(obs[i], ref)
        np.testing.assert_allclose(sig.lfdr[i].numpy(), ref["lfdr"], rtol=0, atol=1e-4)
        for name in MAP_NAMES:
            if name in ("lfdr", "posterior"):
                # lfdr agrees to 1e-4; a token that sits within that of the threshold may flip.
                close = np.abs(ref["lfdr"] - 0.3) > 1e-4
                got, want = reg.maps[name][i].numpy()[close], maps[name][close]
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * obs[i].max())
            else:
                np.testing.assert_allclose(reg.maps[name][i].numpy(), maps[name], rtol=0, atol=1e-15)


OFF_DEFAULT = {"z_th": 0.5, "p_th": 0.2, "lfdr_th": 0.15, "q_th": 0.05}


@pytest.mark.parametrize(("kind", "b", "n", "t", "seed"), CASES)
def test_maps_read_their_own_thresholds(kind, b, n, t, seed):
    """At the defaults p_th == lfdr_th: only distinct thresholds tell a map reading the wrong one."""
    obs, null = make_case(kind, b, n, t, seed)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    reg = regularize(torch.from_numpy(obs), sig, **OFF_DEFAULT)
    assert reg.thresholds.lfdr_th == 0.15 and reg.thresholds.q_th == 0.05
    for i in range(b):
        ref = oracle_image(obs[i], null[i])
        maps = oracle_maps(obs[i], ref, **OFF_DEFAULT)
        # a token whose lfdr lies within the fit's 1e-4 of its threshold may flip
        close = np.abs(ref["lfdr"] - OFF_DEFAULT["lfdr_th"]) > 1e-4
        for name in MAP_NAMES:
            got, want = reg.maps[name][i].numpy(), maps[name]
            if name in ("lfdr", "posterior"):
                np.testing.assert_allclose(got[close], want[close], rtol=0, atol=1e-4 * obs[i].max())
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("patch", [1, 2, 8, 16])
def test_pi0_map_takes_the_percentile_over_pixels_as_the_reference(patch):
    differs = 0
    for kind, b, n, t, seed in CASES:
        obs, null = make_case(kind, b, n, t, seed)
        sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
        ours = regularize(torch.from_numpy(obs), sig, pixels_per_token=patch * patch).maps["pi0"]
        tokens = regularize(torch.from_numpy(obs), sig).maps["pi0"]
        for i in range(b):
            ref = oracle_maps(obs[i], oracle_image(obs[i], null[i]), pixels_per_token=patch * patch)["pi0"]
            np.testing.assert_array_equal(ours[i].numpy(), ref)
            differs += not torch.equal(ours[i], tokens[i])
    assert (differs > 0) == (patch > 1)  # the token rule is not the pixel rule


def test_pi0_map_equals_the_reference_pipeline_on_upsampled_maps():
    """The reference's own order of work: upsample attention to pixels, statistics and maps there."""
    grid, patch = (28, 28), 2
    obs, null = make_case("heavy", 4, 5, grid[0] * grid[1], 20)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    ours = regularize(torch.from_numpy(obs), sig, pixels_per_token=patch * patch).maps["pi0"]
    assert not torch.equal(ours[1], regularize(torch.from_numpy(obs), sig).maps["pi0"][1])  # where rules differ
    for i in range(4):
        px = oracle_pixel_level(obs[i], null[i], grid, patch)
        up = np.kron(obs[i].reshape(grid), np.ones((patch, patch)))
        ref = oracle_maps(up, px)["pi0"].reshape(grid[0] * patch, grid[1] * patch)[::patch, ::patch].ravel()
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=0, atol=1e-15)


def test_float32_input_matches_float64():
    obs, null = make_case("heavy", 4, 10, 196, 7)
    s64 = significance(torch.from_numpy(obs), torch.from_numpy(null))
    s32 = significance(torch.from_numpy(obs).float(), torch.from_numpy(null).float())
    assert s32.z.dtype == torch.float32 and s32.lfdr.dtype == torch.float32
    # logs, mean and std in float64: z of float32 attention is its float64 z, rounded once
    o32, n32 = torch.from_numpy(obs).float(), torch.from_numpy(null).float()
    exact = significance(o32.double(), n32.double())
    assert torch.equal(s32.z, exact.z.float()) and torch.equal(s32.z_null, exact.z_null.float())
    torch.testing.assert_close(s32.z.double(), s64.z, atol=1e-4, rtol=0)
    # float32 rounding may move a token past a near-tie in the pooled ranks: allow one rank.
    assert (s32.p.double() - s64.p).abs().max() <= 1.0 / (196 * 11) + 1e-7
    torch.testing.assert_close(s32.lfdr.double(), s64.lfdr, atol=1e-3, rtol=0)


def _upsample(m: np.ndarray, grid: tuple[int, int], patch: int) -> torch.Tensor:
    x = torch.from_numpy(m).reshape(*m.shape[:-1], *grid)
    return x.repeat_interleave(patch, -2).repeat_interleave(patch, -1)


def test_token_level_equals_pixel_level():
    grid, patch = (6, 8), 4
    obs, null = make_case("heavy", 2, 5, grid[0] * grid[1], 11)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))

    def token(m):  # every pixel of a token carries its value: read one per token
        return m.reshape(grid[0] * patch, grid[1] * patch)[::patch, ::patch].ravel()

    for i in range(2):
        px = oracle_pixel_level(obs[i], null[i], grid, patch)
        np.testing.assert_allclose(sig.z[i].numpy(), token(px["z"]), atol=1e-9)
        np.testing.assert_allclose(sig.p[i].numpy(), token(px["p"]), atol=1e-12)
        assert sig.pi0[i].item() == pytest.approx(px["pi0"], abs=1e-12)
        np.testing.assert_allclose(sig.lfdr[i].numpy(), token(px["lfdr"]), atol=1e-4)
    # and the package itself, run on upsampled maps, agrees with its token-level result
    sig_px = significance(_upsample(obs, grid, patch).flatten(1), _upsample(null, grid, patch).flatten(2))
    for name in ("z", "p", "lfdr"):
        got = getattr(sig_px, name).reshape(2, grid[0] * patch, grid[1] * patch)[:, ::patch, ::patch].flatten(1)
        torch.testing.assert_close(got, getattr(sig, name), atol=1e-4 if name == "lfdr" else 1e-9, rtol=0)
    torch.testing.assert_close(sig_px.pi0, sig.pi0, atol=1e-12, rtol=0)


def srmsd(p: np.ndarray) -> float:
    """Signed RMSD of sorted p-values from Uniform(0,1) quantiles (positive: conservative)."""
    p = np.sort(p.ravel())
    u = (np.arange(1, p.size + 1) - 0.5) / p.size
    d = p - u
    return float(np.sign(d.mean()) * np.sqrt(np.mean(d**2)))


def test_calibrated_under_the_null():
    rng = np.random.default_rng(0)
    b, n, t = 16, 10, 196
    draws = _softmax_rows(rng.normal(0, 1, size=(b, n + 1, t)))
    obs, null = draws[:, 0], draws[:, 1:]
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    assert abs(srmsd(sig.p.numpy())) < 0.03
    assert sig.pi0.mean().item() > 0.85
    assert (sig.lfdr < 0.3).float().mean().item() < 0.02


def test_planted_tokens_are_discovered():
    rng = np.random.default_rng(1)
    b, n, t = 8, 10, 196
    null = _softmax_rows(rng.normal(0, 1, size=(b, n, t)))
    logits = rng.normal(0, 1, size=(b, t))
    planted = np.zeros((b, t), bool)
    planted[:, :10] = True
    # boost the planted tokens without renormalising, so the rest keep their null-like level
    obs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    obs[planted] *= np.exp(6.0)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    assert sig.pi0.mean().item() > 0.8
    lfdr = sig.lfdr.numpy()
    assert lfdr[planted].max() < 0.05
    assert np.median(lfdr[~planted]) > 0.9
    assert (lfdr[~planted] <= 0.3).mean() < 0.05


def test_zero_and_negative_attention_are_clamped_not_nan():
    obs, null = make_case("uniform", 2, 5, 64, 3)  # attention near 1/64: nothing near the floor
    assert significance(torch.from_numpy(obs), torch.from_numpy(null)).clamped.tolist() == [0, 0]
    obs[0, :5] = 0.0
    obs[1, :3] = -0.1
    null[0, 0, :7] = 0.0
    null[1, 2, :2] = 1e-13
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    for v in (sig.z, sig.z_null, sig.p, sig.lfdr, sig.q, sig.pi0):
        assert torch.isfinite(v).all()
    assert sig.valid.all()
    assert sig.clamped.tolist() == [5 + 7, 3 + 2]  # observed and null values below the floor, reported


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_image_gets_the_same_statistics_alone_and_in_any_batch(dtype):
    """Which images share a batch depends on batch size, world size and num_images: a user's maps must not.
    Heavy tails make some Poisson fits drift or diverge, amplifying the last bit of any difference."""
    failed = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        b, n, t = 16, 5, 196 + seed % 2
        null = torch.from_numpy(_softmax_rows(rng.standard_t(2, size=(b, n, t)) * 2)).to(dtype)
        obs = torch.from_numpy(_softmax_rows(rng.standard_t(2, size=(b, t)) * 2)).to(dtype)
        whole = significance(obs, null)
        failed += int((~whole.fit_ok).sum())
        maps = regularize(obs, whole).maps
        others = [[i] for i in range(b)] + [rng.permutation(b)[:5].tolist()]
        for rows in others:
            part = significance(obs[rows], null[rows])
            for name in ("z", "z_null", "p", "pi0", "lfdr", "q", "fit_ok", "valid", "clamped"):
                assert torch.equal(getattr(part, name), getattr(whole, name)[rows]), (seed, rows, name)
            part_maps = regularize(obs[rows], part).maps
            assert all(torch.equal(part_maps[m], maps[m][rows]) for m in maps)
    assert failed > 0  # diverging fits were among them


def test_a_diverging_density_fit_is_flagged_and_discovers_nothing():
    from statsmodels.stats.multitest import local_fdr as sm_local_fdr

    x = np.random.default_rng(2).standard_t(3, size=(32, 784))
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    z, pi0 = torch.from_numpy(x), torch.ones(32, dtype=torch.float64)
    lfdr, fit_ok = stats.local_fdr(z, pi0)
    alone, alone_ok = stats.local_fdr(z[21:22], pi0[:1])
    # row 21's fit explodes (statsmodels' fitted log-density ~ +270): it calls every token a discovery
    assert (sm_local_fdr(x[21], null_proportion=1.0) <= 0.3).all()
    assert fit_ok.tolist() == [i != 21 for i in range(32)] and not alone_ok[0]
    assert (lfdr[21] == 1).all() and torch.equal(alone[0], lfdr[21])
    for i in (0, 5, 20, 22):  # the fits that work agree with statsmodels
        np.testing.assert_allclose(lfdr[i].numpy(), sm_local_fdr(x[i], null_proportion=1.0), rtol=0, atol=1e-4)
    # an explosion that stays finite (fitted histogram of ~1e30 tokens, not 784): flagged all the same
    x = np.random.default_rng(2).standard_t(1.5, size=(25, 784))[24]
    z = torch.from_numpy((x - x.mean()) / x.std())[None]
    lfdr, fit_ok = stats.local_fdr(z, pi0[:1])
    assert not fit_ok[0] and (lfdr == 1).all()


def test_degenerate_images_are_flagged_and_neutral():
    obs, null = make_case("heavy", 3, 5, 64, 9)
    null[1] = 1.0 / 64  # constant null: no spread
    obs[2, 4] = np.nan
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    assert sig.valid.tolist() == [True, False, False]
    for v in (sig.z, sig.p, sig.lfdr, sig.q):
        assert torch.isfinite(v).all()
    assert (sig.p[1:] == 1).all() and (sig.lfdr[1:] == 1).all()
    reg = regularize(torch.from_numpy(obs), sig)
    assert all((m[1:] == 0).all() for m in reg.maps.values())
    # the healthy image is unaffected by its degenerate neighbours
    alone = significance(torch.from_numpy(obs[:1]), torch.from_numpy(null[:1]))
    torch.testing.assert_close(alone.lfdr[0], sig.lfdr[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p_th": 1.5}, "p_th"),
        ({"lfdr_th": -0.1}, "lfdr_th"),
        ({"q_th": 2.0}, "q_th"),
        ({"z_th": float("nan")}, "z_th"),
    ],
)
def test_bad_thresholds_name_the_argument(kwargs, name):
    obs, null = make_case("heavy", 1, 2, 16, 0)
    sig = significance(torch.from_numpy(obs), torch.from_numpy(null))
    with pytest.raises(ValueError, match=name):
        regularize(torch.from_numpy(obs), sig, **kwargs)


def test_bad_shapes_and_pi0():
    obs, null = make_case("heavy", 2, 2, 16, 0)
    with pytest.raises(ValueError, match="null"):
        significance(torch.from_numpy(obs), torch.from_numpy(null[:, :, :8]))
    with pytest.raises(ValueError, match="pi0"):
        significance(torch.from_numpy(obs), torch.from_numpy(null), pi0=1.5)
    with pytest.raises(ValueError, match="pi0"):
        significance(torch.from_numpy(obs), torch.from_numpy(null), pi0="storey")


def test_summary_numbers():
    obs, null = make_case("heavy", 3, 10, 100, 12)
    o = torch.from_numpy(obs)
    reg = regularize(o, significance(o, torch.from_numpy(null)), grid=(10, 10))
    for name, m in reg.maps.items():
        torch.testing.assert_close(reg.sparsity[name], (m == 0).double().mean(1))
        torch.testing.assert_close(reg.retained_mass[name], m.sum(1) / o.sum(1))
        assert (reg.retained_mass[name] <= 1 + 1e-12).all()
    assert reg.spatial("lfdr").shape == (3, 10, 10)
    # every threshold map is a subset of zreg
    for name in ("p", "lfdr", "pi0", "q"):
        assert ((reg.maps[name] > 0) <= (reg.maps["zreg"] > 0)).all()


def _pool_pvalues(z: np.ndarray, z0: np.ndarray) -> np.ndarray:
    """docs/method.md's p-value by sorting the whole pool, one image at a time."""
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        pool = np.sort(np.concatenate([np.abs(z[i]), np.abs(z0[i]).ravel()]))
        out[i] = 1.0 - np.searchsorted(pool, np.abs(z[i]), side="right") / pool.size
    return out


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_counts_are_exact_on_ties_outliers_and_crowding(dtype, chunk, monkeypatch):
    if chunk is not None:  # one bootstrap sample at a time
        monkeypatch.setattr(stats, "_NULLS_PER_CHUNK", chunk)
    rng = np.random.default_rng(13)
    b, n, t = 6, 7, 300
    z = rng.standard_t(3, size=(b, t))
    z0 = rng.standard_t(3, size=(b, n, t))
    z[0, :250] = -1.5  # one value shared by most tokens, and by some nulls on the other side of zero
    z0[0, :, :40] = 1.5
    z[1] = np.round(z[1] * 4) / 4  # heavy ties within the observed values and with the nulls
    z0[1] = np.round(z0[1] * 4) / 4
    z[2, 0] = 1e6  # one far outlier squeezes every other value into the lowest cells
    z[3] = 0.0  # all observed values equal: every null is at or above them
    z0[4] = np.abs(z[4])[None, :] * rng.choice([-1.0, 1.0], size=(n, t))  # nulls equal to observed values
    z[5] = np.linspace(1.0, 1.0 + 1e-4, t)  # distinct values closer together than any cell
    z, z0 = z.astype(dtype), z0.astype(dtype)
    pool = t + n * t  # compare the counts behind p: float32 p rounds them
    want = np.rint((1 - _pool_pvalues(z, z0)) * pool)
    # the whole batch (a crowded image sends it to the plain search) and each image alone (mostly cells)
    got = pooled_pvalues(torch.from_numpy(z), torch.from_numpy(z0)).double().numpy()
    np.testing.assert_array_equal(np.rint((1 - got) * pool), want)
    for i in range(b):
        got = pooled_pvalues(torch.from_numpy(z[i : i + 1]), torch.from_numpy(z0[i : i + 1])).double().numpy()
        np.testing.assert_array_equal(np.rint((1 - got[0]) * pool), want[i])


def test_statistics_carry_no_gradient_but_maps_stay_differentiable_in_attention():
    obs, null = make_case("heavy", 2, 5, 49, 14)
    o = torch.from_numpy(obs).requires_grad_()
    sig = significance(o, torch.from_numpy(null))
    assert not any(getattr(sig, k).requires_grad for k in ("z", "z_null", "p", "pi0", "lfdr", "q"))
    assert not any(getattr(sig, k).is_inference() for k in ("z", "z_null", "p", "pi0", "lfdr", "q", "valid"))
    reg = regularize(o, sig)
    reg.maps["posterior"].sum().backward()
    torch.testing.assert_close(o.grad, 1 - sig.lfdr)


def test_empty_batch_gives_empty_statistics():
    sig = significance(torch.rand(0, 49), torch.rand(0, 5, 49))
    assert sig.z_null.shape == (0, 5, 49) and sig.lfdr.shape == (0, 49) and sig.pi0.shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_null_pvalues_count_the_whole_pool(dtype):
    obs, null = make_case("ties", 3, 4, 64, 15)
    sig = significance(torch.from_numpy(obs.astype(dtype)), torch.from_numpy(null.astype(dtype)))
    got = stats.null_pvalues(sig).double().numpy()
    z, z0 = np.abs(sig.z.double().numpy()), np.abs(sig.z_null.double().numpy()).reshape(3, -1)
    for i in range(3):
        pool = np.sort(np.concatenate([z[i], z0[i]]))
        want = np.searchsorted(pool, z0[i], side="right")  # #{pool <= |z_null|}
        np.testing.assert_array_equal(np.rint((1 - got[i]) * pool.size), want)


def test_poisson_fit_stops_where_statsmodels_glm_does(monkeypatch):
    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM

    # heavy-tailed z: most fits converge in 5-11 steps, a few drift (isolated outliers) to the 100-step cap,
    # where a step more or less moves the fitted log-means by ~1e-4
    rng = np.random.default_rng(1)
    logits = rng.standard_t(3, size=(32, 784))
    z = torch.from_numpy((logits - logits.mean(1, keepdims=True)) / logits.std(1, keepdims=True))
    fits, irls = [], stats._poisson_irls

    def keep(x, y, start):
        fits.append((x, y, start, irls(x, y, start)))
        return fits[-1][-1]

    monkeypatch.setattr(stats, "_poisson_irls", keep)
    _, fit_ok = stats.local_fdr(z, torch.ones(32, dtype=torch.float64))
    ((x, y, start, beta),) = fits
    steps = []
    for i in range(32):
        ref = GLM(y[i].numpy(), x[i].numpy(), family=families.Poisson()).fit(start_params=start[i].numpy())
        steps.append(ref.fit_history["iteration"])
        np.testing.assert_allclose((x[i] @ beta[i]).numpy(), np.log(ref.fittedvalues), rtol=0, atol=1e-7)
    assert 100 in steps and any(s % stats._IRLS_CHECK_EVERY for s in steps)  # both stops are exercised


def test_statistics_bound_their_cpu_threads_and_restore_the_callers_setting(monkeypatch):
    obs, null = (torch.from_numpy(a).float() for a in make_case("heavy", 3, 5, 196, 8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real = stats._significance
        monkeypatch.setattr(stats, "_significance", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
        bounded = significance(obs, null)
        unbounded = significance(obs, null, cpu_threads=None)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        for name in ("z", "p", "lfdr", "q", "pi0"):
            assert torch.equal(getattr(bounded, name), getattr(unbounded, name))
        with pytest.raises(ValueError, match="boom"), stats.bounded_threads(torch.device("cpu"), 1):
            raise ValueError("boom")
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="cpu_threads"):
            significance(obs, null, cpu_threads=0)
    finally:
        torch.set_num_threads(before)
