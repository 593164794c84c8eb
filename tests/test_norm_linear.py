"""layer_norm_linear (sparse_msda/functional/norm_linear.py): LayerNorm + linear whose backward
recomputes the normalised input. Against the two torch modules in sequence, gradcheck in float64,
and the saved tensors (no normalised [N, C] copy is kept)."""

import pytest
import torch
import torch.nn.functional as F

from sparse_msda.functional.norm_linear import layer_norm_linear


def _params(c_in=6, c_out=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    return mk(7, c_in), mk(c_in), mk(c_in), mk(c_out, c_in), mk(c_out) if bias else None


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    x, nw, nb, w, b = _params(bias=bias)
    inputs = (x, nw, nb, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda x, nw, nb, w, *b: layer_norm_linear(x, nw, nb, 1e-5, w, *b), inputs)


def test_equals_modules_and_keeps_no_normalised_copy():
    x, nw, nb, w, b = _params(c_in=16, c_out=8, seed=1)
    x = x.detach().repeat(3, 1).view(3, 7, 16).requires_grad_(True)  # leading dims are flattened
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer_norm_linear(x, nw, nb, 1e-5, w, b)
    ref = F.linear(F.layer_norm(x, [16], nw, nb, 1e-5), w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, nw, nb, w, b], gy)
    want = torch.autograd.grad(ref, [x, nw, nb, w, b], gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # only the input itself, no normalised copy


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_passes_equal_unchunked(bias, monkeypatch):
    """Above NORM_LINEAR_CHUNK_ROWS rows forward and backward run chunk by chunk (a last chunk
    shorter): same output and gradients as one pass, and gradcheck through the chunked path."""
    from sparse_msda import tuning

    x, nw, nb, w, b = _params(c_in=6, c_out=5, bias=bias, seed=2)
    x = x.detach().repeat(3, 1).add_(torch.linspace(0, 1, 21, dtype=torch.float64)[:, None]).requires_grad_(True)
    inputs = (x, nw, nb, w) + ((b,) if bias else ())
    f = lambda x, nw, nb, w, *b: layer_norm_linear(x, nw, nb, 1e-5, w, *b)  # noqa: E731
    gy = torch.randn(21, 5, dtype=torch.float64)
    whole = f(*inputs)
    want = torch.autograd.grad(whole, inputs, gy)
    monkeypatch.setattr(tuning, "NORM_LINEAR_CHUNK_ROWS", 4)  # 21 rows: 5 chunks of 4 and one of 1
    chunked = f(*inputs)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    for a, e in zip(torch.autograd.grad(chunked, inputs, gy), want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, inputs)
