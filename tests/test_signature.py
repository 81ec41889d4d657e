"""The callback's signature spells out every knob (an IDE shows them), as the config defines them, each documented;
an unknown knob is refused naming the closest ones."""

from __future__ import annotations

import inspect

import pytest

from attnreg_lightning import AttentionRegularizationCallback, AttnRegConfig
from attnreg_lightning.config import KNOB_DEFAULTS, KNOB_NAMES


def test_every_knob_is_a_keyword_of_the_callback_with_the_configs_default():
    params = inspect.signature(AttentionRegularizationCallback.__init__).parameters
    knobs = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in knobs] == list(KNOB_NAMES)
    for p in knobs:
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        assert default == KNOB_DEFAULTS[p.name], p.name
    assert AttentionRegularizationCallback().config == AttnRegConfig()


def test_every_knob_is_documented_under_args():
    doc = AttentionRegularizationCallback.__doc__
    args = doc[doc.index("Args:") :]
    assert not [k for k in KNOB_NAMES if f"\n        {k}: " not in args]


def test_knobs_given_by_keyword_reach_the_config():
    cb = AttentionRegularizationCallback(n_bootstrap=3, maps=("lfdr",), faithfulness_prediction="vit")
    assert (cb.config.n_bootstrap, cb.config.maps, cb.config.faithfulness_prediction) == (3, ["lfdr"], "vit")


def test_an_unknown_knob_names_the_closest():
    with pytest.raises(TypeError, match=r"unknown knob 'n_bootstraps' \(did you mean 'n_bootstrap'\?\)"):
        AttentionRegularizationCallback(n_bootstraps=20)
    with pytest.raises(TypeError, match=r"'colour'; the knobs are listed in docs/knobs.md"):
        AttentionRegularizationCallback(colour="red")


def test_a_config_and_knobs_together_are_refused():
    with pytest.raises(ValueError, match=r"not both \(got \['n_bootstrap'\]\)"):
        AttentionRegularizationCallback(AttnRegConfig(), n_bootstrap=3)
