"""``autocast_dtype`` takes the same values in the engine as in the callback's config: the names ``"bfloat16"`` /
``"float16"`` (or those torch dtypes), None and ``"auto"`` (the trainer's precision; without a trainer, float32);
anything else is refused naming the knob and what it takes."""

from __future__ import annotations

import pytest
import timm
import torch

from attnreg_lightning import AttentionRegularizer
from attnreg_lightning.config import AttnRegConfig
from tests.helpers import perturb


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    return perturb(model).eval()


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("float16", torch.float16),
        (torch.float16, torch.float16),
        (None, None),
        ("auto", None),
    ],
)
def test_the_engine_takes_the_names_the_dtypes_none_and_auto(vit, value, dtype):
    engine = AttentionRegularizer(vit, n_bootstrap=2, autocast_dtype=value)
    assert engine.autocast_dtype == dtype
    if isinstance(value, str) and value != "auto":  # the config's value gives the engine the same dtype
        assert AttnRegConfig(autocast_dtype=value).engine_kwargs()["autocast_dtype"] == dtype


@pytest.mark.parametrize("value", [None, "auto", "bfloat16", "float16"])
@pytest.mark.parametrize("precision", [None, "32-true", "bf16-mixed", "16-mixed"])
def test_the_config_and_the_engine_agree(vit, value, precision):
    """Without a trainer (no precision), the config's value means what the engine's does; with one, ``auto`` follows
    it and an explicit value wins."""
    from_config = AttnRegConfig(autocast_dtype=value).engine_kwargs(precision)["autocast_dtype"]
    if precision is None:
        assert from_config == AttentionRegularizer(vit, autocast_dtype=value).autocast_dtype
    want = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision) if value == "auto" else None
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(value, want)
    assert from_config == want


def test_a_named_dtype_runs_the_forwards_under_that_autocast(vit):
    seen = []
    handle = vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        obs, null = AttentionRegularizer(vit, n_bootstrap=2, autocast_dtype="bfloat16").observe(
            torch.randn(2, 3, 32, 32)
        )
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert obs.dtype == null.dtype == torch.float32 and torch.isfinite(obs).all()


@pytest.mark.parametrize("value", ["float32", "Auto", "bf16", "fp16", torch.float32, torch.int8, 16, True])
def test_other_values_are_refused_naming_the_knob_and_what_it_takes(vit, value):
    with pytest.raises(ValueError, match=r"autocast_dtype=.*'auto'.*'bfloat16', 'float16'.*torch\.bfloat16"):
        AttentionRegularizer(vit, autocast_dtype=value)


@pytest.mark.parametrize("native", [True, False])
def test_auto_keeps_a_cpu_without_native_bf16_in_float32(monkeypatch, native):
    """``auto`` under a bf16 trainer follows it on a GPU and on a CPU with bf16 in hardware; on a CPU that would
    emulate bf16 (several times slower than float32) the callback's inference forwards stay float32, while an explicit
    ``bfloat16`` is taken as given."""
    from attnreg_lightning import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    config = AttnRegConfig()
    assert config.autocast("bf16-mixed", "cpu") == (torch.bfloat16 if native else None)
    assert config.autocast("bf16-mixed", "cuda:0") == torch.bfloat16
    assert config.autocast("16-mixed", "cpu") == torch.float16
    assert AttnRegConfig(autocast_dtype="bfloat16").autocast("bf16-mixed", "cpu") == torch.bfloat16
