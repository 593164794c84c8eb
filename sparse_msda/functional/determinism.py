"""Results independent of the thread count under ``torch.use_deterministic_algorithms(True)``.

PyTorch's deterministic mode promises the same result for the same inputs and settings; the
CPU thread count is one of those settings. The attention operations go further: with the
mode on, outputs and gradients are bitwise identical for any ``torch.set_num_threads``:

* C++ kernels: the forward passes and the neighborhood backward split work by query tile or by
  head, so every output element is summed in one fixed order. The sampling backward, with more
  threads than heads, gives each thread its own copy of the table gradient and sums the copies
  at the end, in an order set by the thread count; in deterministic mode it uses at most one
  thread per head (:func:`kernel_threads`): each table row is then written by one thread in
  sample order, which is the single-thread order.
* PyTorch path: its matrix products go through torch's GEMM, whose summation order for some
  shapes depends on the thread count (e.g. ``[8, 64] x [64, 25]`` differs in the last bit
  between 1 and 3 threads). In deterministic mode its forward and backward run on one intra-op
  thread (:func:`one_thread`), restoring the caller's count afterwards.

Outside deterministic mode nothing changes (the thread count may change the last bits).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["kernel_threads", "one_thread", "one_thread_when_deterministic"]


def kernel_threads(n_heads: int, need_table: bool) -> int:
    """Threads for the sampling kernels' backward: ``torch.get_num_threads()``, at most one per
    head when a table gradient is asked for in deterministic mode."""
    n_threads = torch.get_num_threads()
    if need_table and torch.are_deterministic_algorithms_enabled():
        n_threads = min(n_threads, n_heads)
    return n_threads


@contextlib.contextmanager
def one_thread(device_type: str):
    """One intra-op thread inside the block on CPU in deterministic mode (else a no-op)."""
    threads = torch.get_num_threads()
    if device_type != "cpu" or threads == 1 or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread_when_deterministic(method):
    """Decorator for the ``forward`` / ``backward`` of a PyTorch-path autograd Function:
    :func:`one_thread` on the device of its first tensor argument."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device_type = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with one_thread(device_type):
            return method(ctx, *args)

    return wrapper
