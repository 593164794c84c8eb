"""Tests of the encoder (issue 5): SparseMSDAEncoder / SparseMSDAEncoderLayer / FeedForwardBlock.

References are written here independently of the encoder's query bookkeeping: the attention
blocks are called directly with every voxel as a query in the plain level-major row order
(cell centres ``coords + 0.5`` in their own level's frame), and batch handling is checked
against running each batch item alone and against shuffled voxel rows.
"""

from __future__ import annotations

import pytest
import torch
from spconv.pytorch import SparseConvTensor
from torch import nn

import adapters
from sparse_msda import (
    FeedForwardBlock,
    SparseCoordinateIndex,
    SparseMSDAEncoder,
    SparseMSDAEncoderLayer,
)
from sparse_msda.lidar import random_sparse_levels
from sparse_msda.modules.encoder import VoxelQueries

SHAPES_3D = [[6, 12, 10], [3, 6, 5], [2, 3, 3]]
SHAPES_2D = [[12, 10], [6, 5], [3, 3]]
C = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def levels_3d(batch_size=2, seed=0, occupancy=0.15, dtype=torch.float64, shapes=SHAPES_3D):
    return random_sparse_levels(shapes, occupancy, batch_size, C, seed=seed, dtype=dtype)


def make_encoder(n_layers=2, seed=0, position_dim=3, n_levels=3, **kw):
    torch.manual_seed(seed)
    enc = SparseMSDAEncoder(C, 2, n_levels, n_layers, n_points=2, neighborhood_sizes=[3] * n_levels,
                            position_dim=position_dim, **kw)
    return enc.double()


def perturb(module: nn.Module, seed=1, scale=0.2):
    """Move every parameter off its (often zero / symmetric) init so all paths matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def take_item(levels, b):
    """Batch item ``b`` of every level as a batch-size-1 map (rows in their original order)."""
    out = []
    for lvl in levels:
        rows = (lvl.indices[:, 0] == b).nonzero().squeeze(1)
        idx = lvl.indices[rows].clone()
        idx[:, 0] = 0
        out.append(SparseConvTensor(lvl.features[rows], idx, lvl.spatial_shape, 1))
    return out


# --- outputs -------------------------------------------------------------------------------------
def test_encoder_preserves_structure_and_is_differentiable():
    levels = levels_3d()
    for lvl in levels:
        lvl.features.requires_grad_(True)
    enc = perturb(make_encoder())
    out = enc(levels)
    assert isinstance(out, list) and len(out) == len(levels)
    for a, b in zip(levels, out):
        assert isinstance(b, SparseConvTensor)
        assert torch.equal(a.indices, b.indices)
        assert list(a.spatial_shape) == list(b.spatial_shape) and a.batch_size == b.batch_size
        assert b.features.shape == a.features.shape and torch.isfinite(b.features).all()
        assert not torch.allclose(a.features, b.features)
    sum((o.features * torch.randn_like(o.features)).sum() for o in out).backward()
    for lvl in levels:
        assert lvl.features.grad is not None and lvl.features.grad.abs().sum() > 0
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_layer_equals_blocks_called_with_voxel_queries():
    """One layer == MSDA block, neighborhood block and FFN called by hand with every voxel as a
    query at its cell centre (own level's frame for the deformable block, full scale for the
    neighborhood block; batch size 1: level-major row order)."""
    levels = levels_3d(batch_size=1, seed=3)
    torch.manual_seed(0)
    layer = perturb(SparseMSDAEncoderLayer(C, 2, 3, n_points=2, neighborhood_sizes=[3, 3, 3]).double())
    x = torch.cat([lvl.features for lvl in levels])
    pos = torch.cat([lvl.indices[:, 1:].double() + 0.5 for lvl in levels])
    lev = torch.cat([torch.full((lvl.features.shape[0],), i) for i, lvl in enumerate(levels)])
    offsets = torch.tensor([0, x.shape[0]])
    shapes = torch.tensor(SHAPES_3D)

    def maps(f):
        return [lvl.replace_feature(part) for lvl, part in zip(levels, torch.split(f, [lv.features.shape[0] for lv in levels]))]

    ref = layer.deformable(x, pos, offsets, maps(x), shapes, query_level_indices=lev)
    full_pos = pos / shapes[lev].double() * shapes[0].double()  # the neighborhood block takes full-scale positions
    ref = layer.neighborhood(ref, full_pos, offsets, maps(ref), shapes, query_level_indices=lev)
    ref = layer.feedforward(ref)
    out = torch.cat([o.features for o in layer(levels)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_level_embedding_is_added_to_queries_only():
    """``x + (block(x + e) - (x + e))`` per attention block, with the embedding of each voxel's level."""
    levels = levels_3d(batch_size=1, seed=4)
    torch.manual_seed(0)
    layer = perturb(SparseMSDAEncoderLayer(C, 2, 3, n_points=2, neighborhood_sizes=[3, 3, 3]).double())
    emb = torch.randn(3, C, dtype=torch.float64)
    x = torch.cat([lvl.features for lvl in levels])
    pos = torch.cat([lvl.indices[:, 1:].double() + 0.5 for lvl in levels])
    lev = torch.cat([torch.full((lvl.features.shape[0],), i) for i, lvl in enumerate(levels)])
    e = emb[lev]
    offsets, shapes = torch.tensor([0, x.shape[0]]), torch.tensor(SHAPES_3D)

    def maps(f):
        return [lvl.replace_feature(part) for lvl, part in zip(levels, torch.split(f, [lv.features.shape[0] for lv in levels]))]

    y = x + layer.deformable(x + e, pos, offsets, maps(x), shapes, query_level_indices=lev) - (x + e)
    full_pos = pos / shapes[lev].double() * shapes[0].double()  # full scale for the neighborhood block
    y = y + layer.neighborhood(y + e, full_pos, offsets, maps(y), shapes, query_level_indices=lev) - (y + e)
    ref = layer.feedforward(y)
    out = torch.cat([o.features for o in layer(levels, level_embedding=emb)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # zero embedding == no embedding
    zero = torch.cat([o.features for o in layer(levels, level_embedding=torch.zeros(3, C, dtype=torch.float64))])
    torch.testing.assert_close(zero, torch.cat([o.features for o in layer(levels)]), rtol=1e-12, atol=1e-12)


def test_level_embedding_stays_out_of_the_residual_stream():
    """With every branch's output projection zeroed the layers are identities: the output is
    exactly final_norm(input) whatever the level embedding."""
    levels = levels_3d(seed=5)
    enc = make_encoder(final_norm=False)
    with torch.no_grad():
        nn.init.normal_(enc.level_embed, std=3.0)
        for layer in enc.layers:
            layer.deformable.out_proj.weight.zero_()
            layer.neighborhood.out_proj.weight.zero_()
            layer.feedforward.linear2.weight.zero_()
            layer.feedforward.linear2.bias.zero_()
    for a, b in zip(levels, enc(levels)):
        assert torch.equal(a.features, b.features)


def test_batch_items_are_independent():
    levels = levels_3d(batch_size=3, seed=6)
    enc = perturb(make_encoder())
    out = enc(levels)
    for b in range(3):
        alone = enc(take_item(levels, b))
        for lvl, o, a in zip(levels, out, alone):
            rows = (lvl.indices[:, 0] == b).nonzero().squeeze(1)
            torch.testing.assert_close(o.features[rows], a.features, rtol=1e-10, atol=1e-10)


def test_shuffled_rows_give_shuffled_outputs():
    """Rows not grouped by batch (the encoder must sort queries by batch and scatter back)."""
    levels = levels_3d(batch_size=2, seed=7)
    enc = perturb(make_encoder())
    out = enc(levels)
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(lvl.features.shape[0], generator=gen) for lvl in levels]
    shuffled = [SparseConvTensor(l.features[p], l.indices[p], l.spatial_shape, l.batch_size) for l, p in zip(levels, perms)]
    assert VoxelQueries.from_levels(shuffled).order is not None
    out_s = enc(shuffled)
    for o, s, p in zip(out, out_s, perms):
        assert torch.equal(s.indices, o.indices[p])
        torch.testing.assert_close(s.features, o.features[p], rtol=1e-10, atol=1e-10)


def test_voxel_queries_bookkeeping():
    levels = levels_3d(batch_size=3, seed=8)
    q = VoxelQueries.from_levels(levels)
    index = q.index
    batch = index.batch_indices[q.order]
    assert bool((batch[1:] >= batch[:-1]).all())
    counts = torch.bincount(index.batch_indices, minlength=3)
    assert q.batch_offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    assert torch.equal(q.order[q.inverse], torch.arange(index.n_voxels))
    all_idx = torch.cat([lvl.indices for lvl in levels]).long()
    torch.testing.assert_close(q.positions, (all_idx[q.order, 1:] + 0.5).double())
    assert torch.equal(q.level_indices, index.level_indices[q.order])
    feats = q.input_features()
    back = q.to_levels(feats)
    for a, b in zip(levels, back):
        assert torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices)
    # batch size 1: nothing to permute
    assert VoxelQueries.from_levels(take_item(levels, 0)).order is None


def test_empty_batch_item_level_and_map():
    levels = levels_3d(batch_size=1, seed=16)
    enc = perturb(make_encoder())
    alone = enc(levels)
    two = enc([SparseConvTensor(l.features, l.indices, l.spatial_shape, 2) for l in levels])  # item 1 empty
    for a, b in zip(alone, two):
        torch.testing.assert_close(a.features, b.features, rtol=1e-10, atol=1e-10)
    no_level1 = [levels[0], SparseConvTensor(levels[1].features[:0], levels[1].indices[:0], levels[1].spatial_shape, 1), levels[2]]
    out = enc(no_level1)
    assert [o.features.shape[0] for o in out] == [levels[0].features.shape[0], 0, levels[2].features.shape[0]]
    assert all(torch.isfinite(o.features).all() for o in out)
    empty = enc([SparseConvTensor(l.features[:0], l.indices[:0], l.spatial_shape, 1) for l in levels])
    assert [o.features.shape for o in empty] == [(0, C)] * 3


# --- coordinate index reuse ----------------------------------------------------------------------
def count_index_builds(monkeypatch):
    calls = []
    original = SparseCoordinateIndex.__init__

    def counting(self, *a, **kw):
        calls.append(1)
        original(self, *a, **kw)

    monkeypatch.setattr(SparseCoordinateIndex, "__init__", counting)
    return calls


def test_index_built_once_per_forward(monkeypatch):
    levels = levels_3d(seed=9)
    enc = make_encoder(n_layers=3)
    calls = count_index_builds(monkeypatch)
    enc(levels)
    assert len(calls) == 1
    index = adapters.SparseCoordinateIndex.from_spconv(levels)
    calls.clear()
    enc(levels, coordinate_index=index)
    assert len(calls) == 0


def test_prebuilt_index_gives_same_result():
    levels = levels_3d(seed=10)
    enc = perturb(make_encoder())
    index = SparseCoordinateIndex.from_spconv(levels)
    for a, b in zip(enc(levels), enc(levels, coordinate_index=index)):
        assert torch.equal(a.features, b.features)


def test_index_of_another_map_is_rejected():
    enc = make_encoder()
    other = SparseCoordinateIndex.from_spconv(levels_3d(seed=11))
    with pytest.raises(ValueError, match="index"):
        enc(levels_3d(seed=12), coordinate_index=other)
    with pytest.raises(TypeError, match="coordinate_index"):
        enc(levels_3d(seed=12), coordinate_index="index")


# --- plan and corner-table reuse ------------------------------------------------------------------
def count_plan_builds(monkeypatch):
    """Count neighborhood plan builds (the blocks call build_neighborhood_plan through their module)."""
    from sparse_msda.modules import neighborhood_attention as na

    calls = []
    original = na.build_neighborhood_plan

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(na, "build_neighborhood_plan", counting)
    return calls


def count_corner_table_builds(monkeypatch):
    calls = []
    original = SparseCoordinateIndex._corner_table

    def counting(self):
        if getattr(self, "_corners", None) is None:
            calls.append(1)
        return original(self)

    monkeypatch.setattr(SparseCoordinateIndex, "_corner_table", counting)
    return calls


def test_plan_and_corner_table_built_once_per_forward(monkeypatch, backend):
    """3 layers: one neighborhood plan and one deformable corner table per encoder forward;
    outputs and gradients equal to every layer building its own (the unshared path)."""
    levels = levels_3d(seed=13)
    for lvl in levels:
        lvl.features.requires_grad_(True)
    enc = perturb(make_encoder(n_layers=3))
    plans, tables = count_plan_builds(monkeypatch), count_corner_table_builds(monkeypatch)
    shared = enc(levels)
    assert (len(plans), len(tables)) == (1, 1)
    weights = [torch.randn_like(o.features) for o in shared]
    grads = torch.autograd.grad(sum((o.features * w).sum() for o, w in zip(shared, weights)), [l.features for l in levels])
    enc(levels)
    assert (len(plans), len(tables)) == (2, 2)  # one more of each per forward

    plans.clear()
    monkeypatch.setattr(VoxelQueries, "neighborhood_plan", lambda self, block, positions: None)  # every block plans itself
    own = enc(levels)
    assert len(plans) == 3
    own_grads = torch.autograd.grad(sum((o.features * w).sum() for o, w in zip(own, weights)), [l.features for l in levels])
    for a, b in zip(shared, own):
        torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    for a, b in zip(grads, own_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_user_stack_of_blocks_shares_one_plan(monkeypatch):
    """A user's own stack: build_plan() once, plan= to every block (another index passed,
    or the plan used for other queries, sizes or background, is rejected)."""
    from sparse_msda import SparseNeighborhoodAttentionBlock

    levels = levels_3d(seed=14)
    q = VoxelQueries.from_levels(levels)
    torch.manual_seed(0)
    blocks = [perturb(SparseNeighborhoodAttentionBlock(C, 2, 3, [3, 5, 3], position_dim=3).double(), seed=s) for s in (1, 2)]
    args = (q.positions, q.batch_offsets, levels, None)
    kw = dict(query_level_indices=q.level_indices)
    x = q.input_features()
    plans = count_plan_builds(monkeypatch)
    plan = blocks[0].build_plan(*args, **kw)
    y = x
    for block in blocks:
        y = block(y, *args, plan=plan, **kw)
    assert len(plans) == 1
    ref = x
    for block in blocks:
        ref = block(ref, *args, **kw)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)

    with pytest.raises(ValueError, match="another coordinate_index"):
        blocks[0](x, *args, plan=plan, coordinate_index=SparseCoordinateIndex.from_spconv(levels), **kw)
    moved = q.positions.clone()
    moved[0] += 1.0  # another window centre
    with pytest.raises(ValueError, match="window centres"):
        blocks[0](x, moved, *args[1:], plan=plan, **kw)
    other = SparseNeighborhoodAttentionBlock(C, 2, 3, [3, 3, 3], position_dim=3).double()
    with pytest.raises(ValueError, match="neighborhood_sizes"):
        other(x, *args, plan=plan, **kw)
    bg = torch.zeros(levels[0].batch_size, 3, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="background"):
        blocks[0](x, *args, background_embedding=bg, plan=plan, **kw)
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[:3] = True
    with pytest.raises(ValueError, match="queries"):
        blocks[0](x, *args, query_mask=mask, plan=plan, **kw)
    with pytest.raises(TypeError, match="plan"):
        blocks[0](x, *args, plan="plan", **kw)
    masked = blocks[0].build_plan(*args, query_mask=mask, background=True, **kw)
    torch.testing.assert_close(
        blocks[0](x, *args, query_mask=mask, background_embedding=bg, plan=masked, **kw),
        blocks[0](x, *args, query_mask=mask, background_embedding=bg, **kw), rtol=0, atol=0,
    )


# --- 2D, float32, post-norm ------------------------------------------------------------------------
def test_2d_bev_levels_float32():
    levels = random_sparse_levels(SHAPES_2D, 0.3, 2, C, seed=13)
    torch.manual_seed(0)
    enc = SparseMSDAEncoder(C, 2, 3, 1, n_points=2, neighborhood_sizes=[3, 5, 3], position_dim=2)
    out = enc(levels)
    for a, b in zip(levels, out):
        assert b.features.dtype == torch.float32 and torch.isfinite(b.features).all()
        assert torch.equal(a.indices, b.indices) and list(a.spatial_shape) == list(b.spatial_shape)


def test_post_norm_without_level_embedding():
    levels = levels_3d(seed=14)
    enc = make_encoder(norm_first=False, level_embedding=False)
    assert enc.norm is None and enc.level_embed is None
    out = enc(levels)
    # post-norm: every output row is layer-normalised by the last FFN block (unit affine at init)
    f = out[0].features
    torch.testing.assert_close(f.mean(-1), torch.zeros_like(f[:, 0]), atol=1e-9, rtol=0)


# --- feed-forward block ----------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [True, False])
def test_feedforward_block_formula(norm_first):
    torch.manual_seed(0)
    ffn = perturb(FeedForwardBlock(6, 10, activation="relu", norm_first=norm_first).double())
    x = torch.randn(5, 6, dtype=torch.float64)
    ln = nn.functional.layer_norm

    def mlp(v):
        return torch.relu(v @ ffn.linear1.weight.T + ffn.linear1.bias) @ ffn.linear2.weight.T + ffn.linear2.bias

    norm = lambda v: ln(v, (6,), ffn.norm.weight, ffn.norm.bias)  # noqa: E731
    ref = x + mlp(norm(x)) if norm_first else norm(x + mlp(x))
    torch.testing.assert_close(ffn(x), ref)
    assert "dim_feedforward=10" in repr(ffn)


# --- errors and repr -------------------------------------------------------------------------------
def test_errors():
    levels = levels_3d(seed=15)
    with pytest.raises(ValueError, match="norm_first"):
        SparseMSDAEncoder(C, 2, 3, 1, norm_first=False)
    with pytest.raises(ValueError, match="neighborhood_sizes"):
        SparseMSDAEncoder(C, 2, 3, 1, neighborhood_sizes=[3, 3])
    with pytest.raises(ValueError, match="n_layers"):
        SparseMSDAEncoder(C, 2, 3, 0)
    with pytest.raises(ValueError, match="embed_dim"):
        SparseMSDAEncoder(C, 3, 3, 1)
    with pytest.raises(ValueError, match="activation"):
        FeedForwardBlock(C, activation="tanh")
    enc = make_encoder()
    with pytest.raises(ValueError, match="channels"):
        enc([lvl.replace_feature(lvl.features[:, :4]) for lvl in levels])
    with pytest.raises(ValueError, match="levels"):
        enc(levels[:2])
    with pytest.raises(TypeError, match="list of SparseConvTensor"):
        enc(levels[0])
    with pytest.raises(ValueError, match="position_dim|spatial"):
        make_encoder(position_dim=2)(levels)
    layer = enc.layers[0]
    with pytest.raises(ValueError, match="level_embedding"):
        layer(levels, level_embedding=torch.zeros(2, C, dtype=torch.float64))


def test_extra_repr():
    text = repr(make_encoder())
    assert "n_layers=2" in text and "level_embedding=True" in text and "neighborhood_sizes=[3, 3, 3]" in text


def test_inputs_validated_once_per_forward(monkeypatch):
    """The encoder checks its levels (and a passed coordinate index: index.matches) once per
    forward; its blocks take the checked-input path (no prepare_inputs, no index check per block)."""
    from sparse_msda.modules import deformable_attention as da
    from sparse_msda.modules import neighborhood_attention as na

    levels = levels_3d(seed=15)
    index = SparseCoordinateIndex.from_spconv(levels)
    enc = perturb(make_encoder(n_layers=3))
    calls = {"prepare_inputs": 0, "matches": 0}

    def counting(name, original):
        def f(*a, **kw):
            calls[name] += 1
            return original(*a, **kw)
        return f

    for module in (da, na):
        monkeypatch.setattr(module, "prepare_inputs", counting("prepare_inputs", module.prepare_inputs))
    monkeypatch.setattr(SparseCoordinateIndex, "matches", counting("matches", SparseCoordinateIndex.matches))
    out = enc(levels, coordinate_index=index)
    assert calls == {"prepare_inputs": 0, "matches": 1}
    # the same blocks called on their own validate (their public path)
    queries = VoxelQueries.from_levels(levels, index)
    layer = enc.layers[0]
    layer.deformable(queries.input_features(), queries.positions, queries.batch_offsets, levels, None,
                     query_level_indices=queries.level_indices, coordinate_index=index)
    assert calls == {"prepare_inputs": 1, "matches": 3}
    assert all(torch.isfinite(o.features).all() for o in out)


def test_encoder_rejects_wrong_dtype_once():
    levels = levels_3d(seed=16)
    enc = make_encoder(n_layers=2).float()
    with pytest.raises(TypeError, match="query must have the module's dtype torch.float32, got query.dtype=torch.float64"):
        enc(levels)
