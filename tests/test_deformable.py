"""Sparse multi-scale deformable attention against independent dense references (issue 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import SparseCoordinateIndex, coo_stack_to_spconv
from sparse_msda import (
    SparseMSDeformableAttention,
    SparseMSDeformableAttentionBlock,
    sparse_split_heads,
)
from sparse_msda.functional.deformable import sparse_bilinear_sample
from tests.dense_reference import DenseMSDeformAttn, densify_levels

SHAPES = {
    2: [[12, 10], [6, 5], [3, 3]],
    3: [[6, 8, 7], [3, 4, 4], [2, 2, 2]],
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers
def random_map(shapes, batch_size, channels, occupancy, dtype, gen, empty_items=()):
    """Coalesced COO stack ``[B, *max_shape, L, C]`` with each site present with prob ``occupancy``."""
    shapes = torch.tensor(shapes)
    dim = shapes.shape[1]
    rows = []
    for b in range(batch_size):
        if b in empty_items:
            continue
        for lvl, shape in enumerate(shapes.tolist()):
            grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, dim)
            keep = torch.rand(grid.shape[0], generator=gen) < occupancy
            grid = grid[keep]
            rows.append(torch.cat([torch.full((len(grid), 1), b), grid, torch.full((len(grid), 1), lvl)], 1))
    idx = torch.cat(rows).T if rows else torch.zeros(dim + 2, 0, dtype=torch.int64)
    values = torch.randn(idx.shape[1], channels, generator=gen, dtype=dtype)
    size = (batch_size, *shapes.max(0).values.tolist(), len(shapes), channels)
    return torch.sparse_coo_tensor(idx, values, size).coalesce(), shapes


def randomize(module, gen, offset_scale=1.5):
    """Random offsets (some points fall outside the map) and non-uniform attention weights."""
    with torch.no_grad():
        for lin in (module.sampling_offsets, module.attention_weights):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * offset_scale)
        for lin in (module.value_proj, module.output_proj):
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
    return module


def random_queries(counts, shapes, embed_dim, dtype, gen, several_levels=True):
    shapes = torch.as_tensor(shapes)
    n = sum(counts)
    levels = torch.randint(0, len(shapes), (n,), generator=gen) if several_levels else None
    lvl_shapes = shapes[levels] if several_levels else shapes[int(shapes.prod(-1).argmax())].expand(n, -1)
    # positions in [-0.5, shape + 0.5): a few references outside the map too
    pos = (torch.rand(n, shapes.shape[1], generator=gen, dtype=dtype) * (lvl_shapes + 1) - 0.5).to(dtype)
    query = torch.randn(n, embed_dim, generator=gen, dtype=dtype)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return query, pos, offsets, levels


def dense_output(module, query, pos, offsets, stack, shapes, levels=None, background=None):
    """Deformable DETR's dense MSDeformAttn (state loaded from ``module``) on the densified projected map."""
    dim = shapes.shape[1]
    dense = DenseMSDeformAttn(module.embed_dim, module.n_levels, module.n_heads, module.n_points, dim).to(query.dtype)
    dense.load_state_dict(module.state_dict())
    st = stack.coalesce()
    idx = st.indices()
    value = dense.value_proj(st.values())
    bg = None if background is None else dense.value_proj(background)
    b_size = stack.shape[0]
    value_list = densify_levels(value, idx[0], idx[-1], idx[1:-1].T, shapes, b_size, bg)
    if levels is None:
        levels = torch.full((query.shape[0],), int(shapes.prod(-1).argmax()))
    ref = (pos / shapes[levels].to(pos.dtype)).flip(-1)  # normalised, (x, y[, z])
    outs = []
    for b in range(b_size):
        s, e = int(offsets[b]), int(offsets[b + 1])
        ref_b = ref[s:e][None, :, None, :].expand(1, e - s, len(shapes), dim)
        outs.append(dense.forward_projected(query[s:e][None], ref_b, [v[b : b + 1] for v in value_list], shapes)[0])
    return torch.cat(outs)


# ----------------------------------------------------------------------------- (a) parity
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("occupancy", [1.0, 0.35])
@pytest.mark.parametrize("with_background", [False, True])
def test_parity_with_dense_msdeformattn(dim, dtype, occupancy, with_background, backend):
    gen = torch.Generator().manual_seed(dim * 100 + int(occupancy * 10) + with_background)
    embed, heads, points = 16, 4, 3
    shapes = SHAPES[dim]
    stack, shapes_t = random_map(shapes, 2, embed, occupancy, dtype, gen)
    module = randomize(SparseMSDeformableAttention(embed, heads, len(shapes), points, dim), gen).to(dtype)
    query, pos, offsets, levels = random_queries([7, 5], shapes, embed, dtype, gen)
    bg = torch.randn(2, len(shapes), embed, generator=gen, dtype=dtype) if with_background else None
    out = module(query, pos, offsets, stack, shapes_t, query_level_indices=levels, background_embedding=bg)
    ref = dense_output(module, query, pos, offsets, stack, shapes_t, levels, bg)
    assert out.shape == (12, embed)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_parity_default_query_level_and_points_outside(backend):
    """Default query level = largest level; large offsets put most points outside every level."""
    gen = torch.Generator().manual_seed(7)
    stack, shapes = random_map(SHAPES[2], 2, 8, 0.5, torch.float64, gen)
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 4), gen, offset_scale=20.0).double()
    query, pos, offsets, _ = random_queries([4, 6], SHAPES[2], 8, torch.float64, gen, several_levels=False)
    out = module(query, pos, offsets, stack, shapes)
    torch.testing.assert_close(out, dense_output(module, query, pos, offsets, stack, shapes), **TOL[torch.float64])


def test_zero_value_far_outside_equals_output_bias(backend):
    """Every sample far outside the map: the attention output is exactly output_proj(0)."""
    gen = torch.Generator().manual_seed(3)
    stack, shapes = random_map(SHAPES[2], 1, 8, 1.0, torch.float64, gen)
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 2), gen).double()
    query = torch.randn(3, 8, dtype=torch.float64, generator=gen)
    pos = torch.full((3, 2), 1e4, dtype=torch.float64)
    out = module(query, pos, torch.tensor([0, 3]), stack, shapes)
    torch.testing.assert_close(out, module.output_proj.bias.expand(3, -1), atol=0, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dim=st.sampled_from([2, 3]),
    occupancy=st.floats(0.0, 1.0),
    counts=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    background=st.booleans(),
)
def test_hypothesis_parity_random_small_maps(seed, dim, occupancy, counts, background):
    gen = torch.Generator().manual_seed(seed)
    n_levels = int(torch.randint(1, 4, (1,), generator=gen))
    shapes = torch.randint(1, 6, (n_levels, dim), generator=gen).tolist()
    stack, shapes_t = random_map(shapes, len(counts), 4, occupancy, torch.float64, gen)
    module = randomize(SparseMSDeformableAttention(4, 2, n_levels, 2, dim), gen).double()
    query, pos, offsets, levels = random_queries(counts, shapes, 4, torch.float64, gen)
    bg = torch.randn(len(counts), n_levels, 4, generator=gen, dtype=torch.float64) if background else None
    out = module(query, pos, offsets, stack, shapes_t, query_level_indices=levels, background_embedding=bg)
    ref = dense_output(module, query, pos, offsets, stack, shapes_t, levels, bg)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


# ----------------------------------------------------------------------------- grid sample
@pytest.mark.parametrize("dim", [2, 3])
def test_grid_sample_matches_f_grid_sample(dim, backend):
    gen = torch.Generator().manual_seed(11 + dim)
    shapes = SHAPES[dim]
    stack, shapes_t = random_map(shapes, 2, 6, 0.6, torch.float64, gen)
    st_ = stack.coalesce()
    idx = st_.indices()
    bg = torch.randn(2, len(shapes), 6, generator=gen, dtype=torch.float64)
    for background in (None, bg):
        dense = densify_levels(st_.values(), idx[0], idx[-1], idx[1:-1].T, shapes_t, 2, background)
        for lvl, shape in enumerate(shapes):
            n = 40
            shape_f = torch.tensor(shape, dtype=torch.float64)
            pos = torch.rand(2, n, dim, generator=gen, dtype=torch.float64) * (shape_f + 4) - 2
            out = sparse_bilinear_sample(
                stack, pos, torch.arange(2)[:, None], shapes_t, torch.tensor(lvl), background_embedding=background
            )
            grid = (2 * pos / shape_f - 1).flip(-1).reshape(2, n, *([1] * (dim - 1)), dim)
            ref = F.grid_sample(dense[lvl], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            torch.testing.assert_close(out, ref.reshape(2, 6, n).transpose(1, 2), **TOL[torch.float64])


def test_grid_sample_head_split_and_head_indices(backend):
    gen = torch.Generator().manual_seed(5)
    stack, shapes = random_map(SHAPES[2], 2, 8, 0.5, torch.float64, gen)
    split = sparse_split_heads(stack, 4)
    assert split.shape == (*stack.shape[:-1], 4, 2)
    pos = torch.rand(10, 2, generator=gen, dtype=torch.float64) * 6
    b = torch.randint(0, 2, (10,), generator=gen)
    lvl = torch.randint(0, 3, (10,), generator=gen)
    full = sparse_bilinear_sample(stack, pos, b, shapes, lvl)  # [10, 8]
    all_heads = sparse_bilinear_sample(split, pos, b, shapes, lvl)  # [10, 4, 2]
    torch.testing.assert_close(all_heads.reshape(10, 8), full, atol=0, rtol=0)
    h = torch.randint(0, 4, (10,), generator=gen)
    one = sparse_bilinear_sample(split, pos, b, shapes, lvl, head_indices=h)
    torch.testing.assert_close(one, all_heads[torch.arange(10), h], atol=0, rtol=0)


# ----------------------------------------------------------------------------- (b) gradcheck
@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck_module_query_values_background_positions(dim, backend):
    gen = torch.Generator().manual_seed(21 + dim)
    shapes = [[4, 5], [2, 3]] if dim == 2 else [[3, 4, 3], [2, 2, 2]]
    stack, shapes_t = random_map(shapes, 2, 4, 0.6, torch.float64, gen)
    st_ = stack.coalesce()
    module = randomize(SparseMSDeformableAttention(4, 2, 2, 2, dim), gen).double()
    query, pos, offsets, levels = random_queries([2, 1], shapes, 4, torch.float64, gen)
    bg = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64)

    def f(q, values, background, positions):
        m = torch.sparse_coo_tensor(st_.indices(), values, st_.shape, is_coalesced=True)
        return module(q, positions, offsets, m, shapes_t, query_level_indices=levels, background_embedding=background)

    inputs = (query.requires_grad_(), st_.values().clone().requires_grad_(), bg.requires_grad_(), pos.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_grid_sample_values_positions_background(backend):
    gen = torch.Generator().manual_seed(31)
    stack, shapes = random_map([[4, 4], [2, 3]], 1, 3, 0.5, torch.float64, gen)
    st_ = stack.coalesce()
    pos = (torch.rand(6, 2, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    lvl = torch.tensor([0, 0, 0, 1, 1, 1])
    bg = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(values, positions, background):
        m = torch.sparse_coo_tensor(st_.indices(), values, st_.shape, is_coalesced=True)
        return sparse_bilinear_sample(m, positions, torch.tensor(0), shapes, lvl, background_embedding=background)

    assert torch.autograd.gradcheck(f, (st_.values().clone().requires_grad_(), pos, bg), eps=1e-6, atol=1e-7)


def test_gradients_reach_every_parameter():
    gen = torch.Generator().manual_seed(2)
    stack, shapes = random_map(SHAPES[2], 2, 8, 0.5, torch.float32, gen)
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 2), gen)
    query, pos, offsets, levels = random_queries([3, 3], SHAPES[2], 8, torch.float32, gen)
    module(query, pos, offsets, stack, shapes, query_level_indices=levels).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ----------------------------------------------------------------------------- (c) edge cases
@pytest.mark.parametrize(
    "counts,empty_items",
    [([3, 0, 2], ()), ([2, 3, 1], (1,)), ([0, 1, 0], ()), ([0, 0, 0], ()), ([2, 2, 2], (0, 1, 2))],
    ids=["item-without-queries", "item-without-voxels", "single-query", "zero-queries", "no-voxels-at-all"],
)
@pytest.mark.parametrize("with_background", [False, True])
def test_empty_items_and_tiny_batches(counts, empty_items, with_background, backend):
    gen = torch.Generator().manual_seed(sum(counts) + len(empty_items))
    stack, shapes = random_map(SHAPES[2], 3, 8, 0.5, torch.float64, gen, empty_items=empty_items)
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 2), gen).double()
    query, pos, offsets, levels = random_queries(counts, SHAPES[2], 8, torch.float64, gen)
    bg = torch.randn(3, 3, 8, generator=gen, dtype=torch.float64) if with_background else None
    query.requires_grad_()
    out = module(query, pos, offsets, stack, shapes, query_level_indices=levels, background_embedding=bg)
    assert out.shape == (sum(counts), 8)
    torch.testing.assert_close(out, dense_output(module, query, pos, offsets, stack, shapes, levels, bg), **TOL[torch.float64])
    out.sum().backward()  # backward works on every degenerate case
    assert query.grad.shape == query.shape


# ----------------------------------------------------------------------------- (d) input kinds
@pytest.mark.parametrize("dim", [2, 3])
def test_coo_stack_spconv_list_and_prebuilt_index_agree(dim, backend):
    gen = torch.Generator().manual_seed(41)
    shapes = SHAPES[dim]
    stack, shapes_t = random_map(shapes, 2, 8, 0.5, torch.float32, gen)
    module = randomize(SparseMSDeformableAttention(8, 2, len(shapes), 2, dim), gen)
    query, pos, offsets, levels = random_queries([4, 3], shapes, 8, torch.float32, gen)
    bg = torch.randn(2, len(shapes), 8, generator=gen)
    kw = dict(query_level_indices=levels, background_embedding=bg)
    out_coo = module(query, pos, offsets, stack, shapes_t, **kw)
    levels_sp = coo_stack_to_spconv(stack, shapes_t)
    out_sp = module(query, pos, offsets, levels_sp, None, **kw)
    torch.testing.assert_close(out_sp, out_coo, atol=0, rtol=0)
    index = SparseCoordinateIndex.from_spconv(levels_sp)
    out_idx = module(query, pos, offsets, levels_sp, None, coordinate_index=index, **kw)
    torch.testing.assert_close(out_idx, out_coo, atol=0, rtol=0)
    index_coo = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    torch.testing.assert_close(module(query, pos, offsets, stack, shapes_t, coordinate_index=index_coo, **kw), out_coo, atol=0, rtol=0)


# ----------------------------------------------------------------------------- (e) state_dict
def test_loads_deformable_detr_state_dict_and_reproduces_it():
    """A state_dict of Deformable DETR's MSDeformAttn loads unchanged; on a full map, same output."""
    gen = torch.Generator().manual_seed(51)
    embed, heads, n_levels, points = 16, 4, 3, 4
    torch.manual_seed(0)
    detr = DenseMSDeformAttn(embed, n_levels, heads, points)
    randomize(detr, gen)
    state = {k: v.clone() for k, v in detr.state_dict().items()}
    ours = SparseMSDeformableAttention(embed, heads, n_levels, points)
    assert set(ours.state_dict()) == set(state)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in state.items())
    ours.load_state_dict(state)  # strict

    shapes = torch.tensor(SHAPES[2])
    b_size = 2
    # Deformable DETR's inputs: flattened dense maps and normalised reference points (x, y)
    input_levels = [torch.randn(b_size, embed, *s, generator=gen) for s in shapes.tolist()]
    n_q = 9
    ref_xy = torch.rand(b_size, n_q, 2, generator=gen)
    query = torch.randn(b_size, n_q, embed, generator=gen)
    expected = detr(query, ref_xy[:, :, None, :].expand(b_size, n_q, n_levels, 2), input_levels, shapes)

    # ours: the same maps as a fully occupied COO stack, positions in cells of level 0, (y, x)
    rows, vals = [], []
    for lvl, dense in enumerate(input_levels):
        nz = torch.ones(dense.shape[0], *dense.shape[2:], dtype=torch.bool).nonzero()
        rows.append(torch.cat([nz, torch.full((len(nz), 1), lvl)], 1))
        vals.append(dense.movedim(1, -1)[tuple(nz.T)])
    stack = torch.sparse_coo_tensor(torch.cat(rows).T, torch.cat(vals), (b_size, 12, 10, n_levels, embed)).coalesce()
    pos = (ref_xy.flip(-1) * shapes[0].float()).reshape(-1, 2)
    out = ours(query.reshape(-1, embed), pos, torch.tensor([0, n_q, 2 * n_q]), stack, shapes)
    torch.testing.assert_close(out, expected.reshape(-1, embed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_reset_parameters_matches_deformable_detr_init(dim):
    m = SparseMSDeformableAttention(32, 8, 4, 4, dim)
    bias = m.sampling_offsets.bias.view(8, 4, 4, dim)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0 and torch.count_nonzero(m.attention_weights.bias) == 0
    assert torch.count_nonzero(m.value_proj.bias) == 0 and torch.count_nonzero(m.output_proj.bias) == 0
    # point k of each head lies at (k + 1) times a unit-max-norm direction, same for every level
    torch.testing.assert_close(bias.abs().amax(-1), torch.arange(1.0, 5.0).expand(8, 4, 4))
    torch.testing.assert_close(bias, bias[:, :1].expand_as(bias))
    if dim == 2:
        detr = DenseMSDeformAttn(32, 4, 8, 4)
        torch.testing.assert_close(m.sampling_offsets.bias, detr.sampling_offsets.bias)
    else:
        b0 = bias[:, 0, 0].detach()
        dirs = b0 / b0.norm(dim=-1, keepdim=True)
        cos = dirs @ dirs.T - 2 * torch.eye(8)
        assert float(cos.max()) < 0.9  # heads point in distinct directions


# ----------------------------------------------------------------------------- block
@pytest.mark.parametrize("norm_first", [True, False])
def test_block_composition(norm_first):
    gen = torch.Generator().manual_seed(61)
    stack, shapes = random_map(SHAPES[3], 2, 8, 0.5, torch.float64, gen)
    block = SparseMSDeformableAttentionBlock(8, 2, 3, 2, dropout=0.0, bias=True, norm_first=norm_first, position_dim=3).double()
    randomize(block.msdeform_attn, gen)
    query, pos, offsets, levels = random_queries([3, 4], SHAPES[3], 8, torch.float64, gen)
    bg = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    out = block(query, pos, offsets, stack, shapes, bg, levels)
    x = block.norm(query) if norm_first else query
    attn = dense_output(block.msdeform_attn, block.q_in_proj(x), pos, offsets, stack, shapes, levels, bg)
    expected = query + block.out_proj(attn)
    if not norm_first:
        expected = block.norm(expected)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    assert "norm_first" in repr(block) and "n_points=2" in repr(block)


# ----------------------------------------------------------------------------- (f) errors
def _setup():
    gen = torch.Generator().manual_seed(71)
    stack, shapes = random_map(SHAPES[2], 2, 8, 0.5, torch.float32, gen)
    module = SparseMSDeformableAttention(8, 2, 3, 2)
    query, pos, offsets, _ = random_queries([2, 3], SHAPES[2], 8, torch.float32, gen, several_levels=False)
    return module, query, pos, offsets, stack, shapes


def test_error_embed_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SparseMSDeformableAttention(10, 3)


def test_error_wrong_position_dim():
    with pytest.raises(ValueError, match="position_dim must be 2 or 3"):
        SparseMSDeformableAttention(8, 2, position_dim=4)
    module, query, pos, offsets, stack, shapes = _setup()
    m3 = SparseMSDeformableAttention(8, 2, 3, 2, position_dim=3)
    with pytest.raises(ValueError, match=r"query_spatial_positions must have shape \[5, 3\]"):
        m3(query, pos, offsets, stack, shapes)
    with pytest.raises(ValueError, match="level_spatial_shapes"):
        m3(query, torch.zeros(5, 3), offsets, stack, shapes)


def test_error_integer_positions():
    module, query, pos, offsets, stack, shapes = _setup()
    with pytest.raises(TypeError, match="query_spatial_positions must be a floating-point tensor"):
        module(query, pos.long(), offsets, stack, shapes)


def test_error_shape_mismatches():
    module, query, pos, offsets, stack, shapes = _setup()
    with pytest.raises(ValueError, match=r"query must have shape \[n_queries, 8\]"):
        module(query[:, :6], pos, offsets, stack, shapes)
    with pytest.raises(ValueError, match=r"query_spatial_positions must have shape \[5, 2\]"):
        module(query, pos[:4], offsets, stack, shapes)
    with pytest.raises(ValueError, match="background_embedding must have shape"):
        module(query, pos, offsets, stack, shapes, background_embedding=torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="query_level_indices must have shape"):
        module(query, pos, offsets, stack, shapes, query_level_indices=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_levels"):
        SparseMSDeformableAttention(8, 2, 4, 2)(query, pos, offsets, stack, shapes)


def test_error_offsets_not_matching_batch():
    module, query, pos, offsets, stack, shapes = _setup()
    with pytest.raises(ValueError, match=r"query_batch_offsets must have shape \[batch_size \+ 1\] = \[3\]"):
        module(query, pos, torch.tensor([0, 5]), stack, shapes)
    with pytest.raises(ValueError, match="query_batch_offsets must rise from 0 to n_queries=5"):
        module(query, pos, torch.tensor([0, 2, 4]), stack, shapes)
    with pytest.raises(TypeError, match="query_batch_offsets must be an integer tensor"):
        module(query, pos, offsets.float(), stack, shapes)


def test_error_grid_sample_inputs():
    module, query, pos, offsets, stack, shapes = _setup()
    with pytest.raises(TypeError, match="spatial_positions must be a floating-point tensor"):
        sparse_bilinear_sample(stack, pos.long(), torch.tensor(0), shapes, torch.tensor(0))
    with pytest.raises(ValueError, match=r"spatial_positions must have shape \[\.\.\., 2\]"):
        sparse_bilinear_sample(stack, torch.zeros(4, 3), torch.tensor(0), shapes, torch.tensor(0))
    with pytest.raises(ValueError, match="level_indices is required"):
        sparse_bilinear_sample(stack, pos, torch.tensor(0), shapes)
    with pytest.raises(TypeError, match="batch_indices must be an integer tensor"):
        sparse_bilinear_sample(stack, pos, torch.tensor(0.0), shapes, torch.tensor(0))
    with pytest.raises(ValueError, match="must broadcast"):
        sparse_bilinear_sample(stack, pos, torch.zeros(3, dtype=torch.long), shapes, torch.tensor(0))
    with pytest.raises(ValueError, match="head_indices is given but sparse_tensor is not head-split"):
        sparse_bilinear_sample(stack, pos, torch.tensor(0), shapes, torch.tensor(0), head_indices=torch.tensor(0))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        sparse_split_heads(stack, 3)
    with pytest.raises(TypeError, match="sparse COO tensor"):
        sparse_split_heads(stack.to_dense(), 2)


def test_extra_repr():
    r = repr(SparseMSDeformableAttention(16, 4, 2, 3, 3))
    assert "embed_dim=16, n_heads=4, n_levels=2, n_points=3, position_dim=3" in r


@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck_fused_gather_with_repeated_corners(dim, backend):
    """The custom backward of the fused interpolation + weighted sum, with corners shared by
    several samples of one bag (points of a head close together) and a background."""
    from sparse_msda.functional.sampling import sparse_weighted_gather

    gen = torch.Generator().manual_seed(81 + dim)
    shapes = [[4, 5], [2, 3]] if dim == 2 else [[3, 4, 3], [2, 2, 2]]
    stack, shapes_t = random_map(shapes, 2, 3, 0.6, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    n_heads = 3
    table = torch.randn(index.n_voxels * n_heads, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    bg = torch.randn(2 * 2 * n_heads, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    centre = torch.rand(4, 1, dim, generator=gen, dtype=torch.float64) * 3 + 0.5
    pos = (centre + 0.2 * torch.rand(4, 5, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.rand(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0, 1, 1, 0])[:, None]
    lvl = torch.tensor([0, 0, 1, 1, 0])[None, :]
    h = torch.tensor([0, 2, 1, 1])[:, None]

    def f(t, p, weights, background):
        return sparse_weighted_gather(t, index, p, b, lvl, h, n_heads, weights, background)

    base = torch.floor(pos.detach() - 0.5).long()  # [4, 5, dim]
    bb, ll = b.expand(4, 5).reshape(-1), lvl.expand(4, 5).reshape(-1)
    corner = index.lookup_corners(bb, ll, base.reshape(-1, dim)).view(4, 5 * 2**dim)
    found_rows = [[r for r in row.tolist() if r >= 0] for row in corner]
    assert any(len(r) > len(set(r)) for r in found_rows), "the test needs repeated rows within a bag"
    out = f(table, pos, w, bg)
    assert out.shape == (4, 2)
    assert torch.autograd.gradcheck(f, (table, pos, w, bg), eps=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(91)
    stack, shapes = random_map(SHAPES[3], 2, 8, 0.5, torch.float64, gen)
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 2, 3), gen).double()
    query, pos, offsets, levels = random_queries([4, 3], SHAPES[3], 8, torch.float64, gen)
    bg = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    out = module(query, pos, offsets, stack, shapes, query_level_indices=levels, background_embedding=bg)
    dev = torch.device("cuda")
    out_cuda = module.to(dev)(
        query.to(dev), pos.to(dev), offsets.to(dev), stack.to(dev), shapes.to(dev),
        query_level_indices=levels.to(dev), background_embedding=bg.to(dev),
    )
    torch.testing.assert_close(out_cuda.cpu(), out, **TOL[torch.float64])



def test_grid_sample_head_split_uncoalesced_stack():
    """An uncoalesced head-split stack: unsorted but distinct sites sample as its coalesced form
    (gradients flow to the values); duplicate sites are an error, never silently summed."""
    gen = torch.Generator().manual_seed(5)
    stack, shapes = random_map(SHAPES[2], 2, 4, 0.6, torch.float64, gen)
    split = sparse_split_heads(stack, 2)
    idx, vals = split.indices(), split.values()
    perm = torch.randperm(idx.shape[1], generator=gen)
    values = vals[perm].clone().requires_grad_()
    shuffled = torch.sparse_coo_tensor(idx[:, perm], values, split.shape)
    assert not shuffled.is_coalesced()
    pos = torch.rand(5, 2, generator=gen, dtype=torch.float64) * 3
    b, lvl = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 0])
    out = sparse_bilinear_sample(shuffled, pos, b, shapes, lvl)
    ref = sparse_bilinear_sample(split, pos, b, shapes, lvl)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    dup = torch.sparse_coo_tensor(torch.cat([idx, idx[:, :1]], 1), torch.cat([vals, vals[:1]]), split.shape)
    with pytest.raises(ValueError, match="duplicate coordinates"):
        sparse_bilinear_sample(dup, pos, b, shapes, lvl)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_bg", [False, True])
@pytest.mark.parametrize("compact", [True, False])
def test_planned_compact_sampling_matches(dim, with_bg, compact, monkeypatch, backend):
    """A decoder's planned sampling (hash first, project only the touched voxels, or all of
    them) equals the plain path: outputs and the gradients of query, features, background and
    parameters."""
    from sparse_msda.functional import deformable
    from sparse_msda.modules import deformable_attention

    plans = []

    def planner(*args, **kwargs):
        plans.append(deformable.plan_deformable_sampling(*args, compact_below=1.01 if compact else 0.0))
        return plans[-1]

    monkeypatch.setattr(deformable_attention, "plan_deformable_sampling", planner)
    gen = torch.Generator().manual_seed(71 + dim)
    stack, shapes = random_map(SHAPES[dim], 2, 8, 0.6, torch.float64, gen)
    query, pos, offsets, levels = random_queries([2, 1], SHAPES[dim], 8, torch.float64, gen)
    bg = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) if with_bg else None
    module = randomize(SparseMSDeformableAttention(8, 2, 3, 2, dim), gen).double()
    results = []
    for plan_below in (0.0, float("inf")):
        module.plan_below = plan_below
        feats = stack.coalesce().values().clone().requires_grad_()
        st = torch.sparse_coo_tensor(stack.indices(), feats, stack.shape)
        q = query.clone().requires_grad_()
        b = None if bg is None else bg.clone().requires_grad_()
        out = module(q, pos, offsets, st, shapes, query_level_indices=levels, background_embedding=b)
        grads = torch.autograd.grad(out.square().sum(), [q, feats, *module.parameters()] + ([b] if b is not None else []))
        results.append((out, grads))
    assert len(plans) == 1 and (plans[0].voxel_rows is not None) == compact
    if compact:
        assert plans[0].voxel_rows.numel() < stack.coalesce().values().shape[0]  # fewer voxels projected
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=0, atol=1e-12)


def test_plan_sampling_compacts_to_the_touched_voxels():
    from sparse_msda.functional.sampling import plan_sampling

    gen = torch.Generator().manual_seed(9)
    stack, shapes = random_map(SHAPES[2], 2, 4, 0.5, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes)
    pos = torch.rand(3, 2, 2, generator=gen, dtype=torch.float64) * 4  # few samples near the origin
    b, lvl = torch.tensor([0, 1, 1])[:, None], torch.tensor([0, 1])[None, :]
    plan = plan_sampling(index, pos, b, lvl)
    base = torch.floor(pos - 0.5).long()
    corners = index.lookup_corners(b.expand(3, 2).reshape(-1), lvl.expand(3, 2).reshape(-1), base.reshape(-1, 2))
    touched = sorted(set(corners[corners >= 0].tolist()))
    assert plan.voxel_rows is not None and plan.voxel_rows.tolist() == touched
    # the compact table maps each sample's corners to positions in voxel_rows
    compact = plan.corner_table[plan.ids.long()].reshape(-1, 4)
    expected = torch.where(corners >= 0, torch.searchsorted(plan.voxel_rows, corners.clamp(min=0)), -1)
    assert compact.tolist() == expected.tolist()
    full = plan_sampling(index, pos, b, lvl, compact_below=0.0)  # never compact
    assert full.voxel_rows is None and full.corner_table is index.corner_row_table()
