"""Narrow workarounds for three defects of spconv's CPU code (spconv 2.3.x).

1. ``HashTable.insert`` / ``HashTable.query`` on a *CPU* table do their work and
   then raise ``RuntimeError("... spconv not compiled with cuda ...")``.
   :func:`hash_insert` and :func:`hash_query` call the underlying C++ table,
   swallow exactly that message for CPU tables only, and verify that the work
   was done (table size after an insert, every "is empty" flag written after a
   query). Any other error propagates.
2. With a CPU-only torch, every sparse-convolution backward dies in
   ``spconv.pytorch.ops.get_current_stream`` ("Torch not compiled with CUDA
   enabled"). :func:`patch_spconv_cpu_stream` makes it return stream ``0`` when
   torch has no CUDA; it is applied once when :mod:`adapters` is imported.
3. ``SpconvOps.scatter_add_cpu`` -- the scatter-add of every CPU sparse convolution's
   forward (and of its backward w.r.t. the input) -- has a data race: its parallel loop
   (``tv::kernel_1d``, OpenMP) shares the row pointers ``buf``/``out_ptr`` between threads
   (captured by reference), so with more than one OpenMP thread (``torch.get_num_threads()``
   > 1) rows are silently added from/to the wrong places. :func:`patch_spconv_cpu_scatter_add`
   replaces it, for spconv's ops module only, with ``torch.Tensor.index_add_`` on the same
   memory (the same per-element additions, exact); it is applied when :mod:`adapters` is
   imported, on every torch build (CPU tensors take that path also with CUDA available).

:func:`patch_spconv` applies (2) and (3) -- what ``import adapters`` does -- explicitly and
idempotently, for programs that run spconv without ever calling our attention;
``python -m adapters.check_spconv`` tells whether the installed spconv needs it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Callable, Iterator, Optional

import torch
from spconv.pytorch.cppcore import torch_tensor_to_tv
from spconv.pytorch.hash import HashTable

__all__ = [
    "hash_insert",
    "hash_query",
    "new_hash_table",
    "patch_spconv",
    "patch_spconv_cpu_scatter_add",
    "patch_spconv_cpu_stream",
    "query_cpu",
    "query_cpu_async",
    "spconv_unpatched",
]

_NO_CUDA_MESSAGE = "spconv not compiled with cuda"


def _is_no_cuda_error(err: RuntimeError) -> bool:
    return _NO_CUDA_MESSAGE in str(err)


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else nothing.

    spconv launches its CUDA hash-table kernels on ``torch.cuda.current_stream()`` of the
    *current* device, so a table or keys on ``cuda:1`` while ``cuda:0`` is current would run on
    the wrong device's stream; the guard makes the tensors' device current for the call.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def new_hash_table(device: torch.device, capacity: int, value_dtype: torch.dtype = torch.int64) -> HashTable:
    """An int64 -> ``value_dtype`` (int64 or int32) spconv ``HashTable`` on ``device`` for ``capacity`` keys."""
    if value_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"value_dtype must be torch.int64 or torch.int32, got {value_dtype=}")
    device = torch.device(device)
    if device.type == "cpu":
        return HashTable(device, torch.int64, value_dtype)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _on_device(device):
        return HashTable(device, torch.int64, value_dtype, max_size=max(2 * capacity, 16))


def table_size(table: HashTable) -> Optional[int]:
    """Number of keys held by a CPU table (``None`` for CUDA tables)."""
    return table._table.size_cpu() if table.is_cpu else None


def hash_insert(table: HashTable, keys: torch.Tensor, values: torch.Tensor) -> None:
    """``table.insert(keys, values)`` that survives defect (1) on CPU tables.

    For a CPU table the size after the insert is checked to have grown by the
    number of distinct new keys at most, and by at least one when keys were given,
    so a swallowed error cannot hide an insert that did not happen.
    """
    if keys.numel() == 0:
        return
    if not table.is_cpu:
        with _on_device(keys.device):
            table.insert(keys, values)
        return
    before = table_size(table)
    try:
        table.insert(keys, values)
    except RuntimeError as err:
        if not _is_no_cuda_error(err):
            raise
    after = table_size(table)
    if not (before < after <= before + keys.numel()):
        raise RuntimeError(
            f"spconv HashTable.insert did not insert: size {before} -> {after} "
            f"after inserting {keys.numel()} keys"
        )


_QUERY_THREAD: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _query_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _QUERY_THREAD
    if _QUERY_THREAD is None:
        _QUERY_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapters-query")
    return _QUERY_THREAD


def query_cpu(table: HashTable, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The CPU part of :func:`hash_query`, writing into a given buffer: ``values[i]`` the value of
    ``keys[i]`` where found (left as it was elsewhere), and returns the uint8 "is empty" flags
    (1: not found, 0: found).

    ``keys`` int64 and ``values`` (of the table's value dtype) contiguous ``[n]`` CPU tensors.
    The flags are pre-filled with a sentinel (2) that spconv's query must overwrite for every key;
    a query that did not run (or did not finish) is an error, never a silent miss.

    Threads: spconv's CPU query is an OpenMP loop (``tv::kernel_1d_cpu``) in spconv's own copy of
    libgomp (``spconv.libs``), a second OpenMP runtime beside torch's. It is run on one worker
    thread of ours, never on the calling thread: entered from the thread that also runs torch's
    parallel ops, it made those ops several times slower afterwards (measured 2026-11-30: 30 steps
    of 7 ``clamp`` over ``[32768, 16]`` int64, 81-156 ms alone, 490-850 ms after a 130k-key query
    on the calling thread, 98-113 ms after the same query on a worker thread; the deformable
    encoder's forward loop slowed 2x). One worker: the queries of all callers run one at a time,
    each over spconv's OpenMP threads.
    """
    return query_cpu_async(table, keys, values)()


def query_cpu_async(table: HashTable, keys: torch.Tensor, values: torch.Tensor) -> Callable[[], torch.Tensor]:
    """:func:`query_cpu` started on the worker thread: returns ``wait``, which blocks until the query
    is done and returns the uint8 "is empty" flags (or raises what :func:`query_cpu` raises), so
    that the caller can do other work meanwhile. ``keys`` and ``values`` must stay untouched until
    ``wait`` returns; ``wait`` must be called (an unawaited query may still be writing ``values``)."""
    n = keys.shape[0]
    if values.dtype != table.value_dtype or values.shape != (n,) or not values.is_contiguous():
        raise ValueError(
            f"values must be a contiguous [{n}] {table.value_dtype} tensor, got "
            f"values.shape={tuple(values.shape)}, values.dtype={values.dtype}"
        )
    is_empty = torch.full((n,), 2, dtype=torch.uint8)
    if n == 0:
        return lambda: is_empty
    keys = keys.contiguous()

    def query() -> None:
        try:
            table._table.query(torch_tensor_to_tv(keys), torch_tensor_to_tv(values), torch_tensor_to_tv(is_empty), 0)
        except RuntimeError as err:
            if not _is_no_cuda_error(err):
                raise

    future = _query_thread().submit(query)

    def wait() -> torch.Tensor:
        future.result()
        if bool((is_empty > 1).any()):
            raise RuntimeError("spconv HashTable.query did not write every result")
        return is_empty

    return wait


def hash_query(table: HashTable, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``table.query(keys)`` that survives defect (1) on CPU tables.

    Returns ``(values, found)``: values of the table's value dtype (undefined where not found)
    and a bool mask. On CPU the "is empty" buffer is pre-filled with a sentinel (2)
    that the C++ query must overwrite with 0/1 for every key; a query that did
    not run is an error, never a silent miss (:func:`query_cpu`).
    """
    n = keys.shape[0]
    values = torch.empty(n, dtype=table.value_dtype, device=keys.device)
    if n == 0:
        return values, torch.zeros(0, dtype=torch.bool, device=keys.device)
    if not table.is_cpu:
        with _on_device(keys.device):
            values, is_empty = table.query(keys, values)
        return values, ~is_empty
    is_empty = query_cpu(table, keys, values)
    return values, is_empty == 0


def patch_spconv_cpu_stream() -> bool:
    """Make spconv's ``get_current_stream`` return 0 when torch has no CUDA.

    Returns True when the patch is (already) installed. On a CUDA-enabled torch
    nothing is changed.
    """
    if torch.cuda.is_available():
        return False
    import spconv.pytorch.cppcore as cppcore
    import spconv.pytorch.hash as hash_module
    import spconv.pytorch.ops as ops
    import spconv.pytorch.utils as utils

    def get_current_stream() -> int:
        return 0

    get_current_stream._sparse_msda_patch = True  # type: ignore[attr-defined]
    for module in (cppcore, ops, hash_module, utils):
        current = getattr(module, "get_current_stream", None)
        if current is not None and not getattr(current, "_sparse_msda_patch", False):
            _ORIGINAL_STREAMS[module] = current
            module.get_current_stream = get_current_stream
    return True


_ORIGINAL_STREAMS: dict = {}  # module -> spconv's own get_current_stream, kept by the patch


class _SpconvOpsWithSafeScatterAdd:
    """Proxy of spconv's ``SpconvOps`` whose ``scatter_add_cpu`` is race-free (defect 3)."""

    _sparse_msda_patch = True

    def __init__(self, base) -> None:
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def scatter_add_cpu(self, out, inp, inds) -> None:
        """``out[inds[i]] += inp[i]`` for ``i < len(inds)`` (tensorview tensors, in place)."""
        import numpy as np

        n = int(inds.dim(0))
        if n == 0:
            return
        out_np, inp_np, inds_np = out.numpy_view(), inp.numpy_view(), inds.numpy_view()
        if out_np.dtype not in (np.float16, np.float32, np.float64):  # e.g. bf16: original, one thread
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._base.scatter_add_cpu(out, inp, inds)
            finally:
                torch.set_num_threads(threads)
            return
        target = torch.from_numpy(out_np)
        target.index_add_(0, torch.from_numpy(inds_np).to(torch.int64), torch.from_numpy(inp_np)[:n])


def patch_spconv_cpu_scatter_add() -> bool:
    """Route ``spconv.pytorch.ops``' CPU scatter-add through a race-free torch implementation.

    Returns True when the patch is (already) installed.
    """
    import spconv.pytorch.ops as ops

    if not getattr(ops.SpconvOps, "_sparse_msda_patch", False):
        ops.SpconvOps = _SpconvOpsWithSafeScatterAdd(ops.SpconvOps)
    return True


def patch_spconv() -> dict[str, bool]:
    """Apply the fixes for spconv's CPU sparse convolutions; idempotent (a second call changes nothing).

    What ``import adapters`` (and so ``import sparse_msda``) already does, for programs that run
    spconv convolutions without our attention, or in a process that never imports us: call it
    once per process before the first CPU sparse convolution (DataLoader workers that only
    load data need nothing). Fixes defect (2), the sparse-conv backward on a CPU-only torch
    (nothing to do, and not applied, when torch has CUDA), and defect (3), the data race of the
    CPU scatter-add that silently corrupts features with more than one thread.

    Returns:
        ``{"cpu_stream": bool, "cpu_scatter_add": bool}``, whether each patch is installed.
    """
    return {"cpu_stream": patch_spconv_cpu_stream(), "cpu_scatter_add": patch_spconv_cpu_scatter_add()}


@contextlib.contextmanager
def spconv_unpatched() -> Iterator[None]:
    """Run spconv's own CPU code (without :func:`patch_spconv`'s fixes) inside the ``with`` block.

    For checking whether the installed spconv still has the defects
    (``python -m adapters.check_spconv``); the patches are put back on exit.
    """
    import spconv.pytorch.ops as ops

    patched_ops = ops.SpconvOps
    patched_streams = {m: m.get_current_stream for m in _ORIGINAL_STREAMS}
    if getattr(patched_ops, "_sparse_msda_patch", False):
        ops.SpconvOps = patched_ops._base
    for module, original in _ORIGINAL_STREAMS.items():
        module.get_current_stream = original
    try:
        yield
    finally:
        ops.SpconvOps = patched_ops
        for module, patched in patched_streams.items():
            module.get_current_stream = patched
