"""Faithfulness of attention maps: does the model's prediction depend on the tokens a map keeps?

Pure functions over a batch; every perturbed image streams through the classifier in chunks, so memory does
not grow with the number of perturbations::

    forward = classifier_forward(model)                     # images -> logits, None without a head
    res = faithfulness(forward, images, reg.attention, reg.maps, reg.grid, ids, mode="curves")
    res.scores["lfdr/comprehensiveness"]                    # [B] float64

Definitions (per image):

- ``c`` is the class the model predicts on the clean image ``x`` (argmax of its logits) and ``P_c(.)`` the
  softmax probability of class ``c``, the softmax taken in float64 of whatever logits the forward (and its
  autocast) gave.
- A token stands for a ``ph x pw`` pixel block (``H = h ph``, ``W = w pw`` for the token grid ``(h, w)``).
  A *removed* token's block is replaced by the same block of a baseline image in the model's input space:
  ``"mean"`` (each channel's mean over the image's pixels), ``"blur"`` (the image blurred by a Gaussian of
  ``sigma = max(ph, pw)``, separable, reflect padding, truncated at ``3 sigma`` or the image's edge) or
  ``"zeros"``.
- For a thresholded map ``m`` (``p``, ``lfdr``, ``pi0``, ``q``), ``S`` is the set of tokens with ``m > 0`` and
  ``k = |S|``; ``comprehensiveness = P_c(x) - P_c(x with S removed)`` and
  ``sufficiency = P_c(x) - P_c(x with only S kept)`` (every other token removed). The same two numbers are given
  for two baselines: ``fixed_k_top@m``, each image's ``round(kappa T)`` tokens of highest raw attention (ties to
  the lower token index) with one ``kappa`` for every image (the caller's: the callback gives the run's mean kept
  fraction of ``m``), and ``same_k_random@m``, the ``k`` tokens with the smallest keys of :func:`token_keys` (a
  function of the seed, the sample id and the token index only: the same image with the same id draws the same
  tokens in any batch, at any position, on any device). A size-matched top-k set is no baseline: within an image
  z, p, q and the pi0 cut are monotone in the raw attention, so ``m`` keeps that image's top-k tokens and such a
  set IS ``S``; what the method adds over raw attention is the per-image choice of ``k``, which ``fixed_k_top@m``
  takes away. An image with ``k = 0`` or ``k = T`` has no such question: its values for ``m`` and
  ``same_k_random@m`` are NaN and it is counted in ``undefined[m]``; ``fixed_k_top@m`` is NaN for every image
  when ``round(kappa T)`` is ``0`` or ``T``.
- For a marked region ``r`` (a token mask: the object ``roi``, planted ``noise``, a suspected ``shortcut`` cue),
  ``reliance = P_c(x) - P_c(x with r's tokens removed)``: how much the prediction depends on the region, whatever
  attention puts there (a model can lean on a cue it attends little to). Beside it ``same_k_random@r``: as many
  random tokens (the keys above). An image with no region token, or only region tokens, has NaN values.
- Deletion and insertion curves of the continuous maps ``raw`` (the attention) and ``posterior``, with
  ``K = steps``: tokens are ordered by the map's value, descending, ties by raw attention, descending, then by
  token index. At step ``j = 0..K`` the first ``m_j = round(j T / K)`` tokens in that order (Python's ``round``:
  halves to even) are removed from ``x`` (deletion: ``P_c`` of ``x`` without them) or kept in the all-baseline
  image (insertion: ``P_c`` of the baseline with only them). Deletion at ``j = 0`` and insertion at ``j = K`` are
  the clean image (no forward of their own); deletion at ``j = K`` and insertion at ``j = 0`` are the all-baseline
  image, one forward shared by both curves of both maps. ``*_auc`` is the trapezoidal area of the ``K + 1``
  points over the fraction ``[0, 1]``. A lower deletion AUC and a higher insertion AUC mean a more faithful map.
  An image whose attention or map has a non-finite value (the engine's mark of an image it could not test) gets
  NaN areas (and NaN curves).

Cost: each distinct perturbed image of an image is forwarded once. Two sets that hold the same tokens for an image
(its ``fixed_k_top@lfdr`` set and its ``lfdr`` set where the image keeps ``round(kappa T)`` tokens, two maps'
curve steps, ...) share one forward, a set that keeps every token is the clean image, and an undefined value costs
none. With ``"drop"`` a forward costs less the fewer tokens it keeps (the images of a forward keep as many tokens
each: the perturbed images are grouped by kept count). The clean forward itself is saved when the caller gives its
logits (the engine's ``classify=True`` reads them in the forward that reads the attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnreg_lightning.attention import classifier, resolve_vit
from attnreg_lightning.bootstrap import rechunk, require_positive_int
from attnreg_lightning.engine import eval_mode, images_per_forward
from attnreg_lightning.token_drop import check_droppable, keeping_tokens

MODES = ("kept", "curves")
PIXEL_BASELINES = ("mean", "blur", "zeros")
BASELINES = (*PIXEL_BASELINES, "drop")
KEPT_MAPS = ("p", "lfdr", "pi0", "q")
CURVE_MAPS = ("raw", "posterior")
FAITHFUL_KINDS = ("comprehensiveness", "sufficiency")
FIXED_K, SAME_K_RANDOM = "fixed_k_top@", "same_k_random@"
_MASK64 = (1 << 64) - 1


def faithfulness_keys(mode: str, maps: Sequence[str], regions: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The faithfulness scores' keys and the counts of images undefined for each map (``mode`` off: none)."""
    if mode == "off":
        return [], []
    scores = [f"{who}{m}/{what}" for m in maps for who in ("", FIXED_K, SAME_K_RANDOM) for what in FAITHFUL_KINDS]
    scores += [f"{who}{r}/reliance" for r in regions for who in ("", SAME_K_RANDOM)]
    if mode == "curves":
        scores += [f"{m}/{curve}_auc" for m in CURVE_MAPS for curve in ("deletion", "insertion")]
    return scores, [f"{m}/faithfulness_undefined" for m in maps]


@dataclass
class FaithfulnessResult:
    """Per-image float64 ``[B]`` scores keyed ``"<map>/comprehensiveness"``, ``"fixed_k_top@<map>/sufficiency"``,
    ..., ``"raw/deletion_auc"``, ...; the curves themselves ``[B, K + 1]`` keyed ``"raw/deletion"``, ...; per kept
    map the number of images it leaves undefined; the predicted class ``c``, ``P_c`` and the logits of the clean
    images."""

    scores: dict[str, Tensor]
    curves: dict[str, Tensor]
    undefined: dict[str, int]
    predicted: Tensor
    p_clean: Tensor
    clean_logits: Tensor


def classifier_forward(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """``images -> logits [B, classes]`` of the ViT the engine reads in ``model`` (see
    :func:`~attnreg_lightning.attention.resolve_vit`), or None when it has no classification head: a timm ViT
    built with ``num_classes=0``, a Hugging Face backbone, any model whose reader knows no classifier.

    The forward runs the model in eval mode (a dropout would make ``P_c`` noisy) and restores each module's mode.
    """
    vit = resolve_vit(model)
    run = classifier(vit)
    return None if run is None else _in_eval_mode(vit, run)


def _in_eval_mode(module: nn.Module, run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``run`` with ``module`` in eval mode while it runs (each submodule's own mode restored after)."""

    def forward(images: Tensor) -> Tensor:
        with eval_mode(module):
            return run(images)

    return forward


PREDICTIONS = ("auto", "module", "vit")


@dataclass
class Prediction:
    """The forward whose class scores faithfulness scores: ``forward`` (``images -> logits``, None when there is
    none), ``source`` (``"module"``: the module's own forward; ``"vit"``: the ViT's own head, which the engine's
    attention forward also gives) and ``note``, why, when the choice is worth a word."""

    forward: Callable[[Tensor], Tensor] | None
    source: str | None
    note: str | None = None


def probe_images(vit: nn.Module, device: torch.device | str = "cpu", count: int = 2) -> Tensor | None:
    """``count`` random images of the size ``vit`` takes (timm: ``patch_embed.img_size``; Hugging Face:
    ``config.image_size``), to tell which forward predicts before any batch is seen; None when the size is unknown."""
    embed = getattr(vit, "patch_embed", None)
    config = getattr(vit, "config", None)
    size = getattr(embed, "img_size", None) or getattr(config, "image_size", None)
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    # the first convolution takes the pixels (a hybrid's CNN stem comes before its projection)
    conv = next((m for m in (embed.modules() if embed is not None else ()) if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else getattr(config, "num_channels", 3)
    dtype = next((p.dtype for p in vit.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, channels, *size, generator=generator).to(device, dtype)


def _is_embedding(module: nn.Module, images: Tensor, scores: Tensor) -> bool:
    """Whether ``scores`` are the headless ViT's own output (its pooled features): a module that returns embeddings."""
    vit = resolve_vit(module)
    try:
        with eval_mode(vit):
            features = vit(images)
    except Exception:
        return False
    return isinstance(features, Tensor) and features.shape == scores.shape and torch.allclose(features, scores)


def _are_probabilities(scores: Tensor) -> bool:
    """Rows that are a distribution over the classes (a forward ending in a softmax)."""
    scores = scores.double()
    return bool((scores >= 0).all()) and torch.allclose(scores.sum(dim=-1), torch.ones_like(scores[:, 0]), atol=1e-4)


def _log_of(forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def log_probabilities(images: Tensor) -> Tensor:
        return forward(images).log()  # the softmax of log p is p

    return log_probabilities


@torch.no_grad()
def prediction_forward(module: nn.Module, images: Tensor, prefer: str = "auto") -> Prediction:
    """What ``module`` predicts, for the faithfulness scores: ``prefer="auto"`` takes the module's own forward where
    it returns class scores ``[B, classes]`` for ``images`` (a LightningModule may predict with a head of its own,
    e.g. over a backbone that kept its pretrained 1000-class head), and the ViT's head (:func:`classifier_forward`)
    where its logits are the module's, or the module's forward gives none (a headless ViT's own features are no class
    scores). A forward that gives probabilities (rows summing to one) is scored through their log, so the softmax
    faithfulness takes gives them back. ``"module"`` and ``"vit"`` take that one (refused with the reason when it
    gives no class scores)."""
    if prefer not in PREDICTIONS:
        raise ValueError(f"faithfulness_prediction must be one of {list(PREDICTIONS)}, got {prefer!r}")
    own = classifier_forward(module)
    if resolve_vit(module) is module or prefer == "vit":
        if own is None and prefer == "vit":
            raise ValueError(f"faithfulness_prediction='vit': {type(resolve_vit(module)).__name__} has no head")
        return Prediction(own, None if own is None else "vit")
    forward = _in_eval_mode(module, module)
    try:
        scores = forward(images)
        why = None
    except Exception as err:  # a forward that takes more than images, or other inputs
        scores, why = None, f"it raised {type(err).__name__}: {err}"
    if scores is not None and not (
        isinstance(scores, Tensor)
        and scores.dim() == 2
        and scores.shape[0] == len(images)
        and scores.is_floating_point()
    ):
        why = f"it returned {type(scores).__name__}{tuple(scores.shape) if isinstance(scores, Tensor) else ''}"
        scores = None
    if scores is not None and own is None and _is_embedding(module, images, scores):
        why, scores = "it returned the ViT's features, not class scores", None
    if scores is not None and _are_probabilities(scores):  # faithfulness takes a softmax: give it log-probabilities
        forward = _log_of(forward)
    if prefer == "module":
        if scores is None:
            raise ValueError(f"faithfulness_prediction='module': {type(module).__name__}'s forward gives no class "
                             f"scores [B, classes] for a batch of images ({why})")  # fmt: skip
        return Prediction(forward, "module")
    if scores is None:
        note = None
        if own is not None:
            note = (f"{type(module).__name__}'s forward gives no class scores [B, classes] for a batch of images "
                    f"({why}), so the faithfulness scores are those of the ViT's own head")  # fmt: skip
        return Prediction(own, None if own is None else "vit", note)
    if own is not None:
        vit_scores = own(images)
        if vit_scores.shape == scores.shape and torch.allclose(
            vit_scores.float(), scores.float(), rtol=1e-4, atol=1e-5
        ):
            return Prediction(own, "vit")
    return Prediction(forward, "module")


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic: it copies the sign bit in)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _splitmix64(x: Tensor) -> Tensor:
    """splitmix64's output function on int64 words (products wrap modulo 2**64 as in uint64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def token_keys(seed: int, sample_ids: Tensor, tokens: int) -> Tensor:
    """Pseudo-random keys in ``[0, 2**63)``, int64 ``[B, T]``: a hash of (seed, sample id, token index) only, so a
    token's key does not depend on the batch, the image's place in it or the device.

    With ``s`` splitmix64's output function on 64-bit words: ``s(s(s(seed) ^ id) ^ token) >> 1`` (the top 63 bits:
    keys compare alike as signed and unsigned words)."""
    ids = sample_ids.to(torch.int64)
    image = _splitmix64(_splitmix64(torch.full_like(ids, _signed(seed))) ^ ids)
    index = torch.arange(tokens, device=ids.device, dtype=torch.int64)
    return _shr(_splitmix64(image[:, None] ^ index), 1)


def _ranks(order: Tensor) -> Tensor:
    """Each token's place in ``order [B, T]`` (a permutation of the token indices per row)."""
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def _descending_ranks(values: Tensor, then: Tensor | None = None) -> Tensor:
    """Ranks by ``values`` descending, ties by ``then`` descending, then by token index (two stable sorts:
    the later sort keeps the earlier one's order among its ties)."""
    order = torch.arange(values.shape[1], device=values.device).expand_as(values)
    if then is not None:
        order = then.sort(dim=1, descending=True, stable=True).indices
    order = order.gather(1, values.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    return _ranks(order)


def top_tokens(attention: Tensor, k: Tensor) -> Tensor:
    """Bool ``[B, T]``: each image's ``k [B]`` tokens of highest attention, ties to the lower token index."""
    return _descending_ranks(attention) < k[:, None]


def random_tokens(seed: int, sample_ids: Tensor, k: Tensor, tokens: int) -> Tensor:
    """Bool ``[B, T]``: each image's ``k [B]`` tokens with the smallest :func:`token_keys`."""
    return _ranks(token_keys(seed, sample_ids, tokens).argsort(dim=1, stable=True)) < k[:, None]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """``images [B, C, H, W]`` blurred channel by channel: a Gaussian of ``sigma`` pixels applied along the
    width, then the height, with reflect padding; its kernel stops at ``3 sigma`` or where reflection can no
    longer fill the padding (one pixel short of the image's size)."""
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    for size, axis in ((w, -1), (h, -2)):
        radius = min(math.ceil(3 * sigma), size - 1)
        t = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).to(images.dtype)
        if axis == -1:
            x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        else:
            x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def baseline_images(images: Tensor, baseline: str, block: tuple[int, int]) -> Tensor:
    """The image removed tokens are replaced from, ``[B, C, H, W]`` (``block``: a token's pixels ``(ph, pw)``)."""
    if baseline == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    if baseline == "blur":
        return gaussian_blur(images, float(max(block)))
    if baseline == "zeros":
        return torch.zeros_like(images)
    raise ValueError(f"baseline must be one of {list(PIXEL_BASELINES)}, got {baseline!r}")


def compose(images: Tensor, base: Tensor, keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """``images`` where ``keep [B, T]`` keeps a token, ``base`` in the pixel blocks of the other tokens."""
    b, _, height, width = images.shape
    h, w = grid
    pixels = keep.reshape(b, h, 1, w, 1).expand(b, h, height // h, w, width // w).reshape(b, 1, height, width)
    return torch.where(pixels, images, base)


def _distinct(masks: Tensor, wanted: Tensor) -> Tensor:
    """For each set ``s`` and image ``b`` of ``masks [S, B, T]``, the first wanted set holding the same tokens for
    that image (``s`` itself when none before it does), ``[S, B]``: the same tokens make the same image, whose
    probability is computed once."""
    sets = torch.arange(len(masks), device=masks.device)
    source = sets[:, None].expand(wanted.shape).clone()
    for s in range(1, len(masks)):
        same = (masks[:s] == masks[s]).all(dim=-1) & wanted[:s]  # [s, B]
        source[s] = torch.where(same.any(dim=0), same.to(torch.uint8).argmax(dim=0), s)
    return source


def _forward_groups(pairs: Tensor, counts: Tensor | None, max_images: int) -> list[Tensor]:
    """``pairs [P, 2]`` split into forwards of at most ``max_images``; with ``counts [P]`` (dropped tokens: a forward
    is one sequence length) each forward's pairs keep as many tokens."""
    if counts is None:
        return list(pairs.split(max_images))
    order = counts.argsort(stable=True)
    pairs, counts = pairs[order], counts[order]
    sizes = torch.unique_consecutive(counts, return_counts=True)[1].tolist()
    return [chunk for group in pairs.split(sizes) for chunk in group.split(max_images)]


def _class_probability(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    base: Tensor | None,
    grid: tuple[int, int],
    masks: Tensor,
    wanted: Tensor,
    predicted: Tensor,
    p_clean: Tensor,
    max_images: int,
    model: nn.Module | None,
) -> Tensor:
    """``P_c`` of each image composed with each of ``masks [S, B, T]`` where ``wanted [S, B]``, ``[S, B]`` float64
    (NaN where not wanted). Each distinct perturbed image of an image is forwarded once, in forwards of at most
    ``max_images`` images; a mask that keeps every token is the clean image (``p_clean``). Without ``base`` the
    removed tokens are dropped from ``model``'s sequence instead of replaced by ``base``'s pixels."""
    clean = masks.all(dim=-1)
    source = _distinct(masks, wanted & ~clean)
    sets = torch.arange(len(masks), device=masks.device)[:, None]
    pairs = (wanted & ~clean & (source == sets)).nonzero()  # [P, 2]: (set, image), set-major
    probs = torch.full(wanted.shape, float("nan"), dtype=torch.float64, device=images.device)
    counts = None if base is not None else masks[pairs[:, 0], pairs[:, 1]].sum(dim=1)
    for chunk in _forward_groups(pairs, counts, max_images):
        s, b = chunk.unbind(1)
        if base is not None:
            logits = forward(compose(images[b], base[b], masks[s, b], grid))
        else:
            with keeping_tokens(model, masks[s, b]):
                logits = forward(images[b])
        probs[s, b] = logits.to(torch.float64).softmax(dim=-1).gather(1, predicted[b, None])[:, 0]
    probs = torch.where(wanted, probs.gather(0, source), probs)
    return torch.where(wanted & clean, p_clean, probs)


def _check(
    images: Tensor,
    attention: Tensor,
    maps: dict[str, Tensor],
    grid: tuple[int, int],
    ids: Tensor,
    mode: str,
    kept_maps: Sequence[str],
    steps: int,
    baseline: str,
    max_images: int | None,
    clean_logits: Tensor | None,
    fixed_k: Mapping[str, float] | None,
    regions: Mapping[str, Tensor] | None,
    model: nn.Module | None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    if baseline == "drop":
        if model is None:
            raise ValueError("baseline='drop' needs the model whose tokens are dropped: pass model=")
        check_droppable(model)
    require_positive_int(steps, "steps")
    if max_images is not None:
        require_positive_int(max_images, "max_images_per_forward")
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a floating-point [B, C, H, W] tensor")
    b, _, height, width = images.shape
    if b == 0:
        raise ValueError("images: the batch is empty")
    if attention.dim() != 2 or attention.shape[0] != b:
        raise ValueError(f"attention must be [B, T] with B={b} images, got {tuple(attention.shape)}")
    t = attention.shape[1]
    if not (isinstance(grid, Sequence) and len(grid) == 2 and all(isinstance(n, int) and n >= 1 for n in grid)):
        raise ValueError(f"grid must be the token grid (h, w), got {grid!r}")
    h, w = grid
    if h * w != t:
        raise ValueError(f"grid={tuple(grid)} does not hold the attention's T={t} tokens")
    if height % h or width % w:
        raise ValueError(f"grid={tuple(grid)} does not tile the {height}x{width} images into whole pixel blocks")
    for name, m in maps.items():
        if m.shape != attention.shape:
            raise ValueError(f"maps[{name!r}] has shape {tuple(m.shape)}, the attention {tuple(attention.shape)}")
    if isinstance(kept_maps, str):
        raise ValueError(f"kept_maps must be a sequence of map names, got the string {kept_maps!r}")
    for name in kept_maps:
        if name not in KEPT_MAPS:
            raise ValueError(f"kept_maps: {name!r} is not a thresholded map; choose among {list(KEPT_MAPS)}")
        if name not in maps:
            raise ValueError(f"kept_maps: {name!r} is not among the maps given ({sorted(maps)})")
    for name, kappa in (fixed_k or {}).items():
        if name not in KEPT_MAPS:
            raise ValueError(f"fixed_k: {name!r} is not a thresholded map; choose among {list(KEPT_MAPS)}")
        if not (isinstance(kappa, (int, float)) and 0 <= kappa <= 1):
            raise ValueError(f"fixed_k[{name!r}] must be a kept fraction in [0, 1], got {kappa!r}")
    for name, region in (regions or {}).items():
        if region.shape != attention.shape or region.dtype != torch.bool:
            raise ValueError(f"regions[{name!r}] must be a bool token mask of shape {tuple(attention.shape)}")
    if mode == "curves" and "posterior" not in maps:
        raise ValueError(f"mode='curves' needs maps['posterior'] (maps given: {sorted(maps)})")
    if ids.dim() != 1 or len(ids) != b:
        raise ValueError(f"sample_ids: got {tuple(ids.shape)} ids for {b} images")
    if clean_logits is not None and (clean_logits.dim() != 2 or clean_logits.shape[0] != b):
        raise ValueError(f"clean_logits must be [B, classes] with B={b}, got {tuple(clean_logits.shape)}")


@torch.no_grad()
def faithfulness(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    attention: Tensor,
    maps: dict[str, Tensor],
    grid: tuple[int, int],
    sample_ids: Sequence[int] | Tensor,
    *,
    mode: str = "kept",
    kept_maps: Sequence[str] = ("lfdr",),
    fixed_k: Mapping[str, float] | None = None,
    regions: Mapping[str, Tensor] | None = None,
    steps: int = 8,
    baseline: str = "mean",
    seed: int = 0,
    max_images_per_forward: int | None = None,
    clean_logits: Tensor | None = None,
    model: nn.Module | None = None,
) -> FaithfulnessResult:
    """Comprehensiveness and sufficiency of the ``kept_maps`` and of their size-matched random sets, and of the
    fixed-k top sets of ``fixed_k`` (``{map: kappa}``, a map there need not be among ``maps``: the images' top
    ``round(kappa T)`` raw tokens); the reliance on each of ``regions`` (``{name: bool token mask [B, T]}``) beside
    as many random tokens; ``mode="curves"`` adds the deletion and insertion curves of ``raw`` and
    ``posterior`` (module docstring).

    ``forward`` maps images to logits (:func:`classifier_forward`); ``images [B, C, H, W]`` are the model's
    inputs, ``attention`` and ``maps`` ``[B, T]`` (moved to the images' device), ``grid`` the token grid,
    ``sample_ids`` the images' ids (they seed the random sets). ``clean_logits``: the caller's logits of
    ``images``, saving that forward. Every forward sees at most ``max_images_per_forward`` images (None: 32 on a CPU,
    256 on other devices).
    ``baseline="drop"`` needs ``model``: the model ``forward`` runs, whose ViT (:func:`resolve_vit`) is run on the
    kept tokens alone (``forward`` may be the ViT's own classifier or any forward that runs that ViT).
    """
    ids = torch.as_tensor(sample_ids, dtype=torch.int64)
    _check(
        images, attention, maps, grid, ids, mode, kept_maps, steps, baseline, max_images_per_forward, clean_logits,
        fixed_k, regions, model,
    )  # fmt: skip
    device = images.device
    max_images_per_forward = images_per_forward(max_images_per_forward, device)
    ids = ids.to(device)
    attention = attention.to(device)
    maps = {name: m.to(device) for name, m in maps.items()}
    b, t = attention.shape
    block = (images.shape[-2] // grid[0], images.shape[-1] // grid[1])
    if clean_logits is None:
        clean_logits = torch.cat([forward(chunk) for chunk in rechunk([images], max_images_per_forward)])
    clean_logits = clean_logits.to(device)
    clean = clean_logits.to(torch.float64).softmax(dim=-1)
    predicted = clean.argmax(dim=1)
    p_clean = clean.gather(1, predicted[:, None])[:, 0]

    # token masks [B, T] (True: the token keeps its pixels) are small; the images are composed chunk by chunk
    keeps: dict[str, Tensor] = {}
    wanted: dict[str, Tensor] = {}  # [B]: the images whose value is defined (an undefined one costs no forward)
    undefined: dict[str, Tensor] = {}
    for name in kept_maps:
        kept = maps[name] > 0
        k = kept.sum(dim=1)
        undefined[name] = (k == 0) | (k == t)
        for label, s in ((name, kept), (f"{SAME_K_RANDOM}{name}", random_tokens(seed, ids, k, t))):
            keeps[f"{label}/removed"] = ~s
            keeps[f"{label}/only"] = s
            wanted[f"{label}/removed"] = wanted[f"{label}/only"] = ~undefined[name]
    fixed = {}  # [B]: the images whose fixed-k value is defined (all or none: k is the same for every image)
    for name, kappa in (fixed_k or {}).items():
        k = round(kappa * t)
        label = f"{FIXED_K}{name}"
        top = top_tokens(attention, torch.full((b,), k, device=device))
        fixed[label] = torch.full((b,), 0 < k < t, device=device) & torch.isfinite(attention).all(dim=1)
        keeps[f"{label}/removed"], keeps[f"{label}/only"] = ~top, top
        wanted[f"{label}/removed"] = wanted[f"{label}/only"] = fixed[label]
    for name, region in (regions or {}).items():
        region = region.to(device)
        k = region.sum(dim=1)
        undefined[f"region:{name}"] = (k == 0) | (k == t)
        for label, s in ((name, region), (f"{SAME_K_RANDOM}{name}", random_tokens(seed, ids, k, t))):
            keeps[f"{label}/removed"] = ~s
            wanted[f"{label}/removed"] = ~undefined[f"region:{name}"]
    if mode == "curves":
        counts = [round(j * t / steps) for j in range(steps + 1)]
        usable = {}
        for name in CURVE_MAPS:
            values = attention if name == "raw" else maps[name]
            usable[name] = (torch.isfinite(attention) & torch.isfinite(values)).all(dim=1)
            ranks = _descending_ranks(attention) if name == "raw" else _descending_ranks(maps[name], then=attention)
            for j in range(1, steps):
                keeps[f"{name}/deletion@{j}"] = ranks >= counts[j]
                keeps[f"{name}/insertion@{j}"] = ranks < counts[j]
                wanted[f"{name}/deletion@{j}"] = wanted[f"{name}/insertion@{j}"] = usable[name]
        keeps["baseline"] = torch.zeros_like(attention, dtype=torch.bool)
        wanted["baseline"] = usable["raw"] | usable["posterior"]

    base = None if baseline == "drop" else baseline_images(images, baseline, block)
    probs: dict[str, Tensor] = {}
    if keeps:
        masks, needed = torch.stack(list(keeps.values())), torch.stack(list(wanted.values()))
        values = _class_probability(
            forward, images, base, grid, masks, needed, predicted, p_clean, max_images_per_forward, model
        )
        probs = dict(zip(keeps, values, strict=True))

    scores: dict[str, Tensor] = {}
    nan = torch.full_like(p_clean, float("nan"))
    labels = [(label, undefined[name]) for name in kept_maps for label in (name, f"{SAME_K_RANDOM}{name}")]
    labels += [(label, ~defined) for label, defined in fixed.items()]
    for label, nan_where in labels:
        for metric, kind in (("comprehensiveness", "removed"), ("sufficiency", "only")):
            scores[f"{label}/{metric}"] = torch.where(nan_where, nan, p_clean - probs[f"{label}/{kind}"])
    for name in regions or {}:
        for label in (name, f"{SAME_K_RANDOM}{name}"):
            removed = probs[f"{label}/removed"]
            scores[f"{label}/reliance"] = torch.where(undefined[f"region:{name}"], nan, p_clean - removed)
    curves: dict[str, Tensor] = {}
    if mode == "curves":
        for name in CURVE_MAPS:
            inner = [probs[f"{name}/deletion@{j}"] for j in range(1, steps)]
            deletion = torch.stack([p_clean, *inner, probs["baseline"]], dim=1)
            inner = [probs[f"{name}/insertion@{j}"] for j in range(1, steps)]
            insertion = torch.stack([probs["baseline"], *inner, p_clean], dim=1)
            for kind, curve in (("deletion", deletion), ("insertion", insertion)):
                curves[f"{name}/{kind}"] = curve
                scores[f"{name}/{kind}_auc"] = torch.where(
                    usable[name], torch.trapezoid(curve, dx=1 / steps, dim=1), nan
                )
    return FaithfulnessResult(
        scores=scores,
        curves=curves,
        undefined={name: int(u.sum()) for name, u in undefined.items() if not name.startswith("region:")},
        predicted=predicted,
        p_clean=p_clean,
        clean_logits=clean_logits,
    )
