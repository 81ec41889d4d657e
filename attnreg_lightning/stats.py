"""Significance of observed attention against its bootstrap null, batched over images in torch.

The formulas are those of docs/method.md, computed for all images at once on the
input's device: z-scores on the log scale, pooled empirical p-values, Storey's pi0, Efron's local FDR
(the model of ``statsmodels.stats.multitest.local_fdr``, fitted by a batched Poisson IRLS) and pi0-scaled
Benjamini-Hochberg q-values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

ATTENTION_FLOOR = 1e-12
"""Attention values below this (zero, negative) are clamped to it before taking logs."""

STOREY_LAMBDA = 0.89
"""pi0 = #{p > lambda} / (T (1 - lambda)), the reference's spline evaluated at its last knot."""

_CELLS_PER_TOKEN = 16
_MAX_CELL_DEPTH = 16
_NULLS_PER_CHUNK = 1 << 16
FIT_TOTAL_FACTOR = 4.0
"""A local-FDR fit whose fitted histogram holds over this many times the image's tokens (or under its
inverse) diverged. Seen on heavy-tailed z: fits that work hold 0.74-2.1 T, diverged ones 8.6 T and up."""

_IRLS_MAX_ITER = 100
_IRLS_TOL = 1e-8
_IRLS_CHECK_EVERY = 8
_EPS = torch.finfo(torch.float64).eps


def _div(x: Tensor, divisor: float) -> Tensor:
    """``x / divisor`` correctly rounded on every device: CUDA divides by a Python number as a multiplication
    by its reciprocal, one ulp off the CPU (and numpy) at times; a tensor divisor is divided elementwise."""
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class Significance:
    """Per-token statistics of a batch; shapes ``B`` images, ``N`` nulls, ``T`` tokens.

    ``valid[b]`` is False where image ``b`` is degenerate (non-finite attention, or null attention with no
    spread beyond rounding): its statistics are placeholders (z = 0, p = 1, lfdr = 1, q = 1) that select no token.
    ``fit_ok[b]`` is False where the local-FDR density fit failed (see :func:`local_fdr`): its lfdr is 1 at
    every token. ``clamped[b]`` counts the image's attention values (observed and null) below
    :data:`ATTENTION_FLOOR` that were clamped to it.
    """

    z: Tensor  # [B, T]
    z_null: Tensor  # [B, N, T]
    p: Tensor  # [B, T]
    pi0: Tensor  # [B]
    lfdr: Tensor  # [B, T]
    q: Tensor  # [B, T]
    valid: Tensor  # [B] bool
    fit_ok: Tensor  # [B] bool
    clamped: Tensor  # [B] int64


def zscores(obs: Tensor, null: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-scale z-scores of observed ``[B, T]`` and null ``[B, N, T]`` attention; also returns validity ``[B]``.

    Logs, mean and std are taken in float64 whatever the input (``(N + 1) T`` values per image, a negligible
    cost), so float32 attention loses nothing but the final rounding of z to float32.
    """
    dtype = obs.dtype
    log_obs = obs.to(torch.float64).clamp_min(ATTENTION_FLOOR).log_()  # a copy: the input stays as it was
    log_null = null.to(torch.float64).clamp_min(ATTENTION_FLOOR).log_()
    mu = log_null.mean(dim=(1, 2))
    # two-pass population std (numpy's), sharing the centred values with z_null
    centred = log_null.sub_(mu[:, None, None])
    sd = centred.square().mean(dim=(1, 2)).sqrt_()
    # a non-finite null value makes mu (hence sd) non-finite; a spread of a few ulps (of the input's
    # precision) of the mean is the rounding of a constant null, not spread
    tiny_spread = 8 * torch.finfo(dtype).eps * mu.abs()
    valid = torch.isfinite(obs).all(1) & torch.isfinite(sd) & (sd > tiny_spread)
    sd = torch.where(valid, sd, torch.ones_like(sd))
    z = (log_obs - mu[:, None]).div_(sd[:, None])
    z0 = centred.div_(sd[:, None, None])
    return z.to(dtype), z0.to(dtype), valid


def clamped_counts(obs: Tensor, null: Tensor) -> Tensor:
    """How many of each image's observed ``[B, T]`` and null ``[B, N, T]`` attention values lie below
    :data:`ATTENTION_FLOOR` (zero, negative): the values :func:`zscores` clamps. ``[B]`` int64."""
    return (obs < ATTENTION_FLOOR).sum(1) + (null < ATTENTION_FLOOR).sum((1, 2))


def _as_ordered_ints(x: Tensor) -> Tensor:
    """Non-negative floats viewed as their bit patterns: those order like the values, and torch sorts and
    searches integers faster than floats on a CPU."""
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)


def _argsort_nonnegative(x: Tensor) -> Tensor:
    """Ascending order of each row of non-negative floats."""
    return _as_ordered_ints(x).argsort(dim=1)


@torch.inference_mode()
def _cells(distinct: Tensor, n_distinct: Tensor) -> tuple[Tensor, Tensor, int]:
    """Cells of equal width over ``[0, max]`` of each row of ``distinct`` (``[B, D]``, ascending, its first
    ``n_distinct[b]`` entries distinct and the rest +inf): the scale that maps a value to its cell, ``lower``
    (``[B, cells + 2]``: how many distinct values lie in cells below each cell) and the most distinct values
    any one cell holds."""
    b, d = distinct.shape
    cells = _CELLS_PER_TOKEN * d
    top = distinct.gather(1, (n_distinct - 1).unsqueeze(1))
    scale = cells / top
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    own = torch.arange(d, device=distinct.device) < n_distinct.unsqueeze(1)
    lower = torch.zeros(b, cells + 2, dtype=torch.long, device=distinct.device)
    lower.scatter_add_(1, _cell(torch.where(own, distinct, 0.0), scale, cells) + 1, own.long())
    depth = int(lower.max()) if lower.numel() else 0
    return scale, lower.cumsum_(1), depth


def _cell(v: Tensor, scale: Tensor, cells: int) -> Tensor:
    # floor(v * scale) is non-decreasing in v under IEEE rounding: a value in a lower cell is below v, one
    # in a higher cell above it
    return (v * scale).clamp_(max=cells).long()


@torch.inference_mode()
def _count_below(distinct: Tensor, cells: tuple[Tensor, Tensor, int], values: Tensor) -> Tensor:
    """``#{distinct[b] < v}`` for every ``v`` in ``values[b]`` (all >= 0), exactly: a searchsorted.

    torch's searchsorted costs ~40 ns per value on a CPU; this costs a few elementwise passes: one lookup
    of how many distinct values lie in cells below the value's cell (``cells`` from :func:`_cells`), then
    comparisons with only the few that share its cell. Crowded cells fall back to the search.
    """
    scale, lower, depth = cells
    if depth > _MAX_CELL_DEPTH:  # values crowded into a few cells: the cells no longer pay
        return torch.searchsorted(distinct, values)
    d = distinct.shape[1]
    place = lower.gather(1, _cell(values, scale, lower.shape[1] - 2))
    # the first distinct value at or above a value's cell; past it only the values sharing that cell
    hit = (distinct.gather(1, place) < values).view(-1).nonzero().squeeze(1)
    if hit.numel():  # 1-D index_select: advanced indexing costs several times more per element
        flat_place = place.view(-1)
        at, v = flat_place.index_select(0, hit).add_(1), values.reshape(-1).index_select(0, hit)
        row_start = hit.div(values.shape[1], rounding_mode="floor").mul_(d)
        flat = distinct.view(-1)
        for _ in range(depth - 1):
            at += flat.index_select(0, row_start + at) < v
        flat_place.index_copy_(0, hit, at)
    return place


def pooled_pvalues(z: Tensor, z_null: Tensor, order: Tensor | None = None) -> Tensor:
    """``p = 1 - #{pool <= |z|} / (T + N T)`` with pool = |z| and |z_null| of the same image together.

    Counts by placing each null value among the image's distinct observed values (a sort of ``T``, not of
    ``T + N T``, values): the same comparisons as sorting the pool, so the same counts. ``order`` may give
    the ascending order of ``|z|`` per image when the caller has it.
    """
    obs = z.abs()
    b, t = obs.shape
    n = z_null.shape[1]
    order = _argsort_nonnegative(obs) if order is None else order
    sorted_obs = obs.gather(1, order)
    # rank[b, i]: the place of sorted_obs[b, i] among the image's distinct values
    new = torch.ones_like(sorted_obs, dtype=torch.bool)
    new[:, 1:] = sorted_obs[:, 1:] != sorted_obs[:, :-1]
    rank = new.cumsum(1).sub_(1)
    distinct = torch.full((b, t + 1), math.inf, dtype=obs.dtype, device=obs.device).scatter_(1, rank, sorted_obs)
    cells = _cells(distinct, rank[:, -1] + 1)
    le = torch.zeros(b, t + 1, dtype=torch.long, device=obs.device)
    one = torch.ones((), dtype=torch.long, device=obs.device)
    # a few bootstrap samples at a time: the buffers stay small enough to be reused, not paged in afresh
    step = max(1, _NULLS_PER_CHUNK // max(1, b * t))
    for i in range(0, n, step):
        place = _count_below(distinct, cells, z_null[:, i : i + step].abs().flatten(1))
        # a null value at place m is <= every distinct value from the m-th on
        le.scatter_add_(1, place, one.expand_as(place))
    le.scatter_add_(1, rank, one.expand_as(rank))
    count = le.cumsum_(1).gather(1, rank)
    return 1.0 - _div(torch.empty_like(count).scatter_(1, order, count).to(z.dtype), t + n * t)


def null_pvalues(sig: Significance) -> Tensor:
    """p-values of the null images' tokens against the same pool as the observed ones, ``[B, N T]``: under
    a calibrated null they are Uniform(0, 1) (the metrics' sRMSD measures how far they are)."""
    nulls = sig.z_null.abs().flatten(1)
    pool = _as_ordered_ints(torch.cat([sig.z.abs(), nulls], 1)).sort(1).values
    count = torch.searchsorted(pool, _as_ordered_ints(nulls), right=True)
    return 1.0 - _div(count.to(nulls.dtype), pool.shape[1])


def storey_pi0(p: Tensor, lam: float = STOREY_LAMBDA) -> Tensor:
    """Storey's ``min(1, #{p > lam} / (T (1 - lam)))`` per image."""
    return _div((p > lam).sum(dim=1).to(p.dtype), p.shape[1] * (1 - lam)).clamp(max=1.0)


def _vander(x: Tensor, deg: int) -> Tensor:
    """Decreasing powers ``x^deg, ..., x, 1`` as numpy.vander: ``[..., deg + 1]``."""
    rising = torch.cat([torch.ones_like(x).unsqueeze(-1), x.unsqueeze(-1).expand(*x.shape, deg).cumprod(-1)], -1)
    return rising.flip(-1)


def _pad_rows(x: Tensor) -> Tensor:
    """``x [B, K, P]`` with zero rows appended up to a multiple of 8 rows.

    MKL's QR of a matrix depends on its memory alignment in the last bits (in a batch, every other 29 x 9
    matrix starts off a 64-byte boundary), and a fit that drifts amplifies those bits: with every matrix and
    column 64-byte aligned, an image's fit is the same bits alone and in any batch. Zero rows change no
    least-squares solution, and a bin with no count and no design adds a constant to the deviance.
    """
    return torch.nn.functional.pad(x, (0, 0, 0, -x.shape[1] % 8))


def _lstsq(system: Tensor) -> Tensor:
    """Least squares of the tall, full-rank batched systems ``system = [A | y]`` (``[B, K, P + 1]``): ``[B, P, 1]``.

    One Householder QR of ``[A | y]`` gives both ``R`` and ``Q^T y`` (its last column), so ``Q`` is never
    formed: each IRLS iteration pays for a single LAPACK factorisation (CPU and CUDA).
    """
    p = system.shape[-1] - 1
    top = torch.geqrf(system)[0].narrow(-2, 0, p)
    return torch.linalg.solve_triangular(top.narrow(-1, 0, p), top.narrow(-1, p, 1), upper=True)


@torch.inference_mode()
def _poisson_irls(x: Tensor, y: Tensor, start: Tensor) -> Tensor:
    """Poisson log-link fit of ``y [B, K]`` on ``x [B, K, P]`` for all images at once, from ``start [B, P]``.

    The iteration of statsmodels' GLM IRLS: working response and weights with ``mu`` floored at machine eps,
    stop when the deviance changes by at most 1e-8 or after 100 iterations. Each image stops on its own
    (where the fit drifts instead of converging, a few isolated outliers among empty bins, it ends where
    statsmodels does). The loop is dispatch-bound, every op counts: the stop rule is checked every few
    iterations from the fits and deviances kept meanwhile (an image that stopped earlier in the block
    takes the fit of its stop), then stopped images leave the batch; per-bin quantities are ``[B, K, 1]``
    columns, ready for the matrix products, and the working response goes straight into its column of the
    system. On a GPU this also means one host sync per check, not per iteration.
    """
    beta = start.clone()
    if beta.shape[0] == 0:
        return beta
    p = x.shape[-1]
    rows = torch.arange(y.shape[0], device=y.device)
    log_eps = math.log(_EPS)
    tiny = torch.finfo(x.dtype).tiny
    y = y.unsqueeze(-1)
    # where y * log(y / mu) would fall below y * log(eps), i.e. eta above log(y) - log(eps); none where y = 0
    eta_cap = torch.where(y > 0, y.log() - log_eps, math.inf)

    # Half the Poisson deviance sum(y log(max(y / mu, eps)) - y + mu) as statsmodels computes it, less the
    # y-only terms: both cancel in the change the stop rule looks at.
    def half_deviance(eta: Tensor, mu: Tensor) -> Tensor:
        return torch.addcmul(mu, y, torch.minimum(eta, eta_cap), value=-1).sum(dim=(1, 2))

    eta = torch.bmm(x, start.unsqueeze(-1))
    mu = eta.exp()
    devs, fits = [half_deviance(eta, mu)], []
    system = torch.cat([x, eta], -1)  # [x | working response]; the last column is rewritten every step
    for step in range(1, _IRLS_MAX_ITER + 1):
        floored = mu.clamp_min(_EPS)
        # statsmodels' weights 1 / (g'(mu)^2 V(mu)) with g' = 1 / max(mu, eps): mu, or eps^2 / mu below eps,
        # which pins bins whose fitted mean has collapsed instead of letting them drift.
        w = floored * mu.clamp_min(tiny).rsqrt()
        torch.addcdiv(eta, y - mu, floored, out=system[..., p:])
        fit = _lstsq(system * w)
        eta = torch.bmm(x, fit)
        mu = eta.exp()
        fits.append(fit)
        devs.append(half_deviance(eta, mu))
        last = step == _IRLS_MAX_ITER
        if step % _IRLS_CHECK_EVERY and not last:
            continue
        dev = torch.stack(devs)
        # isclose(rtol=0, equal_nan=True), cheaper: a NaN change (NaN deviance, inf - inf) moves only where
        # just one of the two is NaN, so a fit that blew up (NaN twice running) settles too
        moving = ((dev[1:] - dev[:-1]).abs_() > _IRLS_TOL / 2) | (dev[1:].isnan() != dev[:-1].isnan())
        stuck = moving.all(0)
        done = torch.ones_like(stuck) if last else ~stuck
        n_done = int(done.sum())  # the one host sync of the block
        if n_done == 0:
            devs, fits = devs[-1:], []
            continue
        # the fit of the first settled step, or of the last step where none settled (the cap)
        at = torch.where(stuck, len(fits) - 1, moving.logical_not().byte().argmax(0))
        chosen = torch.stack(fits)[at, torch.arange(at.numel(), device=at.device)].squeeze(-1)
        beta[rows[done]] = chosen[done]
        if n_done == done.numel():
            break
        keep = ~done
        rows, x, y, eta_cap, eta, mu, system = (t[keep] for t in (rows, x, y, eta_cap, eta, mu, system))
        devs, fits = [devs[-1][keep]], []
    return beta


def local_fdr(z: Tensor, pi0: Tensor, deg: int = 7, nbins: int = 30) -> tuple[Tensor, Tensor]:
    """Efron's local FDR ``clip(pi0 phi(z) / f(z), 0, 1)`` per image, as statsmodels' ``local_fdr``; and
    whether each image's fit succeeded (``fit_ok``, ``[B]`` bool).

    ``f`` is a Poisson regression of the histogram of ``z[b]`` (``nbins`` edges from min to max) on a
    degree-``deg`` polynomial of the bin centres. ``z`` is ``[B, T]``; computed in float64.

    A fit fails when its coefficients are not finite or its fitted histogram holds more than
    :data:`FIT_TOTAL_FACTOR` times the image's ``T`` tokens, or less than ``1 /`` that (a converged Poisson
    fit with an intercept holds exactly ``T``): the IRLS diverged (deviances of 1e4 to 1e178 seen, where
    statsmodels then calls every token a discovery). A failed fit, and a row with no spread to fit, gets
    lfdr = 1 at every token: nothing is discovered through a density that was not estimated. Each image's
    fit is the same bits alone and in any batch, so the outcome is too.
    """
    if deg < 1 or nbins < deg + 2:
        raise ValueError(f"lfdr_deg={deg} and lfdr_bins={nbins}: need deg >= 1 and bins >= deg + 2")
    zd = z.to(torch.float64)
    t = zd.shape[1]
    lo, hi = zd.amin(dim=1), zd.amax(dim=1)
    # Rows with no spread (or non-finite) have no histogram to fit; fit a stand-in and report lfdr = 1.
    fittable = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)
    if not bool(fittable.all()):
        stand_in = torch.linspace(-1.0, 1.0, t, device=z.device, dtype=torch.float64).expand_as(zd)
        zd = torch.where(fittable[:, None], zd, stand_in)
        lo, hi = zd.amin(dim=1), zd.amax(dim=1)
    step = (hi - lo) / (nbins - 1)
    # Edges built as numpy.linspace builds them, so bin membership matches numpy.histogram exactly.
    edges = torch.arange(nbins, device=z.device, dtype=torch.float64) * step[:, None] + lo[:, None]
    edges[:, -1] = hi
    # Bin by arithmetic, then correct by comparing with the edges, as numpy.histogram does: bin i holds
    # edges[i] <= z < edges[i + 1], the last bin also its right edge.
    idx = ((zd - lo[:, None]) / step[:, None]).floor().long().clamp(0, nbins - 2)
    idx = idx - (zd < edges.gather(1, idx)).long()
    idx = idx + ((zd >= edges.gather(1, idx + 1)) & (idx < nbins - 2)).long()
    counts = torch.zeros(zd.shape[0], nbins - 1, dtype=torch.float64, device=z.device)
    counts.scatter_add_(1, idx, torch.ones_like(zd))
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    design = _vander(centres, deg)
    scale = (design - design.mean(dim=1, keepdim=True)).square_().mean(dim=1, keepdim=True).sqrt_()  # numpy's std
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
    design, y = _pad_rows(design / scale), _pad_rows(counts.unsqueeze(-1)).squeeze(-1)
    start = _lstsq(torch.cat([design, y.log1p().unsqueeze(-1)], -1)).squeeze(-1)
    beta = _poisson_irls(design, y, start)
    fitted_total = torch.bmm(design[:, : nbins - 1], beta.unsqueeze(-1)).exp_().sum(dim=(1, 2))
    fit_ok = (
        fittable
        & torch.isfinite(beta).all(1)
        & (fitted_total <= FIT_TOTAL_FACTOR * t)
        & (fitted_total >= t / FIT_TOTAL_FACTOR)
    )
    coef = beta / scale.squeeze(1)  # of z^deg, ..., z, 1
    log_fitted = coef[:, :1].expand_as(zd)
    for k in range(1, deg + 1):  # Horner: no [B, T, deg + 1] design at the tokens
        log_fitted = torch.addcmul(coef[:, k : k + 1], log_fitted, zd)
    fitted = log_fitted.exp()
    width = (edges[:, 1] - edges[:, 0])[:, None]
    fz = fitted / (t * width)
    f0 = torch.exp(zd.square().mul_(-0.5)).div_(math.sqrt(2 * math.pi))
    lfdr = (pi0.to(torch.float64)[:, None] * f0 / fz).clamp(0.0, 1.0).nan_to_num(nan=1.0)
    return torch.where(fit_ok[:, None], lfdr, torch.ones_like(lfdr)).to(z.dtype), fit_ok


def bh_qvalues(p: Tensor, pi0: Tensor, order: Tensor | None = None) -> Tensor:
    """Benjamini-Hochberg q-values scaled by ``pi0``: ``q_(i) = min_{j >= i} pi0 T p_(j) / j``, at most 1.

    ``order`` may give the ascending order of ``p`` per image (tied p-values get the same q in any order).
    """
    t = p.shape[1]
    order = p.argsort(dim=1) if order is None else order
    sorted_p = p.gather(1, order)
    ranks = torch.arange(1, t + 1, device=p.device, dtype=p.dtype)
    raw = pi0[:, None] * t * sorted_p / ranks
    q_sorted = raw.flip(1).cummin(dim=1).values.flip(1).clamp(max=1.0)
    return torch.empty_like(p).scatter_(1, order, q_sorted)


@contextmanager
def bounded_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """At most ``threads`` intra-op threads for CPU work inside the block; the caller's setting afterwards.

    ``torch.set_num_threads`` is process-wide, so it is restored on the way out, exception or not. Does
    nothing for other devices or ``threads=None``.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def significance(
    obs: Tensor,
    null: Tensor,
    pi0: str | float = "estimate",
    lfdr_deg: int = 7,
    lfdr_bins: int = 30,
    cpu_threads: int | None = 1,
) -> Significance:
    """Statistics of observed attention ``obs [B, T]`` against null attention ``null [B, N, T]``.

    Attention below :data:`ATTENTION_FLOOR` (zero, negative) is clamped to it before the log and counted
    (``clamped``). Logs, mean and std of z are taken in float64; p is counted on z in float64 for float64
    input and in float32 otherwise (the Poisson fit of the local FDR always in float64); results come back
    in ``obs.dtype``. ``pi0`` is ``"estimate"`` (Storey, per image) or a float in [0, 1].
    Images whose input is non-finite or whose null has no spread are flagged in ``valid`` and get neutral
    statistics rather than NaN; images whose local-FDR fit diverged are flagged in ``fit_ok`` (lfdr = 1).
    Ranks and histograms have no gradient: the inputs are detached.

    On a CPU the statistics run on at most ``cpu_threads`` intra-op threads (``None``: torch's setting).
    They are thousands of small ops: beside busy processes (a training loop's data workers) threads that
    wait for each other at every op made them 13-50x slower than idle; one thread takes its fair share.
    The caller's ``torch.get_num_threads()`` is restored.
    """
    if obs.dim() != 2 or null.dim() != 3 or null.shape[0] != obs.shape[0] or null.shape[2] != obs.shape[1]:
        raise ValueError(f"obs must be [B, T] and null [B, N, T]; got {tuple(obs.shape)} and {tuple(null.shape)}")
    if null.shape[1] < 1:
        raise ValueError("null must hold at least one bootstrap sample (N >= 1)")
    if cpu_threads is not None and (
        isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1
    ):
        raise ValueError(f"cpu_threads must be None or an int >= 1, got {cpu_threads!r}")
    if isinstance(pi0, str):
        if pi0 != "estimate":
            raise ValueError(f"pi0 must be 'estimate' or a float in [0, 1], got {pi0!r}")
    elif not 0.0 <= float(pi0) <= 1.0:
        raise ValueError(f"pi0 must be 'estimate' or a float in [0, 1], got {pi0!r}")
    with bounded_threads(obs.device, cpu_threads):
        return _significance(obs, null, pi0, lfdr_deg, lfdr_bins)


def _significance(obs: Tensor, null: Tensor, pi0: str | float, lfdr_deg: int, lfdr_bins: int) -> Significance:
    dtype = obs.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    obs, null = obs.detach(), null.detach()
    clamped = clamped_counts(obs, null)
    z, z0, valid = zscores(obs.to(work), null.to(work))
    if not bool(valid.all()):  # in place: a fresh [B, N, T] buffer costs more in page faults than the work
        z.masked_fill_(~valid[:, None], 0.0)
        z0.masked_fill_(~valid[:, None, None], 0.0)
    # p falls as |z| rises, so one sort of |z| orders both the p-value count and the q-values
    abs_order = _argsort_nonnegative(z.abs())
    p = pooled_pvalues(z, z0, abs_order)
    p = torch.where(valid[:, None], p, torch.ones_like(p))
    if isinstance(pi0, str):
        pi0_t = storey_pi0(p)
    else:
        pi0_t = torch.full((obs.shape[0],), float(pi0), dtype=work, device=obs.device)
    lfdr, fit_ok = local_fdr(z, pi0_t, lfdr_deg, lfdr_bins)
    q = bh_qvalues(p, pi0_t, abs_order.flip(1))
    return Significance(
        z=z.to(dtype),
        z_null=z0.to(dtype),
        p=p.to(dtype),
        pi0=pi0_t.to(dtype),
        lfdr=lfdr.to(dtype),
        q=q.to(dtype),
        valid=valid,
        fit_ok=fit_ok & valid,
        clamped=clamped,
    )
