import copy
import threading

import pytest
import timm
import torch

from attnreg_lightning.attention import cls_attention
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.regularize import MAP_NAMES, Thresholds, regularize
from attnreg_lightning.stats import significance
from tests.helpers import perturb


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)


def _images(b=4, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_result_carries_attention_significance_and_grid(vit):
    x = _images()
    reg = AttentionRegularizer(vit, n_bootstrap=5, thresholds=Thresholds(p_th=0.2))(x)
    assert reg.grid == (4, 4)
    assert reg.attention.shape == (4, 16)
    assert reg.significance.z_null.shape == (4, 5, 16)
    assert set(reg.maps) == set(MAP_NAMES)
    assert reg.thresholds.p_th == 0.2
    with torch.no_grad():
        torch.testing.assert_close(reg.attention, cls_attention(vit.eval(), x))
    assert reg.significance.valid.all()


def test_pi0_rule_counts_each_tokens_pixels(vit, monkeypatch):
    """The reference takes the pi0 percentile over upsampled pixels: the engine passes the patch area."""
    import attnreg_lightning.engine as engine_module

    seen = []
    monkeypatch.setattr(engine_module, "regularize", lambda *a, **kw: seen.append(kw) or regularize(*a, **kw))
    AttentionRegularizer(vit, n_bootstrap=2)(_images(1))
    assert seen[0]["pixels_per_token"] == 8 * 8


def test_null_attention_is_the_attention_of_the_null_images(vit):
    from attnreg_lightning.bootstrap import iter_null_chunks

    x = _images(2)
    engine = AttentionRegularizer(vit, method="pixel", n_bootstrap=3, seed=7)
    reg = engine(x, sample_ids=[10, 11])
    gens = engine.generators(x, [10, 11])
    nulls = torch.cat(list(iter_null_chunks(x, 3, "pixel", gens, max_images=100)))
    with torch.no_grad():
        null_attn = cls_attention(vit.eval(), nulls).reshape(2, 3, 16)
    expected = significance(reg.attention, null_attn)
    torch.testing.assert_close(reg.significance.z, expected.z)


def test_forwards_are_bounded_whatever_n(vit):
    sizes = []
    handle = vit.patch_embed.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        AttentionRegularizer(vit, n_bootstrap=13, max_images_per_forward=8)(_images(5))
    finally:
        handle.remove()
    assert max(sizes) <= 8
    assert sum(sizes) == 5 * (13 + 1)


def test_deterministic_and_independent_of_chunking_and_batch(vit):
    x = _images(4)
    ids = [3, 1, 4, 1]
    a = AttentionRegularizer(vit, n_bootstrap=6, seed=5, max_images_per_forward=256)(x, sample_ids=ids)
    b = AttentionRegularizer(vit, n_bootstrap=6, seed=5, max_images_per_forward=5)(x, sample_ids=ids)
    c = AttentionRegularizer(vit, n_bootstrap=6, seed=5)(x[2:3], sample_ids=ids[2:3])
    d = AttentionRegularizer(vit, n_bootstrap=6, seed=6)(x, sample_ids=ids)
    torch.testing.assert_close(a.significance.z_null, b.significance.z_null, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.significance.z_null[2:3], c.significance.z_null, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.significance.z_null, d.significance.z_null)
    # without sample ids: same seed, same results
    e1 = AttentionRegularizer(vit, n_bootstrap=6, seed=5)(x)
    e2 = AttentionRegularizer(vit, n_bootstrap=6, seed=5)(x)
    torch.testing.assert_close(e1.maps["lfdr"], e2.maps["lfdr"])


def test_model_state_rng_and_grads_untouched(vit):
    vit.train()
    vit.blocks[0].eval()  # a mixed-mode model must come back mixed
    modes = [m.training for m in vit.modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules())
    params = [p.detach().clone() for p in vit.parameters()]
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    reg = AttentionRegularizer(vit, n_bootstrap=3)(_images(2).requires_grad_(True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in vit.modules()] == modes
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules()) == hooks
    assert all(p.grad is None for p in vit.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, vit.parameters(), strict=True))
    assert not reg.attention.requires_grad
    vit.eval()


def test_degenerate_images_are_flagged_not_fatal(vit):
    x = _images(4)
    x[1] = 0.7  # constant
    x[2, 0, 3, 3] = float("nan")
    reg = AttentionRegularizer(vit, n_bootstrap=4)(x)
    assert reg.significance.valid.tolist() == [True, False, False, True]
    for m in reg.maps.values():
        assert torch.isfinite(m).all()
        assert (m[1:3] == 0).all()
    healthy = AttentionRegularizer(vit, n_bootstrap=4)(x[[0]])
    assert healthy.significance.valid.all()


@pytest.mark.parametrize("method", ["normal", "uniform", "pixel", "patch"])
def test_every_method_runs(vit, method):
    reg = AttentionRegularizer(vit, method=method, n_bootstrap=2)(_images(2))
    assert reg.significance.valid.all()


def test_autocast_runs_the_forwards_in_that_dtype_and_stays_close(vit):
    x = _images(2)
    seen = []
    handle = vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        full = AttentionRegularizer(vit, n_bootstrap=2)(x)
        assert set(seen) == {torch.float32}
        seen.clear()
        low = AttentionRegularizer(vit, n_bootstrap=2, autocast_dtype=torch.bfloat16)(x)
    finally:
        handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert low.attention.dtype == torch.float32
    assert not torch.equal(low.attention, full.attention)
    # bfloat16 keeps 8 bits of mantissa (eps 7.8e-3); the softmax of its scores is within a quarter of that
    torch.testing.assert_close(low.attention, full.attention, atol=0, rtol=2e-3)


def test_forwards_run_in_eval_mode_on_a_train_mode_model_with_dropout():
    torch.manual_seed(0)
    drop = {"drop_rate": 0.3, "attn_drop_rate": 0.3, "proj_drop_rate": 0.3, "drop_path_rate": 0.3}
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, **drop)
    x = _images(2)
    engine = AttentionRegularizer(model, n_bootstrap=3)
    model.eval()
    want = engine(x, sample_ids=[0, 1])
    model.train()
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    first, second = engine(x, sample_ids=[0, 1]), engine(x, sample_ids=[0, 1])
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for got in (first, second):
        assert torch.equal(got.attention, want.attention)
        assert torch.equal(got.significance.z_null, want.significance.z_null)


def test_each_id_has_its_own_nulls_whatever_batch_it_is_in(vit):
    x = _images(3)
    x[1] = x[0]  # same pixels, different ids: only the ids can tell their nulls apart
    engine = AttentionRegularizer(vit, n_bootstrap=4)
    a = engine(x[[0, 1]], sample_ids=[10, 11])
    assert torch.equal(a.attention[0], a.attention[1])
    # (the same nulls in two rows of one forward differ by ~5e-6: far below what different draws give)
    assert (a.significance.z_null[0] - a.significance.z_null[1]).abs().max() > 0.1
    b = engine(x[[2, 1]], sample_ids=[12, 11])  # id 11 again, beside another image
    assert torch.equal(b.significance.z_null[1], a.significance.z_null[1])
    for name in a.maps:
        assert torch.equal(b.maps[name][1], a.maps[name][1]), name


def test_patch_nulls_get_the_models_patch_size(vit):
    from attnreg_lightning.bootstrap import iter_null_chunks

    x = _images(1)
    engine = AttentionRegularizer(vit, method="patch", n_bootstrap=2)
    assert engine.method_options == {"patch_size": 8}
    reg = engine(x, sample_ids=[5])

    def null_z(tile):
        nulls = torch.cat(list(iter_null_chunks(x, 2, "patch", engine.generators(x, [5]), 100, patch_size=tile)))
        with torch.no_grad():
            return significance(reg.attention, cls_attention(vit.eval(), nulls).reshape(1, 2, 16)).z_null

    torch.testing.assert_close(reg.significance.z_null, null_z(8))
    assert not torch.allclose(reg.significance.z_null, null_z(4))


@pytest.mark.slow
def test_compile_is_off_by_default_and_same_results(vit):
    engine = AttentionRegularizer(vit, n_bootstrap=2)
    assert engine._read is cls_attention
    compiled = AttentionRegularizer(vit, n_bootstrap=2, compile=True)
    x = _images(2)
    torch.testing.assert_close(compiled(x, sample_ids=[0, 1]).attention, engine(x, sample_ids=[0, 1]).attention)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_bootstrap": 0}, "n_bootstrap"),
        ({"method": "gauss"}, "method"),
        ({"max_images_per_forward": 0}, "max_images_per_forward"),
    ],
)
def test_bad_knobs_are_named(vit, kwargs, name):
    with pytest.raises(ValueError, match=name):
        AttentionRegularizer(vit, **kwargs)


def test_non_vit_rejected():
    with pytest.raises(TypeError, match="Conv2d"):
        AttentionRegularizer(torch.nn.Conv2d(3, 3, 3))


def test_patch_nulls_whose_tiles_cannot_tile_the_images_are_refused_at_construction(vit):
    with pytest.raises(ValueError, match="patch_size=5.*32x32"):
        AttentionRegularizer(vit, method="patch", method_options={"patch_size": 5})
    AttentionRegularizer(vit, method="patch", method_options={"patch_size": 4})  # divides 32: fine


def test_per_head_significance_tests_each_head_against_its_own_null_without_extra_forwards(vit):
    x = _images(2)
    sizes = []
    handle = vit.patch_embed.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        both = AttentionRegularizer(vit, n_bootstrap=3, heads="all")(x, sample_ids=[4, 5])
        forwards = sum(sizes)
        sizes.clear()
        mean = AttentionRegularizer(vit, n_bootstrap=3)(x, sample_ids=[4, 5])
    finally:
        handle.remove()
    assert forwards == sum(sizes) == 2 * (3 + 1)
    heads = vit.blocks[-1].attn.num_heads
    per = both.per_head
    assert per.attention.shape == (2 * heads, 16) and mean.per_head is None
    # the head mean is the mean path's attention, and the mean path is unchanged
    torch.testing.assert_close(per.attention.view(2, heads, 16).mean(1), mean.attention)
    assert all(torch.equal(both.maps[m], mean.maps[m]) for m in MAP_NAMES)
    # each head row: the statistics of that head's attention against that head's null attention
    obs, null = AttentionRegularizer(vit, n_bootstrap=3, heads="all").observe(x, sample_ids=[4, 5])
    for b in range(2):
        for h in range(heads):
            alone = significance(obs[b, h][None], null[b, :, h][None])
            assert torch.equal(per.significance.z[b * heads + h], alone.z[0])
            assert torch.equal(per.significance.lfdr[b * heads + h], alone.lfdr[0])
    with pytest.raises(ValueError, match="heads"):
        AttentionRegularizer(vit, heads="max")


def _statistics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("attnreg-statistics")]


@pytest.mark.parametrize("heads", ["mean", "all"])
def test_submit_gives_the_calls_result_from_a_background_thread(vit, heads):
    engine = AttentionRegularizer(perturb(copy.deepcopy(vit), 3), n_bootstrap=3, heads=heads)
    batches = [(_images(4, seed), list(range(4 * seed, 4 * seed + 4))) for seed in range(3)]
    threads, before = torch.get_num_threads(), set(_statistics_threads())
    futures = [engine.submit(images, ids) for images, ids in batches]  # forwards back to back
    (thread,) = set(_statistics_threads()) - before
    assert torch.get_num_threads() == threads  # the thread's own setting is its own
    for future, (images, ids) in zip(futures, batches, strict=True):
        got, want = future.result(), engine(images, ids)
        for a, b in ((got, want), (got.per_head, want.per_head)) if heads == "all" else ((got, want),):
            assert torch.equal(a.attention, b.attention) and a.grid == b.grid
            for field in ("z", "z_null", "p", "pi0", "lfdr", "q", "valid", "fit_ok", "clamped"):
                assert torch.equal(getattr(a.significance, field), getattr(b.significance, field)), field
            for name in MAP_NAMES:
                assert torch.equal(a.maps[name], b.maps[name]), name
    engine.close()
    assert not thread.is_alive()


def test_submit_runs_the_forwards_the_late_copy_test_delays(vit, monkeypatch):
    """``test_cuda.py`` delays the forwards ``submit`` runs, to check the statistics thread waits for the device's
    copy: that check means something only while ``submit`` reaches the patched forwards, shown here on the CPU."""
    from tests.helpers import observe_late

    engine = AttentionRegularizer(perturb(copy.deepcopy(vit), 4), n_bootstrap=3)
    x, ids = _images(3), [7, 8, 9]
    want = engine(x, ids)
    delayed: list[bool] = []
    calls = observe_late(engine, monkeypatch, lambda: delayed.append(True))
    got = engine.submit(x, ids).result()
    engine.close()
    assert calls == [3] and delayed == [True]
    assert torch.equal(got.attention, want.attention) and torch.equal(got.significance.z, want.significance.z)


def test_an_exception_in_the_statistics_thread_is_raised_by_result(vit, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("statistics failed on purpose")

    engine = AttentionRegularizer(vit, n_bootstrap=2)
    monkeypatch.setattr("attnreg_lightning.engine.significance", failing)
    future = engine.submit(_images(2), [0, 1])  # the forwards ran; the failure waits in the future
    with pytest.raises(RuntimeError, match="statistics failed on purpose"):
        future.result()
    monkeypatch.undo()
    assert engine.submit(_images(2), [0, 1]).result().maps["lfdr"].shape == (2, 16)  # the thread lives on
    engine.close()


def test_statistics_stay_on_the_device_unless_it_lacks_float64():
    # Apple MPS has no float64: the statistics (and the metrics' float64 states) are computed on the CPU there
    from attnreg_lightning.engine import statistics_device

    assert statistics_device("mps") == torch.device("cpu")
    assert statistics_device("mps:0") == torch.device("cpu")
    assert statistics_device("cuda:1") == torch.device("cuda", 1)
    assert statistics_device(torch.device("cpu")) == torch.device("cpu")


def test_classify_gives_the_class_logits_of_the_forward_that_reads_the_attention(vit):
    """``classify=True``: the model's logits of each image beside the same statistics (the images' attention comes
    from forwards of their own, apart from their nulls: equal to float rounding), NaN for an image it can't test; the
    background path carries them too. Without it, no logits."""
    model = perturb(copy.deepcopy(vit), 5).eval()
    x = _images(5, seed=2)
    x[3] = 0.25  # a constant image
    ids = [4, 8, 15, 16, 23]
    plain = AttentionRegularizer(model, n_bootstrap=3, max_images_per_forward=4)
    engine = AttentionRegularizer(model, n_bootstrap=3, max_images_per_forward=4, classify=True)
    got, want = engine(x, ids), plain(x, ids)
    assert want.logits is None
    with torch.no_grad():
        logits = model(x)
    usable = torch.tensor([True, True, True, False, True])
    torch.testing.assert_close(got.logits[usable], logits[usable], atol=1e-5, rtol=0)
    assert got.logits[3].isnan().all() and got.logits.shape == logits.shape
    torch.testing.assert_close(got.attention, want.attention, atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(got.significance.z_null, want.significance.z_null, atol=1e-4, rtol=0, equal_nan=True)
    background = engine.submit(x, ids).result()
    engine.close()
    torch.testing.assert_close(background.logits, got.logits, atol=0, rtol=0, equal_nan=True)


def test_classify_refuses_a_model_without_a_head(vit):
    headless = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    with pytest.raises(ValueError, match="classify=True: VisionTransformer.s attention reader gives no class logits"):
        AttentionRegularizer(headless, classify=True)


def test_forwards_are_sized_by_device_unless_told(vit):
    """None: forwards of 32 images on a CPU (faster there than 256, docs/performance.md), 256 on other devices; a
    number is taken as given."""
    engine = AttentionRegularizer(vit, n_bootstrap=9)
    assert (engine.per_forward("cpu"), engine.per_forward("cuda:0")) == (32, 256)
    assert AttentionRegularizer(vit, max_images_per_forward=7).per_forward("cuda:0") == 7
    sizes = []
    handle = vit.patch_embed.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    try:
        engine(_images(5))  # 5 images and their 45 nulls: 50 images, in forwards of 32
    finally:
        handle.remove()
    assert sizes == [32, 18]
