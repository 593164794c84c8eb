"""Optional fused CPU kernels of the sparse sampling (``sparse_msda/csrc``), compiled on first use.

The pure-PyTorch path of :mod:`sparse_msda.functional.sampling` is the reference and runs
everywhere (CPU and CUDA). On CPU, a small C++ kernel (``csrc/sparse_sample_cpu.cpp``) fuses
the interpolation, the weighted sum and their backward into one pass per sample; it is
built with ``torch.utils.cpp_extension.load`` (g++ and ninja; cached under
``~/.cache/torch_extensions``) the first time it is needed. It does no coordinate lookup of
its own: the sample's corner rows come from the coordinate index's corner table.

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

__all__ = ["build_error", "kernels_enabled", "sampling_kernels"]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "sparse_sample_cpu.cpp"
_LOCK = threading.Lock()
_STATE: dict = {}


def kernels_enabled() -> bool:
    """False when ``SPARSE_MSDA_CPU_KERNELS=0``."""
    return os.environ.get("SPARSE_MSDA_CPU_KERNELS", "1") != "0"


def sampling_kernels():
    """The compiled sampling kernels, or None (disabled, or the build failed: warned once)."""
    if not kernels_enabled():
        return None
    with _LOCK:
        if "module" not in _STATE:
            try:
                from torch.utils.cpp_extension import load

                venv_bin = os.path.dirname(sys.executable)  # the pip-installed ninja of a venv not on PATH
                if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
                    os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
                _STATE["module"] = load(
                    name="sparse_msda_sample_cpu", sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False
                )
            except Exception as err:  # no compiler / ninja: the PyTorch path still works
                _STATE["module"], _STATE["error"] = None, err
                warnings.warn(
                    f"sparse_msda: building the CPU sampling kernels failed ({type(err).__name__}: {err}); "
                    "using the (slower) pure-PyTorch path",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _STATE["module"]


def build_error():
    """The exception of a failed build (after :func:`sampling_kernels` tried), else None."""
    return _STATE.get("error")
