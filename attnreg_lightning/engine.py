"""AttentionRegularizer: a model and a batch of images in, regularized attention out.

    reg = AttentionRegularizer(vit, method="normal", n_bootstrap=10)(images)
    reg.maps["lfdr"]            # [B, T] regularized attention
    reg.spatial("lfdr")         # [B, h, w]

The observed images and their ``B * N`` null images stream through the model in chunks of at most
``max_images_per_forward`` images, so memory does not grow with ``N``. The call never changes the model or
the global RNG: no gradients, every module's train/eval mode restored, randomness from its own generators.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnreg_lightning.attention import (
    check_model,
    cls_attention,
    cls_attention_and_logits,
    patch_size,
    pixels_per_token,
    reads_logits,
    resolve_vit,
    token_grid,
)
from attnreg_lightning.bootstrap import get_null_generator, null_stream, rechunk, require_positive_int
from attnreg_lightning.regularize import RegularizedAttention, Thresholds, regularize
from attnreg_lightning.stats import significance

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, sample id) pairs over seeds


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""The autocast dtypes the forwards may run under, by name."""
PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}
"""The autocast dtype ``autocast_dtype="auto"`` takes from a Lightning trainer's ``precision`` (float32 otherwise)."""


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags (``/proc/cpuinfo``: x86 ``avx512_bf16``/``amx_bf16``, ARM ``bf16``) of bfloat16 arithmetic in hardware."""


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware; elsewhere torch emulates it, several times slower than
    float32 (engine 34 s vs 8.5 s on such a machine). Unknown (no ``/proc/cpuinfo``): assumed so."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return any(flag in words for flag in NATIVE_BF16_FLAGS)


def resolve_autocast_dtype(
    value: str | torch.dtype | None, precision: str | None = None, device: torch.device | str | None = None
) -> torch.dtype | None:
    """The forwards' autocast dtype for an ``autocast_dtype`` knob: None for None (float32: the engine adds no
    autocast), ``"auto"`` follows a Lightning ``precision`` (``bf16-mixed`` -> bfloat16, ``16-mixed`` -> float16,
    ...; float32 without one, as the engine alone has) except to a bfloat16 that a CPU ``device`` would emulate
    (:func:`cpu_has_native_bf16`: float32 there, the forwards being inference only), ``"bfloat16"`` /
    ``"float16"`` or those torch dtypes (always taken as given)."""
    if value is None:
        return None
    if value == "auto":
        dtype = PRECISION_DTYPES.get(str(precision))
        on_cpu = device is not None and torch.device(device).type == "cpu"
        if dtype == torch.bfloat16 and on_cpu and not cpu_has_native_bf16():
            return None
        return dtype
    if isinstance(value, str) and value in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value]
    if isinstance(value, torch.dtype) and value in AUTOCAST_DTYPES.values():
        return value
    raise ValueError(
        f"autocast_dtype={value!r}: need None (float32), 'auto' (the trainer's precision; float32 without a "
        f"trainer), one of {list(AUTOCAST_DTYPES)} or torch.bfloat16 / torch.float16"
    )


CPU_IMAGES_PER_FORWARD = 32
DEVICE_IMAGES_PER_FORWARD = 256
"""``max_images_per_forward=None``: forwards of 32 images on a CPU (the engine ran 27% faster there than at 256 on
the dev CPU, faithfulness curves 20%: docs/performance.md), 256 on a GPU or other device."""


def images_per_forward(value: int | None, device: torch.device | str) -> int:
    """The most images in one forward on ``device``: ``value``, or the device's default when it is None."""
    if value is not None:
        return value
    return CPU_IMAGES_PER_FORWARD if torch.device(device).type == "cpu" else DEVICE_IMAGES_PER_FORWARD


def usable_images(images: Tensor) -> Tensor:
    """``[B]`` bool: which images the engine can explain, their pixels finite and not all equal (it gives the others
    NaN attention: no null distribution worth the name)."""
    flat = images.flatten(1)
    return torch.isfinite(flat).all(1) & (flat.amax(1) > flat.amin(1))


def sample_seed(seed: int, sample_id: int) -> int:
    """The generator seed of one image: a function of the run seed and the sample id only."""
    return (int(seed) * _SEED_MIX + int(sample_id) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _check_tiles(vit: nn.Module, tile: int | None) -> None:
    """Refuse at construction a ``patch`` tile size that can't tile the model's fixed image size."""
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    if tile is None or size is None or getattr(vit, "dynamic_img_size", False):
        return
    if any(int(s) % tile for s in size):
        raise ValueError(
            f"patch_size={tile}: the patch null's tiles must tile the model's {size[0]}x{size[1]} images "
            "(choose a divisor of the image size, or null for the model's patch size)"
        )


def statistics_device(device: torch.device | str) -> torch.device:
    """Where the statistics and the metrics' states live for a model on ``device``: there, except on devices
    without float64 (Apple MPS), where they are computed on the CPU."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _start_statistics_thread(device: torch.device) -> None:
    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _to_pinned_host(t: Tensor) -> Tensor:
    """A host copy of a device tensor, enqueued on the current stream: the caller does not wait for it."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class AttentionRegularizer:
    """Bootstrap-regularized CLS attention for a ViT (docs/method.md).

    Args:
        model: a timm ``VisionTransformer`` or EVA, a Hugging Face ViT / DeiT / DINOv2, a model with
            ``get_last_selfattention``, any model a registered reader matches, or a module exposing one through
            ``attention_model()`` / ``vit`` / ``backbone`` / ``model``.
        method: null-image generator name (``normal``, ``uniform``, ``pixel``, ``patch``).
        n_bootstrap: null images per image (``N >= 1``).
        thresholds: rule thresholds (reference defaults).
        max_images_per_forward: most images in one forward pass (observed and null images together); None: 32 on a
            CPU, 256 on other devices (:func:`images_per_forward`).
        autocast_dtype: run forwards under ``torch.autocast`` with this dtype: ``"bfloat16"`` / ``"float16"`` or
            those torch dtypes; None or ``"auto"`` (without a trainer) add no autocast (see
            :func:`resolve_autocast_dtype`).
        seed: seed of the engine's own generators.
        pi0: ``"estimate"`` (Storey) or a fixed float in [0, 1].
        method_options: extra options of the generator (``std_factor``, ``all_channels``, ``patch_size``).
        compile: ``torch.compile`` the attention read-out (off by default; results unchanged).
        heads: ``"mean"`` (attention averaged over heads) or ``"all"``: also each head tested against the same
            null images' attention for that head (no extra forward passes), in the result's ``per_head``.
        classify: also the model's class logits of the images, in the result's ``logits``: the forward that reads
            the images' attention runs on to the classification head (the images get forwards of their own, apart
            from their nulls); a model whose reader gives no logits (see ``attention.reads_logits``) is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "normal",
        n_bootstrap: int = 10,
        thresholds: Thresholds | None = None,
        max_images_per_forward: int | None = None,
        autocast_dtype: str | torch.dtype | None = None,
        seed: int = 0,
        pi0: str | float = "estimate",
        method_options: dict | None = None,
        compile: bool = False,
        heads: str = "mean",
        classify: bool = False,
    ) -> None:
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {heads!r}")
        get_null_generator(method)
        require_positive_int(n_bootstrap, "n_bootstrap")
        if max_images_per_forward is not None:
            require_positive_int(max_images_per_forward, "max_images_per_forward")
        autocast_dtype = resolve_autocast_dtype(autocast_dtype)
        vit = resolve_vit(model)
        check_model(vit)
        if classify and not reads_logits(vit):
            raise ValueError(
                f"classify=True: {type(vit).__name__}'s attention reader gives no class logits (no classification "
                "head, or a reader without read_classified)"
            )
        self.model = model
        self.method = method
        self.n_bootstrap = n_bootstrap
        self.thresholds = thresholds or Thresholds()
        self.max_images_per_forward = max_images_per_forward
        self.autocast_dtype = autocast_dtype
        self.seed = seed
        self.pi0 = pi0
        self.method_options = dict(method_options or {})
        model_patch = patch_size(vit)
        if method == "patch" and "patch_size" not in self.method_options and model_patch is not None:
            self.method_options["patch_size"] = model_patch[0]
        _check_tiles(vit, self.method_options.get("patch_size") if method == "patch" else None)
        self.heads = heads
        self.classify = classify
        self._pixels_per_token = pixels_per_token(vit)
        self._read = torch.compile(cls_attention) if compile else cls_attention
        self._generator: torch.Generator | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._worker_device: torch.device | None = None

    def generators(self, images: Tensor, sample_ids: Sequence[int] | Tensor | None) -> list[torch.Generator]:
        """One generator per image: seeded by (seed, sample id) when ids are given, else the engine's stream."""
        if sample_ids is None:
            if self._generator is None or self._generator.device.type != images.device.type:
                self._generator = torch.Generator(device=images.device).manual_seed(self.seed)
            return [self._generator] * images.shape[0]
        ids = sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids)
        if len(ids) != images.shape[0]:
            raise ValueError(f"sample_ids: got {len(ids)} ids for {images.shape[0]} images")
        return [torch.Generator(device=images.device).manual_seed(sample_seed(self.seed, i)) for i in ids]

    def per_forward(self, device: torch.device | str) -> int:
        """The most images in one of this engine's forwards on ``device`` (:func:`images_per_forward`)."""
        return images_per_forward(self.max_images_per_forward, device)

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def _attention(self, chunks: Iterable[Tensor]) -> Tensor:
        outs = []
        for chunk in chunks:
            with self._autocast(chunk.device):
                outs.append(self._read(self.model, chunk, self.heads))
        return torch.cat(outs)

    def _attention_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outs, logits = [], []
        for chunk in rechunk([images], self.per_forward(images.device)):
            with self._autocast(chunk.device):
                attention, classes = cls_attention_and_logits(self.model, chunk, self.heads)
            outs.append(attention)
            logits.append(classes)
        return torch.cat(outs), torch.cat(logits)

    @torch.no_grad()
    def observe(self, images: Tensor, sample_ids: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The forward passes alone: observed ``[B, T]`` and null ``[B, N, T]`` attention of ``images``
        (``heads="all"``: ``[B, H, T]`` and ``[B, N, H, T]``); with ``classify``, the images' own forwards run on to
        the head, as :meth:`__call__`'s do.

        A constant or non-finite image has no null distribution worth the name: its observed row is NaN, which
        :func:`~attnreg_lightning.stats.significance` flags as invalid instead of crashing.
        """
        return self._observe(images, sample_ids)[:2]

    def _observe(
        self, images: Tensor, sample_ids: Sequence[int] | Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`observe`, and the images' class logits with ``classify`` (else None)."""
        gens = self.generators(images, sample_ids)
        b, n = images.shape[0], self.n_bootstrap
        usable = usable_images(images)
        safe = torch.where(usable[:, None, None, None], images, torch.zeros_like(images)).nan_to_num()
        nulls = null_stream(safe, n, self.method, gens, **self.method_options)
        logits = None
        with eval_mode(self.model):
            if self.classify:  # the observed images run on to the head: forwards of their own
                obs, logits = self._attention_and_logits(safe)
                null = self._attention(rechunk(nulls, self.per_forward(images.device)))
            else:  # observed images first, then their nulls, packed into full forward passes
                chunks = rechunk(itertools.chain([safe], nulls), self.per_forward(images.device))
                attention = self._attention(chunks)
                obs, null = attention[:b], attention[b:]
        keep = usable.view(-1, *([1] * (obs.dim() - 1)))
        obs = torch.where(keep, obs, torch.full_like(obs, float("nan")))
        if logits is not None:
            logits = torch.where(usable[:, None], logits, torch.full_like(logits, float("nan")))
        return obs, null.reshape(b, n, *null.shape[1:]), logits

    @torch.no_grad()
    def __call__(self, images: Tensor, sample_ids: Sequence[int] | Tensor | None = None) -> RegularizedAttention:
        """Regularized attention of ``images [B, C, H, W]`` (``sample_ids`` make each image's nulls its own)."""
        grid = token_grid(self.model, images)
        obs, null, logits = self._observe(images, sample_ids)
        where = statistics_device(obs.device)
        reg = self.explain(obs.to(where), null.to(where), grid)
        reg.logits = None if logits is None else logits.to(where)
        return reg

    @torch.no_grad()
    def submit(
        self,
        images: Tensor,
        sample_ids: Sequence[int] | Tensor | None = None,
        then: Callable[..., Any] | None = None,
        carry: Sequence[Tensor | None] = (),
    ) -> Future[Any]:
        """:meth:`__call__` in two halves: the forward passes now, the statistics in a background CPU thread.

        On a GPU the attention is copied to pinned host memory without waiting for the device, and the thread
        computes significance and maps once the copy lands, while the caller goes on (launching the next
        forwards): the statistics leave the GPU's critical path. ``result()`` is what :meth:`explain` gives for
        the same attention on the CPU (its tensors on the CPU), or raises the thread's exception. Jobs run one
        at a time, in the order submitted; :meth:`close` ends the thread.

        ``then(result, *carry)``, when given, also runs in the thread, right after the job's statistics, and
        ``result()`` is what it returns: the caller's own host work (metrics, pictures) leaves the critical path
        too, in the order submitted. ``carry`` are tensors it needs besides the attention (``None`` allowed),
        copied to the host with it.

            futures = [engine.submit(x, ids) for x, ids in batches]   # forwards back to back
            results = [f.result() for f in futures]
        """
        grid = token_grid(self.model, images)
        obs, null, logits = self._observe(images, sample_ids)
        tensors = [obs, null, logits, *carry]
        copied = None
        if obs.device.type == "cuda":
            tensors = [None if t is None else _to_pinned_host(t) for t in tensors]
            # a blocking event: the thread sleeps until the copies land instead of spinning a CPU core
            copied = torch.cuda.Event(blocking=True)
            copied.record()
        elif obs.device.type != "cpu":  # e.g. MPS: no pinned copies there, and no float64 for the statistics
            tensors = [None if t is None else t.cpu() for t in tensors]
        # the caller's inference mode goes with the job: states made under it (e.g. metrics reset in a Lightning
        # validation loop) can only be updated under it
        inference = torch.is_inference_mode_enabled()
        job = (tensors, grid, copied, then, inference)
        return self._worker(images.device).submit(self._explain_when_copied, *job)

    @torch.no_grad()  # grad mode is per thread
    def _explain_when_copied(
        self,
        tensors: Sequence[Tensor | None],
        grid: tuple[int, int] | None,
        copied: torch.cuda.Event | None,
        then: Callable[..., Any] | None,
        inference: bool,
    ) -> Any:
        if copied is not None:
            copied.synchronize()
        obs, null, logits, *carry = tensors
        with torch.inference_mode(inference):
            reg = self.explain(obs, null, grid)
            reg.logits = logits
            return reg if then is None else then(reg, *carry)

    def later(self, device: torch.device, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(*args)`` in the statistics thread, after the jobs submitted before it: host work (e.g. drawing) that
        the caller does not wait for."""
        return self._worker(device).submit(fn, *args)

    def _worker(self, device: torch.device) -> ThreadPoolExecutor:
        if self._executor is not None and self._worker_device != device:
            self.close()
        if self._executor is None:
            # one thread, one intra-op thread (torch's thread count is per OpenMP thread, so the caller's stays),
            # on the caller's device: a thread that touched CUDA without it would open a context on GPU 0
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="attnreg-statistics", initializer=_start_statistics_thread, initargs=(device,)
            )
            self._worker_device = device
        return self._executor

    def close(self) -> None:
        """Wait for the submitted jobs and end the statistics thread (a later :meth:`submit` starts another)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None}  # a thread is not copied (e.g. into spawned processes)

    def explain(self, obs: Tensor, null: Tensor, grid: tuple[int, int] | None = None) -> RegularizedAttention:
        """Statistics and maps of the attention :meth:`observe` gave, on the device it is on."""
        if self.heads == "mean":
            return self._regularize(obs, null, grid)
        # the mean over heads is the mean path's attention, its nulls the same images' mean attention
        reg = self._regularize(obs.mean(1), null.mean(2), grid)
        b, h, t = obs.shape
        reg.per_head = self._regularize(obs.reshape(b * h, t), null.transpose(1, 2).reshape(b * h, -1, t), grid)
        return reg

    def _regularize(self, obs: Tensor, null: Tensor, grid: tuple[int, int] | None) -> RegularizedAttention:
        sig = significance(obs, null, pi0=self.pi0)
        th = self.thresholds
        # the pi0 rule's percentile is over pixels, as the reference takes it on upsampled maps
        return regularize(
            obs, sig, th.z_th, th.p_th, th.lfdr_th, th.q_th, grid=grid, pixels_per_token=self._pixels_per_token
        )
