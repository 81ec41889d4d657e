"""Null-image generators: resampled copies of an image that carry its statistics but not its content.

Every generator maps ``[B, C, H, W]`` images to ``[B, N, C, H, W]`` null images, draws its randomness only
from the ``torch.Generator`` it is given (on the images' device) and is registered by name, so a config
string picks one::

    g = torch.Generator(device=images.device).manual_seed(0)
    nulls = null_images(images, n=10, method="pixel", generator=g)        # [B, 10, C, H, W]
    for chunk in iter_null_chunks(images, 10, "pixel", g, max_images=64):  # [<=64, C, H, W] each
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

NullGenerator = Callable[..., Tensor]
_REGISTRY: dict[str, NullGenerator] = {}


def register_null(name: str) -> Callable[[NullGenerator], NullGenerator]:
    """Register ``fn(images, n, generator, **options) -> [B, N, C, H, W]`` under ``name``."""

    def wrap(fn: NullGenerator) -> NullGenerator:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_null_generator(method: str) -> NullGenerator:
    if method not in _REGISTRY:
        raise ValueError(f"method={method!r} is not a known bootstrap; choose one of {available_methods()}")
    return _REGISTRY[method]


def _stats_dims(all_channels: bool) -> tuple[int, ...]:
    # all_channels=True: one statistic per image and channel; False: one per image.
    return (-2, -1) if all_channels else (-3, -2, -1)


@register_null("normal")
def normal_nulls(
    images: Tensor, n: int, generator: torch.Generator, *, std_factor: float = 1.0, all_channels: bool = True
) -> Tensor:
    """i.i.d. ``N(mean, std * std_factor)`` pixels; mean and population std per image (and channel)."""
    dims = _stats_dims(all_channels)
    mean = images.mean(dim=dims, keepdim=True).unsqueeze(1)
    std = images.std(dim=dims, keepdim=True, correction=0).unsqueeze(1)
    b, c, h, w = images.shape
    noise = torch.randn((b, n, c, h, w), generator=generator, device=images.device, dtype=images.dtype)
    return mean + noise * (std * std_factor)


NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
"""Per-channel (mean, std) a ``uniform`` null may be re-normalized with (the reference's ``bootstrap_uniform``)."""


@register_null("uniform")
def uniform_nulls(
    images: Tensor, n: int, generator: torch.Generator, *, all_channels: bool = True, normalization: str | None = None
) -> Tensor:
    """i.i.d. ``U(min, max)`` pixels; range per image (and channel).

    ``normalization="imagenet"`` then applies ``(u - mean) / std`` with ImageNet's statistics, as the paper's
    code does by default: on images that are already normalized this normalizes twice (channel ranges of
    about [-11, 8] for an image in [-2.1, 2.4]), so nulls no longer share the image's range; we default to
    ``None`` (the plain range) and offer it to reproduce the paper's numbers.
    """
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: choose null or one of {sorted(NORMALIZATIONS)}")
    dims = _stats_dims(all_channels)
    lo = images.amin(dim=dims, keepdim=True).unsqueeze(1)
    hi = images.amax(dim=dims, keepdim=True).unsqueeze(1)
    b, c, h, w = images.shape
    u = torch.rand((b, n, c, h, w), generator=generator, device=images.device, dtype=images.dtype)
    nulls = lo + u * (hi - lo)
    if normalization is None:
        return nulls
    mean, std = (torch.tensor(v, device=images.device, dtype=images.dtype) for v in NORMALIZATIONS[normalization])
    if c != mean.numel():
        raise ValueError(f"normalization={normalization!r} is for {mean.numel()}-channel images, got {c} channels")
    return (nulls - mean.view(1, 1, c, 1, 1)) / std.view(1, 1, c, 1, 1)


@register_null("pixel")
def pixel_nulls(images: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Pixels drawn with replacement from the same image; a pixel's channels stay together."""
    b, c, h, w = images.shape
    idx = torch.randint(0, h * w, (b, n, h * w), generator=generator, device=images.device)
    flat = images.reshape(b, 1, c, h * w).expand(b, n, c, h * w)
    return flat.gather(3, idx.unsqueeze(2).expand(b, n, c, h * w)).reshape(b, n, c, h, w)


@register_null("patch")
def patch_nulls(images: Tensor, n: int, generator: torch.Generator, *, patch_size: int = 16) -> Tensor:
    """The image's ``patch_size x patch_size`` tiles, permuted (a fresh permutation per null image)."""
    b, c, h, w = images.shape
    p = patch_size
    if p < 1 or h % p or w % p:
        raise ValueError(f"patch_size={patch_size} must be >= 1 and divide the image size {h}x{w}")
    gh, gw = h // p, w // p
    tiles = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, 1, gh * gw, c * p * p)
    perm = torch.rand((b, n, gh * gw), generator=generator, device=images.device).argsort(dim=-1)
    shuffled = tiles.expand(b, n, gh * gw, c * p * p).gather(2, perm.unsqueeze(-1).expand(-1, -1, -1, c * p * p))
    return shuffled.reshape(b, n, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, n, c, h, w)


def require_positive_int(value, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check(images: Tensor, n: int, generator: torch.Generator) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D [B, C, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    require_positive_int(n, "n (number of bootstrap samples)")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {images.device}; put both on one device")


def null_images(images: Tensor, n: int, method: str, generator: torch.Generator, **options) -> Tensor:
    """``N`` null images per input image, all at once: ``[B, C, H, W] -> [B, N, C, H, W]``."""
    fn = get_null_generator(method)
    _check(images, n, generator)
    return fn(images, n, generator, **options)


def null_stream(
    images: Tensor, n: int, method: str, generator: torch.Generator | Sequence[torch.Generator], **options
) -> Iterator[Tensor]:
    """Yield each image's ``[N, C, H, W]`` null images in turn (inputs validated before the first one).

    ``generator`` may be one generator (consumed image after image) or one per image, which makes each
    image's nulls independent of which other images share its batch.
    """
    fn = get_null_generator(method)
    gens = [generator] * images.shape[0] if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != images.shape[0]:
        raise ValueError(f"generator: got {len(gens)} generators for {images.shape[0]} images")
    for g in gens:
        _check(images, n, g)
    return (fn(images[i : i + 1], n, g, **options)[0] for i, g in enumerate(gens))


def iter_null_chunks(
    images: Tensor,
    n: int,
    method: str,
    generator: torch.Generator | Sequence[torch.Generator],
    max_images: int,
    **options,
) -> Iterator[Tensor]:
    """Yield the ``B * N`` null images as ``[k, C, H, W]`` chunks (``k <= max_images``) in (image, sample) order.

    Nulls are drawn one input image at a time (see :func:`null_stream`), so at most ``max_images + N``
    images exist at once.
    """
    require_positive_int(max_images, "max_images")
    return rechunk(null_stream(images, n, method, generator, **options), max_images)


def rechunk(parts: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    """Concatenate a stream of ``[k, ...]`` tensors and re-cut it into ``[<= size, ...]`` chunks, in order."""
    pending: list[Tensor] = []
    count = 0
    for part in parts:
        pending.append(part)
        count += len(part)
        while count >= size:
            flat = torch.cat(pending)
            yield flat[:size]
            rest = flat[size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield torch.cat(pending)
