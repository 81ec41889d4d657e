"""What an explained run draws: a picture row per pictured image, the z-scores behind the histograms, and
each pictured probe's maps by run for the evolution pictures. Arrays, and their PNG files for the loggers that take
files (encoded where they are drawn: off the training thread); loggers.py sends them."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from attnreg_lightning.probes import ProbeBook
from attnreg_lightning.regularize import RegularizedAttention
from attnreg_lightning.viz import display_uint8, evolution_picture, heads_picture, mask_classes, picture_row, stack


@dataclass
class PictureRow:
    """One explained image: its strip of panels, a caption and a row of per-image statistics."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    stats: dict[str, float] = field(default_factory=dict)
    input: np.ndarray | None = None  # uint8 [H', W', 3], the input as drawn
    mask: np.ndarray | None = None  # uint8 [H', W'] classes of viz.MASK_CLASSES over ``input``
    files: dict[str, Path] = field(default_factory=dict)  # PNGs of "image" and "input", while the run's are kept
    name: str | None = None  # the image's own name (its file's), where it has one: PNG files are named by it


@dataclass
class RunPictures:
    """One run's picture rows and the z-scores of every valid image explained with them; :meth:`close` deletes the
    rows' PNG files once the loggers have taken them."""

    rows: list[PictureRow]
    z_observed: Tensor
    z_null: Tensor
    folder: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None
        for row in self.rows:
            row.files = {}


class PictureBook:
    """The pictures of the current run (the first ``limit`` valid images) and the probes' map history.

    The colour scale of a probe's attention panels is its first run's, so its pictures compare across runs. With
    ``write_png``, each row's picture and input are also written as PNG files as they are drawn. ``names`` gives
    sample ids a name to be shown by (``explain.py images=``: each file's path), in place of ``id <n>``.
    """

    def __init__(self, probes: ProbeBook, maps: Sequence[str], limit: int) -> None:
        self.probes, self.maps, self.limit = probes, list(maps), limit
        self.write_png = False
        self.names: dict[int, str] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self.start_run()

    def start_run(self) -> None:
        if self._folder is not None:  # a run that never ended (an exception): its files are not wanted
            self._folder.cleanup()
            self._folder = None
        self.rows: list[PictureRow] = []
        self._z: list[tuple[Tensor, Tensor]] = []

    def _png(self, name: str, image: np.ndarray) -> Path:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="attnreg-pictures-")
        path = Path(self._folder.name) / f"{len(self.rows)}_{name}.png"
        Image.fromarray(image).save(path)
        return path

    def add(
        self,
        images: Tensor | None,
        reg: RegularizedAttention,
        ids: list[int],
        scores: dict[str, Tensor],
        stage: str,
        heads: int | None,
    ) -> None:
        """Note one result's z-scores and draw its valid images while rows are wanted; ``scores`` are
        those of its valid images, ``stage`` names the run (``epoch3``, ``validate``); ``images`` None: none
        is wanted any more (the caller knew)."""
        sig = reg.significance
        valid_rows = sig.valid.nonzero().flatten().tolist()
        self._z.append((sig.z[sig.valid], sig.z_null[sig.valid]))
        for j, i in enumerate(valid_rows):
            if images is None or len(self.rows) >= self.limit or reg.grid is None:
                return
            scale = self.probes.scale(ids[i])  # noted by ProbeBook.follow: the probe's first run's scale
            kept = int((reg.maps["lfdr"][i] > 0).sum())
            run = stage.replace("epoch", "epoch ")
            title = f"{self.label(ids[i])} · {run} · pi0 {float(sig.pi0[i]):.2f} · lfdr keeps {kept}/{sig.z.shape[1]}"
            picture = picture_row(images[i], reg, i, self.maps, title=title, scale=scale)
            if reg.per_head is not None:
                picture = stack(picture, heads_picture(images[i], reg.per_head, i, heads))
            base = display_uint8(images[i])
            stats = {"id": ids[i], **{k: float(v[j]) for k, v in scores.items()}}
            files = {"image": self._png("image", picture), "input": self._png("input", base)} if self.write_png else {}
            mask = mask_classes(reg, i, base.shape[:2])
            self.rows.append(PictureRow(picture, title, stats, base, mask, files, self.names.get(ids[i])))
            self.probes.add_history(
                ids[i],
                stage,
                reg.attention[i].double().cpu().numpy().reshape(reg.grid),
                reg.maps["lfdr"][i].double().cpu().numpy().reshape(reg.grid),
                base,
            )

    def label(self, sample_id: int) -> str:
        """How a picture names an image: its name where it has one, else its id."""
        return self.names.get(sample_id, f"id {sample_id}")

    def end_run(self) -> RunPictures | None:
        """This run's pictures, if any was drawn; the book is then empty for the next run."""
        run = None
        if self.rows:
            z_observed = torch.cat([z.flatten() for z, _ in self._z])
            z_null = torch.cat([z0.flatten() for _, z0 in self._z])
            run = RunPictures(self.rows, z_observed, z_null, self._folder)
            self._folder = None
        self.start_run()
        return run

    def evolution(self) -> list[tuple[np.ndarray, str]]:
        """How each pictured probe's raw and lfdr maps moved over the explained runs (up to ``limit``)."""
        followed = [(i, r) for i, r in self.probes.records.items() if r.history and r.image is not None]
        return [
            (
                evolution_picture(r.image, r.history, r.scale, title=self.label(i)),
                f"{self.label(i)}: raw and lfdr maps by run",
            )
            for i, r in followed[: self.limit]
        ]
