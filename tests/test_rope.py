"""Rotary position encoding over (full-scale position, level)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparse_msda.functional.rope import (
    apply_rope,
    init_rope_frequencies,
    rope_freq_groups,
    rope_group_sizes,
)
from sparse_msda.modules.neighborhood_attention import MultilevelRotaryEncoding

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


@pytest.mark.parametrize("share_heads", [False, True])
def test_gradcheck_custom_backward_through_x_positions_and_frequencies(share_heads):
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
