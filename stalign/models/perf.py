"""Inference and training speed settings, used by default by the tasks (``stalign.tasks.embed``).

What the fast path does, per device (``precision="auto"``, ``channels_last="auto"``, ``compile="auto"``):

| setting | CUDA | CPU |
| --- | --- | --- |
| autocast | bf16 (fp16 where the GPU lacks bf16) | none (fp32), bf16 only when asked |
| fp32 matmuls | TF32 (``fast_matmul``), cuDNN autotuning | unchanged |
| memory format | channels-last for CNN encoders | unchanged (ask with ``channels_last=True``) |
| ``torch.compile`` | for jobs of >= ``COMPILE_MIN_ITEMS`` crops, static batch shape | off |
| attention | timm / ``nn.MultiheadAttention`` already call SDPA (flash / memory-efficient kernels) | same |

``torch.compile`` failures (no Triton, an unsupported op, a missing C compiler) fall back to eager with
a warning, so the fast path never makes a job fail that the plain path would run.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from stofm.util.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Break-even estimate from issue 6's H100 figures (ViT-B: 8,721 img/s bf16 -> 10,749 with compile, i.e. 22 us saved
# per image) and ~1 min to compile (an assumption still to be measured): ~3M images, 2 per tile.
COMPILE_MIN_ITEMS = 1_500_000


def resolve_device(device: Any = None):
    """``torch.device``: the one given, else CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: Any = None, precision: str = "auto"):
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 on CUDA (fp16 on GPUs without bf16), fp32 on the CPU.
    """
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fixed = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in fixed:
        return fixed[precision]
    if resolve_device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


@contextlib.contextmanager
def fast_matmul(device: Any = None) -> Iterator[None]:
    """On CUDA: TF32 for the fp32 matmuls/convolutions left outside autocast and cuDNN autotuning; restored after."""
    import torch

    if resolve_device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def autocast(device: Any = None, precision: str = "auto"):
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    import torch

    device = resolve_device(device)
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_cnn(module: Any) -> bool:
    """True when ``module`` has several 2-d convolutions (a CNN; a ViT has one, its patch embedding)."""
    import torch

    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules()) > 1


def use_channels_last(module: Any, device: Any = None, setting: bool | str = "auto") -> bool:
    """Whether to run ``module`` channels-last: ``auto`` = a CNN on CUDA (tensor-core convolutions want NHWC)."""
    if setting == "auto":
        return resolve_device(device).type == "cuda" and is_cnn(module)
    return bool(setting)


@contextlib.contextmanager
def inference_context(model: Any, device: Any = None, precision: str = "auto") -> Iterator[Any]:
    """``with inference_context(model, device) as m:`` -> the model on ``device`` in eval mode, under
    ``torch.inference_mode``, autocast (bf16 on CUDA by default) and ``fast_matmul``; train mode restored after."""
    import torch

    device = resolve_device(device)
    was_training = model.training
    model = model.to(device).eval()
    try:
        with torch.inference_mode(), fast_matmul(device), autocast(device, precision):
            yield model
    finally:
        model.train(was_training)


class CompiledOrEager:
    """``torch.compile(fn)`` that falls back to ``fn`` (with one warning) if compiling or running it fails."""

    def __init__(self, fn: Callable, *, backend: str | Callable = "inductor", mode: str | None = None,
                 dynamic: bool | None = False) -> None:
        import torch

        self.eager, self.failed, self.error = fn, False, None
        try:
            self.compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=dynamic)
        except Exception as err:  # noqa: BLE001  (torch.compile refuses: unsupported Python, no backend)
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        self.failed, self.error = True, err
        warnings.warn(f"torch.compile failed, running eager instead: {type(err).__name__}: {str(err)[:300]}",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001  (Dynamo/Inductor/Triton errors have no common base)
                self._fail(err)
        return self.eager(*args, **kwargs)


def should_compile(device: Any = None, setting: bool | str = "auto", n_items: int | None = None) -> bool:
    """``auto``: compile on CUDA for jobs of at least ``COMPILE_MIN_ITEMS`` items (Triton must be importable)."""
    if setting != "auto":
        return bool(setting)
    if resolve_device(device).type != "cuda" or n_items is None or n_items < COMPILE_MIN_ITEMS:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FastEmbedder:
    """Image-only embeddings ``model.encode_image(spot, niche)`` on the fast path: autocast, channels-last
    CNNs, TF32, optional ``torch.compile`` (fixed batch shape: a short last batch is padded, then trimmed).

    ``embedder(spot_uint8, niche_uint8, niche_weight=0.5)`` -> float32 (B, E) on the device.
    """

    def __init__(self, *, model: Any, device: Any = None, precision: str = "auto", channels_last: bool | str = "auto",
                 compile: bool | str = "auto", n_items: int | None = None,
                 compile_backend: str | Callable = "inductor") -> None:
        import torch

        self.device = resolve_device(device)
        self.precision = precision
        self.dtype = autocast_dtype(self.device, precision)
        self.model = model.to(self.device).eval()
        encoders = [m for m in (getattr(model, "spot_image_encoder", None), getattr(model, "niche_image_encoder", None))
                    if m is not None] or [model]
        self.channels_last = any(use_channels_last(e, self.device, channels_last) for e in encoders)
        if self.channels_last:
            for e in encoders:
                e.to(memory_format=torch.channels_last)
        self.compile = should_compile(self.device, compile, n_items)
        self.compile_backend = compile_backend
        self._fns: dict[tuple, Callable] = {}
        self._batch: dict[tuple, int] = {}

    def settings(self) -> dict[str, Any]:
        """What this embedder does (for logs and ``uns``)."""
        failed = any(getattr(f, "failed", False) for f in self._fns.values())
        return {"device": str(self.device), "autocast": str(self.dtype).replace("torch.", "") if self.dtype else "fp32",
                "channels_last": self.channels_last, "compile": self.compile and not failed}

    def _prepare(self, x: Any):
        import torch

        x = torch.as_tensor(x).to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _run(self, key: tuple, fn: Callable, *inputs: Any):
        import torch

        xs = [self._prepare(x) for x in inputs]
        n = xs[0].shape[0]
        if key not in self._fns:
            self._fns[key] = CompiledOrEager(fn, backend=self.compile_backend) if self.compile else fn
        if self.compile:  # one static shape: pad a short (last) batch instead of recompiling
            full = self._batch.setdefault(key, n)
            if n < full:
                xs = [self._prepare(torch.cat([x, x[-1:].expand(full - n, *x.shape[1:])])) for x in xs]
        with torch.inference_mode(), fast_matmul(self.device), autocast(self.device, self.precision):
            out = self._fns[key](*xs)
        return out[:n].float()

    def __call__(self, spot: Any, niche: Any, *, niche_weight: float = 0.5):
        w = float(niche_weight)
        return self._run(("encode_image", w), lambda s, n: self.model.encode_image(s, n, niche_weight=w), spot, niche)

    def encode(self, x: Any):
        """float32 (B, D) output of a one-input model (e.g. an ``ImageEncoder``) on the same fast path."""
        return self._run(("forward",), self.model, x)
