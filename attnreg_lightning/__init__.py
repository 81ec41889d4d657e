"""Bootstrap-regularized attention maps for Vision Transformers (Chung & Laletin, AISTATS 2026)."""

from attnreg_lightning.attention import register_attention_reader
from attnreg_lightning.callback import AttentionRegularizationCallback, BatchView
from attnreg_lightning.config import AttnRegConfig
from attnreg_lightning.engine import AttentionRegularizer
from attnreg_lightning.mixin import AttentionRegularizationMixin
from attnreg_lightning.regularize import RegularizedAttention, Thresholds
from attnreg_lightning.stats import Significance, significance

__all__ = [
    "AttentionRegularizationCallback",
    "AttentionRegularizationMixin",
    "AttentionRegularizer",
    "AttnRegConfig",
    "BatchView",
    "RegularizedAttention",
    "Significance",
    "Thresholds",
    "register_attention_reader",
    "significance",
]
