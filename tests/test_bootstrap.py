import pytest
import torch

from attnreg_lightning.bootstrap import available_methods, iter_null_chunks, null_images

METHODS = ["normal", "uniform", "pixel", "patch"]


def _images(b=3, c=3, h=16, w=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:c, None, None] + 0.3).to(dtype)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_lists_all_methods():
    assert set(METHODS) <= set(available_methods())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_and_determinism(method, dtype):
    x = _images(dtype=dtype)
    kw = {"patch_size": 8} if method == "patch" else {}
    a = null_images(x, 5, method, _gen(1), **kw)
    b = null_images(x, 5, method, _gen(1), **kw)
    c = null_images(x, 5, method, _gen(2), **kw)
    assert a.shape == (3, 5, 3, 16, 24) and a.dtype == dtype and a.device == x.device
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # nulls differ between samples of the same image
    assert not torch.equal(a[:, 0], a[:, 1])


@pytest.mark.parametrize("method", METHODS)
def test_global_rng_untouched(method):
    x = _images()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    null_images(x, 4, method, _gen(), **({"patch_size": 8} if method == "patch" else {}))
    assert torch.equal(torch.get_rng_state(), before)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_normal_matches_per_channel_moments(device):
    # 4x4 images: population and sample std differ by sqrt(16/15), 3.3%; 4000 nulls pin the spread to ~0.3%
    x = _images(b=2, h=4, w=4).to(device)
    g = torch.Generator(device=device)
    nulls = null_images(x, 4000, "normal", g.manual_seed(0)).double()
    for b in range(2):
        for c in range(3):
            v, pixels = nulls[b, :, c], x[b, c].double()
            assert v.mean().item() == pytest.approx(pixels.mean().item(), abs=4 * pixels.std().item() / 250)
            assert v.std().item() == pytest.approx(pixels.std(correction=0).item(), rel=0.012)
    # exactly: the image's mean plus the generator's standard normals times its population std
    noise = torch.randn((2, 5, 3, 4, 4), generator=g.manual_seed(1), device=device)
    mean, std = x.mean((2, 3), keepdim=True)[:, None], x.std((2, 3), correction=0, keepdim=True)[:, None]
    torch.testing.assert_close(null_images(x, 5, "normal", g.manual_seed(1)), mean + noise * std)
    # per-image (not per-channel) statistics, and std_factor scales the spread
    pooled = null_images(x, 5, "normal", g.manual_seed(1), all_channels=False, std_factor=2.0)
    mean, std = x.mean((1, 2, 3), keepdim=True)[:, None], x.std((1, 2, 3), correction=0, keepdim=True)[:, None]
    torch.testing.assert_close(pooled, mean + noise * 2 * std)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_spans_each_channels_range(device):
    x = _images().to(device)
    g = torch.Generator(device=device)
    nulls = null_images(x, 50, "uniform", g.manual_seed(0))
    lo = x.amin(dim=(2, 3))[:, None, :, None, None]
    hi = x.amax(dim=(2, 3))[:, None, :, None, None]
    assert ((nulls >= lo) & (nulls <= hi)).all()
    spread = nulls.amax(dim=(1, 3, 4)) - nulls.amin(dim=(1, 3, 4))
    assert (spread > 0.99 * (hi - lo)[:, 0, :, 0, 0]).all()
    # flat over the range: the mean sits mid-range, the std is the range / sqrt(12)
    u = (nulls - lo) / (hi - lo)
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.std().item() == pytest.approx(12**-0.5, rel=0.01)
    u_exact = torch.rand(nulls.shape, generator=g.manual_seed(0), device=device)
    torch.testing.assert_close(nulls, lo + u_exact * (hi - lo))


def test_uniform_with_imagenet_normalization_is_the_paper_codes_default():
    x = torch.rand(2, 3, 8, 8, generator=_gen(4)) * 4.5 - 2.1  # an image normalized already: [-2.1, 2.4]
    plain = null_images(x, 3, "uniform", _gen(1))
    paper = null_images(x, 3, "uniform", _gen(1), normalization="imagenet")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(paper, (plain - mean) / std)
    assert paper.amin() < -10 and paper.amax() > 8  # normalized twice: far outside the image's range
    with pytest.raises(ValueError, match="normalization='cifar'"):
        null_images(x, 3, "uniform", _gen(1), normalization="cifar")
    with pytest.raises(ValueError, match="3-channel"):
        null_images(x[:, :1], 3, "uniform", _gen(1), normalization="imagenet")


def test_pixel_draws_existing_pixels_channels_together():
    x = _images(b=2, h=8, w=8)
    nulls = null_images(x, 6, "pixel", _gen())
    for b in range(2):
        source = {tuple(v.tolist()) for v in x[b].reshape(3, -1).T}
        drawn = {tuple(v.tolist()) for v in nulls[b].permute(0, 2, 3, 1).reshape(-1, 3)}
        assert drawn <= source
        assert len(drawn) > 0.5 * len(source)


def test_patch_preserves_multiset_of_tiles():
    x = _images(b=2, h=16, w=24)
    p = 8
    nulls = null_images(x, 4, "patch", _gen(), patch_size=p)

    def tiles(img):
        t = img.reshape(3, 2, p, 3, p).permute(1, 3, 0, 2, 4).reshape(6, -1)
        return sorted(tuple(r.tolist()) for r in t)

    for b in range(2):
        for n in range(4):
            assert tiles(nulls[b, n]) == tiles(x[b])
    assert any(not torch.equal(nulls[0, n], x[0]) for n in range(4))


@pytest.mark.parametrize("method", METHODS)
def test_chunks_cover_all_nulls_and_respect_the_bound(method):
    x = _images(b=5)
    kw = {"patch_size": 8} if method == "patch" else {}
    chunks = list(iter_null_chunks(x, 7, method, _gen(3), max_images=4, **kw))
    assert all(len(c) <= 4 for c in chunks)
    flat = torch.cat(chunks)
    assert flat.shape == (35, 3, 16, 24)
    # per-image generators: an image's nulls do not depend on its batch-mates
    gens = [_gen(10 + i) for i in range(5)]
    full = torch.cat(list(iter_null_chunks(x, 7, method, gens, max_images=6, **kw)))
    alone = torch.cat(list(iter_null_chunks(x[2:3], 7, method, [_gen(12)], max_images=3, **kw)))
    assert torch.equal(full[14:21], alone)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((torch.zeros(3, 8, 8), 2, "normal"), {}, "images"),
        ((torch.zeros(1, 3, 8, 8), 0, "normal"), {}, "n "),
        ((torch.zeros(1, 3, 8, 8), 2, "gaussian"), {}, "method"),
        ((torch.zeros(1, 3, 8, 8), 2, "patch"), {"patch_size": 3}, "patch_size"),
        ((torch.zeros(1, 3, 8, 8, dtype=torch.long), 2, "pixel"), {}, "images"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        null_images(*args, generator=_gen(), **kwargs)


def test_bad_chunk_size_and_generator_count():
    x = _images(b=2)
    with pytest.raises(ValueError, match="max_images"):
        list(iter_null_chunks(x, 2, "normal", _gen(), max_images=0))
    with pytest.raises(ValueError, match="generator"):
        list(iter_null_chunks(x, 2, "normal", [_gen()], max_images=4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_generated_on_the_images_device(method):
    x = _images().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = null_images(x, 3, method, g, **({"patch_size": 8} if method == "patch" else {}))
    assert out.device == x.device
