"""Faithfulness metrics: the batched path gives what a plain per-image loop gives (each perturbed image built block
by block in numpy, the model run on one image at a time), random sets are the same for the same (seed, id) in any
batch, undefined images are NaN and counted, the forward budget and chunking hold, classifier heads are found."""

import copy

import lightning as L
import numpy as np
import pytest
import timm
import torch
from scipy.ndimage import gaussian_filter1d
from torch import nn

from attnreg_lightning.faithfulness import (
    classifier_forward,
    faithfulness,
    gaussian_blur,
    random_tokens,
    token_keys,
    top_tokens,
)
from tests.helpers import perturb

GRID = (4, 6)  # neither the grid nor a token's block is square: a swapped h and w misplaces pixels
BLOCK = (8, 6)
SIZE = (GRID[0] * BLOCK[0], GRID[1] * BLOCK[1])
T = GRID[0] * GRID[1]
IDS = [10, 3, 7, 100, 5, 42]
MASK64 = (1 << 64) - 1


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    """A small timm ViT whose predictions depend on the image: fresh timm weights (std 0.02) leave the class
    token's output nearly the same for every image, so every weight is drawn at a scale that carries the image
    through (2 / sqrt(fan-in)), biases and norms are random, and the head's bias is centred on random images so
    that images are predicted different classes (a path that mixes up images' classes is seen)."""
    torch.manual_seed(seed)
    options = {"img_size": SIZE, "patch_size": BLOCK, "depth": 2, "embed_dim": 48, "num_heads": 3}
    vit = timm.create_model("vit_tiny_patch16_224", **{"num_classes": 5, **options, **kwargs})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0, 2 / module.weight[0].numel() ** 0.5, generator=g)
        vit.cls_token.normal_(0, 1, generator=g)
        vit.pos_embed.normal_(0, 0.5, generator=g)
    perturb(vit, seed).eval()
    if vit.num_classes:
        with torch.no_grad():
            vit.head.bias -= vit(_images(64, seed=99)).mean(0)
    return vit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The oracle runs hundreds of one-image forwards of a tiny model: one intra-op thread runs them faster than
    two that wait on each other (and on whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit():
    return _vit()


def _images(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(b, 3, 4, 6, generator=g), size=SIZE, mode="bilinear")
    return 2 * smooth + 0.5 * torch.randn(b, 3, *SIZE, generator=g)


def _inputs(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Images, attention with ties, an ``lfdr`` map with k = 0, T, 1, 5, 12, 23 (rows 0..5), a ``p`` map of other
    sizes, and a ``posterior`` with many zeros and repeated values (ties broken by the attention)."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.randint(1, 7, (b, T), generator=g).float() / 10
    ks = [0, T, 1, 5, 12, 23][:b]
    lfdr = torch.zeros(b, T)
    for row, k in enumerate(ks):  # test data, not the code under test
        lfdr[row, torch.randperm(T, generator=g)[:k]] = torch.rand(k, generator=g) + 0.1
    p = attention * (torch.rand(b, T, generator=g) < 0.3)
    posterior = (torch.randint(0, 3, (b, T), generator=g).float() / 4) * (torch.rand(b, T, generator=g) < 0.6)
    return _images(b, seed), attention, {"lfdr": lfdr, "p": p, "posterior": posterior}


# --- the oracle: one image at a time, blocks replaced by explicit slicing ---------------------------------------


def _mix(z: int) -> int:
    """splitmix64's output function on Python's unbounded ints, reduced to 64 bits."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _oracle_keys(seed: int, sample_id: int, tokens: int) -> list[int]:
    image = _mix(_mix(seed & MASK64) ^ (sample_id & MASK64))
    return [_mix(image ^ t) >> 1 for t in range(tokens)]


def _oracle_random(seed: int, sample_id: int, k: int) -> list[int]:
    keys = _oracle_keys(seed, sample_id, T)
    return sorted(range(T), key=lambda t: (keys[t], t))[:k]


def _oracle_baseline(image: np.ndarray, baseline: str) -> np.ndarray:
    if baseline == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).copy()
    if baseline == "zeros":
        return np.zeros_like(image)
    # scipy's "mirror" is torch's "reflect" (the edge pixel not repeated); radius int(3 sigma + 0.5)
    sigma = max(BLOCK)
    out = gaussian_filter1d(image.astype(np.float64), sigma, axis=2, mode="mirror", truncate=3.0)
    return gaussian_filter1d(out, sigma, axis=1, mode="mirror", truncate=3.0).astype(image.dtype)


def _paste(target: np.ndarray, source: np.ndarray, tokens) -> np.ndarray:
    """``target`` with the pixel blocks of ``tokens`` copied from ``source``."""
    out = target.copy()
    ph, pw = BLOCK
    for tok in tokens:
        r, c = divmod(tok, GRID[1])
        out[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = source[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
    return out


def _probability(model: nn.Module, image: np.ndarray, c: int) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None])
    return float(logits.double().softmax(-1)[0, c])


def _oracle(model, images, attention, maps, ids, kept_maps, steps, baseline, seed, fixed_k=None, regions=None):
    """The numbers per kept map (the map's, its same-k random set's, the fixed-k top set's for the maps in
    ``fixed_k``) and the four curves, per image, as a loop over images and tokens."""
    rows = []
    for i in range(len(images)):
        x = images[i].numpy()
        base = _oracle_baseline(x, baseline)
        with torch.no_grad():
            c = int(model(images[i : i + 1]).argmax())
        p0 = _probability(model, x, c)
        att = attention[i].tolist()
        out = {"c": c, "p_clean": p0}
        seen = set()  # the distinct perturbed images this image's values need (the clean image aside)

        def prob(image: np.ndarray, x: np.ndarray = x, seen: set = seen, c: int = c) -> float:
            if not np.array_equal(image, x):
                seen.add(image.tobytes())
            return _probability(model, image, c)

        sets = {}  # label: (tokens, undefined)
        for name in kept_maps:
            kept = [t for t in range(T) if maps[name][i, t] > 0]
            k = len(kept)
            sets[name] = (kept, k in (0, T))
            sets[f"same_k_random@{name}"] = (_oracle_random(seed, ids[i], k), k in (0, T))
        for name, kappa in (fixed_k or {}).items():
            k = round(kappa * T)
            sets[f"fixed_k_top@{name}"] = (sorted(range(T), key=lambda t: (-att[t], t))[:k], k in (0, T))
        for label, (s, nan) in sets.items():
            rest = [t for t in range(T) if t not in s]
            out[f"{label}/comprehensiveness"] = np.nan if nan else p0 - prob(_paste(x, base, s))
            out[f"{label}/sufficiency"] = np.nan if nan else p0 - prob(_paste(x, base, rest))
        for name, region in (regions or {}).items():
            tokens = [t for t in range(T) if region[i, t]]
            nan = len(tokens) in (0, T)
            drawn = _oracle_random(seed, ids[i], len(tokens))
            out[f"{name}/reliance"] = np.nan if nan else p0 - prob(_paste(x, base, tokens))
            out[f"same_k_random@{name}/reliance"] = np.nan if nan else p0 - prob(_paste(x, base, drawn))
        counts = [round(j * T / steps) for j in range(steps + 1)]
        for name in ("raw", "posterior"):
            v = att if name == "raw" else maps["posterior"][i].tolist()
            order = sorted(range(T), key=lambda t: (-v[t], -att[t], t))
            deletion = [prob(_paste(x, base, order[:m])) for m in counts]
            insertion = [prob(_paste(base, x, order[:m])) for m in counts]
            for kind, curve in (("deletion", deletion), ("insertion", insertion)):
                out[f"{name}/{kind}"] = curve
                out[f"{name}/{kind}_auc"] = sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:], strict=True)) / steps
        out["forwards"] = len(seen)
        rows.append(out)
    return rows


# --- the batched path against the oracle ----------------------------------------------------------------------

# a shortcut of 1 to 4 tokens, none in row 0 and every token in row 1 (undefined there); an object region of 3
REGIONS = {
    "shortcut": torch.tensor([[False] * T, [True] * T] + [[t < 1 + r for t in range(T)] for r in range(4)]),
    "roi": torch.tensor([[t in (5, 6, 11) for t in range(T)]] * 6),
}


class Recording:
    def __init__(self, forward):
        self.forward, self.sizes = forward, []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.forward(images)


@pytest.mark.parametrize(("baseline", "steps"), [("mean", 5), ("blur", 4), ("zeros", 1)])
def test_batched_path_equals_the_per_image_oracle(vit, baseline, steps):
    # in float64 the two paths differ by rounding alone, so a tight tolerance leaves no room for a real error
    vit = copy.deepcopy(vit).double()
    images, attention, maps = _inputs()
    images = images.double()
    kept_maps = ("lfdr", "p")
    counted = Recording(classifier_forward(vit))
    res = faithfulness(
        counted,
        images,
        attention,
        maps,
        GRID,
        IDS,
        mode="curves",
        kept_maps=kept_maps,
        fixed_k={"lfdr": 0.3, "q": 0.55},  # a map need not be among the kept maps for its fixed-k set
        regions=REGIONS,
        steps=steps,
        baseline=baseline,
        seed=3,
    )
    fixed = {"lfdr": 0.3, "q": 0.55}
    expected = _oracle(vit, images, attention, maps, IDS, kept_maps, steps, baseline, 3, fixed, REGIONS)
    # the clean images, then each distinct perturbed image of an image once (none for an undefined value)
    assert sum(counted.sizes) == len(images) + sum(row["forwards"] for row in expected)
    assert res.predicted.tolist() == [row["c"] for row in expected]
    assert len(set(res.predicted.tolist())) > 2
    np.testing.assert_allclose(res.p_clean, [row["p_clean"] for row in expected], rtol=0, atol=1e-10)
    assert set(res.scores) == {
        f"{prefix}{name}/{metric}"
        for name in kept_maps
        for prefix in ("", "same_k_random@")
        for metric in ("comprehensiveness", "sufficiency")
    } | {f"fixed_k_top@{m}/{metric}" for m in ("lfdr", "q") for metric in ("comprehensiveness", "sufficiency")} | {
        f"{name}/{kind}_auc" for name in ("raw", "posterior") for kind in ("deletion", "insertion")
    } | {f"{who}{r}/reliance" for r in REGIONS for who in ("", "same_k_random@")}
    for key, values in res.scores.items():
        assert values.dtype == torch.float64 and values.shape == (len(images),)
        np.testing.assert_allclose(values, [row[key] for row in expected], rtol=0, atol=1e-10, err_msg=key)
    for key, values in res.curves.items():
        assert values.shape == (len(images), steps + 1)
        np.testing.assert_allclose(values, [row[key] for row in expected], rtol=0, atol=1e-10, err_msg=key)
    # the check has teeth: replacing tokens moves the predicted class's probability by a lot
    assert np.nanmax(np.abs(res.scores["lfdr/sufficiency"])) > 0.05
    assert (res.curves["raw/deletion"].amax(1) - res.curves["raw/deletion"].amin(1)).mean() > 0.05


def test_undefined_images_are_nan_and_counted(vit):
    images, attention, maps = _inputs()
    forward = classifier_forward(vit)
    res = faithfulness(forward, images, attention, maps, GRID, IDS, kept_maps=("lfdr", "p"), fixed_k={"lfdr": 0.5})
    k_p = (maps["p"] > 0).sum(1)
    assert res.undefined == {"lfdr": 2, "p": int(((k_p == 0) | (k_p == T)).sum())}
    for prefix in ("", "same_k_random@"):
        for metric in ("comprehensiveness", "sufficiency"):
            values = res.scores[f"{prefix}lfdr/{metric}"]
            assert values[:2].isnan().all() and values[2:].isfinite().all()  # rows 0, 1: k = 0 and k = T
    # the fixed k is every image's: defined for all of them, or (k rounds to 0 or T) for none
    assert res.scores["fixed_k_top@lfdr/comprehensiveness"].isfinite().all()
    for kappa in (0.01, 0.99):
        none = faithfulness(forward, images, attention, maps, GRID, IDS, kept_maps=(), fixed_k={"lfdr": kappa})
        assert set(none.scores) == {"fixed_k_top@lfdr/comprehensiveness", "fixed_k_top@lfdr/sufficiency"}
        assert all(v.isnan().all() for v in none.scores.values())


def test_the_fixed_k_baseline_is_the_map_only_where_the_image_keeps_the_fixed_k():
    """A map that keeps each image's top-k raw tokens (as every thresholded map does, z, p, q and the pi0 cut being
    monotone in the raw attention) with k varying by image: its fixed-k baseline equals it exactly on the images
    whose k is the fixed one and differs on the others, so the logged comparison can come out either way."""
    model = TopLeftClassifier()
    images, attention, _ = _inputs()
    attention[:, 0] = torch.linspace(0.0, 1.0, 6)  # token 0, the only one the model sees, ranks by image
    ks = torch.tensor([3, 8, 22, 8, 15, 20])
    lfdr = torch.where(top_tokens(attention, ks), attention, torch.zeros_like(attention))
    res = faithfulness(model, images, attention, {"lfdr": lfdr}, GRID, IDS, fixed_k={"lfdr": 8 / T})
    for metric in ("comprehensiveness", "sufficiency"):
        mine, fixed = res.scores[f"lfdr/{metric}"], res.scores[f"fixed_k_top@lfdr/{metric}"]
        same = ks == 8
        assert torch.equal(mine[same], fixed[same])
    # where token 0 is in one set and not the other, the model's prediction tells them apart
    in_map = top_tokens(attention, ks)[:, 0]
    in_fixed = top_tokens(attention, torch.full((6,), 8))[:, 0]
    differ = in_map != in_fixed
    assert differ.any()
    gap = (res.scores["lfdr/comprehensiveness"] - res.scores["fixed_k_top@lfdr/comprehensiveness"]).abs()
    assert (gap[differ] > 1e-3).all()


def test_reliance_on_a_region_the_attention_ignores():
    """The model reads token 0 alone, and the attention puts least there: the map keeps other tokens and removing
    them changes nothing, while removing the region {token 0} moves the prediction; as many random tokens (which
    miss token 0 in these images) do not."""
    model = TopLeftClassifier()
    images, attention, _ = _inputs()
    attention[:, 0] = 0.0
    lfdr = torch.where(top_tokens(attention, torch.full((6,), 5)), attention, torch.zeros_like(attention))
    cue = torch.zeros(6, T, dtype=torch.bool)
    cue[:, 0] = True
    res = faithfulness(model, images, attention, {"lfdr": lfdr}, GRID, IDS, regions={"shortcut": cue}, seed=1)
    assert res.scores["lfdr/comprehensiveness"].abs().max() <= 1e-7
    drawn = random_tokens(1, torch.tensor(IDS), torch.ones(6, dtype=torch.long), T)
    assert not drawn[:, 0].any()
    assert (res.scores["shortcut/reliance"] > 1e-3).all()
    assert res.scores["same_k_random@shortcut/reliance"].abs().max() <= 1e-7


def test_top_tokens_break_ties_by_the_lower_index():
    attention = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3]])
    chosen = top_tokens(attention, torch.tensor([2, 3]))
    assert chosen.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]


# --- random sets ------------------------------------------------------------------------------------------------


def test_token_keys_are_splitmix64_of_seed_id_and_token():
    ids = torch.tensor([0, 1, 7, -3, 2**62 + 5])
    for seed in (0, 1, -1, 2**63 + 11):
        keys = token_keys(seed, ids, T)
        expected = [_oracle_keys(seed, i, T) for i in ids.tolist()]
        assert keys.tolist() == expected  # exact: a shift that drags the sign bit in changes every key
        assert (keys >= 0).all()


def test_random_sets_depend_on_seed_and_id_only():
    ids = torch.tensor(IDS)
    k = torch.tensor([0, 1, 5, 12, 23, T])
    chosen = random_tokens(7, ids, k, T)
    assert chosen.sum(1).tolist() == k.tolist()
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(random_tokens(7, ids[perm], k[perm], T), chosen[perm])
    assert torch.equal(random_tokens(7, ids[:2], k[:2], T), chosen[:2])
    assert torch.equal(random_tokens(7, ids[2:], k[2:], T), chosen[2:])
    five = torch.full((6,), 5)
    base = random_tokens(7, ids, five, T)
    assert not torch.equal(random_tokens(8, ids, five, T), base)
    others = random_tokens(7, ids + 1000, five, T)
    assert all(not torch.equal(a, b) for a, b in zip(others, base, strict=True))
    assert len({tuple(row.tolist()) for row in base}) == len(ids)


def test_random_scores_follow_the_image_not_its_batch(vit):
    images, attention, maps = _inputs()
    forward = classifier_forward(vit)

    def run(rows: list[int], seed: int = 5):
        subset = {name: m[rows] for name, m in maps.items()}
        ids = [IDS[i] for i in rows]
        return faithfulness(forward, images[rows], attention[rows], subset, GRID, ids, kept_maps=("p",), seed=seed)

    full = run(list(range(6)))
    perm = [3, 5, 0, 2, 4, 1]
    permuted, first, rest = run(perm), run([0, 1]), run([2, 3, 4, 5])
    for metric in ("comprehensiveness", "sufficiency"):
        key = f"same_k_random@p/{metric}"
        np.testing.assert_allclose(permuted.scores[key], full.scores[key][perm], rtol=0, atol=1e-6, equal_nan=True)
        joined = torch.cat([first.scores[key], rest.scores[key]])
        np.testing.assert_allclose(joined, full.scores[key], rtol=0, atol=1e-6, equal_nan=True)
    key = "same_k_random@p/comprehensiveness"
    defined = full.scores[key].isfinite()
    assert defined.sum() >= 4
    assert not torch.allclose(run(list(range(6)), seed=6).scores[key][defined], full.scores[key][defined])


# --- a model that looks at one token only ------------------------------------------------------------------------


class TopLeftClassifier(nn.Module):
    """Logits from the top-left token's pixels alone: removing any other token changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(3 * BLOCK[0] * BLOCK[1], 4)
        nn.init.normal_(self.linear.weight, std=0.3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images[:, :, : BLOCK[0], : BLOCK[1]].flatten(1))


def test_tokens_the_model_ignores_have_zero_comprehensiveness():
    model = TopLeftClassifier()
    images, attention, _ = _inputs()
    g = torch.Generator().manual_seed(2)
    lfdr = torch.zeros(6, T)
    for row, k in enumerate([1, 3, 8, 15, 20, 23]):
        lfdr[row, 1 + torch.randperm(T - 1, generator=g)[:k]] = 1.0  # never token 0
    attention[:, 0] = 1.0  # the top-k always holds token 0
    maps = {"lfdr": lfdr, "posterior": lfdr}
    res = faithfulness(model, images, attention, maps, GRID, IDS, fixed_k={"lfdr": 0.25})
    assert res.undefined == {"lfdr": 0}
    assert res.scores["lfdr/comprehensiveness"].abs().max() <= 1e-7
    # keeping S alone replaced token 0, the only one the model sees: as far as the model knows, all is baseline
    base = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    with torch.no_grad():
        p_base = model(base).double().softmax(-1).gather(1, res.predicted[:, None])[:, 0]
    np.testing.assert_allclose(res.scores["lfdr/sufficiency"], res.p_clean - p_base, rtol=0, atol=1e-7)
    fixed = res.scores["fixed_k_top@lfdr/comprehensiveness"]
    np.testing.assert_allclose(fixed, res.p_clean - p_base, rtol=0, atol=1e-7)
    assert fixed.abs().min() > 1e-3
    expected = _oracle(model, images, attention, maps, IDS, ("lfdr",), 8, "mean", 0, {"lfdr": 0.25})
    for key, values in res.scores.items():
        np.testing.assert_allclose(values, [row[key] for row in expected], rtol=0, atol=1e-6, err_msg=key)


# --- forwards: budget, chunking, clean logits -------------------------------------------------------------------


def test_chunks_give_the_same_results_and_the_forward_budget_holds(vit):
    images, attention, maps = _inputs(5, seed=1)
    kwargs = {"mode": "curves", "kept_maps": ("lfdr", "p"), "steps": 4, "baseline": "blur", "seed": 2}
    small, large = Recording(classifier_forward(vit)), Recording(classifier_forward(vit))
    a = faithfulness(small, images, attention, maps, GRID, IDS[:5], max_images_per_forward=3, **kwargs)
    b = faithfulness(large, images, attention, maps, GRID, IDS[:5], max_images_per_forward=256, **kwargs)
    distinct = sum(
        row["forwards"] for row in _oracle(vit, images, attention, maps, IDS[:5], ("lfdr", "p"), 4, "blur", 2)
    )
    # fewer than every set of every image (6 per kept map, the all-baseline one and 4 curves x 3 inner steps): the
    # undefined images' sets and the sets equal to another are not forwarded
    assert distinct < 5 * (6 * 2 + 1 + 4 * 3)
    assert sum(small.sizes) == sum(large.sizes) == 5 + distinct
    assert max(small.sizes) == 3 and large.sizes == [5, distinct]
    for key in a.scores:
        np.testing.assert_allclose(a.scores[key], b.scores[key], rtol=0, atol=1e-6, err_msg=key)
    assert a.undefined == b.undefined and torch.equal(a.predicted, b.predicted)
    assert len(set(a.predicted.tolist())) > 2  # a chunk that takes another image's class is seen
    given = Recording(classifier_forward(vit))
    with torch.no_grad():
        logits = vit(images)
    c = faithfulness(
        given, images, attention, maps, GRID, IDS[:5], clean_logits=logits, max_images_per_forward=256, **kwargs
    )
    assert given.sizes == [distinct]
    # by default, on a CPU: forwards of 32
    default = Recording(classifier_forward(vit))
    faithfulness(default, images, attention, maps, GRID, IDS[:5], **kwargs)
    assert max(default.sizes) == 32 and sum(default.sizes) == 5 + distinct
    for key in a.scores:
        np.testing.assert_allclose(c.scores[key], b.scores[key], rtol=0, atol=1e-6, err_msg=key)


def maps_rows(maps: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {name: m[rows] for name, m in maps.items()}


def test_curves_alone_cost_one_baseline_forward_and_unusable_images_are_nan(vit):
    images, attention, maps = _inputs(3)
    attention[0, 3] = float("nan")  # the engine's mark of an image it could not test
    counted = Recording(classifier_forward(vit))
    res = faithfulness(counted, images, attention, maps, GRID, IDS[:3], mode="curves", kept_maps=(), steps=3)
    assert set(res.scores) == {f"{m}/{kind}_auc" for m in ("raw", "posterior") for kind in ("deletion", "insertion")}
    assert res.undefined == {}
    # the clean images, then the usable images' distinct steps (the all-baseline image and 4 curves x 2 inner steps)
    usable = _oracle(vit, images[1:], attention[1:], maps_rows(maps, slice(1, None)), IDS[1:3], (), 3, "mean", 0)
    assert sum(counted.sizes) == 3 + sum(row["forwards"] for row in usable)
    for values in res.scores.values():
        assert values[0].isnan() and values[1:].isfinite().all()
    nothing = faithfulness(counted, images, attention, maps, GRID, IDS[:3], kept_maps=())
    assert nothing.scores == {} and nothing.p_clean.shape == (3,)


def test_blur_keeps_a_constant_image_and_takes_images_smaller_than_its_kernel():
    image = torch.full((1, 3, 8, 5), 2.5)
    torch.testing.assert_close(gaussian_blur(image, 8.0), image)


# --- classifier_forward -------------------------------------------------------------------------------------------


class Holder(L.LightningModule):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit


def test_classifier_forward_timm():
    from torch._dynamo.testing import CompileCounter

    vit = _vit(drop_rate=0.5)
    x = _images(2)
    with torch.no_grad():
        expected = vit(x)
    counter = CompileCounter()  # Dynamo's graphs run eagerly: the compiled call without inductor's minutes
    compiled = torch.compile(vit, backend=counter)
    for model in (vit, Holder(vit), compiled):
        model.train()
        forward = classifier_forward(model)
        with torch.no_grad():
            torch.testing.assert_close(forward(x), expected)  # eval mode: no dropout
        assert vit.training  # each module's mode restored
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected)  # the compiled model itself is what its forward reads
    assert counter.frame_count >= 1
    assert classifier_forward(_vit(num_classes=0)) is None
    assert classifier_forward(nn.Linear(3, 2)) is None


def test_classifier_forward_hugging_face():
    transformers = pytest.importorskip("transformers")
    small = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96}
    config = transformers.ViTConfig(**small, image_size=32, patch_size=8, num_labels=4, attn_implementation="eager")
    torch.manual_seed(0)
    classifier = perturb(transformers.ViTForImageClassification(config).eval())
    x = torch.randn(2, 3, 32, 48)  # not the config's size: run with interpolated position embeddings
    with torch.no_grad():
        expected = classifier(pixel_values=x, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(classifier_forward(Holder(classifier))(x), expected)
    assert classifier_forward(transformers.ViTModel(config)) is None
    clip = transformers.CLIPVisionConfig(**small, image_size=32, patch_size=8)
    assert classifier_forward(transformers.CLIPVisionModel(clip)) is None


# --- arguments ----------------------------------------------------------------------------------------------------


def _forward(images):
    return torch.zeros(len(images), 3)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"mode": "all"}, "mode"),
        ({"baseline": "noise"}, "baseline"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"max_images_per_forward": 0}, "max_images_per_forward"),
        ({"kept_maps": ("posterior",)}, "kept_maps"),
        ({"kept_maps": ("q",)}, "kept_maps"),
        ({"kept_maps": "lfdr"}, "kept_maps"),
        ({"maps": {"lfdr": torch.ones(2, T)}}, "posterior"),
        ({"maps": {"lfdr": torch.ones(2, T), "posterior": torch.ones(2, T - 1)}}, "maps"),
        ({"grid": (4, 5)}, "grid"),
        ({"grid": (3, 8)}, "grid"),  # 3 x 8 = T tokens, but 32 rows do not split into 3 blocks
        ({"grid": None}, "grid"),
        ({"sample_ids": [1, 2, 3]}, "sample_ids"),
        ({"attention": torch.ones(3, T)}, "attention"),
        ({"images": torch.ones(2, 3, *SIZE, dtype=torch.int64)}, "images"),
        ({"clean_logits": torch.zeros(3, 3)}, "clean_logits"),
    ],
)
def test_bad_arguments_are_refused_by_name(change, name):
    args = {
        "images": torch.zeros(2, 3, *SIZE),
        "attention": torch.ones(2, T),
        "maps": {"lfdr": torch.ones(2, T), "posterior": torch.ones(2, T)},
        "grid": GRID,
        "sample_ids": [1, 2],
        "mode": "curves",
    }
    args.update(change)
    with pytest.raises(ValueError, match=name):
        faithfulness(_forward, **args)


# --- devices ------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_sets_and_scores_on_cuda_equal_the_cpu():
    ids = torch.tensor(IDS + [-1, 2**62])
    torch.testing.assert_close(token_keys(9, ids.cuda(), T).cpu(), token_keys(9, ids, T), rtol=0, atol=0)
    # float64: no TF32 convolutions, so the devices differ by rounding alone
    vit = _vit().double()
    images, attention, maps = _inputs()
    images = images.double()
    kwargs = {"mode": "curves", "kept_maps": ("lfdr", "p"), "baseline": "blur", "seed": 9}
    cpu = faithfulness(classifier_forward(vit), images, attention, maps, GRID, IDS, **kwargs)
    gpu = faithfulness(classifier_forward(vit.cuda()), images.cuda(), attention, maps, GRID, IDS, **kwargs)
    assert torch.equal(gpu.predicted.cpu(), cpu.predicted)
    for key in cpu.scores:
        np.testing.assert_allclose(gpu.scores[key].cpu(), cpu.scores[key], rtol=0, atol=1e-9, err_msg=key)
