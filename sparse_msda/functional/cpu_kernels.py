"""Building and loading the fused CPU kernels (``sparse_msda/csrc``), compiled on first use.

The kernels are the ``cpu`` backend (:mod:`sparse_msda.backends.cpu`, which holds their autograd
Functions); the ``reference`` backend (:mod:`sparse_msda.backends.reference`, pure PyTorch) runs
everywhere (CPU and CUDA). On CPU, two small C++ kernels fuse the per-sample / per-query work
and its backward:

* ``csrc/sparse_sample_cpu.cpp``: interpolation and weighted sum of the sparse sampling
  (:func:`sampling_kernels`); the sample's corner rows come from the coordinate index's
  corner table;
* ``csrc/neighborhood_attention_cpu.cpp``: scores, softmax and weighted sum of the
  neighborhood attention over a tiled plan (:func:`neighborhood_kernels`); the tiles' key
  voxels come from the coordinate index;
* ``csrc/rope_cpu.cpp``: the rotary position encoding and its backward in one pass over the
  rows (:func:`rope_kernels`, used by :mod:`sparse_msda.functional.rope`).

Neither does a coordinate lookup of its own. Each is built with
``torch.utils.cpp_extension.load`` (g++ and ninja) the first time it is needed, for the target
ISA ``-march=$SPARSE_MSDA_CPU_MARCH`` (default ``native``: the host's; e.g. ``x86-64-v3`` for
any AVX2 CPU), into a build directory keyed by everything the binary depends on
(:func:`build_directory`): torch version and C++ ABI, Python, the compiler flags, the ISA the
compiler actually targets (its predefined ISA macros, e.g. ``__AVX512F__``, for that ``-march``
on this host), and a hash of the source. So a home directory shared by machines with different
CPUs never loads a binary with instructions the CPU lacks, and two environments (e.g. two torch
versions) never rebuild each other's kernel. A build prints one line on stderr when it starts;
``python -m sparse_msda.build_kernels`` prebuilds them all (e.g. for a container image).

``SPARSE_MSDA_CPU_KERNELS=0`` disables them. A failed build (or a ``-march`` whose ISA this CPU
lacks) warns once and falls back to the PyTorch path.

Dispatch guard: by default a kernel is used only where its build's vector ISA (``simd_isa()`` of
the extension, from ``csrc/simd.h``: ``avx512``, ``avx2``, ``avx``, ``sse2``, ``neon``,
``generic``) is one it was measured no slower than its PyTorch path on (:data:`KERNEL_WINS`;
``python -m benchmarks.neighborhood`` and ``benchmarks.msda`` print the kernel / PyTorch-path
ratio of every case); elsewhere the PyTorch path runs. ``SPARSE_MSDA_CPU_KERNELS=1`` uses the
kernels on any ISA (the parity tests do).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

__all__ = [
    "KERNEL_WINS",
    "build_directory",
    "build_error",
    "kernel_wins",
    "kernels_enabled",
    "kernels_forced",
    "neighborhood_kernels",
    "rope_kernels",
    "sampling_kernels",
    "target_march",
]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_LOCK = threading.Lock()
# -fno-trapping-math: lets the compiler vectorise branch-free loops with float -> int conversions
# (the kernels never read floating-point exception flags)
_BASE_CFLAGS = ["-O3", "-fno-trapping-math"]
_STATE: dict = {}
# name -> (source file, what it computes): the two extensions
_KERNELS = {
    "sparse_msda_sample_cpu": ("sparse_sample_cpu.cpp", "sampling"),
    "sparse_msda_neighborhood_cpu": ("neighborhood_attention_cpu.cpp", "neighborhood-attention"),
    "sparse_msda_rope_cpu": ("rope_cpu.cpp", "rotary-encoding"),
}
# ISA feature macros a compiler predefines for a -march (__AVX2__, __FMA__, __AVX512F__, ...)
_ISA_MACRO = re.compile(r"#define (__[A-Z][A-Z0-9_]*__) 1$")


# Vector ISAs (the extensions' simd_isa()) on which both kernels were measured no slower than their
# PyTorch paths in the README cases of benchmarks.neighborhood / benchmarks.msda (README,
# "Benchmarks": avx512 = -march=native on an AMD EPYC (Zen 4), avx2 = -march=x86-64-v3
# there). Not in it: sse2 (-march=x86-64 there: scan-bev encoder block 1.4 s against 0.9 s for the
# PyTorch path, single thread) and the ISAs nobody measured (avx without FMA, neon, generic).
KERNEL_WINS = frozenset({"avx512", "avx2"})


def kernels_enabled() -> bool:
    """False when ``SPARSE_MSDA_CPU_KERNELS=0``."""
    return os.environ.get("SPARSE_MSDA_CPU_KERNELS", "1") != "0"


def kernels_forced() -> bool:
    """True when ``SPARSE_MSDA_CPU_KERNELS=1``: use the kernels whatever ISA they are built for."""
    return os.environ.get("SPARSE_MSDA_CPU_KERNELS", "") == "1"


def kernel_wins(isa: str) -> bool:
    """Whether a kernel built for vector ISA ``isa`` is used by default (:data:`KERNEL_WINS`)."""
    return isa in KERNEL_WINS


def _dispatch(ext, auto: bool):
    """``ext`` if the CPU dispatch should use it, else None (see the module docstring)."""
    if ext is None or not auto or kernels_forced():
        return ext
    return ext if kernel_wins(ext.simd_isa()) else None


def target_march() -> str:
    """The target ISA of the kernels: ``$SPARSE_MSDA_CPU_MARCH``, default ``"native"`` (the
    host's ISA). Any GCC/Clang ``-march`` value, e.g. ``x86-64-v3`` (AVX2 + FMA, no AVX-512)."""
    march = os.environ.get("SPARSE_MSDA_CPU_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", march):
        raise ValueError(
            f"SPARSE_MSDA_CPU_MARCH must be a compiler -march value such as 'native' or 'x86-64-v3', got {march!r}"
        )
    return march


def _compiler() -> str:
    return os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with on Linux


@functools.lru_cache(maxsize=None)
def _predefined_macros(compiler: str, march: str) -> tuple[str, ...]:
    """The compiler's predefined macros for ``-march=march`` (identifies the compiler, its
    version and the exact ISA it targets on this host)."""
    out = subprocess.run(
        [*shlex.split(compiler), f"-march={march}", "-E", "-dM", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return tuple(sorted(out.splitlines()))


def _isa_features(macros) -> set[str]:
    return {m.group(1) for m in map(_ISA_MACRO.match, macros) if m}


def _isa_label(features: set[str]) -> str:
    for macro, label in (("__AVX512F__", "avx512"), ("__AVX2__", "avx2"), ("__AVX__", "avx"), ("__SSE2__", "sse2")):
        if macro in features:
            return label
    return "generic"


def _cflags(march: str) -> list[str]:
    return [*_BASE_CFLAGS, f"-march={march}"]


def _build_key(name: str) -> dict:
    """Everything the binary of extension ``name`` depends on (see :func:`build_directory`)."""
    import torch

    source = _CSRC / _KERNELS[name][0]
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(p for p in _CSRC.iterdir() if p.suffix in (".h", ".hpp")):  # headers it may include
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    march = target_march()
    compiler = _compiler()
    return {
        "name": name,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.implementation.cache_tag,
        "compiler": compiler,
        "cflags": _cflags(march),
        "target_macros": hashlib.sha256("\n".join(_predefined_macros(compiler, march)).encode()).hexdigest(),
        "source": digest.hexdigest(),
        # torch's JIT build (ninja) records the absolute source path: the same source loaded from
        # another checkout would silently recompile in place (measured: 44 s, no message), and two
        # checkouts sharing one cache would rebuild each other's binary in turn
        "source_path": str(source.resolve()),
    }


def build_directory(name: str) -> Path:
    """Build directory of extension ``name`` (``"sparse_msda_sample_cpu"``,
    ``"sparse_msda_neighborhood_cpu"`` or ``"sparse_msda_rope_cpu"``):
    ``$TORCH_EXTENSIONS_DIR/sparse_msda/<name>-<isa>-<key hash>`` (default root
    ``~/.cache/torch_extensions``), the hash over torch version/git revision/C++ ABI, Python,
    compiler, compiler flags, the compiler's predefined macros for the target ``-march`` on this
    host (the exact ISA: ``-march=native`` on an AVX2 CPU and on an AVX-512 CPU give different
    directories), the source (and any header in ``csrc``) and its path (one build per checkout)."""
    if name not in _KERNELS:
        raise ValueError(f"name must be one of {sorted(_KERNELS)}, got {name!r}")
    from torch.utils.cpp_extension import get_default_build_root

    key = _build_key(name)
    features = _isa_features(_predefined_macros(key["compiler"], target_march()))
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / "sparse_msda" / f"{name}-{_isa_label(features)}-{tag}"


def _check_host_supports(march: str) -> None:
    """Raise if ``-march=march`` enables ISA extensions this CPU lacks (they would SIGILL)."""
    if march == "native":
        return
    compiler = _compiler()
    missing = _isa_features(_predefined_macros(compiler, march)) - _isa_features(_predefined_macros(compiler, "native"))
    if missing:
        raise RuntimeError(
            f"SPARSE_MSDA_CPU_MARCH={march} targets ISA extensions this CPU lacks: "
            f"{', '.join(sorted(m.strip('_') for m in missing))}"
        )


def _load(name: str):
    """The compiled extension ``name``, or None (disabled, or the build failed: warned once)."""
    if not kernels_enabled():
        return None
    with _LOCK:
        if name not in _STATE:
            what = _KERNELS[name][1]
            try:
                from torch.utils.cpp_extension import load

                march = target_march()
                _check_host_supports(march)
                build_dir = build_directory(name)
                build_dir.mkdir(parents=True, exist_ok=True)
                if not (build_dir / f"{name}.so").exists():
                    print(
                        f"building sparse_msda CPU {what} kernels, once, ~30 s (-march={march}, into {build_dir})",
                        file=sys.stderr,
                        flush=True,
                    )
                venv_bin = os.path.dirname(sys.executable)  # the pip-installed ninja of a venv not on PATH
                if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
                    os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
                _STATE[name] = load(
                    name=name,
                    sources=[str(_CSRC / _KERNELS[name][0])],
                    extra_cflags=_cflags(march),
                    build_directory=str(build_dir),
                    verbose=False,
                )
            except Exception as err:  # no compiler / ninja, or an ISA the CPU lacks: the PyTorch path still works
                _STATE[name], _STATE["error"] = None, err
                warnings.warn(
                    f"sparse_msda: building the CPU {what} kernels failed ({type(err).__name__}: {err}); "
                    "using the (slower) pure-PyTorch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _STATE[name]


def sampling_kernels(auto: bool = True):
    """The compiled sampling kernels, or None (disabled, the build failed: warned once, or
    ``auto`` and built for an ISA not in :data:`KERNEL_WINS`)."""
    return _dispatch(_load("sparse_msda_sample_cpu"), auto)


def neighborhood_kernels(auto: bool = True):
    """The compiled neighborhood-attention kernels, or None (disabled, the build failed: warned
    once, or ``auto`` and built for an ISA not in :data:`KERNEL_WINS`)."""
    return _dispatch(_load("sparse_msda_neighborhood_cpu"), auto)


def rope_kernels(auto: bool = True):
    """The compiled rotary-encoding kernels, or None (disabled, the build failed: warned once,
    or ``auto`` and built for an ISA not in :data:`KERNEL_WINS`)."""
    return _dispatch(_load("sparse_msda_rope_cpu"), auto)


def build_error():
    """The exception of the last failed build (after a kernel getter tried), else None."""
    return _STATE.get("error")
