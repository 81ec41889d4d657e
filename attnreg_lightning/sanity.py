"""The model-randomization sanity check (Adebayo et al., 2018), cheap form: a map that does not change when the
model does explains nothing about the model.

    copy = randomized_last_block(vit, seed=0)       # a deep copy; its last block re-initialized
    rho = map_spearman(trained_reg, copy_reg)        # {"raw": [B], "lfdr": [B]}

The images are explained by the trained model and by the copy with the same nulls (same seed and sample ids);
each image's raw and lfdr maps are compared by Spearman's rank correlation. Near 1: the maps hardly depend on
what the last block learned; near 0: they do.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from attnreg_lightning.attention import resolve_vit
from attnreg_lightning.metrics import spearman
from attnreg_lightning.readers import hf as hf_reader
from attnreg_lightning.readers import timm as timm_reader
from attnreg_lightning.regularize import RegularizedAttention

SANITY_KEYS = ("sanity/raw_spearman", "sanity/lfdr_spearman")


def last_block(vit: nn.Module) -> nn.Module | None:
    """The block that holds the attention the engine reads (timm and Hugging Face ViTs), None if unknown."""
    if timm_reader.READER.matches(vit):
        attention = timm_reader.last_attention(vit)
    elif hf_reader.READER.matches(vit):
        attention = hf_reader._last_attention(hf_reader.tower(vit))
    else:
        return None
    if attention is None:
        return None
    parents = {id(child): module for module in vit.modules() for child in module.children()}
    return parents.get(id(attention))


def randomized_last_block(model: nn.Module, seed: int) -> nn.Module | None:
    """A deep copy of the ViT in ``model`` whose last block's layers are re-initialized (every submodule with
    ``reset_parameters``: linear layers, norms), from ``seed`` and without touching the global random state;
    None when the last block is unknown."""
    vit = copy.deepcopy(resolve_vit(model))
    block = last_block(vit)
    if block is None:
        return None
    devices = [p.device for p in block.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        for module in block.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return vit.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's correlation; 0 when exactly one map is constant (e.g. the randomized model's lfdr map is empty
    where the trained one keeps tokens: nothing of the trained map's order survives), NaN when both are."""
    flat_a, flat_b = bool(a.max() == a.min()), bool(b.max() == b.min())
    if flat_a or flat_b:
        return float("nan") if flat_a and flat_b else 0.0
    return spearman(a, b)


def map_spearman(trained: RegularizedAttention, randomized: RegularizedAttention) -> dict[str, Tensor]:
    """Per image, the :func:`rank_correlation` of the raw and of the lfdr maps (NaN for an image either model could
    not test)."""
    valid = (trained.significance.valid & randomized.significance.valid).cpu().numpy()
    out = {}
    for name, a, b in (
        ("raw", trained.attention, randomized.attention),
        ("lfdr", trained.maps["lfdr"], randomized.maps["lfdr"]),
    ):
        x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
        rho = [rank_correlation(x[i], y[i]) if valid[i] else float("nan") for i in range(len(x))]
        out[name] = torch.tensor(np.asarray(rho, dtype=np.float64))
    return out
