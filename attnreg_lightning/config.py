"""Every knob of the method and the callback, validated on construction.

The dataclasses double as Hydra structured configs (only OmegaConf-friendly field types), so a typo or an
out-of-range value fails at start-up with the key named.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

import torch

from attnreg_lightning.batch import REGIONS
from attnreg_lightning.bootstrap import NORMALIZATIONS, available_methods
from attnreg_lightning.engine import AUTOCAST_DTYPES, resolve_autocast_dtype
from attnreg_lightning.faithfulness import BASELINES, KEPT_MAPS, MODES, PREDICTIONS
from attnreg_lightning.regularize import MAP_NAMES, Thresholds

ON_ERROR = ("raise", "warn")
FAITHFULNESS = ("off", *MODES)


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"attnreg.{key}={value!r}: {what}")


def check_knob_names(names, where: str = "AttnRegConfig") -> None:
    """Raise ``TypeError`` for names that are not knobs, each with the closest knobs (a typo names its fix)."""
    known = [f.name for f in fields(AttnRegConfig)]
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise TypeError(f"{where}: unknown knob {', '.join(hints)}; the knobs are listed in docs/knobs.md")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AttnRegConfig:
    """Knobs of :class:`~attnreg_lightning.callback.AttentionRegularizationCallback` (``attnreg.*`` in Hydra).

    ``pi0=None`` estimates pi0 per image (Storey); a float fixes it. ``dataloader_idx``: the validation loader
    explained (one per callback: a second loader gets a second callback with its own ``name``). ``maps`` are the
    regularized maps whose metrics and pictures are logged. ``num_images`` is per validation epoch and per rank;
    ``log_images`` is how many of those get a picture row (rank 0 only). ``std_factor``, ``all_channels``,
    ``patch_size`` and ``normalization`` are options of the null generator (``patch_size=None``: the model's patch size;
    ``normalization="imagenet"``, ``uniform`` only: re-normalized as the paper's code does). ``statistics``: where
    significance is computed: ``background`` (a CPU thread, while the device runs the next forwards),
    ``inline`` (after the forwards, on the model's device) or ``auto`` (background on a GPU). On MPS, which has no
    float64, the statistics are computed on the CPU.
    ``faithfulness``: whether the model uses what the maps keep (docs/method.md): ``off``, ``kept``
    (comprehensiveness and sufficiency of each of ``faithfulness_maps`` beside a fixed-k top set and a random set of
    the same size) or ``curves`` (also deletion and insertion AUCs of the raw and posterior maps,
    ``faithfulness_steps`` steps); a removed token's pixels become ``faithfulness_baseline`` (``mean``, ``blur`` or
    ``zeros``), or it is dropped from the ViT's sequence (``drop``). ``faithfulness_prediction``: whose prediction is
    scored: ``auto`` (the module's own forward where it returns class scores, else the ViT's head), ``module``,
    ``vit``.
    ``faithfulness_regions``: the marked regions (of ``roi``, ``noise``, ``shortcut``) whose reliance is scored when
    a batch carries their masks: the predicted class's probability drop when the region's tokens are removed,
    beside as many random tokens (2 forwards per image and region).
    ``sanity_check``: at a fit's end, up to 16 probes per rank explained again by a copy of the model whose last block
    is re-initialized, ``sanity_draws`` times independently, and the maps compared: the mean over draws and its spread
    (every draw's raw maps, one forward per probe; the first ``ceil(sanity_draws / 8)`` draws' lfdr maps, ``N + 1``
    forwards per probe; :mod:`attnreg_lightning.sanity`).
    ``name`` prefixes every logged key and names the callback's checkpoint state (two callbacks in one Trainer
    need two names).
    """

    method: str = "normal"
    n_bootstrap: int = 10
    z_th: float = 0.0
    p_th: float = 0.3
    lfdr_th: float = 0.3
    q_th: float = 0.1
    pi0: Optional[float] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    num_images: int = 16
    every_n_epochs: int = 1
    dataloader_idx: int = 0
    maps: list[str] = field(default_factory=lambda: ["p", "lfdr", "pi0", "posterior"])
    max_images_per_forward: Optional[int] = None  # noqa: UP045
    autocast_dtype: Optional[str] = "auto"  # noqa: UP045
    seed: int = 0
    log_images: int = 4
    on_error: str = "warn"
    std_factor: float = 1.0
    all_channels: bool = True
    patch_size: Optional[int] = None  # noqa: UP045
    normalization: Optional[str] = None  # noqa: UP045
    probe_ids: Optional[list[int]] = None  # noqa: UP045
    heads: str = "mean"
    statistics: str = "auto"
    faithfulness: str = "kept"
    faithfulness_maps: list[str] = field(default_factory=lambda: ["lfdr"])
    faithfulness_steps: int = 8
    faithfulness_baseline: str = "mean"
    faithfulness_regions: list[str] = field(default_factory=lambda: ["shortcut"])
    faithfulness_prediction: str = "auto"
    sanity_check: bool = True
    sanity_draws: int = 128
    name: str = "attnreg"

    def __post_init__(self) -> None:
        if isinstance(self.maps, str):  # maps="lfdr" means one map, not the letters l, f, d, r
            self.maps = [self.maps]
        _require(self.method in available_methods(), "method", self.method, f"choose one of {available_methods()}")
        _require(
            _is_int(self.n_bootstrap) and self.n_bootstrap >= 1, "n_bootstrap", self.n_bootstrap, "need an int >= 1"
        )
        try:
            Thresholds(z_th=self.z_th, p_th=self.p_th, lfdr_th=self.lfdr_th, q_th=self.q_th)
        except ValueError as err:
            raise ValueError(f"attnreg.{err}") from None
        _require(self.pi0 is None or 0.0 <= float(self.pi0) <= 1.0, "pi0", self.pi0, "need null or a float in [0, 1]")
        _require(_is_int(self.num_images) and self.num_images >= 0, "num_images", self.num_images, "need an int >= 0")
        _require(
            _is_int(self.every_n_epochs) and self.every_n_epochs >= 1,
            "every_n_epochs",
            self.every_n_epochs,
            "need >= 1",
        )
        _require(
            _is_int(self.dataloader_idx) and self.dataloader_idx >= 0,
            "dataloader_idx",
            self.dataloader_idx,
            "need an int >= 0",
        )
        unknown = [m for m in self.maps if m not in MAP_NAMES]
        _require(not unknown, "maps", list(self.maps), f"unknown {unknown}; choose from {list(MAP_NAMES)}")
        _require(
            self.max_images_per_forward is None
            or (_is_int(self.max_images_per_forward) and self.max_images_per_forward >= 1),
            "max_images_per_forward",
            self.max_images_per_forward,
            "need null (32 on a CPU, 256 elsewhere) or an int >= 1",
        )
        _require(
            self.autocast_dtype in (None, "auto", *AUTOCAST_DTYPES),
            "autocast_dtype",
            self.autocast_dtype,
            f"need null (float32), 'auto' (the trainer's precision) or one of {list(AUTOCAST_DTYPES)}",
        )
        _require(_is_int(self.seed), "seed", self.seed, "need an int")
        _require(_is_int(self.log_images) and self.log_images >= 0, "log_images", self.log_images, "need an int >= 0")
        _require(self.on_error in ON_ERROR, "on_error", self.on_error, f"choose one of {list(ON_ERROR)}")
        _require(
            math.isfinite(self.std_factor) and self.std_factor > 0, "std_factor", self.std_factor, "need a float > 0"
        )
        _require(
            self.patch_size is None or (_is_int(self.patch_size) and self.patch_size >= 1),
            "patch_size",
            self.patch_size,
            "need null or an int >= 1",
        )
        _require(
            self.normalization is None or self.normalization in NORMALIZATIONS,
            "normalization",
            self.normalization,
            f"need null or one of {sorted(NORMALIZATIONS)}",
        )
        _require(
            self.probe_ids is None or (len(self.probe_ids) > 0 and all(_is_int(i) for i in self.probe_ids)),
            "probe_ids",
            self.probe_ids,
            "need null or a non-empty list of sample ids (ints)",
        )
        _require(self.heads in ("mean", "all"), "heads", self.heads, "choose 'mean' or 'all' (each head tested too)")
        _require(
            self.statistics in ("auto", "background", "inline"),
            "statistics",
            self.statistics,
            "choose 'auto' (background on a GPU), 'background' (a CPU thread) or 'inline'",
        )
        if isinstance(self.faithfulness_maps, str):
            self.faithfulness_maps = [self.faithfulness_maps]
        _require(
            self.faithfulness in FAITHFULNESS,
            "faithfulness",
            self.faithfulness,
            f"choose one of {list(FAITHFULNESS)}",
        )
        bad = [m for m in self.faithfulness_maps if m not in KEPT_MAPS]
        _require(
            bool(self.faithfulness_maps) and not bad,
            "faithfulness_maps",
            list(self.faithfulness_maps),
            f"need thresholded maps among {list(KEPT_MAPS)}",
        )
        _require(
            _is_int(self.faithfulness_steps) and self.faithfulness_steps >= 1,
            "faithfulness_steps",
            self.faithfulness_steps,
            "need an int >= 1",
        )
        _require(
            self.faithfulness_baseline in BASELINES,
            "faithfulness_baseline",
            self.faithfulness_baseline,
            f"choose one of {list(BASELINES)}",
        )
        _require(
            self.faithfulness_prediction in PREDICTIONS,
            "faithfulness_prediction",
            self.faithfulness_prediction,
            f"choose one of {list(PREDICTIONS)}",
        )
        if isinstance(self.faithfulness_regions, str):
            self.faithfulness_regions = [self.faithfulness_regions]
        _require(
            all(r in REGIONS for r in self.faithfulness_regions),
            "faithfulness_regions",
            list(self.faithfulness_regions),
            f"need regions among {list(REGIONS)} (or [] for none)",
        )
        _require(isinstance(self.sanity_check, bool), "sanity_check", self.sanity_check, "need true or false")
        _require(
            _is_int(self.sanity_draws) and self.sanity_draws >= 1, "sanity_draws", self.sanity_draws, "need an int >= 1"
        )
        _require(
            isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
            "name",
            self.name,
            "need a non-empty key prefix of letters, digits, '_', '.', '-'",
        )

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(z_th=self.z_th, p_th=self.p_th, lfdr_th=self.lfdr_th, q_th=self.q_th)

    def method_options(self) -> dict:
        """Options of the chosen null generator."""
        if self.method == "normal":
            return {"std_factor": self.std_factor, "all_channels": self.all_channels}
        if self.method == "uniform":
            return {"all_channels": self.all_channels, "normalization": self.normalization}
        if self.method == "patch" and self.patch_size is not None:
            return {"patch_size": self.patch_size}
        return {}

    def autocast(self, precision: str | None = None, device: torch.device | str | None = None) -> torch.dtype | None:
        """The forwards' autocast dtype: ``"auto"`` follows a Lightning ``precision`` (``bf16-mixed`` ->
        bfloat16, ``16-mixed`` -> float16, ...; float32 without one, and on a CPU ``device`` that would emulate
        bfloat16), an explicit value wins; as the engine resolves its own ``autocast_dtype``."""
        return resolve_autocast_dtype(self.autocast_dtype, precision, device)

    def faithfulness_kwargs(self) -> dict:
        """Keyword arguments of :func:`~attnreg_lightning.faithfulness.faithfulness` (mode ``kept``/``curves``)."""
        return {
            "mode": self.faithfulness,
            "kept_maps": list(self.faithfulness_maps),
            "steps": self.faithfulness_steps,
            "baseline": self.faithfulness_baseline,
            "seed": self.seed,
            "max_images_per_forward": self.max_images_per_forward,
        }

    def engine_kwargs(self, precision: str | None = None, device: torch.device | str | None = None) -> dict:
        """Keyword arguments of :class:`~attnreg_lightning.engine.AttentionRegularizer` (``precision``: the
        trainer's, and ``device``: the model's, for ``autocast_dtype="auto"``)."""
        return {
            "method": self.method,
            "n_bootstrap": self.n_bootstrap,
            "thresholds": self.thresholds,
            "max_images_per_forward": self.max_images_per_forward,
            "autocast_dtype": self.autocast(precision, device),
            "seed": self.seed,
            "pi0": "estimate" if self.pi0 is None else float(self.pi0),
            "method_options": self.method_options(),
            "heads": self.heads,
        }


KNOB_NAMES = tuple(f.name for f in fields(AttnRegConfig))
"""Every knob, in :class:`AttnRegConfig`'s order."""
KNOB_DEFAULTS = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(AttnRegConfig)}
"""Every knob's default."""


def register_configs() -> None:
    """Register the structured config schema with Hydra, so composition type-checks ``attnreg.*`` keys.

    Stored outside the ``attnreg`` group (``conf/attnreg/default.yaml`` pulls it in with
    ``/attnreg_schema@_here_``), so ``--help`` lists only the options a user can choose."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="attnreg_schema", node=AttnRegConfig)
