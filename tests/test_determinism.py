"""Determinism across thread counts (issue 13).

With ``torch.use_deterministic_algorithms(True)`` both operations give bitwise identical
outputs and gradients whatever ``torch.set_num_threads`` says, on the C++ kernels and on the
PyTorch path (``SPARSE_MSDA_CPU_KERNELS=0``). Four cases failed before the fix
(``sparse_msda/functional/determinism.py``): the sampling kernel's backward with more threads
than heads (one head; two heads on three threads) summed per-thread copies of the table
gradient in an order set by the thread count, and the PyTorch path's ``[8, 64] x [64, 25]``
score product changes its summation order with the thread count inside torch's GEMM.
"""

from __future__ import annotations

import pytest
import torch

from adapters import SparseCoordinateIndex
from sparse_msda.functional.neighborhood import build_neighborhood_plan, sparse_neighborhood_attention
from tests.test_cpu_kernels import _problem

PATHS = ["1", "0"]  # SPARSE_MSDA_CPU_KERNELS: C++ kernels (where built), PyTorch path
THREADS = (1, 2, 3)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)``, the thread count restored afterwards."""
    threads, before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
    torch.set_num_threads(threads)


def _per_thread_count(fn):
    """``fn()`` (a list of tensors) once per thread count in :data:`THREADS`."""
    out = {}
    for t in THREADS:
        torch.set_num_threads(t)
        out[t] = [x.detach().clone() for x in fn()]
    return out


def _assert_bitwise_equal(results):
    names = ["output"] + [f"gradient {i}" for i in range(len(results[1]) - 1)]
    for t in THREADS[1:]:
        for name, a, b in zip(names, results[1], results[t]):
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            assert torch.equal(a, b), f"{name}: {t} threads differ from 1 thread by up to {diff:.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_heads, background", [(1, False), (1, True), (2, False)])
def test_sampling_bitwise_equal_across_thread_counts(path, n_heads, background, deterministic, monkeypatch):
    """3000 samples (the kernel splits work above 256 samples per thread), one head (the case
    that summed per-thread table-gradient copies) and two heads with 3 threads (more threads
    than heads)."""
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", path)
    f, inputs = _problem(3, background, 3000, torch.float32, 5, head_dim=16, n_heads=n_heads)
    w = torch.randn(3000, 16, generator=torch.Generator().manual_seed(1))

    def run():
        out = f(*inputs)
        return [out, *torch.autograd.grad((out * w).sum(), inputs)]

    _assert_bitwise_equal(_per_thread_count(run))


def _one_tile_plan(n_queries=8):
    """One level 8 x 8, fully occupied; ``n_queries`` queries in the same cell, window 5: one
    tile of 8 queries x 25 keys (the ``[8, d] x [d, 25]`` product whose result depends on the
    thread count in torch's GEMM)."""
    cells = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    zeros = torch.zeros(64, dtype=torch.int64)
    index = SparseCoordinateIndex(zeros, zeros, cells, [[8, 8]], 1)
    pos = 4.5 + torch.linspace(-0.4, 0.4, n_queries, dtype=torch.float64)[:, None].expand(-1, 2)
    batch = torch.zeros(n_queries, dtype=torch.int64)
    plan = build_neighborhood_plan(index, batch, pos, torch.tensor([8.0, 8.0], dtype=torch.float64), [5], False)
    assert [tuple(c.shape) for c in plan.chunks] == [(1, n_queries, 25)]
    return plan


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_heads, head_dim", [(1, 64), (3, 16)])
def test_neighborhood_attention_bitwise_equal_across_thread_counts(path, n_heads, head_dim, deterministic, monkeypatch):
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", path)
    plan = _one_tile_plan()
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(n, n_heads, head_dim, generator=g).requires_grad_() for n in (plan.n_queries, plan.n_keys, plan.n_keys)]
    w = torch.randn(plan.n_queries, n_heads, head_dim, generator=g)

    def run():
        out = sparse_neighborhood_attention(*inputs, plan)
        return [out, *torch.autograd.grad((out * w).sum(), inputs)]

    _assert_bitwise_equal(_per_thread_count(run))
