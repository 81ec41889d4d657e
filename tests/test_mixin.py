import lightning as L
import pytest
import torch

from attnreg_lightning import AttentionRegularizationMixin, AttnRegConfig
from tests.helpers import IMAGE_SIZE, tiny_module


def test_regularized_attention_inside_a_module_with_overrides():
    module = tiny_module().eval()
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    reg = module.regularized_attention(images, sample_ids=[7, 8, 9], n_bootstrap=4, lfdr_th=0.2)
    assert reg.significance.z_null.shape == (3, 4, 36) and reg.grid == (6, 6)
    assert reg.thresholds.lfdr_th == 0.2
    again = module.regularized_attention(images, sample_ids=[7, 8, 9], n_bootstrap=4, lfdr_th=0.2)
    torch.testing.assert_close(reg.maps["lfdr"], again.maps["lfdr"])
    # the module's own default knobs, then the overrides on top
    module.attnreg_config = AttnRegConfig(n_bootstrap=2, method="pixel")
    assert module.regularized_attention(images).significance.z_null.shape[1] == 2
    with pytest.raises(ValueError, match=r"attnreg\.n_bootstrap"):
        module.regularized_attention(images, n_bootstrap=0)


def test_module_without_a_vit_says_how_to_fix_it():
    class NoVit(AttentionRegularizationMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="NoVit.*attention_model"):
        NoVit().regularized_attention(torch.zeros(1, 3, 8, 8))


def test_without_ids_each_call_draws_fresh_nulls_in_a_reproducible_sequence():
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))

    def two_calls(module):
        return [module.regularized_attention(images, n_bootstrap=3, seed=5).significance.z_null for _ in range(2)]

    first, second = two_calls(tiny_module().eval())
    assert not torch.equal(first, second)  # a new batch, new null noise
    again = two_calls(tiny_module().eval())
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    other_seed = tiny_module().eval().regularized_attention(images, n_bootstrap=3, seed=6).significance.z_null
    assert not torch.equal(other_seed, first)
