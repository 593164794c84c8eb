"""Implementations ("backends") of the two differentiable operations, and how one is chosen.

The two operations every attention module reduces to:

* ``weighted_gather(table, positions, weights, sampling) -> [S, Dh]``: the bilinear/trilinear
  sampling of a multi-level sparse map fused with the attention-weighted sum over samples
  (:func:`sparse_msda.functional.sampling.sparse_weighted_gather` checks the arguments, hashes
  the samples' base cells through the coordinate index and calls it);
* ``neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale) ->
  [Q, H, d]``: softmax attention of each query over the keys of its windows
  (:func:`sparse_msda.functional.neighborhood.sparse_neighborhood_attention` checks and calls it).

One module per implementation, each exposing ``available() -> bool``, ``supports(op, *tensors)
-> bool`` and the two operations with the signatures above; a backend may also implement the
deformable attention's whole sampling head in one pass, ``deformable_attention(...)`` (the
arguments of :func:`sparse_msda.functional.deformable_fused.fused_deformable_attention`, which
chooses the backend by ``choose_backend("weighted_gather", ...)`` and uses it when it has one;
today the ``cpu`` backend, :mod:`sparse_msda.backends.cpu_deformable`):

* :mod:`sparse_msda.backends.reference` — pure PyTorch, the readable specification; runs on any
  device and floating dtype (chunked ``embedding_bag`` sampling; padded tiles and batched
  matmuls for the neighborhood attention).
* :mod:`sparse_msda.backends.cpu` — the fused C++ CPU kernels (``sparse_msda/csrc``, compiled on
  first use by :mod:`sparse_msda.functional.cpu_kernels`); CPU float32/float64.
* ``sparse_msda.backends.triton`` — the Triton kernels for CUDA tensors (its own subpackage).

:func:`choose_backend` picks one per call, in this order:

1. an explicit ``backend=`` name (the functional API's and the modules' ``backend`` argument);
2. the environment: ``SPARSE_MSDA_BACKEND=<name>``; else the legacy switch
   ``SPARSE_MSDA_CPU_KERNELS``: ``0`` means ``reference``, ``1`` means the C++ kernels wherever
   they support the tensors, whatever ISA they were built for;
3. automatic: the C++ kernels for CPU float32/float64 tensors when they are built and their
   vector ISA is one they were measured to win on (:data:`~sparse_msda.functional.cpu_kernels.KERNEL_WINS`),
   Triton for CUDA tensors when it is importable, else ``reference``.

A name from 1 or 2 that is unknown, not available here (e.g. no compiler) or that does not
support the call's tensors (device, dtype) raises ``ValueError`` saying which and why; nothing
falls back silently from an explicit choice.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

from torch import Tensor

__all__ = ["BACKENDS", "OPS", "available_backends", "backend_module", "check_backend_name", "choose_backend"]

#: the operations a backend implements
OPS = ("weighted_gather", "neighborhood_attention")

#: backend name -> module (imported on first use, so that e.g. Triton is imported only when asked for)
BACKENDS = {
    "reference": "sparse_msda.backends.reference",
    "cpu": "sparse_msda.backends.cpu",
    "triton": "sparse_msda.backends.triton",
}


def check_backend_name(backend: Optional[str], name: str = "backend") -> Optional[str]:
    """``backend`` if it is None or a known backend name, else ``ValueError`` / ``TypeError``
    naming the argument and the known names (for constructors: fail at construction)."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{name} must be None or one of {sorted(BACKENDS)}, got {type(backend).__name__} {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be None or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def backend_module(name: str) -> Optional[ModuleType]:
    """The module of backend ``name``, or None when it cannot be imported (e.g. a backend whose
    package is not present in this installation)."""
    check_backend_name(name)
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError:
        return None


def available_backends() -> list[str]:
    """Names of the backends usable in this process (importable and ``available()``), in the
    order of :data:`BACKENDS`. ``cpu`` builds the C++ kernels on first call (~30 s each, cached)."""
    names = []
    for name in BACKENDS:
        module = backend_module(name)
        if module is not None and module.available():
            names.append(name)
    return names


def _checked(op: str, name: str, source: str, tensors: tuple) -> ModuleType:
    module = backend_module(name)
    if module is None:
        raise ValueError(f"{source}={name!r}: the {name} backend cannot be imported in this installation")
    if not module.available():
        why = getattr(module, "unavailable_reason", lambda: "")()
        raise ValueError(f"{source}={name!r}: the {name} backend is not available here" + (f" ({why})" if why else ""))
    if not module.supports(op, *tensors):
        described = ", ".join(f"{t.device.type} {t.dtype}" for t in tensors if isinstance(t, Tensor))
        raise ValueError(
            f"{source}={name!r}: the {name} backend does not support {op} on these tensors ({described})"
            + (f": {module.SUPPORTS}" if hasattr(module, "SUPPORTS") else "")
        )
    return module


def choose_backend(op: str, *tensors: Tensor, backend: Optional[str] = None) -> ModuleType:
    """The backend module that computes ``op`` (one of :data:`OPS`) on ``tensors``.

    Args:
        op: ``"weighted_gather"`` or ``"neighborhood_attention"``.
        tensors: the call's tensors (device and dtype decide what a backend supports).
        backend: an explicit backend name (see the module docstring for the order of precedence).

    Raises:
        ValueError: unknown op; an explicit or environment-chosen backend that is unknown,
            unavailable or does not support the tensors (the message names it and why).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend is not None:
        check_backend_name(backend)
        return _checked(op, backend, "backend", tensors)
    env = os.environ.get("SPARSE_MSDA_BACKEND", "").strip()
    if env:
        check_backend_name(env, "SPARSE_MSDA_BACKEND")
        return _checked(op, env, "SPARSE_MSDA_BACKEND", tensors)
    from . import cpu, reference

    legacy = os.environ.get("SPARSE_MSDA_CPU_KERNELS", "")
    if legacy == "0":
        return reference
    if cpu.supports(op, *tensors) and cpu.available() and (legacy == "1" or cpu.wins()):
        return cpu
    if any(isinstance(t, Tensor) and t.device.type == "cuda" for t in tensors):
        triton = backend_module("triton")
        if triton is not None and triton.available() and triton.supports(op, *tensors):
            return triton
    return reference


def _float_tensors(tensors) -> list[Tensor]:
    return [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]


def same_float_dtype(tensors, dtypes, device_type: str) -> bool:
    """True when every floating tensor of ``tensors`` has one dtype out of ``dtypes`` and every
    tensor lies on a device of type ``device_type`` (a helper for the backends' ``supports``)."""
    floats = _float_tensors(tensors)
    if any(isinstance(t, Tensor) and t.device.type != device_type for t in tensors):
        return False
    return bool(floats) and all(t.dtype == floats[0].dtype for t in floats) and floats[0].dtype in dtypes

