"""Optional fused CPU kernels (``sparse_msda/csrc``), compiled on first use.

The pure-PyTorch paths of :mod:`sparse_msda.functional.sampling` and
:mod:`sparse_msda.functional.neighborhood` are the references and run everywhere (CPU and
CUDA). On CPU, two small C++ kernels fuse the per-sample / per-query work and its backward:

* ``csrc/sparse_sample_cpu.cpp``: interpolation and weighted sum of the sparse sampling
  (:func:`sampling_kernels`); the sample's corner rows come from the coordinate index's
  corner table;
* ``csrc/neighborhood_attention_cpu.cpp``: scores, softmax and weighted sum of the
  neighborhood attention over a tiled plan (:func:`neighborhood_kernels`); the tiles' key
  voxels come from the coordinate index.

Neither does a coordinate lookup of its own. Each is built with
``torch.utils.cpp_extension.load`` (g++ and ninja; cached under ``~/.cache/torch_extensions``)
the first time it is needed.

``SPARSE_MSDA_CPU_KERNELS=0`` disables it. A failed build warns once and falls back to the
PyTorch path.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["build_error", "kernels_enabled", "neighborhood_kernels", "sampling_kernels"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_LOCK = threading.Lock()
# -fno-trapping-math: lets the compiler vectorise branch-free loops with float -> int conversions
# (the kernels never read floating-point exception flags)
_CFLAGS = ["-O3", "-march=native", "-fno-trapping-math"]
_STATE: dict = {}


def kernels_enabled() -> bool:
    """False when ``SPARSE_MSDA_CPU_KERNELS=0``."""
    return os.environ.get("SPARSE_MSDA_CPU_KERNELS", "1") != "0"


def _load(name: str, source: str, what: str):
    """The compiled extension ``name`` from ``csrc/source``, or None (disabled, or the build
    failed: warned once)."""
    if not kernels_enabled():
        return None
    with _LOCK:
        if name not in _STATE:
            try:
                from torch.utils.cpp_extension import load

                venv_bin = os.path.dirname(sys.executable)  # the pip-installed ninja of a venv not on PATH
                if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
                    os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
                _STATE[name] = load(name=name, sources=[str(_CSRC / source)], extra_cflags=_CFLAGS, verbose=False)
            except Exception as err:  # no compiler / ninja: the PyTorch path still works
                _STATE[name], _STATE["error"] = None, err
                warnings.warn(
                    f"sparse_msda: building the CPU {what} kernels failed ({type(err).__name__}: {err}); "
                    "using the (slower) pure-PyTorch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _STATE[name]


def sampling_kernels():
    """The compiled sampling kernels, or None (disabled, or the build failed: warned once)."""
    return _load("sparse_msda_sample_cpu", "sparse_sample_cpu.cpp", "sampling")


def neighborhood_kernels():
    """The compiled neighborhood-attention kernels, or None (disabled, or the build failed:
    warned once)."""
    return _load("sparse_msda_neighborhood_cpu", "neighborhood_attention_cpu.cpp", "neighborhood-attention")


def build_error():
    """The exception of the last failed build (after a kernel getter tried), else None."""
    return _STATE.get("error")
