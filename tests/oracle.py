"""Independent reference: docs/method.md's formulas in plain numpy + statsmodels, one image at a time.

Written from the specification, not from the package, so that agreement means something.
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.multitest import local_fdr

FLOOR = 1e-12


def oracle_image(a: np.ndarray, a0: np.ndarray, pi0="estimate", deg: int = 7, nbins: int = 30) -> dict:
    """Statistics for one image: ``a`` is ``[T]`` (or any shape) and ``a0`` is ``[N, ...]``."""
    la = np.log(np.maximum(np.asarray(a, np.float64).ravel(), FLOOR))
    la0 = np.log(np.maximum(np.asarray(a0, np.float64).reshape(len(a0), -1), FLOOR))
    mu, sd = la0.mean(), la0.std()
    z = (la - mu) / sd
    z0 = (la0 - mu) / sd
    pool = np.sort(np.concatenate([np.abs(z), np.abs(z0).ravel()]))
    p = 1.0 - np.searchsorted(pool, np.abs(z), side="right") / pool.size  # #{pool <= |z|}
    t = z.size
    pi0_v = min(1.0, np.sum(p > 0.89) / (t * (1 - 0.89))) if pi0 == "estimate" else float(pi0)
    lfdr = local_fdr(z, null_proportion=pi0_v, deg=deg, nbins=nbins)
    order = np.argsort(p, kind="stable")
    ranked = pi0_v * t * p[order] / np.arange(1, t + 1)
    q = np.empty(t)
    q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return {"z": z, "z_null": z0, "p": p, "pi0": pi0_v, "lfdr": lfdr, "q": q}


def oracle_maps(a: np.ndarray, st: dict, z_th=0.0, p_th=0.3, lfdr_th=0.3, q_th=0.1, pixels_per_token=1) -> dict:
    """The maps; the pi0 cut is the reference's percentile over pixels, each token repeated ``pixels_per_token``
    times (the multiset of its nearest-upsampled map)."""
    a = np.asarray(a, np.float64).ravel()
    zreg = a * (st["z"] >= z_th)
    cut = np.percentile(np.repeat(st["p"], pixels_per_token), 100 * (1 - st["pi0"]))
    return {
        "zreg": zreg,
        "p": zreg * (st["p"] <= p_th),
        "lfdr": zreg * (st["lfdr"] <= lfdr_th),
        "pi0": zreg * (st["p"] <= cut),
        "posterior": a * (1 - st["lfdr"]),
        "q": zreg * (st["q"] <= q_th),
    }


def oracle_pixel_level(a: np.ndarray, a0: np.ndarray, grid: tuple[int, int], patch: int, **kw) -> dict:
    """The reference's way: nearest-upsample the token maps to pixels, then the same statistics."""
    up = lambda m: np.kron(m.reshape(grid), np.ones((patch, patch)))  # noqa: E731
    return oracle_image(up(a), np.stack([up(m) for m in a0]), **kw)
