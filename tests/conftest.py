"""Shared pytest fixtures."""

import os

import pytest
import torch

# Without a GPU the Triton backend's tests run its kernels through Triton's interpreter. Triton
# fixes the mode when it is first imported (its own library functions are decorated then) and
# reads it again at run time, so it is set here, before any test imports triton (torch may do so
# on its own). Nothing else runs Triton code on a CPU-only machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny problems: one intra-op thread is as fast, and immune to OpenMP spin-waiting when the
    machine is oversubscribed (several times faster then)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_backends() -> list[str]:
    """The backends available here that run CPU tensors (``sparse_msda.backends``): the parity
    tests run on each (``backend`` fixture). ``cpu`` builds the C++ kernels on first call.
    ``triton`` on CPU tensors is Triton's interpreter (op by op in Python, far too slow for these
    suites): left out; tests/test_triton_backend.py holds it equal to ``reference``."""
    from sparse_msda.backends import available_backends, backend_module

    probe = torch.zeros(1)
    return [n for n in available_backends() if n != "triton" and backend_module(n).supports("weighted_gather", probe)]


@pytest.fixture(params=cpu_backends())
def backend(request, monkeypatch):
    """Run the test on one backend: ``SPARSE_MSDA_BACKEND`` set to its name."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", request.param)
    return request.param
