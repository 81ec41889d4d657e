"""The GPU path: the statistics on a CUDA device give the CPU's (hence the oracle's) answers, and the engine
runs there deterministically, in bf16 close to float32. Skipped without a CUDA device (CI has none);
``benchmarks/gpu_suite.py`` runs them on a GPU."""

import numpy as np
import pytest
import timm
import torch

from attnreg_lightning import AttentionRegularizer
from attnreg_lightning.regularize import MAP_NAMES, regularize
from attnreg_lightning.stats import significance
from tests.test_stats import CASES, make_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("kind", "b", "n", "t", "seed"), CASES)
def test_statistics_on_cuda_equal_the_cpu(kind, b, n, t, seed):
    obs, null = (torch.from_numpy(a) for a in make_case(kind, b, n, t, seed))
    cpu = significance(obs, null)
    gpu = significance(obs.cuda(), null.cuda())
    # the device sums log attention in another order: z agrees to rounding, amplified by |mean| / sd where
    # the null is nearly constant (the "uniform" case: 5e-11 relative measured on an H200)
    np.testing.assert_allclose(gpu.z.cpu(), cpu.z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.p.cpu(), cpu.p, rtol=0, atol=0)
    torch.testing.assert_close(gpu.pi0.cpu(), cpu.pi0, rtol=0, atol=0)
    np.testing.assert_allclose(gpu.lfdr.cpu(), cpu.lfdr, rtol=0, atol=1e-6)
    reg_cpu, reg_gpu = regularize(obs, cpu), regularize(obs.cuda(), gpu)
    for name in MAP_NAMES:
        if name not in ("lfdr", "posterior"):
            torch.testing.assert_close(reg_gpu.maps[name].cpu(), reg_cpu.maps[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def cuda_vit():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch8_224", img_size=64, num_classes=0).eval()
    with torch.no_grad():  # realistic weights: non-zero biases, non-identity norms
        for name, p in vit.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return vit.cuda()


def test_engine_on_cuda_is_deterministic_and_reads_the_same_attention_as_the_cpu(cuda_vit):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    engine = AttentionRegularizer(cuda_vit, n_bootstrap=5)
    a = engine(images.cuda(), sample_ids=[0, 1, 2, 3])
    b = engine(images.cuda(), sample_ids=[0, 1, 2, 3])
    torch.testing.assert_close(a.maps["lfdr"], b.maps["lfdr"], rtol=0, atol=0)
    cpu_vit = timm.create_model("vit_small_patch8_224", img_size=64, num_classes=0).eval()
    cpu_vit.load_state_dict({k: v.cpu() for k, v in cuda_vit.state_dict().items()})
    cpu_obs, _ = AttentionRegularizer(cpu_vit, n_bootstrap=1).observe(images)
    torch.testing.assert_close(a.attention.cpu(), cpu_obs, rtol=1e-3, atol=1e-6)


def test_bfloat16_engine_on_cuda_is_close_to_float32(cuda_vit):
    images = torch.randn(4, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    ids = [10, 11, 12, 13]
    full = AttentionRegularizer(cuda_vit, n_bootstrap=5).observe(images, ids)
    half = AttentionRegularizer(cuda_vit, n_bootstrap=5, autocast_dtype=torch.bfloat16).observe(images, ids)
    for f, h in zip(full, half, strict=True):
        assert not torch.equal(f, h)  # bf16 really ran
        # bf16 keeps ~3 significant digits: attention (rows sum to 1) moves by a few percent at most
        torch.testing.assert_close(h, f, rtol=0.1, atol=2e-4)


def test_background_statistics_of_cuda_attention_are_the_cpus_for_the_same_attention(cuda_vit):
    images = torch.randn(8, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    ids = list(range(8))
    engine = AttentionRegularizer(cuda_vit, n_bootstrap=5, autocast_dtype=torch.bfloat16, heads="all")
    obs, null = engine.observe(images, ids)
    want = engine.explain(obs.cpu(), null.cpu(), (8, 8))
    futures = [engine.submit(images, ids) for _ in range(3)]  # copies in flight while the next forwards run
    for got in (f.result() for f in futures):
        assert got.attention.device.type == "cpu"
        assert torch.equal(got.attention, want.attention) and torch.equal(got.significance.z, want.significance.z)
        for name in MAP_NAMES:
            assert torch.equal(got.maps[name], want.maps[name]) and torch.equal(
                got.per_head.maps[name], want.per_head.maps[name]
            )
    engine.close()


def test_the_statistics_thread_reads_the_attention_only_once_its_copy_has_landed(cuda_vit, monkeypatch):
    """The device is kept busy before the attention is even written, so the copy to pinned host memory lands
    late: a thread that did not wait for the copy's event would read the buffer before it is filled.
    (``test_engine.py`` shows on the CPU that ``submit`` reaches the delayed forwards.)"""
    from tests.helpers import observe_late

    images = torch.randn(4, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    ids = [0, 1, 2, 3]
    engine = AttentionRegularizer(cuda_vit, n_bootstrap=5)
    obs, null = engine.observe(images, ids)
    want = engine.explain(obs.cpu(), null.cpu(), (8, 8))
    calls = observe_late(engine, monkeypatch, lambda: torch.cuda._sleep(int(2e9)))  # ~1 s of device time queued
    got = engine.submit(images, ids).result()
    assert calls == [4]
    assert torch.equal(got.attention, want.attention) and torch.equal(got.significance.z, want.significance.z)
    engine.close()


def _gpu_trainer(tmp_path, callbacks):
    import lightning as L

    return L.Trainer(
        accelerator="gpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def test_the_background_batch_hook_never_waits_for_the_device(tmp_path):
    """With background statistics the training thread only launches forwards and copies: the batch hook must run
    under ``set_sync_debug_mode("error")``, which raises at any device-to-host synchronization. Batches with no
    ids (explained by position) and with ids left on the host; a picked subset of rows too (gathered, not
    indexed with a Python list)."""
    from attnreg_lightning import AttentionRegularizationCallback
    from tests.helpers import tiny_data, tiny_module

    module = tiny_module()
    trainer = _gpu_trainer(tmp_path, [])
    trainer.validate(module, tiny_data(val_size=8, batch_size=4), verbose=False)
    module.cuda()  # the strategy's teardown moved it back to the CPU
    images = torch.randn(4, 3, 48, 48, device="cuda")  # tiny_module's size
    batches = {6: images, 4: (images, torch.zeros(4, device="cuda"), torch.tensor([100, 101, 102, 103]))}
    for explained, batch in batches.items():
        # faithfulness and the sanity copies off: they wait for the device in the statistics thread, which the
        # process-wide debug mode would flag there too
        cb = AttentionRegularizationCallback(
            n_bootstrap=3, num_images=6, log_images=2, statistics="background", faithfulness="off", sanity_check=False
        )
        cb.setup(trainer, module, "validate")
        cb.on_validation_epoch_start(trainer, module)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cb.on_validation_batch_end(trainer, module, None, batch, 0)
            cb.on_validation_batch_end(trainer, module, None, batch, 1)  # by position: 2 rows left, a subset
        finally:
            torch.cuda.set_sync_debug_mode(0)
        cb._collect(wait=True)
        assert int(cb.run_metrics.compute("cpu")["explained"]) == explained
        assert len(cb.pictures.rows) == 2
        cb.teardown(trainer, module, "validate")


def test_the_statistics_thread_works_on_the_callers_device():
    """A thread that touched CUDA on the default device would open a context on GPU 0 from every rank."""
    import threading

    seen = []
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    engine = AttentionRegularizer(vit.to(device).eval(), n_bootstrap=2)

    def where(reg):
        seen.append((threading.current_thread().name, torch.cuda.current_device()))
        return reg

    engine.submit(torch.randn(2, 3, 32, 32, device=device), [0, 1], then=where).result()
    engine.close()
    assert seen == [(seen[0][0], device.index)] and seen[0][0].startswith("attnreg-statistics")
