"""Shared benchmark harness: every case in a fresh subprocess, wall time and peak memory.

Usage (from a benchmark module such as ``benchmarks/msda.py``; run it from the repository root
as ``python -m benchmarks.msda``)::

    from benchmarks.common import Case, add_common_args, run_cases

    def setup_dense(n_queries: int, device: str = "cpu"):
        # module-level function: builds inputs (not timed) and returns a zero-arg callable
        x = torch.randn(n_queries, 256, device=device)
        return lambda: x @ x.T  # the timed operation

    if __name__ == "__main__":          # required: cases run in spawned subprocesses
        args = add_common_args(argparse.ArgumentParser()).parse_args()
        cases = [Case("dense", setup_dense, {"n_queries": n}) for n in (1000, 4000)]
        run_cases(cases, repeats=args.repeats, warmup=args.warmup, out=args.out)

What is measured, per case, in a *fresh* ``multiprocessing`` "spawn" child (so caches, the
allocator and the high-water mark of one case never leak into another):

1. ``torch.set_num_threads(2)`` (the CI machine has 2 cores), then ``fn = case.setup(**case.kwargs)``.
2. ``warmup`` untimed calls of ``fn()`` (default 1).
3. Memory baseline: ``gc.collect()``, glibc ``malloc_trim(0)`` (so freed-but-cached heap is
   returned and cannot hide the op's allocations), the kernel's peak-RSS counter is reset by
   writing ``5`` to ``/proc/self/clear_refs`` (that resets ``VmHWM``, the memory map's
   high-water mark behind ``resource.getrusage(RUSAGE_SELF).ru_maxrss``), and the current RSS
   is read from ``/proc/self/statm``.
4. ``repeats`` timed calls (default 5), each ``time.perf_counter`` around ``fn()`` (with
   ``torch.cuda.synchronize()`` before and after on CUDA, so host syncs and launch overhead are
   counted; CUDA events around the call are recorded too, ``Result.cuda_times_s``); the result
   is dropped after each call.
5. ``peak RSS`` = the high-water mark after the calls minus the RSS before them: the extra resident
   memory the operation needed at its peak (inputs built by ``setup`` are not counted; outputs
   are, while alive). The mark is read as ``VmHWM`` from ``/proc/self/status``, not
   ``ru_maxrss``: the latter also keeps the peak recorded whenever a thread of the process
   exited, which no reset clears (``ru_maxrss`` is the fallback without ``/proc``). If the counter could not be reset (no ``/proc/self/clear_refs``) the column
   says ``(no reset)`` and the number is only a lower bound. On CUDA ``peak CUDA`` is
   ``torch.cuda.max_memory_allocated()`` (reset before the calls) minus the allocated bytes before.

The table reports the median and the minimum of the repeats. A case that raises, or runs past
``timeout`` seconds, appears as a row with the error instead of numbers; the others still run.

**Interleaved rounds** (``run_cases(..., group=...)``; what ``benchmarks.neighborhood`` and
``benchmarks.msda`` do unless given ``--separate``). The cases that implement one setting (the
kernel, its PyTorch path, the floor, ...: same ``group(case)``) are set up in *one* fresh
subprocess on the same inputs (the global RNG re-seeded before each setup, as a fresh process
has it), each gets its ``warmup`` calls, and then they are timed alternately, ``repeats`` rounds
of one call each, the order rotated by one every round (``k p f``, ``p f k``, ``f k p``, ...)
(:func:`interleave`). On a shared VM whose speed drifts 20-40 % between minutes, timings taken
minutes apart in separate processes give ratios that flip between runs; within a round the
implementations see the same machine state, so the per-round ratios (:func:`paired_ratios`) are
what :func:`kernel_vs_pytorch_table` reports. Times only: the peak memory of a process that also
holds and has run the other implementations is not the operation's own, so the peak comes from
a separate fresh subprocess per case (the measurement above with ``warmup`` calls and
``peak_repeats`` timed calls, default 1; ``peak`` selects the cases, e.g. only the 3D encoders),
and is left blank ("not measured") for the others. An implementation that raises (setup, warm-up
or a round) is reported with its error; the others keep their rounds.

Real-scan inputs: :func:`scan_levels` builds the VoxelBackBone8x-shaped multi-level spconv map of
the shipped scan (``examples/data/``; more frames from ``../shared/data/lidar/`` when present) via
:mod:`sparse_msda.lidar`; :func:`sparse_msda.lidar.random_bev_levels` gives the synthetic
reference setting (4 BEV levels 256..32, 5 % occupancy, batch 2, 256 channels).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "Case",
    "Result",
    "REPO_ROOT",
    "Timings",
    "add_common_args",
    "add_interleave_args",
    "cpu_kernels_off",
    "format_table",
    "interleave",
    "kernel_vs_pytorch_table",
    "levels_to",
    "paired_ratios",
    "round_orders",
    "run_case",
    "run_cases",
    "run_interleaved",
    "scan_frames",
    "scan_levels",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_THREADS = 2


@dataclass
class Case:
    """One benchmark case.

    Attributes:
        name: row label.
        setup: a *module-level* function (picklable by reference) that builds the inputs and
            returns a zero-argument callable: the operation that is timed.
        kwargs: keyword arguments for ``setup``; shown in the table's ``params`` column.
        columns: extra table columns for this row (e.g. ``{"voxels": 1_000_000}``).
        device: ``"cuda"`` to synchronise around the timed calls and report the CUDA peak;
            default: ``kwargs["device"]`` if given, else ``"cpu"``.
    """

    name: str
    setup: Callable[..., Callable[[], Any]]
    kwargs: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    device: Optional[str] = None

    @property
    def device_type(self) -> str:
        return str(self.device if self.device is not None else self.kwargs.get("device", "cpu")).split(":")[0]


@dataclass
class Result:
    case: Case
    times_s: list = field(default_factory=list)
    peak_rss_bytes: Optional[int] = None
    rss_reset: bool = True
    peak_cuda_bytes: Optional[int] = None
    device: str = "cpu"
    error: Optional[str] = None
    cuda_times_s: list = field(default_factory=list)  # CUDA-event time of each timed call (CUDA only)
    #: "separate" (timed in its own fresh subprocess) or "interleaved" (``times_s[i]`` is round ``i``
    #: of :func:`interleave`, alongside the other cases of its group)
    mode: str = "separate"

    @property
    def median_ms(self) -> Optional[float]:
        return 1e3 * statistics.median(self.times_s) if self.times_s else None

    @property
    def min_ms(self) -> Optional[float]:
        return 1e3 * min(self.times_s) if self.times_s else None


# --- memory probes (Linux) ------------------------------------------------------------------
def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    """The process's resident-memory high-water mark.

    ``VmHWM`` of ``/proc/self/status`` (the memory map's peak, which ``clear_refs`` resets);
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback. The two agree except that
    ``ru_maxrss`` also keeps the peak recorded when any thread of the process exited, which
    ``clear_refs`` cannot reset (thread-pool churn during ``setup`` would pin it).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the child ------------------------------------------------------------------------------
def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def _by_name(case: Case) -> Case:
    """``case`` with its setup function replaced by its name: what a child sends back (the
    parent puts its own ``case`` back into the result)."""
    return Case(case.name, getattr(case.setup, "__name__", "?"), case.kwargs, case.columns, case.device)  # type: ignore[arg-type]


def _measure(case: Case, warmup: int, repeats: int) -> Result:
    import logging

    import torch

    # spconv calls torch.fx.is_fx_tracing(), which logs a one-off deprecation notice per process
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    torch.set_num_threads(NUM_THREADS)
    fn = case.setup(**case.kwargs)
    cuda = case.device_type == "cuda"
    result = Result(case, device="cuda" if cuda else "cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        out = fn()
        del out
    sync()
    gc.collect()
    _malloc_trim()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    result.rss_reset = _reset_peak_rss()
    rss_before = _current_rss_bytes()
    for _ in range(repeats):
        sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            end.record()
        sync()
        result.times_s.append(time.perf_counter() - t0)
        if cuda:
            result.cuda_times_s.append(start.elapsed_time(end) / 1e3)
        del out
    result.peak_rss_bytes = max(_maxrss_bytes() - rss_before, 0)
    if cuda:
        result.peak_cuda_bytes = torch.cuda.max_memory_allocated() - cuda_before
    result.case = _by_name(case)
    return result


def _child(conn, case: Case, warmup: int, repeats: int) -> None:
    try:
        result = _measure(case, warmup, repeats)
    except BaseException as err:  # reported as a table row
        result = Result(_by_name(case), error=_error_text(err))
        traceback.print_exc()
    conn.send(result)
    conn.close()


def _run_in_subprocess(target: Callable, args: tuple, timeout: float) -> tuple:
    """Run ``target(conn, *args)`` in a fresh spawned subprocess and receive what it sends on
    ``conn``: ``(payload, None)``, or ``(None, why)`` when it ran past ``timeout`` seconds or died
    without sending (the process is killed if still alive)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    payload, timed_out = None, not parent.poll(timeout)
    if not timed_out:
        try:
            payload = parent.recv()
        except EOFError:
            payload = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if payload is not None:
        return payload, None
    return None, f"timed out after {timeout:.0f} s" if timed_out else f"subprocess died (exit code {proc.exitcode})"


def run_case(case: Case, *, warmup: int = 1, repeats: int = 5, timeout: float = 600.0) -> Result:
    """Run one case in a fresh spawned subprocess and return its :class:`Result`."""
    result, why = _run_in_subprocess(_child, (case, warmup, repeats), timeout)
    if result is None:
        result = Result(case, error=why)
    result.case = case
    return result


# --- interleaved rounds ---------------------------------------------------------------------
@dataclass
class Timings:
    """What :func:`interleave` measured of one implementation: ``times_s[i]`` is its call in round
    ``i`` (rounds ``0 .. len(times_s) - 1``), ``error`` the first exception it raised (after which
    it takes no further rounds)."""

    times_s: list = field(default_factory=list)
    error: Optional[str] = None


def round_orders(names: Sequence[str], rounds: int, rotate: bool = True) -> list:
    """The call order of each round: ``names`` rotated left by the round's number (``rotate``),
    so that every implementation runs first, second, ... equally often; else always ``names``."""
    names = list(names)
    n = len(names)
    return [names[r % n:] + names[: r % n] if rotate and n else list(names) for r in range(rounds)]


def interleave(
    fns: dict,
    *,
    warmup: int = 1,
    repeats: int = 5,
    rotate: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] = lambda: None,
) -> dict:
    """Time several zero-argument callables alternately, in rounds.

    Each of ``fns`` (name -> callable, in round order) first gets ``warmup`` untimed calls; then
    ``repeats`` rounds call each once, in :func:`round_orders` order, ``sync(); t0 = clock();
    out = fn(); sync()`` timing each call (the result is dropped at once). An implementation that
    raises (in warm-up or in a round) records the error and leaves the rounds; the others go on.

    Returns:
        name -> :class:`Timings`, one per entry of ``fns``, in its order.
    """
    timings = {name: Timings() for name in fns}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                out = fn()
                del out
            sync()
        except Exception as err:  # reported with the results; the other implementations still run
            timings[name].error = _error_text(err)
            traceback.print_exc()
    for order in round_orders(list(fns), repeats, rotate):
        for name in order:
            if timings[name].error is not None:
                continue
            try:
                sync()
                t0 = clock()
                out = fns[name]()
                sync()
                timings[name].times_s.append(clock() - t0)
                del out
            except Exception as err:
                timings[name].error = _error_text(err)
                traceback.print_exc()
    return timings


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> tuple:
    """``(median of the per-round ratios num[i] / den[i], ratio of the medians)`` of two
    implementations timed in the same rounds of :func:`interleave` (``num[i]``, ``den[i]``: round
    ``i``; rounds only one of them has are left out of the first); ``(None, None)`` when either
    has no time (or a zero median)."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    if not num or not den:
        return None, None
    med_num, med_den = statistics.median(num), statistics.median(den)
    return (statistics.median(pairs) if pairs else None), (med_num / med_den if med_den > 0 else None)


def _measure_interleaved(cases: Sequence[Case], warmup: int, repeats: int) -> list:
    import logging

    import torch

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    torch.set_num_threads(NUM_THREADS)
    cuda = any(c.device_type == "cuda" for c in cases)
    seed = torch.initial_seed()  # a fresh process's default seed: each setup sees the RNG as it would alone
    fns, setup_errors = {}, {}
    for case in cases:
        try:
            torch.manual_seed(seed)
            fns[case.name] = case.setup(**case.kwargs)
        except Exception as err:
            setup_errors[case.name] = _error_text(err)
            traceback.print_exc()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timings = interleave(fns, warmup=warmup, repeats=repeats, sync=sync)
    results = []
    for case in cases:
        r = Result(_by_name(case), device="cuda" if cuda else "cpu", mode="interleaved")
        t = timings.get(case.name)
        r.error = setup_errors.get(case.name) or (t.error if t else None)
        r.times_s = list(t.times_s) if t else []
        results.append(r)
    return results


def _child_interleaved(conn, cases: Sequence[Case], warmup: int, repeats: int) -> None:
    try:
        results = _measure_interleaved(cases, warmup, repeats)
    except BaseException as err:
        results = [Result(_by_name(case), mode="interleaved", error=_error_text(err)) for case in cases]
        traceback.print_exc()
    conn.send(results)
    conn.close()


def run_interleaved(cases: Sequence[Case], *, warmup: int = 1, repeats: int = 5, timeout: float = 600.0) -> list:
    """Time ``cases`` (the implementations of one setting) in interleaved rounds
    (:func:`interleave`) in one fresh spawned subprocess; one :class:`Result` per case, in order,
    ``mode="interleaved"``, times only (no peak). ``timeout`` is for the whole subprocess."""
    results, why = _run_in_subprocess(_child_interleaved, (list(cases), warmup, repeats), timeout)
    if results is None:
        results = [Result(case, mode="interleaved", error=why) for case in cases]
    for r, case in zip(results, cases):
        r.case = case
    return results


def _selected(name: str, spec: str) -> bool:
    """Whether case ``name`` is selected by ``spec``: ``all``, ``none`` or comma-separated substrings."""
    if spec == "all":
        return True
    if spec == "none":
        return False
    return any(part and part in name for part in spec.split(","))


@contextlib.contextmanager
def _kernels_env(value: str):
    old = os.environ.get("SPARSE_MSDA_CPU_KERNELS")
    os.environ["SPARSE_MSDA_CPU_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPARSE_MSDA_CPU_KERNELS"]
        else:
            os.environ["SPARSE_MSDA_CPU_KERNELS"] = old


def cpu_kernels_off(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``SPARSE_MSDA_CPU_KERNELS=0`` (the PyTorch path) during each call only.

    The package reads the switch at call time (``sparse_msda.backends.choose_backend``,
    ``functional.cpu_kernels.kernels_enabled``, checked by every kernel getter), and a benchmark's
    call holds its whole forward and backward, so one process can alternate the kernel and its
    PyTorch path; the variable is restored after each call."""

    def run():
        with _kernels_env("0"):
            return fn()

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


# --- reporting ------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def format_table(results: Sequence[Result]) -> str:
    """Markdown table: case, params, extra columns, median/min ms, peak RSS MiB (+ peak CUDA MiB)."""
    extra = []
    for r in results:
        extra += [k for k in r.case.columns if k not in extra]
    any_cuda = any(r.peak_cuda_bytes is not None for r in results)
    head = ["case", "params", *extra, "median ms", "min ms", "peak RSS MiB"] + (["peak CUDA MiB"] if any_cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r.case.kwargs.items())
        cells = [r.case.name, params] + [_fmt(r.case.columns.get(k, "")) for k in extra]
        if r.error:
            cells += [f"error: {r.error}", "", ""] + ([""] if any_cuda else [])
        else:
            mem = "not measured" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 2**20:.1f}" + ("" if r.rss_reset else " (no reset)")
            cells += [f"{r.median_ms:.3f}", f"{r.min_ms:.3f}", mem]
            if any_cuda:
                cells.append("" if r.peak_cuda_bytes is None else f"{r.peak_cuda_bytes / 2**20:.1f}")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def run_cases(
    cases: Sequence[Case],
    *,
    warmup: int = 1,
    repeats: int = 5,
    timeout: float = 600.0,
    out: Optional[str] = None,
    title: Optional[str] = None,
    verbose: bool = True,
    summarize: Optional[Callable[[Sequence[Result]], str]] = None,
    group: Optional[Callable[[Case], str]] = None,
    peak: str = "all",
    peak_repeats: int = 1,
) -> str:
    """Run every case, print and return the markdown table.

    Args:
        cases: the cases, run one after the other.
        warmup / repeats: untimed and timed calls per case (interleaved: rounds).
        timeout: seconds per case (setup included) before its subprocess is killed (interleaved:
            this times the group's number of cases, for the group's subprocess).
        out: also write the table (with a header line naming the machine) to this file.
        title: a heading printed above the table.
        summarize: appends its text (e.g. :func:`kernel_vs_pytorch_table`) below the table.
        group: None: each case timed in its own fresh subprocess (:func:`run_case`, time and
            peak from the same calls). Else the cases with the same ``group(case)`` are timed in
            interleaved rounds in one subprocess (:func:`run_interleaved`), and the peak memory of
            the cases that ``peak`` selects (``"all"``, ``"none"`` or comma-separated substrings
            of case names) comes from a fresh subprocess per case with ``warmup`` untimed and
            ``peak_repeats`` timed calls (their times are not reported).
    """
    results = []
    if group is None:
        for case in cases:
            if verbose:
                print(f"[bench] {case.name} {case.kwargs} ...", file=sys.stderr, flush=True)
            results.append(run_case(case, warmup=warmup, repeats=repeats, timeout=timeout))
    else:
        groups: dict = {}
        for case in cases:
            groups.setdefault(group(case), []).append(case)
        for name, members in groups.items():
            if verbose:
                impls = ", ".join(c.name for c in members)
                print(f"[bench] interleaved {name}: {impls} ...", file=sys.stderr, flush=True)
            timed = run_interleaved(members, warmup=warmup, repeats=repeats, timeout=timeout * len(members))
            for r in timed:
                if peak_repeats > 0 and _selected(r.case.name, peak) and r.error is None:
                    if verbose:
                        print(f"[bench] peak memory of {r.case.name} (own subprocess) ...", file=sys.stderr, flush=True)
                    m = run_case(r.case, warmup=warmup, repeats=peak_repeats, timeout=timeout)
                    if m.error is None:
                        r.peak_rss_bytes, r.rss_reset, r.peak_cuda_bytes = m.peak_rss_bytes, m.rss_reset, m.peak_cuda_bytes
                    else:
                        print(f"[bench] peak run of {r.case.name} failed: {m.error}", file=sys.stderr, flush=True)
            results += timed
    table = format_table(results)
    if group is None:
        how = f"median/min of {repeats}; each case in a fresh subprocess."
    else:
        peaks = {"all": "every case", "none": "no case"}.get(peak, f"the cases matching {peak!r}")
        how = (
            f"median/min of {repeats} interleaved rounds: the cases of one setting (kernel, PyTorch path, floor, ...) "
            f"set up in one fresh subprocess and called alternately, one call each per round, the order rotated "
            f"every round; peak RSS ({peaks}) from a separate fresh subprocess per case "
            f"(warm-up {warmup}, {peak_repeats} call{'s' if peak_repeats != 1 else ''})."
        )
    header = (
        f"{title + chr(10) + chr(10) if title else ''}"
        f"_{machine_description()}; torch.set_num_threads({NUM_THREADS}); warm-up {warmup}, {how}_\n\n"
    )
    text = header + table
    if summarize is not None:
        text += "\n\n" + summarize(results)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")
    return text


def machine_description() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}; {cpu_kernel_description()}"


def cpu_simd_flags() -> str:
    """The CPU's vector-ISA flags from ``/proc/cpuinfo`` (``avx2 fma avx512f ...``), or ``?``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    return " ".join(sorted(f for f in set(flags) if f.startswith(("avx", "fma", "sse4_2")))) or "no AVX"


def cpu_kernel_description() -> str:
    """CPU flags, and the ISA the fused CPU kernels are built for (their register width) and
    whether the CPU dispatch uses them (``sparse_msda.functional.cpu_kernels``)."""
    from sparse_msda.functional import cpu_kernels

    text = f"CPU flags: {cpu_simd_flags()}"
    ext = cpu_kernels.sampling_kernels(auto=False) if cpu_kernels.kernels_enabled() else None
    if ext is None:
        return text + "; CPU kernels off (SPARSE_MSDA_CPU_KERNELS=0 or no build)"
    isa = ext.simd_isa()
    used = "used" if cpu_kernels.kernel_wins(isa) or cpu_kernels.kernels_forced() else "not used (PyTorch path)"
    return text + f"; CPU kernels built with -march={cpu_kernels.target_march()} ({isa}), {used}"


def kernel_vs_pytorch_table(
    results: Sequence[Result], key: Callable[[Case], tuple], kernel: str, pytorch: str, floor: str
) -> str:
    """The guard against a CPU kernel slower than its own PyTorch path: per case group (``key(case)
    -> (group, impl)``), the median ms of the kernel, of the PyTorch path (the same module with
    ``SPARSE_MSDA_CPU_KERNELS=0``) and of the floor, their ratios, and a closing line naming every
    group where the kernel lost.

    Results timed in interleaved rounds (``Result.mode == "interleaved"``, :func:`run_cases` with
    ``group``): each ratio is the median of the per-round ratios (:func:`paired_ratios`), and a
    last column gives the ratios of the medians (kernel / PyTorch, kernel / floor) for comparison;
    the guard judges the per-round one. Separately timed results: ratios of the medians, as before.
    """
    times: dict = {}
    for r in results:
        group, impl = key(r.case)
        if r.median_ms is not None:
            times.setdefault(group, {})[impl] = r
    interleaved = any(r.mode == "interleaved" for g in times.values() for r in g.values())
    head = ["case", "kernel ms", "PyTorch path ms", "floor ms", "kernel / PyTorch", "kernel / floor", "PyTorch / floor"]
    if interleaved:
        head += ["rounds", "ratio of medians (k / P, k / f)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    losses = []

    def ratios(a: Optional[Result], b: Optional[Result]) -> tuple:
        if a is None or b is None:
            return None, None
        if a.mode == b.mode == "interleaved":
            return paired_ratios(a.times_s, b.times_s)
        of_medians = a.median_ms / b.median_ms if b.median_ms else None
        return of_medians, of_medians

    def fmt(x) -> str:
        return f"{x:.2f}x" if x is not None else ""

    for group, t in times.items():
        k, p, f = t.get(kernel), t.get(pytorch), t.get(floor)
        if k is None and p is None:
            continue
        (kp, kp_med), (kf, kf_med), (pf, _) = ratios(k, p), ratios(k, f), ratios(p, f)
        cells = [group] + [f"{x.median_ms:.0f}" if x is not None else "" for x in (k, p, f)]
        cells += [fmt(kp), fmt(kf), fmt(pf)]
        if interleaved:
            rounds = sorted({len(x.times_s) for x in (k, p, f) if x is not None})
            cells += ["/".join(str(n) for n in rounds), " / ".join(fmt(x) or "-" for x in (kp_med, kf_med))]
        lines.append("| " + " | ".join(cells) + " |")
        if kp is not None and kp > 1:
            losses.append(f"{group} ({kp:.2f}x)")
    verdict = (
        f"KERNEL SLOWER THAN ITS PYTORCH PATH: {', '.join(losses)}"
        if losses
        else "kernel <= PyTorch path in every case measured"
    )
    how = (
        "same inputs, the implementations of a case in one process, timed in interleaved rounds; ms: medians; "
        "ratios: median of the "
        "per-round ratios"
        if interleaved
        else "same inputs, same run"
    )
    return f"Kernel vs its PyTorch path ({how}):\n\n" + "\n".join(lines) + "\n\n" + verdict


def add_interleave_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--separate``, ``--peak``, ``--peak-repeats``: how :func:`run_cases` times the cases (see
    the module docstring, "Interleaved rounds")."""
    parser.add_argument(
        "--separate", action="store_true",
        help="time every case in its own fresh subprocess (the previous method; time and peak from the same calls) "
        "instead of the implementations of a setting in interleaved rounds in one subprocess",
    )
    parser.add_argument(
        "--peak", default="all",
        help="interleaved mode: cases whose peak memory is measured in a fresh subprocess of their own: "
        "all (default), none, or comma-separated substrings of case names",
    )
    parser.add_argument("--peak-repeats", type=int, default=1, help="interleaved mode: timed calls of each peak-memory run")
    return parser


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--repeats``, ``--warmup``, ``--timeout``, ``--out``, ``--device``, ``--quick``."""
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is killed")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    return parser


#: ``--dtype`` choices: the module and its inputs in that dtype, or (``autocast-bfloat16``) a float32
#: module and inputs run under ``torch.autocast("cpu" / "cuda", dtype=torch.bfloat16)`` (backward outside)
DTYPES = ("float32", "bfloat16", "float16", "autocast-bfloat16")


def precision(dtype: str):
    """``(tensor dtype, autocast dtype or None)`` of a ``--dtype`` choice (:data:`DTYPES`)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype.startswith("autocast-"):
        return torch.float32, getattr(torch, dtype.split("-", 1)[1])
    return getattr(torch, dtype), None


def under_autocast(fn: Callable, dtype: str, device: str = "cpu") -> Callable:
    """``fn`` run under ``torch.autocast`` when ``dtype`` is an autocast choice, else ``fn``."""
    import torch

    cast = precision(dtype)[1]
    if cast is None:
        return fn

    def run(*args, **kwargs):
        with torch.autocast(device, dtype=cast):
            return fn(*args, **kwargs)
    return run


def dtype_list(text: str) -> list[str]:
    """``--dtype``'s value: one or more comma-separated :data:`DTYPES` (several: each case runs once
    per dtype, side by side in one run, which is what makes their times comparable on a busy machine)."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if not dtypes or bad:
        raise argparse.ArgumentTypeError(f"--dtype takes comma-separated values from {DTYPES}, got {text!r}")
    return dtypes


def dtype_label(dtype: str) -> str:
    """Case-name prefix of a ``--dtype`` choice ("" for float32, the default; else ``"<dtype>:"``)."""
    return "" if dtype == "float32" else f"{dtype}:"


def without_dtype(name: str) -> str:
    """A case name without its :func:`dtype_label` prefix."""
    head, sep, rest = name.partition(":")
    return rest if sep and head in DTYPES else name


def with_device(cases: Sequence[Case], device: str, parser: Optional[argparse.ArgumentParser] = None) -> list:
    """The cases with ``device`` passed to their setups (``--device``); ``"cpu"`` leaves them as they are.

    Every setup must take a ``device`` argument; one that does not is an error (through
    ``parser.error`` when a parser is given) rather than a CPU run labelled as another device.
    """
    if device == "cpu":
        return list(cases)
    out = []
    for c in cases:
        if "device" not in inspect.signature(c.setup).parameters:
            msg = f"--device {device}: setup {c.setup.__name__} of case {c.name!r} takes no device argument"
            if parser is not None:
                parser.error(msg)
            raise ValueError(msg)
        out.append(Case(c.name, c.setup, {**c.kwargs, "device": device}, c.columns, device))
    return out


def run_main(
    description: str,
    build_cases: Callable[[bool], list],
    title: str,
    summarize: Optional[Callable[[Sequence[Result]], str]] = None,
    group: Optional[Callable[[Case], str]] = None,
) -> None:
    """Command line of a benchmark module: the common arguments plus ``--only`` (comma-separated
    substrings of case names), then :func:`run_cases` on ``build_cases(quick)``. With ``group``
    (the setting of a case), the cases of one setting are timed in interleaved rounds unless
    ``--separate`` is given (:func:`add_interleave_args`)."""
    parser = add_common_args(argparse.ArgumentParser(description=description))
    if group is not None:
        add_interleave_args(parser)
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only cases whose name contains one")
    takes_dtype = "dtype" in inspect.signature(build_cases).parameters
    if takes_dtype:
        parser.add_argument(
            "--dtype", type=dtype_list, default=["float32"], help=f"module and input dtype(s), comma-separated, from {DTYPES}"
        )
    args = parser.parse_args()
    if takes_dtype:
        cases = [c for d in args.dtype for c in build_cases(args.quick, dtype=d)]
        if len(args.dtype) > 1:  # each case's dtypes next to each other
            order = {c.name: i for i, c in enumerate(build_cases(args.quick))}
            cases.sort(key=lambda c: order.get(without_dtype(c.name), len(order)))
    else:
        cases = build_cases(args.quick)
    if args.only:
        cases = [c for c in cases if any(part in c.name for part in args.only.split(","))]
    cases = with_device(cases, args.device, parser)
    interleaved = {} if group is None or args.separate else dict(group=group, peak=args.peak, peak_repeats=args.peak_repeats)
    run_cases(
        cases, repeats=args.repeats, warmup=args.warmup, timeout=args.timeout, out=args.out, title=title, summarize=summarize,
        **interleaved,
    )


def block_queries(features, index, role: str, n_queries: int, generator, embed_dim: int, uniform: bool = False):
    """Queries of a block benchmark on the map of ``index`` (rows of ``features``).

    ``enc``: every voxel is a query (its feature, its cell centre mapped to full scale -- the
    neighborhood and map blocks take full-scale positions, as sparse-transformer-layers -- and
    its level), batch items in order. ``dec``: ``n_queries`` per item with random features, at
    random finest-level voxels jittered by +-2 cells (``uniform``: uniform over the full-scale
    frame instead), in the full-scale frame. Returns ``(query, positions, query_levels or None,
    batch offsets)``.
    """
    import torch

    if role == "enc":
        order = torch.argsort(index.batch_indices, stable=True)
        query = features[order].clone()
        from sparse_msda.functional.neighborhood import full_scale_positions

        qlev = index.level_indices[order].clone()
        pos = full_scale_positions(index.spatial_indices[order].float() + 0.5, qlev, index.level_spatial_shapes)
        counts = torch.bincount(index.batch_indices, minlength=index.batch_size)
    else:
        shapes = index.level_spatial_shapes
        big = int(torch.argmax(shapes.prod(-1)))
        full = shapes[big].float()
        pos_list = []
        for b in range(index.batch_size):
            if uniform:
                pos_list.append(torch.rand(n_queries, shapes.shape[1], generator=generator) * full)
                continue
            fine = ((index.batch_indices == b) & (index.level_indices == big)).nonzero().squeeze(1)
            pick = fine[torch.randint(fine.numel(), (n_queries,), generator=generator)]
            jitter = (torch.rand(n_queries, shapes.shape[1], generator=generator) - 0.5) * 4
            pos_list.append((index.spatial_indices[pick].float() + 0.5 + jitter).clamp(torch.zeros_like(full), full - 1e-3))
        pos = torch.cat(pos_list)
        query = torch.randn(pos.shape[0], embed_dim, generator=generator)
        qlev = None
        counts = torch.full((index.batch_size,), n_queries)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return query, pos, qlev, offsets


def block_runner(block, query, run: Callable, inputs, backward: bool) -> Callable[[], None]:
    """The timed call of a block benchmark: ``run(block, inputs)`` with the block's and the
    query's gradients cleared, then (``backward``) the backward of ``(out * w).sum()`` for a
    fixed random ``w`` (drawn on the first call)."""
    import torch

    w = None

    def fn():
        nonlocal w
        block.zero_grad(set_to_none=True)
        query.grad = None
        out = run(block, inputs)
        if not backward:
            return None
        if w is None or w.shape != out.shape:
            w = torch.randn(out.shape).to(out.device)
        (out * w).sum().backward()
        return None

    return fn


def levels_to(levels, device):
    """The spconv levels (``SparseConvTensor`` list) with features and indices on ``device``."""
    from spconv.pytorch import SparseConvTensor

    return [
        SparseConvTensor(lvl.features.to(device), lvl.indices.to(device), lvl.spatial_shape, lvl.batch_size)
        for lvl in levels
    ]


# --- real-scan inputs -----------------------------------------------------------------------
def scan_frames() -> list[Path]:
    """The shipped frame, then the other frames in ``../shared/data/lidar/`` when present."""
    frames = [REPO_ROOT / "examples" / "data" / "os1_128_1795.bin"]
    shared = REPO_ROOT.parent / "shared" / "data" / "lidar"
    if shared.is_dir():
        frames += sorted(p for p in shared.glob("*.bin") if p.name != frames[0].name)
    return frames


def scan_levels(batch_size: int = 1, channels: Optional[int] = None, seed: int = 0, bev: bool = False):
    """Multi-level spconv map of real scans (KITTI grid, VoxelBackBone8x shapes).

    Args:
        batch_size: number of frames; frames are taken from :func:`scan_frames` in order and
            reused cyclically when there are fewer.
        channels / seed: as in :func:`sparse_msda.lidar.multiscale_levels`.
        bev: return the 2D BEV pyramid ``[200,176] .. [25,22]`` instead of the 3D levels.

    Returns:
        list of ``SparseConvTensor`` (3D: ``[41,1600,1408]``, ``[21,800,704]``, ``[11,400,352]``,
        ``[5,200,176]``).
    """
    import adapters  # noqa: F401  (spconv CPU patches)
    from sparse_msda import lidar

    frames = scan_frames()
    voxels = [lidar.voxelize(lidar.load_kitti_bin(frames[i % len(frames)])) for i in range(batch_size)]
    x = lidar.stack_batch(voxels)
    if bev:
        return lidar.bev_levels(x, channels=channels, seed=seed)
    return lidar.multiscale_levels(x, channels=channels, seed=seed)
