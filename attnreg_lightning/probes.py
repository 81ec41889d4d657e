"""Probe images: the same validation images explained at every explained run, and how their maps move.

The first explained run picks the probes (each rank's first ``num_images`` images, or the configured
``probe_ids``); later runs explain whichever batch rows carry a probe's id, on whichever rank meets it.
After each run every rank's new records are gathered, so all ranks (and the checkpoint, written by rank 0)
hold every probe's last and first lfdr map and last z, which the next run compares with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnreg_lightning.metrics import iou, spearman
from attnreg_lightning.regularize import RegularizedAttention
from attnreg_lightning.viz import attention_scale

STABILITY_KEYS = ("stability/lfdr_iou", "stability/z_spearman", "stability/lfdr_iou_first")


@dataclass
class ProbeRecord:
    """What the next run compares one probe image with, and how it is drawn."""

    first_keep: np.ndarray  # bool [T]: tokens the lfdr map kept at the first explained run
    last_keep: np.ndarray  # bool [T]: ... at the last explained run
    last_z: np.ndarray  # float32 [T]
    scale: tuple[float, float]  # the attention panels' colour range, fixed at the first run
    history: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # pictured probes only
    image: np.ndarray | None = None  # uint8 [H, W, 3] input of a pictured probe, for the evolution picture


class ProbeBook:
    """Every probe's record by sample id, and this run's new observations until they are gathered."""

    def __init__(self, probe_ids: list[int] | None = None) -> None:
        self.fixed = None if probe_ids is None else {int(i) for i in probe_ids}
        self.picked: set[int] = set()  # the ids the first run picked, valid or not: each run explains (or skips) them
        self.records: dict[int, ProbeRecord] = {}
        self.pending: dict[int, dict[str, Any]] = {}
        self.pending_picks: set[int] = set()

    def reset(self) -> None:
        """No probe picked, no record: the next run picks and follows them as a first run does."""
        self.picked, self.records, self.pending, self.pending_picks = set(), {}, {}, set()

    @property
    def chosen(self) -> bool:
        """Whether the probes are known (configured, or picked at an earlier run)."""
        return self.fixed is not None or bool(self.picked)

    def is_probe(self, sample_id: int) -> bool:
        ids = self.fixed if self.fixed is not None else self.picked
        return int(sample_id) in ids

    def pick(self, ids: list[int]) -> None:
        """Note ids this rank picked while the probes are not chosen yet (a degenerate or failed image included:
        the next runs count it again, as skipped, instead of losing it)."""
        self.pending_picks.update(int(i) for i in ids)

    def stability(self, sample_id: int, keep: np.ndarray, z: np.ndarray) -> dict[str, float]:
        """The probe's stability scores against its earlier runs (empty at its first run)."""
        record = self.records.get(int(sample_id))
        if record is None or record.last_keep.shape != keep.shape:
            return {}
        return {
            STABILITY_KEYS[0]: iou(keep, record.last_keep),
            STABILITY_KEYS[1]: spearman(z, record.last_z),
            STABILITY_KEYS[2]: iou(keep, record.first_keep),
        }

    def follow(self, reg: RegularizedAttention, ids: list[int]) -> dict[str, list[float]]:
        """Score how each valid image's maps moved since its earlier runs, and note where they are now."""
        sig = reg.significance
        keep = (reg.maps["lfdr"] > 0).cpu().numpy()
        z, raw = sig.z.double().cpu().numpy(), reg.attention.double().cpu().numpy()
        moved: dict[str, list[float]] = {k: [] for k in STABILITY_KEYS}
        for i in sig.valid.nonzero().flatten().tolist():
            for key, value in self.stability(ids[i], keep[i], z[i]).items():
                moved[key].append(value)
            self.observe(ids[i], keep[i], z[i], self.scale(ids[i]) or attention_scale(raw[i]))
        return moved

    def observe(self, sample_id: int, keep: np.ndarray, z: np.ndarray, scale: tuple[float, float]) -> None:
        self.pending[int(sample_id)] = {"keep": keep, "z": z.astype(np.float32), "scale": scale}

    def add_history(self, sample_id: int, label: str, raw: np.ndarray, lfdr_map: np.ndarray, image) -> None:
        self.pending[int(sample_id)]["history"] = (label, raw.astype(np.float32), lfdr_map.astype(np.float32), image)

    def scale(self, sample_id: int) -> tuple[float, float] | None:
        """The probe's colour scale: from its first run (this run's, when this is its first)."""
        record = self.records.get(int(sample_id))
        if record is not None:
            return record.scale
        new = self.pending.get(int(sample_id))
        return None if new is None else new["scale"]

    def end_run(self) -> None:
        """Gather every rank's observations of this run and fold them into the records (all ranks alike)."""
        gathered = [(self.pending, self.pending_picks)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.pending, self.pending_picks))
        self.pending, self.pending_picks = {}, set()
        for part, picks in gathered:
            self.picked |= picks
            for sample_id, new in sorted(part.items()):
                record = self.records.get(sample_id)
                if record is None:
                    record = ProbeRecord(new["keep"], new["keep"], new["z"], new["scale"])
                    self.records[sample_id] = record
                record.last_keep, record.last_z = new["keep"], new["z"]
                if "history" in new:
                    label, raw, lfdr_map, image = new["history"]
                    record.history.append((label, raw, lfdr_map))
                    if record.image is None:
                        record.image = image

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python only, so checkpoints load with ``torch.load(weights_only=True)``."""
        t = torch.from_numpy
        records = {
            int(i): {
                "first_keep": t(r.first_keep),
                "last_keep": t(r.last_keep),
                "last_z": t(r.last_z),
                "scale": [float(v) for v in r.scale],
                "history": [(label, t(raw), t(lfdr_map)) for label, raw, lfdr_map in r.history],
                "image": None if r.image is None else t(r.image),
            }
            for i, r in self.records.items()
        }
        return {"picked": sorted(self.picked), "records": records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def record(v: dict[str, Any]) -> ProbeRecord:
            return ProbeRecord(
                v["first_keep"].numpy(),
                v["last_keep"].numpy(),
                v["last_z"].numpy(),
                tuple(v["scale"]),
                [(label, raw.numpy(), lfdr_map.numpy()) for label, raw, lfdr_map in v["history"]],
                None if v["image"] is None else v["image"].numpy(),
            )

        # checkpoints written before ``picked`` was kept hold the records alone, keyed by id
        records = state.get("records", {}) if "picked" in state else state
        self.records = {int(i): record(v) for i, v in records.items()}
        self.picked = {int(i) for i in state.get("picked", self.records)}
