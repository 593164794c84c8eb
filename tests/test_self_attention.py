"""Multi-level sparse self-attention (global window) against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from adapters import SparseCoordinateIndex, coo_stack_to_spconv
from sparse_msda import SparseMultilevelMapAttentionBlock, SparseNeighborhoodAttentionBlock
from sparse_msda.functional.self_attention import group_rows_by_batch, multilevel_self_attention
from tests.window_maps import make_map, random_queries

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def make_block(E, H, L, dim, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    block = SparseMultilevelMapAttentionBlock(E, H, n_levels=L, position_dim=dim, **kw).to(dtype)
    with torch.no_grad():  # non-trivial norm / bias so the reference checks them
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.2, 0.2)
        for lin in (block.q_proj, block.kv_proj, block.out_proj):
            if lin.bias is not None:
                lin.bias.uniform_(-0.2, 0.2)
    return block


# ------------------------------------------------------------------------------------------
# naive reference: python loop over queries, scan of the voxel list, dense softmax,
# RoPE as complex multiplication by exp(i * <freqs, u>) (independent of sparse_msda.functional.rope)
# ------------------------------------------------------------------------------------------
def naive_block(block, query, positions, offsets, voxels, feats, shapes, query_levels=None, query_mask=None):
    E, H = block.embed_dim, block.n_heads
    d = E // H
    shapes_t = torch.tensor(shapes, dtype=torch.float64)
    big = int(torch.argmax(shapes_t.prod(-1)))
    full = shapes_t[big]
    freqs = block.rope.frequencies().detach().to(torch.float64)  # [H', d/2, D+1]

    def lin(x, m):
        return x @ m.weight.T + (m.bias if m.bias is not None else 0)

    def rot(x, u):  # x [H, d] split-half pairs (x_j, x_{j+d/2}) = complex x_j + i x_{j+d/2}
        theta = (freqs * u).sum(-1).expand(H, d // 2)
        z = torch.complex(x[:, : d // 2].to(torch.float64), x[:, d // 2 :].to(torch.float64)) * torch.exp(1j * theta)
        return torch.cat([z.real, z.imag], -1).to(x.dtype)

    def norm(x):
        return torch.nn.functional.layer_norm(x, (E,), block.norm.weight, block.norm.bias, block.norm.eps)

    out = []
    for i in range(query.shape[0]):
        x = query[i]
        if query_mask is not None and bool(query_mask[i]):
            out.append(x)
            continue
        b = max(j for j in range(len(offsets) - 1) if int(offsets[j]) <= i)
        ql = big if query_levels is None else int(query_levels[i])
        h = norm(x) if block.norm_first else x
        uq = torch.cat([positions[i].to(torch.float64), torch.tensor([float(ql)], dtype=torch.float64)])  # full-scale
        q = rot(lin(h, block.q_proj).view(H, d), uq)
        ks, vs = [], []
        for j, (vb, level, cell) in enumerate(voxels):  # every voxel of the item, every level
            if vb != b:
                continue
            kv = lin(feats[j], block.kv_proj).view(2, H, d)
            uk = torch.cat([(torch.tensor(cell, dtype=torch.float64) + 0.5) / shapes_t[level] * full,
                            torch.tensor([float(level)], dtype=torch.float64)])
            ks.append(rot(kv[0], uk))
            vs.append(kv[1])
        if ks:
            K, V = torch.stack(ks, 1), torch.stack(vs, 1)  # [H, n, d]
            a = torch.softmax((q[:, None, :] * K).sum(-1) / math.sqrt(d), dim=-1)
            branch = lin((a[..., None] * V).sum(1).reshape(E), block.out_proj)
        else:
            branch = torch.zeros(E, dtype=x.dtype)
        y = x + branch
        out.append(y if block.norm_first else norm(y))
    return torch.stack(out)


SHAPES = {2: [[12, 10], [6, 5], [3, 3]], 3: [[6, 8, 8], [3, 4, 4]]}


# ------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("variant", ["prenorm", "postnorm_bias_levels"])
def test_parity_with_naive_reference(dim, variant):
    shapes = SHAPES[dim]
    L, E, H = len(shapes), 16, 2
    kw = dict(norm_first=variant == "prenorm", bias=variant != "prenorm")
    if variant != "prenorm":
        kw.update(rope_freq_group_pattern="axial" if dim == 3 else "spatial_level", rope_share_heads=True)
    block = make_block(E, H, L, dim, **kw)
    stacked, voxels, feats = make_map(shapes, 2, 0.3, E, seed=dim)
    pos, offsets = random_queries([7, 5], shapes[0], seed=3)
    query = torch.randn(pos.shape[0], E, dtype=torch.float64)
    qlev = None
    if variant != "prenorm":  # queries in other levels' frames
        qlev = torch.randint(0, L, (pos.shape[0],), generator=torch.Generator().manual_seed(4))
    out = block(query, pos, offsets, stacked, shapes, query_level_indices=qlev)
    ref = naive_block(block, query, pos, offsets, voxels, feats, shapes, qlev)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_spconv_levels_input_and_prebuilt_index_match_coo_stack():
    shapes = SHAPES[2]
    block = make_block(16, 2, 3, 2)
    stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=5)
    pos, offsets = random_queries([6, 6], shapes[0], seed=6)
    query = torch.randn(12, 16, dtype=torch.float64)
    out_coo = block(query, pos, offsets, stacked, shapes)
    levels = coo_stack_to_spconv(stacked, shapes)
    out_sp = block(query, pos, offsets, levels, None)  # voxel rows level-major: not grouped by item
    out_idx = block(query, pos, offsets, levels, None, coordinate_index=SparseCoordinateIndex.from_spconv(levels))
    torch.testing.assert_close(out_sp, out_coo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_idx, out_coo, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_matches_neighborhood_block_with_windows_covering_the_map(dim):
    """Independent cross-check: the neighborhood block's state_dict loads (strict) and, with
    windows large enough to cover every level from any in-bounds query, gives the same output."""
    shapes = SHAPES[dim]
    L, E, H = len(shapes), 16, 2
    sizes = [2 * max(s) - 1 for s in shapes]
    kw = dict(bias=True, norm_first=dim == 2, rope_freq_group_pattern="spatial_level")
    torch.manual_seed(11)
    nb = SparseNeighborhoodAttentionBlock(E, H, n_levels=L, neighborhood_sizes=sizes, position_dim=dim, **kw).double()
    with torch.no_grad():
        for p in nb.parameters():  # randomise everything (norm, biases) so every weight matters
            p.add_(0.1 * torch.randn_like(p))
        nb.rope.freqs.mul_(nb.rope.freq_mask)  # frequencies stay in their groups (else loading raises)
    sa = SparseMultilevelMapAttentionBlock(E, H, n_levels=L, position_dim=dim, **kw).double()
    sa.load_state_dict(nb.state_dict(), strict=True)
    assert set(sa.state_dict()) == set(nb.state_dict())
    stacked, _, _ = make_map(shapes, 2, 0.35, E, seed=12 + dim)
    pos, offsets = random_queries([9, 8], shapes[0], seed=13)
    qlev = torch.randint(0, L, (17,), generator=torch.Generator().manual_seed(14))
    query = torch.randn(17, E, dtype=torch.float64)
    out_nb = nb(query, pos, offsets, stacked, shapes, query_level_indices=qlev)
    out_sa = sa(query, pos, offsets, stacked, shapes, query_level_indices=qlev)
    torch.testing.assert_close(out_sa, out_nb, rtol=1e-10, atol=1e-10)
    # control: smaller windows (not covering the map) differ
    nb_small = SparseNeighborhoodAttentionBlock(E, H, n_levels=L, neighborhood_sizes=[3] * L, position_dim=dim, **kw).double()
    nb_small.load_state_dict(sa.state_dict(), strict=True)
    assert not torch.allclose(nb_small(query, pos, offsets, stacked, shapes, query_level_indices=qlev), out_sa, atol=1e-4)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
def test_gradcheck_functional_core_with_empty_item(one_thread):
    g = torch.Generator().manual_seed(0)
    H, d = 2, 4
    q = torch.randn(6, H, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(7, H, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(7, H, d, dtype=torch.float64, generator=g, requires_grad=True)
    qo = torch.tensor([0, 3, 5, 5, 6])  # item 2 has no query, item 1 has no key
    ko = torch.tensor([0, 4, 4, 5, 7])
    out, has_key = multilevel_self_attention(q, k, v, qo, ko)
    assert has_key.tolist() == [True, True, True, False, False, True]
    assert torch.equal(out[3:5], torch.zeros(2, H, d, dtype=torch.float64))
    # against a dense softmax per item
    ref = torch.zeros_like(out)
    for b in range(4):
        q0, q1, k0, k1 = int(qo[b]), int(qo[b + 1]), int(ko[b]), int(ko[b + 1])
        if q1 > q0 and k1 > k0:
            s = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]) / math.sqrt(d)
            ref[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[k0:k1])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: multilevel_self_attention(q, k, v, qo, ko)[0], (q, k, v))


def test_gradcheck_block_through_query_positions_features(one_thread):
    shapes = [[8, 6], [4, 3]]
    block = make_block(8, 2, 2, 2, bias=True)
    stacked, _, _ = make_map(shapes, 2, 0.3, 8, seed=21)
    st = stacked.coalesce()
    idx = st.indices()
    voxels = [(int(c[0]), int(c[-1]), tuple(c[1:-1].tolist())) for c in idx.T]  # coalesced row order
    pos, offsets = random_queries([3, 2], shapes[0], seed=22)
    query = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    pos.requires_grad_(True)
    vals = st.values().clone().requires_grad_(True)

    def fn(query, pos, vals):
        return block(query, pos, offsets, torch.sparse_coo_tensor(idx, vals, st.shape), shapes)

    assert torch.autograd.gradcheck(fn, (query, pos, vals), eps=1e-6, atol=1e-6)
    # parameter gradients equal those of the naive reference (the reference's RoPE uses
    # detached frequencies: those are checked against a finite difference instead)
    out = fn(query, pos, vals)
    ref = naive_block(block, query, pos, offsets, voxels, vals, shapes)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    params = [block.rope.freqs, block.q_proj.weight, block.kv_proj.weight, block.kv_proj.bias, block.out_proj.weight,
              block.norm.weight]
    g1 = torch.autograd.grad((out * w).sum(), params)
    g2 = torch.autograd.grad((ref * w).sum(), params[1:])
    for a, b in zip(g1[1:], g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    direction = torch.randn_like(block.rope.freqs)
    e = 1e-6
    with torch.no_grad():
        block.rope.freqs += e * direction
        plus = (fn(query, pos, vals) * w).sum()
        block.rope.freqs -= 2 * e * direction
        minus = (fn(query, pos, vals) * w).sum()
        block.rope.freqs += e * direction
    torch.testing.assert_close((g1[0] * direction).sum(), (plus - minus) / (2 * e), rtol=1e-5, atol=1e-7)


def test_backward_keeps_no_query_by_key_matrix():
    """Memory: nothing the autograd graph saves has Q_b * N_b elements (flash path)."""
    shapes = [[64, 64], [32, 32]]
    E = 8
    block = make_block(E, 2, 2, 2, dtype=torch.float32)
    stacked, voxels, _ = make_map(shapes, 1, 0.4, E, dtype=torch.float32, seed=23)
    n_vox = len(voxels)
    n_q = 1500
    pos, offsets = random_queries([n_q], shapes[0], dtype=torch.float32, seed=24)
    query = torch.randn(n_q, E, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(query, pos, offsets, stacked, shapes)
    assert n_q * n_vox / 10 > 8 * max(n_q, n_vox) * E  # legit per-row tensors stay far below the bound
    assert max(saved) < n_q * n_vox / 10, (max(saved), n_q, n_vox)
    # control: the math backend saves the [H, Q, N] attention matrix, and the check sees it
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved.clear()
    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(query, pos, offsets, stacked, shapes)
    assert max(saved) >= n_q * n_vox
    out.sum().backward()
    assert torch.isfinite(query.grad).all()


# ------------------------------------------------------------------------------------------
# invariances / isolation of items
# ------------------------------------------------------------------------------------------
def test_translation_invariance():
    shapes = [[64, 64], [32, 32], [16, 16], [8, 8]]  # coarsest stride 8 full-scale cells
    E = 32
    block = make_block(E, 4, 4, 2, dtype=torch.float32, bias=True, norm_first=False)
    stacked, _, _ = make_map(shapes, 2, 0.15, E, dtype=torch.float32, seed=31, region=(0, 32))
    pos, offsets = random_queries([20, 15], [64, 64], dtype=torch.float32, seed=32, lo=0, hi=32)
    qlev = torch.randint(0, 4, (35,), generator=torch.Generator().manual_seed(33))
    pos_l = pos  # full-scale positions whatever the query's level
    query = torch.randn(35, E)
    out = block(query, pos_l, offsets, stacked, shapes, query_level_indices=qlev)
    shift_full = torch.tensor([24, 16])  # multiples of 8
    st = stacked.coalesce()
    idx = st.indices().clone()
    stride = torch.tensor([1, 2, 4, 8])[idx[-1]]
    idx[1:3] += shift_full[:, None] // stride[None]
    shifted = torch.sparse_coo_tensor(idx, st.values(), st.shape)
    pos_s = pos + shift_full.float()
    out_s = block(query, pos_s, offsets, shifted, shapes, query_level_indices=qlev)
    torch.testing.assert_close(out_s, out, rtol=1e-5, atol=1e-5)
    # control: moving the queries alone changes the relative positions, hence the output
    assert not torch.allclose(block(query, pos_s, offsets, stacked, shapes, query_level_indices=qlev), out, atol=1e-3)


def test_permutation_equivariance_over_queries():
    shapes = SHAPES[2]
    block = make_block(16, 2, 3, 2)
    stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=41)
    pos, offsets = random_queries([9, 6], shapes[0], seed=42)
    query = torch.randn(15, 16, dtype=torch.float64)
    perm = torch.cat([torch.randperm(9), 9 + torch.randperm(6)])
    out = block(query, pos, offsets, stacked, shapes)
    out_p = block(query[perm], pos[perm], offsets, stacked, shapes)
    torch.testing.assert_close(out_p, out[perm], rtol=1e-12, atol=1e-12)


def test_every_voxel_of_the_item_matters_and_no_voxel_of_other_items():
    shapes = [[16, 16], [8, 8]]
    block = make_block(16, 2, 2, 2)
    stacked, voxels, _ = make_map(shapes, 2, 0.3, 16, seed=51)
    st = stacked.coalesce()
    idx, vals = st.indices(), st.values()
    pos, offsets = random_queries([4, 4], [16, 16], seed=52, lo=0, hi=3)  # near one corner
    query = torch.randn(8, 16, dtype=torch.float64)
    out = block(query, pos, offsets, st, shapes)
    # the farthest voxel of item 1 at the coarsest level: changes item 1's queries only
    far = max((j for j in range(idx.shape[1]) if int(idx[0, j]) == 1 and int(idx[-1, j]) == 1),
              key=lambda j: int(idx[1:3, j].sum()))
    v2 = vals.clone()
    v2[far] += 5.0
    out2 = block(query, pos, offsets, torch.sparse_coo_tensor(idx, v2, st.shape), shapes)
    assert torch.equal(out2[:4], out[:4])
    assert not torch.allclose(out2[4:], out[4:], atol=1e-6)


# ------------------------------------------------------------------------------------------
# query_mask / empty items / dropout
# ------------------------------------------------------------------------------------------
def test_query_mask_rows_returned_exactly_and_others_unchanged():
    shapes = SHAPES[2]
    for norm_first in (True, False):
        block = make_block(16, 2, 3, 2, norm_first=norm_first)
        stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=61)
        pos, offsets = random_queries([6, 6], shapes[0], seed=62)
        query = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([True, False] * 6)
        out = block(query, pos, offsets, stacked, shapes, query_mask=mask)
        full = block(query, pos, offsets, stacked, shapes)
        assert torch.equal(out[mask], query[mask])
        torch.testing.assert_close(out[~mask], full[~mask], rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(out[mask].sum(), query)
        assert torch.equal(grad[mask], torch.ones(6, 16, dtype=torch.float64)) and not grad[~mask].any()
        all_masked = block(query, pos, offsets, stacked, shapes, query_mask=torch.ones(12, dtype=torch.bool))
        assert torch.equal(all_masked, query)


@pytest.mark.parametrize("norm_first", [True, False])
def test_item_without_voxels_returns_residual(norm_first):
    shapes = [[8, 8], [4, 4]]
    block = make_block(16, 2, 2, 2, bias=True, norm_first=norm_first)  # out_proj bias must not leak in
    stacked, voxels, feats = make_map(shapes, 3, 0.3, 16, seed=71, empty_items=(1,))
    pos, offsets = random_queries([3, 4, 0], [8, 8], seed=72)  # item 2 has voxels but no query
    query = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    out = block(query, pos, offsets, stacked, shapes)
    expect = query[3:] if norm_first else block.norm(query[3:])
    assert torch.equal(out[3:], expect)
    torch.testing.assert_close(out, naive_block(block, query, pos, offsets, voxels, feats, shapes), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert torch.isfinite(query.grad).all()
    for p in block.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    empty = torch.sparse_coo_tensor(torch.zeros(4, 0, dtype=torch.int64), torch.zeros(0, 16, dtype=torch.float64), (3, 8, 8, 2, 16))
    out_e = block(query, pos, offsets, empty, shapes)
    assert torch.equal(out_e, query if norm_first else block.norm(query))


def test_dropout_acts_on_the_branch_only():
    shapes = SHAPES[2]
    block = make_block(16, 2, 3, 2, dropout=1.0)
    stacked, _, _ = make_map(shapes, 1, 0.3, 16, seed=75)
    pos, offsets = random_queries([5], shapes[0], seed=76)
    query = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(block.train()(query, pos, offsets, stacked, shapes), query)
    assert not torch.allclose(block.eval()(query, pos, offsets, stacked, shapes), query)


def test_group_rows_by_batch():
    b = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    rows, off = group_rows_by_batch(b, 3)
    assert rows.tolist() == [1, 3, 2, 6, 0, 4, 5] and off.tolist() == [0, 2, 4, 7]
    rows, off = group_rows_by_batch(b, 3, torch.tensor([True, False, True]))
    assert rows.tolist() == [1, 3, 0, 4, 5] and off.tolist() == [0, 2, 2, 5]
    rows, off = group_rows_by_batch(torch.tensor([0, 0, 1, 3]), 4)
    assert rows is None and off.tolist() == [0, 2, 3, 3, 4]
    rows, off = group_rows_by_batch(torch.tensor([0, 0, 1, 3]), 4, torch.tensor([False, True, True, True]))
    assert rows.tolist() == [2, 3] and off.tolist() == [0, 0, 1, 1, 2]


# ------------------------------------------------------------------------------------------
# errors / repr
# ------------------------------------------------------------------------------------------
def test_constructor_errors():
    with pytest.raises(ValueError, match="position_dim"):
        SparseMultilevelMapAttentionBlock(16, 2, position_dim=4)
    with pytest.raises(ValueError, match="n_levels"):
        SparseMultilevelMapAttentionBlock(16, 2, n_levels=0)
    with pytest.raises(ValueError, match="dropout"):
        SparseMultilevelMapAttentionBlock(16, 2, dropout=1.5)
    with pytest.raises(ValueError, match="divisible"):
        SparseMultilevelMapAttentionBlock(16, 3)
    with pytest.raises(ValueError, match="even head_dim"):
        SparseMultilevelMapAttentionBlock(18, 6)
    with pytest.raises(ValueError, match="rope_freq_group_pattern"):
        SparseMultilevelMapAttentionBlock(16, 2, rope_freq_group_pattern="diagonal")
    with pytest.raises(TypeError, match="neighborhood_sizes"):
        SparseMultilevelMapAttentionBlock(16, 2, neighborhood_sizes=[3, 5, 7, 9])


def test_forward_errors():
    shapes = SHAPES[2]
    block = make_block(16, 2, 3, 2)
    stacked, _, _ = make_map(shapes, 1, 0.3, 16, seed=81)
    pos, offsets = random_queries([4], shapes[0], seed=82)
    query = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="background_embedding is not supported.*dense grid"):
        block(query, pos, offsets, stacked, shapes, background_embedding=torch.zeros(1, 3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        block(query, pos.long(), offsets, stacked, shapes)
    with pytest.raises(ValueError, match="query_spatial_positions"):
        block(query, torch.rand(4, 3, dtype=torch.float64), offsets, stacked, shapes)
    with pytest.raises(ValueError, match="n_levels"):
        make_block(16, 2, 2, 2)(query, pos, offsets, stacked, shapes)
    with pytest.raises(ValueError, match="query_batch_offsets"):
        block(query, pos, torch.tensor([0, 3]), stacked, shapes)
    with pytest.raises(ValueError, match="query_mask"):
        block(query, pos, offsets, stacked, shapes, query_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask"):
        block(query, pos, offsets, stacked, shapes, query_mask=torch.zeros(4))
    with pytest.raises(ValueError, match="q \\[Q, H, d\\]"):
        multilevel_self_attention(torch.zeros(2, 2, 4), torch.zeros(3, 2, 6), torch.zeros(3, 2, 6), torch.tensor([0, 2]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="key_offsets"):
        multilevel_self_attention(torch.zeros(2, 2, 4), torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), torch.tensor([0, 2]), torch.tensor([0, 2]))


def test_extra_repr():
    r = repr(SparseMultilevelMapAttentionBlock(32, 4, n_levels=2, position_dim=3, dropout=0.1))
    assert "n_levels=2" in r and "position_dim=3" in r and "dropout=0.1" in r and "freq_group_pattern='single'" in r


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    shapes = SHAPES[3]
    block = make_block(32, 4, 2, 3, dtype=torch.float32, bias=True)
    stacked, _, _ = make_map(shapes, 2, 0.3, 32, dtype=torch.float32, seed=91)
    pos, offsets = random_queries([10, 7], shapes[0], dtype=torch.float32, seed=92)
    query = torch.randn(17, 32, requires_grad=True)
    out = block(query, pos, offsets, stacked, shapes)
    (g,) = torch.autograd.grad(out.square().sum(), query)
    block_c = block.cuda()
    qc = query.detach().cuda().requires_grad_(True)
    out_c = block_c(qc, pos.cuda(), offsets.cuda(), stacked.cuda(), shapes)
    (gc,) = torch.autograd.grad(out_c.square().sum(), qc)
    torch.testing.assert_close(out_c.cpu(), out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gc.cpu(), g, rtol=1e-4, atol=1e-4)
