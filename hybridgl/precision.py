"""float32 means IEEE float32 inside the method's passes, whatever the process asked of torch.

torch lets float32 convolutions and matmuls run with fewer mantissa bits: cuDNN convolutions take
TF32 by default on Ampere and later GPUs (10 bits, like float16: CLIP's and SAM's patch embeddings,
SAM's neck and its decoder's upscaling), and `torch.set_float32_matmul_precision("high"/"medium")`,
which training code and other libraries call, sends float32 matmuls to TF32 on a GPU and to
bfloat16 on a CPU with AMX. The exact mode's choices, and the fast mode's error bounds measured
against its float32 passes, are defined by float32; near ties between masks are decided in its
last bits. So every pass of the method runs under `ieee_float32`, which sets these flags to IEEE
and gives the process its own settings back when the last pass ends. Low-precision passes (the
fast mode's autocast) are unaffected: the flags govern only float32 operations.

The flags are process-wide, so the guard counts the passes in flight (threads, nesting): the first
one in saves the process's settings, the last one out restores them. Another thread computing
float32 outside the method meanwhile gets IEEE too (slower, never less exact), and torch's legacy
getter `torch.backends.cudnn.allow_tf32` raises there until the pass ends (torch refuses it while
the per-backend flags differ; its kernels read those). Fused attention kernels on Ampere and later
GPUs compute float32 products as three TF32 products whatever the flags say: float32's accuracy,
not its bits.
"""
from __future__ import annotations

import threading
from contextlib import ContextDecorator

import torch

# torch >= 2.9 has a flag per backend and operator; older versions the legacy switches.
_NEW_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
_FLAGS = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def _backend(path: tuple[str, str]):
    return getattr(getattr(torch.backends, path[0]), path[1])


def precision_flags() -> dict[str, object]:
    """The process's float32 precision settings now (the keys the guard sets and restores)."""
    if _NEW_API:
        return {".".join(p): _backend(p).fp32_precision for p in _FLAGS}
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def _set(flags: dict[str, object]) -> None:
    if _NEW_API:
        for path in _FLAGS:
            _backend(path).fp32_precision = flags[".".join(path)]
        return
    torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])


def ieee_flags() -> dict[str, object]:
    """The settings of `precision_flags` that mean IEEE float32 everywhere."""
    if _NEW_API:
        return {".".join(p): "ieee" for p in _FLAGS}
    return {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False, "float32_matmul_precision": "highest"}


class _IEEEFloat32(ContextDecorator):
    """Context manager and decorator: IEEE float32 inside, the process's own settings restored after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: dict[str, object] | None = None

    def __enter__(self) -> "_IEEEFloat32":
        with self._lock:
            if self._depth == 0:
                self._saved, ieee = precision_flags(), ieee_flags()
                if self._saved != ieee:
                    _set(ieee)
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                if self._saved != ieee_flags():
                    _set(self._saved)
                self._saved = None


# One guard per process, as the flags it guards are.
ieee_float32 = _IEEEFloat32()
