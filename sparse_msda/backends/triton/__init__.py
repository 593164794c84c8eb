"""The ``triton`` backend: the deformable sampling and the neighborhood attention as Triton kernels
(CUDA tensors; CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
the kernels were first used).

Importing this package never fails: without an importable ``triton``, :func:`available` is False.
The kernel modules are imported on first use (``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

__all__ = ["SUPPORTS", "available", "interpreted", "neighborhood_attention", "supports", "unavailable_reason", "weighted_gather"]

#: operations this backend implements
OPS = ("weighted_gather", "neighborhood_attention")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreted() -> bool:
    """Whether the kernels run (or will run) through Triton's interpreter: the state of
    ``TRITON_INTERPRET`` when they were decorated, else its state now."""
    mod = _loaded()
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _loaded():
    import sys

    return sys.modules.get(__name__ + ".kernels_state")


#: what :func:`supports` accepts (for the error of a forced ``backend="triton"``)
SUPPORTS = (
    "CUDA tensors on one device (CPU tensors only through Triton's interpreter: TRITON_INTERPRET=1 set before "
    "the first use), float32/float16/bfloat16/float64, not under torch.use_deterministic_algorithms(True) "
    "(the backward adds gradients with atomics)"
)


def available() -> bool:
    """``triton`` is importable and there is a device to run it: a CUDA GPU, or the interpreter."""
    return _triton_importable() and (torch.cuda.is_available() or interpreted())


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    if not _triton_importable():
        return "triton is not installed (a CUDA torch brings its own; for the CPU interpreter: pip install triton==3.9.0)"
    if not (torch.cuda.is_available() or interpreted()):
        return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) was not set before the first use"
    return ""


def supports(op: str, *tensors) -> bool:
    """Whether this backend runs ``op`` on these tensors: triton importable, every tensor on one
    CUDA device (or on the CPU under the interpreter), floating tensors float32/float16/bfloat16/
    float64, and deterministic algorithms not requested (the backward's atomics are not)."""
    if op not in OPS or not _triton_importable() or torch.are_deterministic_algorithms_enabled():
        return False
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) != 1:
        return False
    (device,) = devices
    if device.type == "cuda":
        ok_device = True
    elif device.type == "cpu":
        ok_device = interpreted()
    else:
        ok_device = False
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return ok_device and all(t.dtype in _DTYPES for t in floats)


def unsupported_reason(op: str, *tensors) -> Optional[str]:
    """Why :func:`supports` is False (for the error of a forced ``backend="triton"``), else None."""
    if supports(op, *tensors):
        return None
    if op not in OPS:
        return f"the triton backend has no operation {op!r} (it has {OPS})"
    if not _triton_importable():
        return "triton is not installed (pip install triton; a CUDA torch brings its own)"
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms(True): the backward adds gradients with atomics (order not fixed)"
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) != 1:
        return f"the tensors must be on one device, got {sorted(map(str, devices))}"
    (device,) = devices
    if device.type == "cpu" and not interpreted():
        return "CPU tensors run through Triton's interpreter only: set TRITON_INTERPRET=1 before the first use"
    if device.type not in ("cpu", "cuda"):
        return f"the triton backend runs on CUDA devices, got {device}"
    dtypes = sorted({str(t.dtype) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()})
    return f"the triton backend takes float32/float16/bfloat16/float64 tensors, got {dtypes}"


def weighted_gather(table, positions, weights, sampling):
    """See :func:`sparse_msda.backends.triton.sampling.weighted_gather`."""
    from . import kernels_state  # noqa: F401  (records the interpreter state at decoration)
    from .sampling import weighted_gather as impl

    return impl(table, positions, weights, sampling)


def neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale):
    """See :func:`sparse_msda.backends.triton.neighborhood.neighborhood_attention`."""
    from . import kernels_state  # noqa: F401
    from .neighborhood import neighborhood_attention as impl

    return impl(q, k, v, plan, background_k, background_v, rope_freqs, scale)
