"""An attention module called more than once in a forward (a block shared by every layer, a block looped) is read at
its last call, the one that gives the model's last attention, against an independent reference: a hook on the
unfused copy's ``attn_drop`` (the identity in eval mode: its output is the softmax) keeping every call's weights,
the last taken. A module called once still stops the model at its kernel."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from attnreg_lightning.attention import cls_attention, cls_attention_and_logits
from attnreg_lightning.readers.core import cls_logits
from tests.zoo_models import shake, unfused_copy

timm = pytest.importorskip("timm")

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "num_heads": 3, "num_classes": 4}


class Twice(nn.Module):
    """A block run twice on its own output: its attention is called twice per forward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    @property
    def attn(self) -> nn.Module:
        return self.block.attn

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.block(x))


def weight_tied(depth: int = 3) -> nn.Module:
    """One ``Block`` object in every layer (ALBERT-style weight tying)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=depth, **SMALL)
    vit.blocks = nn.Sequential(*[vit.blocks[0]] * depth)
    return shake(vit)


def looped_last_block() -> nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, **SMALL)
    vit.blocks[-1] = Twice(vit.blocks[-1])
    return shake(vit)


def every_call(vit: nn.Module, images: Tensor) -> list[Tensor]:
    """The CLS rows ``[B, H, N]`` of every call of the last attention of the unfused copy, in call order."""
    ref = unfused_copy(vit)  # the copy keeps the sharing: one module object, as in the model
    rows: list[Tensor] = []
    handle = ref.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: rows.append(o[:, :, 0].float()))
    try:
        with torch.no_grad():
            ref.forward_features(images)
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize(("build", "calls"), [(weight_tied, 3), (looped_last_block, 2)], ids=["tied", "looped"])
def test_an_attention_called_again_is_read_at_its_last_call(build, calls):
    vit = build()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = every_call(vit, images)
    assert len(rows) == calls
    want = rows[-1][..., 1:]
    assert (rows[0][..., 1:] - want).abs().max() > 1e-3  # the first call's map is another map
    with torch.no_grad():
        for _ in range(2):  # the first read counts the calls; the next knows them
            torch.testing.assert_close(cls_attention(vit, images, heads="all"), want, atol=1e-5, rtol=0)
        attention, logits = cls_attention_and_logits(vit, images, heads="all")
        torch.testing.assert_close(attention, want, atol=1e-5, rtol=0)
        assert torch.equal(logits, vit(images))
    assert torch._C._len_torch_function_stack() == 0


def test_an_attention_called_once_still_stops_the_model_at_its_kernel():
    torch.manual_seed(0)
    vit = shake(timm.create_model("vit_tiny_patch16_224", depth=2, **SMALL))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    after: list[str] = []
    handles = [
        vit.blocks[-1].mlp.register_forward_hook(lambda m, i, o: after.append("mlp")),
        vit.norm.register_forward_hook(lambda m, i, o: after.append("norm")),
    ]
    run = lambda: vit.forward_features(images)  # noqa: E731
    try:
        with torch.no_grad():
            first = cls_logits(vit.blocks[-1].attn, run, "vit")
            assert after == ["mlp", "norm"]  # the first read runs on to count the calls: one
            after.clear()
            again = cls_logits(vit.blocks[-1].attn, run, "vit")
    finally:
        for handle in handles:
            handle.remove()
    assert after == []  # stopped at the last attention's kernel: its block's MLP and the final norm never ran
    assert torch.equal(first, again)
    torch.testing.assert_close(again.softmax(-1), every_call(vit, images)[-1], atol=1e-6, rtol=0)


def test_the_count_is_per_module():
    """A tied model's count does not make an untied model with the same architecture run on, nor the reverse."""
    tied = weight_tied()
    torch.manual_seed(0)
    untied = shake(timm.create_model("vit_tiny_patch16_224", depth=3, **SMALL))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_attention(tied, images)
        cls_attention(untied, images)
        after: list[bool] = []
        handle = untied.norm.register_forward_hook(lambda m, i, o: after.append(True))
        try:
            cls_attention(untied, images)
        finally:
            handle.remove()
        assert after == []
        torch.testing.assert_close(cls_attention(tied, images, heads="all"), every_call(tied, images)[-1][..., 1:])
