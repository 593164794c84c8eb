"""Rotary position encoding over (full-scale position, level)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sparse_msda.functional.rope import (
    apply_rope,
    init_rope_frequencies,
    rope_freq_groups,
    rope_group_sizes,
)
from sparse_msda.modules.neighborhood_attention import MultilevelRotaryEncoding
from tests.test_cpu_kernels import _built


def _rope_kernel(monkeypatch):
    """The C++ rotary-encoding kernels, enabled (skip without a compiler, fail if the build fails)."""
    from sparse_msda.functional.cpu_kernels import rope_kernels

    return _built(rope_kernels, monkeypatch)

PATTERNS = ["single", "partition", "closure", "axial", "spatial_level"]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("share_heads", [False, True])
def test_scores_depend_only_on_relative_position(dim, pattern, share_heads):
    H, d = 3, 24  # 12 pairs: divisible by 1, 2, 3, 4 groups
    torch.manual_seed(0)
    rope = MultilevelRotaryEncoding(H, d, dim, 100.0, 10.0, share_heads, pattern).double()
    q, k = torch.randn(5, H, d, dtype=torch.float64), torch.randn(5, H, d, dtype=torch.float64)
    p, r = torch.rand(5, dim + 1, dtype=torch.float64) * 50, torch.rand(5, dim + 1, dtype=torch.float64) * 50
    t = torch.randn(1, dim + 1, dtype=torch.float64) * 30
    score = (rope(q, p) * rope(k, r)).sum(-1)
    score_shifted = (rope(q, p + t) * rope(k, r + t)).sum(-1)
    torch.testing.assert_close(score_shifted, score, rtol=1e-10, atol=1e-10)
    # the score equals <q, R(r - p) k>: rotate the key alone by the difference
    torch.testing.assert_close((q * rope(k, r - p)).sum(-1), score, rtol=1e-10, atol=1e-10)
    # and it does depend on the relative position (not a constant)
    assert not torch.allclose((rope(q, p) * rope(k, r + 1.0)).sum(-1), score)


def test_rotation_is_orthogonal_and_identity_at_origin():
    rope = MultilevelRotaryEncoding(2, 8, 2).double()
    x = torch.randn(10, 2, 8, dtype=torch.float64)
    u = torch.rand(10, 3, dtype=torch.float64) * 100
    torch.testing.assert_close(rope(x, u).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(10, 3, dtype=torch.float64)), x)


def test_split_half_pairing_against_complex_rotation():
    freqs, _ = init_rope_frequencies(2, 8, 2, share_heads=False, freq_group_pattern="single")
    freqs = freqs.double()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    u = torch.rand(4, 3, dtype=torch.float64) * 20
    theta = torch.einsum("pk,hjk->phj", u, freqs)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * theta)
    torch.testing.assert_close(apply_rope(x, u, freqs), torch.cat([z.real, z.imag], -1))


@pytest.mark.parametrize("dim", [2, 3])
def test_frequency_groups_and_init(dim):
    assert rope_freq_groups("single", dim) == [tuple(range(dim + 1))]
    assert rope_freq_groups("axial", dim) == [(k,) for k in range(dim + 1)]
    assert rope_freq_groups("spatial_level", dim) == [tuple(range(dim)), (dim,)]
    n_groups = dim + 1
    d = 4 * n_groups  # 2 pairs per group
    freqs, mask = init_rope_frequencies(3, d, dim, 100.0, 10.0, False, "axial")
    assert freqs.shape == mask.shape == (3, d // 2, dim + 1)
    for g in range(n_groups):  # group g = coordinate g; pairs 2g, 2g+1
        assert mask[:, 2 * g : 2 * g + 2].sum(-1).eq(1).all() and mask[:, 2 * g : 2 * g + 2, g].eq(1).all()
        base = 10.0 if g == dim else 100.0
        torch.testing.assert_close(freqs[:, 2 * g : 2 * g + 2, g], torch.tensor([1.0, base**-0.5]).expand(3, 2))
    assert torch.equal(freqs * mask, freqs)
    # single: spatial magnitudes follow the spectrum, level coordinate the level spectrum
    freqs, mask = init_rope_frequencies(2, 8, dim, 100.0, 10.0, True, "single")
    assert freqs.shape[0] == 1 and mask.eq(1).all()
    j = torch.arange(4.0)
    torch.testing.assert_close(freqs[0, :, :dim].norm(dim=-1), 100.0 ** (-j / 4))
    torch.testing.assert_close(freqs[0, :, dim], 10.0 ** (-j / 4))


def test_frequencies_are_learnable_and_stay_in_their_groups():
    rope = MultilevelRotaryEncoding(2, 12, 2, freq_group_pattern="axial")
    x = torch.randn(6, 2, 12)
    u = torch.rand(6, 3) * 10
    w = torch.randn(6, 2, 12)
    (rope(x, u) * w).sum().backward()  # (a rotation preserves norms: |rope(x)|^2 has no gradient)
    assert rope.freqs.grad is not None and rope.freqs.grad.abs().sum() > 0
    assert torch.equal(rope.freqs.grad * (1 - rope.freq_mask), torch.zeros_like(rope.freqs.grad))


def test_errors():
    with pytest.raises(ValueError, match="rope_freq_group_pattern"):
        rope_freq_groups("checkerboard", 2)
    with pytest.raises(ValueError, match="split equally"):
        rope_group_sizes(8, 3, True)
    assert rope_group_sizes(8, 3, False) == [3, 3, 2]
    assert rope_group_sizes(2, 3, False) == [1, 1, 0]  # trailing groups may be empty (reference rule)
    with pytest.raises(ValueError, match="even head_dim"):
        init_rope_frequencies(2, 7, 2)
    with pytest.raises(ValueError, match="rope_level_base_theta"):
        init_rope_frequencies(2, 8, 2, level_base_theta=0.0)


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
@pytest.mark.parametrize("share_heads", [False, True])
def test_gradcheck_custom_backward_through_x_positions_and_frequencies(share_heads, path, monkeypatch):
    if path == "kernel":
        _rope_kernel(monkeypatch)
    else:
        monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    rope = MultilevelRotaryEncoding(2, 8, 3, share_heads=share_heads).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    u = (torch.rand(3, 4, dtype=torch.float64) * 5).requires_grad_(True)
    f = rope.freqs.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(apply_rope, (x, u, f))
    # positions broadcast over leading dims of x
    x2 = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(apply_rope, (x2, u, f))


def test_float32_rotation_matches_float64():
    rope = MultilevelRotaryEncoding(4, 16, 2)
    x = torch.randn(50, 4, 16, dtype=torch.float64)
    u = torch.rand(50, 3, dtype=torch.float64) * torch.tensor([1600.0, 1400.0, 3.0], dtype=torch.float64)
    f = rope.frequencies().detach()
    ref = apply_rope(x, u, f.double())
    out = apply_rope(x.float(), u.float(), f)  # angles up to ~1e3 rad, reduced before float32 trig
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)


def test_all_pattern_share_combinations_construct_in_block():
    from sparse_msda import SparseNeighborhoodAttentionBlock

    for pattern, share in itertools.product(PATTERNS, [False, True]):
        block = SparseNeighborhoodAttentionBlock(48, 2, rope_freq_group_pattern=pattern, rope_share_heads=share)
        assert block.rope.freqs.shape == (1 if share else 2, 12, 3)


def _rope_problem(n, n_heads, head_dim, share_heads, dtype, seed=0):
    """Positions up to ~1600 cells (the 3D scans' full scale; angles up to ~1e3 rad), all three
    inputs requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    freqs, _ = init_rope_frequencies(n_heads, head_dim, 3, share_heads=share_heads, generator=gen)
    x = torch.randn(n, n_heads, head_dim, generator=gen, dtype=dtype)
    scale = torch.tensor([41.0, 1600.0, 1408.0, 3.0], dtype=torch.float64)
    u = (torch.rand(n, 4, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return [t.to(dtype).requires_grad_() for t in (x, u, freqs)]


def _rope_run(inputs, monkeypatch, flag, seed=1):
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
    y = apply_rope(*inputs)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return [y.detach(), *torch.autograd.grad((y * w).sum(), inputs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("share_heads", [False, True])
def test_kernel_matches_pytorch_path(dtype, share_heads, monkeypatch):
    """The C++ kernel (csrc/rope_cpu.cpp: angles reduced to [-pi/4, pi/4] in float64, Taylor
    cos/sin in x's dtype, float64 frequency gradient) against the PyTorch path (reduced to
    [0, 2 pi), torch cos/sin): output and the gradients w.r.t. x, positions and frequencies.
    Both are also held to the float64 rotation (the PyTorch path on float64 inputs)."""
    _rope_kernel(monkeypatch)
    inputs = _rope_problem(3000, 4, 16, share_heads, dtype)  # > 1024 rows: several dfreqs blocks
    kernel = _rope_run(inputs, monkeypatch, "1")
    pytorch = _rope_run(inputs, monkeypatch, "0")
    exact = _rope_run([t.detach().double().requires_grad_() for t in inputs], monkeypatch, "0")
    names = ("y", "dx", "dpositions", "dfreqs")
    for name, a, b, e in zip(names, kernel, pytorch, exact):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        else:  # float32 trigonometry of angles ~1e3 rad: the two paths round differently
            scale = e.abs().max().item()
            err_k, err_p = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            # the kernel is no less accurate than the PyTorch path (up to round-off of the error itself)
            assert err_k <= 2 * err_p + 1e-6 * scale, (name, err_k, err_p, scale)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_kernel_frequency_gradient_independent_of_threads(monkeypatch):
    """The frequencies' gradient is summed per block of rows, then over blocks in order: the same
    bits with 1 and 2 threads."""
    _rope_kernel(monkeypatch)
    inputs = _rope_problem(5000, 2, 8, False, torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _rope_run(inputs, monkeypatch, "1")
        torch.set_num_threads(2)
        two = _rope_run(inputs, monkeypatch, "1")
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_kernel_large_angles_match_float64(monkeypatch):
    """Angles of ~1e4 rad (positions far out times frequencies near 1) and exact multiples of
    pi/2 (position 0, quadrant boundaries): the float32 kernel within float32 round-off of the
    float64 rotation."""
    _rope_kernel(monkeypatch)
    freqs = torch.zeros(1, 4, 2, dtype=torch.float64)
    freqs[0, :, 0] = torch.tensor([1.0, 0.5, 1e-3, 0.0])
    freqs[0, :, 1] = torch.tensor([0.0, 0.25, 1.0, 1.0])
    u = torch.tensor([[0.0, 0.0], [1e4, -3e3], [math.pi / 2, 0.0], [math.pi, -math.pi], [-2.5e3, 7.77]], dtype=torch.float64)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    exact = apply_rope(x, u, freqs)  # the PyTorch path in float64
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    out = apply_rope(x.float(), u, freqs.float())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(apply_rope(x, u, freqs), exact, rtol=0, atol=1e-12)  # float64 kernel


@pytest.mark.parametrize("grad_in_place", [True, False])
@pytest.mark.parametrize("share_heads", [False, True])
def test_in_place_projection_rotation_matches_apply_rope(grad_in_place, share_heads, monkeypatch):
    """apply_rope_to_projection (the blocks' q / k: rotated in place on the kernel, the backward
    writing dx over the incoming gradient) gives apply_rope's output and gradients bit for bit,
    rotates the projection's own storage, and passes gradcheck."""
    from sparse_msda import tuning
    from sparse_msda.functional.rope import apply_rope_to_projection

    _rope_kernel(monkeypatch)
    monkeypatch.setattr(tuning, "ROPE_GRAD_IN_PLACE", grad_in_place)
    x, u, f = _rope_problem(1500, 4, 16, share_heads, torch.float32)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = apply_rope(x * 1, u, f)
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, u, f))
    proj = x.reshape(x.shape[0], -1) * 1  # a fresh non-leaf (not a view), as a projection's output
    storage = proj.data_ptr()
    out = apply_rope_to_projection(proj, u, f, x.shape[1])
    assert out.shape == x.shape and out.data_ptr() == storage
    grads = torch.autograd.grad((out * w).sum(), (x, u, f))
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    x64, u64, f64 = (t.detach()[:7].double().requires_grad_() for t in (x, u, f))
    u64 = (u64.detach() / 100).requires_grad_()  # moderate angles for the finite differences
    assert torch.autograd.gradcheck(
        lambda a, b, c: apply_rope_to_projection(a.reshape(7, -1) * 1, b, c, 4), (x64, u64, f64)
    )
