"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny problems: one intra-op thread is as fast, and immune to OpenMP spin-waiting when the
    machine is oversubscribed (several times faster then)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
