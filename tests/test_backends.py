"""The backend layer (sparse_msda.backends): choose_backend's rules, the backend= argument of the
functional API and the modules, and equal results on every backend for an encoder."""

from __future__ import annotations

import pytest
import torch

import sparse_msda.backends as backends
from sparse_msda import SparseMSDAEncoder, SparseNeighborhoodAttentionBlock
from sparse_msda.backends import available_backends, choose_backend, cpu, reference
from sparse_msda.functional.deformable import sparse_bilinear_sample
from tests.conftest import cpu_backends
from tests.test_bad_inputs import _issue_map
from tests.test_encoder import levels_3d, make_encoder, perturb

OPS = ("weighted_gather", "neighborhood_attention")
NEEDS_CPU = pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ kernels are not built here (no compiler)")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SPARSE_MSDA_BACKEND", raising=False)
    monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS", raising=False)
    return monkeypatch


def test_reference_always_available():
    assert "reference" in available_backends()
    assert available_backends()[0] == "reference"
    assert all(name in backends.BACKENDS for name in available_backends())


@pytest.mark.parametrize("op", OPS)
def test_explicit_name_wins_over_environment(clean_env, op):
    x = torch.zeros(3, dtype=torch.float64)
    clean_env.setenv("SPARSE_MSDA_BACKEND", "cpu" if "cpu" in available_backends() else "reference")
    clean_env.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    assert choose_backend(op, x, backend="reference") is reference


@NEEDS_CPU
@pytest.mark.parametrize("op", OPS)
def test_environment_wins_over_automatic(clean_env, op):
    x = torch.zeros(3, dtype=torch.float64)
    clean_env.setenv("SPARSE_MSDA_BACKEND", "reference")
    clean_env.setenv("SPARSE_MSDA_CPU_KERNELS", "1")  # the new variable wins over the legacy one
    assert choose_backend(op, x) is reference
    clean_env.setenv("SPARSE_MSDA_BACKEND", "cpu")
    assert choose_backend(op, x) is cpu
    clean_env.setenv("SPARSE_MSDA_CPU_KERNELS", "0")  # disables the kernels altogether: said so, no fallback
    with pytest.raises(ValueError, match=r"SPARSE_MSDA_BACKEND='cpu': the cpu backend is not available here \(disabled by SPARSE_MSDA_CPU_KERNELS=0\)"):
        choose_backend(op, x)


@NEEDS_CPU
@pytest.mark.parametrize("op", OPS)
def test_legacy_switch_and_automatic_choice(clean_env, op, monkeypatch):
    x = torch.zeros(3, dtype=torch.float32)
    clean_env.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    assert choose_backend(op, x) is reference
    clean_env.setenv("SPARSE_MSDA_CPU_KERNELS", "1")  # forced: any ISA
    monkeypatch.setattr(cpu, "wins", lambda: False)
    assert choose_backend(op, x) is cpu
    clean_env.delenv("SPARSE_MSDA_CPU_KERNELS")
    assert choose_backend(op, x) is reference  # automatic: a kernel built for an ISA it loses on is not used
    monkeypatch.setattr(cpu, "wins", lambda: True)
    assert choose_backend(op, x) is cpu
    # automatic: what the kernels do not take goes to the reference
    assert choose_backend(op, x.half()) is reference
    assert choose_backend(op, x, x.double()) is reference  # mixed dtypes
    if op == "weighted_gather":
        assert choose_backend(op, x, torch.zeros(2, 4, dtype=torch.int64)) is reference  # int64 corner table


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_raises(clean_env, op):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"backend must be None or one of \['cpu', 'reference', 'triton'\], got 'cuda'"):
        choose_backend(op, x, backend="cuda")
    with pytest.raises(TypeError, match="backend must be None or one of"):
        choose_backend(op, x, backend=1)
    clean_env.setenv("SPARSE_MSDA_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"SPARSE_MSDA_BACKEND must be None or one of .*got 'fast'"):
        choose_backend(op, x)
    with pytest.raises(ValueError, match="op must be one of"):
        choose_backend("attention", x)


@NEEDS_CPU
def test_unsupported_tensors_raise_naming_backend_and_why(clean_env):
    x = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend='cpu': the cpu backend does not support weighted_gather on these tensors \(cpu torch.float16\): CPU tensors of one dtype, float32 or float64"):
        choose_backend("weighted_gather", x, backend="cpu")
    clean_env.setenv("SPARSE_MSDA_BACKEND", "cpu")
    with pytest.raises(ValueError, match=r"SPARSE_MSDA_BACKEND='cpu': the cpu backend does not support neighborhood_attention"):
        choose_backend("neighborhood_attention", x)


def test_unavailable_backend_raises(clean_env, monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "the C++ kernels could not be built: no compiler")
    with pytest.raises(ValueError, match=r"backend='cpu': the cpu backend is not available here \(the C\+\+ kernels could not be built: no compiler\)"):
        choose_backend("weighted_gather", torch.zeros(3), backend="cpu")


def test_modules_reject_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        SparseNeighborhoodAttentionBlock(16, 2, n_levels=1, neighborhood_sizes=[3], backend="gpu")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        SparseMSDAEncoder(16, 2, 2, 1, backend="gpu")
    text = repr(SparseMSDAEncoder(16, 2, 2, 1, backend="reference"))
    assert text.count("backend='reference'") == 5  # encoder, layer, deformable block and attention, neighborhood block


def _spy(monkeypatch, name):
    """Record which backend module computes each operation."""
    calls = []
    for module in (reference, cpu):
        for op in OPS:
            original = getattr(module, op)

            def wrapped(*args, _original=original, _name=module.__name__.rsplit(".", 1)[1], _op=op):
                calls.append((_name, _op))
                return _original(*args)

            monkeypatch.setattr(module, op, wrapped)
    # the cpu backend's fused deformable attention (offsets, softmax and sampling) is its weighted gather
    original = cpu.deformable_attention
    monkeypatch.setattr(cpu, "deformable_attention", lambda *a: (calls.append(("cpu", "weighted_gather")), original(*a))[1])
    return calls


@pytest.mark.parametrize("name", cpu_backends())
def test_backend_argument_reaches_both_operations(clean_env, monkeypatch, name):
    """A module's backend= decides the implementation of both operations, over the environment."""
    other = next((n for n in cpu_backends() if n != name), name)
    clean_env.setenv("SPARSE_MSDA_BACKEND", other)
    calls = _spy(monkeypatch, name)
    enc = make_encoder(n_layers=1, backend=name)
    enc(levels_3d(seed=3))
    assert sorted(set(calls)) == sorted({(name, "weighted_gather"), (name, "neighborhood_attention")})


@pytest.mark.parametrize("name", cpu_backends())
def test_functional_backend_argument(clean_env, monkeypatch, name):
    calls = _spy(monkeypatch, name)
    st, shapes = _issue_map()
    pos = torch.tensor([[4.3, 4.7], [3.5, 3.5]], dtype=torch.float64)
    sparse_bilinear_sample(st, pos, torch.tensor([0, 1]), shapes, torch.tensor([0, 0]), backend=name)
    assert calls == [(name, "weighted_gather")]
    with pytest.raises(ValueError, match="backend must be None or one of"):
        sparse_bilinear_sample(st, pos, torch.tensor([0, 1]), shapes, torch.tensor([0, 0]), backend="gpu")


@pytest.mark.skipif(len(cpu_backends()) < 2, reason="one backend runs CPU tensors here: nothing to compare")
def test_encoder_equal_on_every_backend(clean_env):
    """Outputs and gradients of an encoder layer (deformable + neighborhood + feed-forward, with
    background-free windows) agree between backends in float64."""
    results = []
    for name in cpu_backends():
        levels = levels_3d(seed=5)
        for lvl in levels:
            lvl.features.requires_grad_(True)
        enc = perturb(make_encoder(n_layers=1, backend=name))
        out = enc(levels)
        loss = sum((o.features * torch.linspace(-1, 1, o.features.numel(), dtype=o.features.dtype).view_as(o.features)).sum() for o in out)
        grads = torch.autograd.grad(loss, [lvl.features for lvl in levels] + list(enc.parameters()))
        results.append(([o.features for o in out], grads))
    (out0, g0), rest = results[0], results[1:]
    for out1, g1 in rest:
        for a, b in zip(out0, out1):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
