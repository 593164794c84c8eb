"""Tests of the adapter layer: COO <-> spconv round trips, the hashed coordinate index, errors.

References are written here independently of the implementation: Python sorting of coordinate
tuples for the documented row order and a Python ``dict`` for lookups.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spconv.pytorch import SparseConvTensor

import adapters
from adapters import coordinate_index
from adapters import (
    SparseCoordinateIndex,
    coo_stack_to_spconv,
    multilevel_features,
    spconv_to_coo_stack,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- random multi-level maps -------------------------------------------------------------------
def _unravel(flat: list[int], shape: list[int]) -> list[tuple[int, ...]]:
    out = []
    for f in flat:
        coords = []
        for size in reversed(shape):
            coords.append(f % size)
            f //= size
        out.append(tuple(reversed(coords)))
    return out


def make_levels(voxels: list[list[tuple[int, ...]]], shapes, batch_size, channels, seed=0, dtype=torch.float32):
    """One SparseConvTensor per level from lists of (batch, *coords) tuples (kept in the given order)."""
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for vox, shape in zip(voxels, shapes):
        idx = torch.tensor(vox, dtype=torch.int32).reshape(-1, 1 + len(shape))
        feats = torch.randn(len(vox), channels, generator=gen).to(dtype)
        levels.append(SparseConvTensor(feats, idx, list(shape), batch_size))
    return levels


@st.composite
def multilevel_maps(draw, dim=None, max_voxels=25):
    """(levels, voxel lists): random shapes, batch items and levels may be empty, rows unsorted."""
    dim = draw(st.sampled_from([2, 3])) if dim is None else dim
    n_levels = draw(st.integers(1, 4))
    batch_size = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 4))
    shapes = [[draw(st.integers(1, 6)) for _ in range(dim)] for _ in range(n_levels)]
    voxels = []
    for shape in shapes:
        n_sites = batch_size * math.prod(shape)
        chosen = draw(st.lists(st.integers(0, n_sites - 1), unique=True, max_size=min(n_sites, max_voxels)))
        voxels.append(_unravel(chosen, [batch_size, *shape]))  # draw order = row order (unsorted)
    seed = draw(st.integers(0, 2**31 - 1))
    return make_levels(voxels, shapes, batch_size, channels, seed), voxels


def reference_rows(levels):
    """Python reference of the index's row convention: concatenation of the levels' rows."""
    table = {}
    row = 0
    for l, lvl in enumerate(levels):
        for v in lvl.indices.tolist():
            table[(v[0], l, *v[1:])] = row
            row += 1
    return table


# --- round trips -------------------------------------------------------------------------------
@SETTINGS
@given(multilevel_maps())
def test_spconv_coo_spconv_roundtrip(data):
    levels, voxels = data
    stacked, shapes = spconv_to_coo_stack(levels)
    dim = len(levels[0].spatial_shape)
    extent = [max(lvl.spatial_shape[a] for lvl in levels) for a in range(dim)]
    assert stacked.is_sparse and stacked.is_coalesced()
    assert list(stacked.shape) == [levels[0].batch_size, *extent, len(levels), levels[0].features.shape[1]]
    assert shapes.dtype == torch.int64 and shapes.tolist() == [list(lvl.spatial_shape) for lvl in levels]
    # the stack holds exactly every voxel, with its features bitwise
    expected = {}
    for l, lvl in enumerate(levels):
        for v, f in zip(lvl.indices.tolist(), lvl.features):
            expected[(v[0], *v[1:], l)] = f
    got_idx = stacked.indices().T.tolist()
    assert len(got_idx) == len(expected)
    for key, f in zip(got_idx, stacked.values()):
        assert torch.equal(f, expected[tuple(key)])

    back = coo_stack_to_spconv(stacked, shapes)
    assert len(back) == len(levels)
    for lvl, out, vox in zip(levels, back, voxels):
        assert out.indices.dtype == torch.int32 and out.indices.shape[1] == 1 + dim
        assert list(out.spatial_shape) == list(lvl.spatial_shape) and out.batch_size == lvl.batch_size
        order = sorted(range(len(vox)), key=lambda i: vox[i])  # documented order: (batch, *coords)
        assert out.indices.tolist() == [list(vox[i]) for i in order]
        assert torch.equal(out.features, lvl.features[order])


@SETTINGS
@given(multilevel_maps())
def test_coo_spconv_coo_roundtrip(data):
    levels, _ = data
    stacked, shapes = spconv_to_coo_stack(levels)
    again, shapes2 = spconv_to_coo_stack(coo_stack_to_spconv(stacked, shapes))
    assert torch.equal(shapes, shapes2)
    assert again.shape == stacked.shape
    assert torch.equal(again.indices(), stacked.indices())
    assert torch.equal(again.values(), stacked.values())


def test_uncoalesced_coo_stack_is_accepted_and_sorted():
    # COO built by hand, rows in reverse order, 3D, 2 levels of different shapes
    coords = [(1, 3, 0, 1, 0), (0, 0, 1, 1, 1), (0, 2, 2, 2, 0), (1, 0, 0, 0, 1)]  # (b, z, y, x, level)
    idx = torch.tensor(coords[::-1]).T
    vals = torch.arange(8, dtype=torch.float64).reshape(4, 2)
    stacked = torch.sparse_coo_tensor(idx, vals, (2, 4, 3, 3, 2, 2))
    assert not stacked.is_coalesced()
    levels = coo_stack_to_spconv(stacked, [[4, 3, 3], [2, 2, 2]])
    rows = {c: vals[i] for i, c in enumerate(coords[::-1])}
    for l, lvl in enumerate(levels):
        keys = sorted(c for c in coords if c[-1] == l)
        assert lvl.indices.tolist() == [list(c[:-1]) for c in keys]
        assert torch.equal(lvl.features, torch.stack([rows[c] for c in keys]))


@pytest.mark.parametrize("dim", [2, 3])
def test_empty_batch_items_and_levels_survive(dim):
    shapes = [[5] * dim, [3] * dim, [2] * dim]
    # batch_size 3: item 0 and 2 empty everywhere; level 1 empty entirely
    voxels = [[(1, *[1] * dim), (1, *[4] * dim)], [], [(1, *[0] * dim)]]
    levels = make_levels(voxels, shapes, batch_size=3, channels=2)
    stacked, out_shapes = spconv_to_coo_stack(levels)
    assert stacked.shape[0] == 3 and stacked._nnz() == 3
    back = coo_stack_to_spconv(stacked, out_shapes)
    assert [lvl.indices.shape[0] for lvl in back] == [2, 0, 1]
    assert all(lvl.batch_size == 3 for lvl in back)
    assert [list(lvl.spatial_shape) for lvl in back] == shapes
    assert back[1].features.shape == (0, 2) and back[1].indices.shape == (0, 1 + dim)
    # an entirely empty map
    empty = make_levels([[], []], shapes[:2], batch_size=2, channels=3)
    stacked, out_shapes = spconv_to_coo_stack(empty)
    assert stacked._nnz() == 0
    back = coo_stack_to_spconv(stacked, out_shapes)
    assert [lvl.indices.shape[0] for lvl in back] == [0, 0] and all(lvl.batch_size == 2 for lvl in back)
    index = SparseCoordinateIndex.from_spconv(empty)
    rows, found = index.lookup(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.zeros(2, dim, dtype=torch.long))
    assert rows.tolist() == [-1, -1] and not found.any()


def test_gradients_flow_both_ways():
    levels = make_levels(
        [[(0, 1, 2), (1, 0, 0), (0, 0, 1)], [(1, 1, 1), (0, 0, 0)]], [[3, 4], [2, 2]], 2, 3, dtype=torch.float64
    )
    feats = [lvl.features.clone().requires_grad_(True) for lvl in levels]
    indices = [lvl.indices for lvl in levels]

    def to_coo(*fs):
        lv = [SparseConvTensor(f, i, s, 2) for f, i, s in zip(fs, indices, [[3, 4], [2, 2]])]
        return spconv_to_coo_stack(lv)[0].values()

    assert torch.autograd.gradcheck(to_coo, feats)
    stacked, shapes = spconv_to_coo_stack(levels)
    values = stacked.values().detach().clone().requires_grad_(True)
    coo_idx = stacked.indices()

    def to_spconv(v):
        st_ = torch.sparse_coo_tensor(coo_idx, v, stacked.shape, is_coalesced=True)
        return tuple(lvl.features for lvl in coo_stack_to_spconv(st_, shapes))

    assert torch.autograd.gradcheck(to_spconv, (values,))
    # and through multilevel_features, for both input kinds
    weights = torch.randn(5, 3, dtype=torch.float64)
    out, index = multilevel_features([SparseConvTensor(f, i, s, 2) for f, i, s in zip(feats, indices, [[3, 4], [2, 2]])])
    (out * weights).sum().backward()
    assert torch.equal(torch.cat([f.grad for f in feats]), weights)
    st_ = torch.sparse_coo_tensor(coo_idx, values, stacked.shape, is_coalesced=True)
    out, _ = multilevel_features(st_, shapes)
    (out * weights).sum().backward()
    assert torch.equal(values.grad, weights)


# --- the coordinate index ----------------------------------------------------------------------
#: (DENSE_TABLE_BYTES, PAGED_TABLE_BYTES) per corner-table regime of _small_index's map (key blocks
#: of 7,728 and 39,216 int32 ids after the guard key): every level direct-address; the smaller level
#: direct-address and the larger one hashed (spconv) or paged; every level hashed or paged
CORNER_REGIMES = {
    "dense": (4 * 46_945, 0),
    "hybrid": (4 * 7_729, 0),
    "hashed": (4 * 7_728, 0),
    "hybrid-paged": (4 * 7_729, 1 << 20),
    "paged": (4 * 7_728, 1 << 20),
}


@pytest.fixture(params=list(CORNER_REGIMES))
def corner_regime(request, monkeypatch):
    """Runs a test with each corner-table regime (the direct-address / paged / hash split of _corner_table)."""
    dense_bytes, paged_bytes = CORNER_REGIMES[request.param]
    monkeypatch.setattr(coordinate_index, "DENSE_TABLE_BYTES", dense_bytes)
    monkeypatch.setattr(coordinate_index, "PAGED_TABLE_BYTES", paged_bytes)
    return request.param


def _check_regime(index, regime):
    table, _ = index._corner_table()
    dense, paged = index._dense, index._paged
    if index.device.type != "cpu" or regime == "hashed":
        assert dense is None and paged is None and table is not None
    elif regime == "dense":
        assert dense is not None and paged is None and table is None
    elif regime == "hybrid":
        assert dense is not None and paged is None and table is not None and table.value_dtype == torch.int32
    else:  # the paged part instead of spconv's table
        assert (dense is not None) == (regime == "hybrid-paged") and paged is not None and table is None


def _random_queries(index, n, gen, margin=2):
    """Queries spread over [-margin, extent + margin) per axis, batch and level slightly out of range too."""
    extent = index.level_spatial_shapes.max(0).values
    b = torch.randint(-1, index.batch_size + 1, (n,), generator=gen)
    l = torch.randint(-1, index.n_levels + 1, (n,), generator=gen)
    c = (torch.rand(n, index.position_dim, generator=gen) * (extent + 2 * margin)).long() - margin
    return b, l, c


def _check_against_dict(index, table, b, l, c):
    rows, found = index.lookup(b, l, c)
    assert rows.dtype == torch.int64 and found.dtype == torch.bool and rows.shape == b.shape
    keys = torch.cat([b[:, None], l[:, None], c], 1).tolist()
    expected = [table.get(tuple(k), -1) for k in keys]
    assert rows.tolist() == expected
    assert found.tolist() == [e >= 0 for e in expected]


@SETTINGS
@given(multilevel_maps(max_voxels=40), st.integers(0, 2**31 - 1))
def test_lookup_matches_dict(data, seed):
    levels, _ = data
    index = SparseCoordinateIndex.from_spconv(levels)
    table = reference_rows(levels)
    assert index.n_voxels == len(table)
    gen = torch.Generator().manual_seed(seed)
    # every voxel is found at its row
    if table:
        keys = torch.tensor(list(table.keys()))
        _check_against_dict(index, table, keys[:, 0], keys[:, 1], keys[:, 2:])
    # random queries: misses, negative coords, coords beyond their own level but inside the extent,
    # batch and level indices out of range
    _check_against_dict(index, table, *_random_queries(index, 300, gen))


def test_lookup_large_random_against_dict():
    gen = torch.Generator().manual_seed(1)
    shapes = [[41, 160, 140], [21, 80, 70], [11, 40, 35], [5, 20, 18]]
    voxels = []
    for shape in shapes:
        n_sites = 2 * math.prod(shape)
        flat = torch.randperm(n_sites, generator=gen)[: min(20_000, n_sites // 3)].tolist()
        voxels.append(_unravel(flat, [2, *shape]))
    levels = make_levels(voxels, shapes, 2, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    table = reference_rows(levels)
    keys = torch.tensor(list(table.keys()))
    hits = keys[torch.randint(len(keys), (50_000,), generator=gen)]
    b, l, c = _random_queries(index, 50_000, gen)
    b, l, c = torch.cat([hits[:, 0], b]), torch.cat([hits[:, 1], l]), torch.cat([hits[:, 2:], c])
    _check_against_dict(index, table, b, l, c)


def _check_boxes_against_dict(index, table, b, l, lo, ext, cells_per_chunk):
    """lookup_boxes against a Python enumeration of every box's cells (row-major) and the dict."""
    box, rows = index.lookup_boxes(b, l, lo, ext, cells_per_chunk=cells_per_chunk)
    assert box.dtype == torch.int64 and rows.dtype == torch.int64
    expected = []
    for p, (bi, li, lo_p, ext_p) in enumerate(zip(b.tolist(), l.tolist(), lo.tolist(), ext.tolist())):
        for cell in _unravel(range(math.prod(ext_p)), ext_p):  # row-major, last axis fastest
            row = table.get((bi, li, *(c + o for c, o in zip(cell, lo_p))), -1)
            if row >= 0:
                expected.append((p, row))
    assert list(zip(box.tolist(), rows.tolist())) == expected


@SETTINGS
@given(multilevel_maps(max_voxels=40), st.integers(0, 2**31 - 1), st.sampled_from([1, 5, 64, 1 << 19]))
def test_lookup_boxes_matches_dict(data, seed, cells_per_chunk):
    levels, _ = data
    index = SparseCoordinateIndex.from_spconv(levels)
    table = reference_rows(levels)
    gen = torch.Generator().manual_seed(seed)
    n, shapes = 12, index.level_spatial_shapes
    b = torch.randint(index.batch_size, (n,), generator=gen)
    l = torch.randint(index.n_levels, (n,), generator=gen)
    lo = (torch.rand(n, index.position_dim, generator=gen) * shapes[l]).long()
    ext = (torch.rand(n, index.position_dim, generator=gen) * (shapes[l] - lo + 1)).long()  # may be 0: empty box
    _check_boxes_against_dict(index, table, b, l, lo, ext, cells_per_chunk)
    # an empty box anywhere (even outside the grid) is allowed and finds nothing
    far = torch.full((1, index.position_dim), 10**6)
    assert index.lookup_boxes(b[:1], l[:1], far, torch.zeros_like(far))[0].numel() == 0


def test_lookup_boxes_errors():
    index = SparseCoordinateIndex(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([[1, 2], [0, 0]]), [[3, 4]], 2)
    one, zero = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"box 0 \(box_lo=\[2, 2\], box_extent=\[2, 1\]\) must have extents >= 0 and lie inside level 0's grid \[3, 4\]"):
        index.lookup_boxes(zero, zero, torch.tensor([[2, 2]]), torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="must have extents >= 0"):
        index.lookup_boxes(zero, zero, torch.tensor([[0, 0]]), torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"box_lo and box_extent must have shape \[P, 2\]"):
        index.lookup_boxes(zero, zero, torch.tensor([[0, 0, 0]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match=r"level_indices must have shape \[1\] \(one per box\)"):
        index.lookup_boxes(zero, torch.tensor([0, 0]), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"batch_indices must lie in \[0, 2\)"):
        index.lookup_boxes(torch.tensor([2]), zero, torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))
    with pytest.raises(TypeError, match="box_extent must have an integer dtype"):
        index.lookup_boxes(one, zero, torch.tensor([[0, 0]]), torch.tensor([[1.0, 1.0]]))
    box, rows = index.lookup_boxes(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([[0, 0], [0, 0]]), torch.tensor([[3, 4], [3, 4]]))
    assert box.tolist() == [0, 1] and rows.tolist() == [1, 0]


def _check_corners_against_dict(index, table, b, l, base):
    rows = index.lookup_corners(b, l, base)
    offsets = adapters.corner_offsets(index.position_dim)
    assert rows.dtype == torch.int64 and rows.shape == (b.shape[0], offsets.shape[0])
    expected = [
        [table.get((bi, li, *(ci + oi for ci, oi in zip(cell, off))), -1) for off in offsets.tolist()]
        for bi, li, cell in zip(b.tolist(), l.tolist(), base.tolist())
    ]
    assert rows.tolist() == expected


@SETTINGS
@given(multilevel_maps(max_voxels=40), st.integers(0, 2**31 - 1))
def test_lookup_corners_matches_dict(data, seed):
    levels, _ = data
    index = SparseCoordinateIndex.from_spconv(levels)
    table = reference_rows(levels)
    gen = torch.Generator().manual_seed(seed)
    if table:  # base cells next to every voxel: each voxel appears as every corner k of some base cell
        keys = torch.tensor(list(table.keys()))
        offsets = adapters.corner_offsets(index.position_dim)
        near = (keys[:, None, 2:] - offsets).reshape(-1, index.position_dim)
        k = offsets.shape[0]
        _check_corners_against_dict(
            index, table, keys[:, 0].repeat_interleave(k), keys[:, 1].repeat_interleave(k), near
        )
    # misses, base cell -1 (the first half of cell 0), beyond the level, batch / level out of range
    _check_corners_against_dict(index, table, *_random_queries(index, 300, gen))


def test_lookup_corners_edge_cells_do_not_alias():
    # level 1 [2, 2] is smaller than level 0 [4, 4]; base cells on and past every border
    levels = make_levels([[(0, 0, 0), (0, 3, 3)], [(0, 0, 0), (0, 1, 1)]], [[4, 4], [2, 2]], 1, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    b = torch.zeros(6, dtype=torch.long)
    l = torch.tensor([0, 0, 1, 1, 1, 0])
    base = torch.tensor([[-1, -1], [3, 3], [1, 1], [0, 0], [-2, -1], [2, 4]])
    rows = index.lookup_corners(b, l, base)
    # corners in order (0,0), (0,1), (1,0), (1,1) of each base cell
    assert rows.tolist() == [
        [-1, -1, -1, 0],  # (-1,-1): only (0,0) of level 0
        [1, -1, -1, -1],  # (3,3): (3,3) of level 0; (3,4), (4,3), (4,4) outside
        [3, -1, -1, -1],  # level 1 (1,1); (1,2), (2,1), (2,2) are outside level 1 (inside level 0)
        [2, -1, -1, 3],
        [-1, -1, -1, -1],
        [-1, -1, -1, -1],
    ]
    with pytest.raises(TypeError, match="base_cells"):
        index.lookup_corners(b, l, base.float())
    with pytest.raises(ValueError, match="base_cells"):
        index.lookup_corners(b, l, base[:, :1])


def test_base_cell_ids_broadcast_batch_and_level():
    """Batch / level indices broadcast against the cells' leading shape ([S, 1] and [1, J], as
    deformable sampling passes them) and give the ids of the flattened call."""
    levels = make_levels([[(0, 0, 0), (0, 3, 3), (1, 2, 1)], [(0, 0, 0), (1, 1, 1)]], [[4, 4], [2, 2]], 2, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 5, (5, 4, 2), generator=gen)
    b = torch.tensor([0, 1, 1, 0, 1])[:, None]
    l = torch.tensor([0, 1, 0, 1])[None, :]
    ids = index.base_cell_ids(b, l, base)
    flat = index.base_cell_ids(b.expand(5, 4).reshape(-1), l.expand(5, 4).reshape(-1), base.reshape(-1, 2))
    assert ids.shape == (5, 4) and ids.reshape(-1).tolist() == flat.tolist()
    rows = index.corner_rows(ids)
    assert rows.shape == (5, 4, 4)
    assert rows.reshape(-1, 4).tolist() == index.lookup_corners(
        b.expand(5, 4).reshape(-1), l.expand(5, 4).reshape(-1), base.reshape(-1, 2)
    ).tolist()
    with pytest.raises(ValueError, match="broadcastable"):
        index.base_cell_ids(torch.zeros(3, dtype=torch.long), l, base)


def test_base_cell_ids_out_buffers_equal_the_int64_result(corner_regime):
    """``out=`` (int32 contiguous: written by the query itself; an int32 strided column slice and
    int64: through a buffer) holds exactly the ids of the plain call, out-of-range cells and
    cells far past every border included (never another cell's id), and is what is returned;
    a bad ``out`` is a clear error."""
    index, gen = _small_index("cpu")
    b, l, c = _random_queries(index, 2400, gen, margin=3)
    edges = torch.tensor([-2**40, -3, -2, -1, 0, 1, 2**40])
    c[:400] = edges[torch.randint(0, edges.numel(), (400, c.shape[1]), generator=gen)]
    b, l, c = b.view(200, 12), l.view(200, 12), c.view(200, 12, -1)
    expected = index.base_cell_ids(b, l, c)
    absent = index.corner_row_table().shape[0] - 1
    assert expected.dtype == torch.int64 and 0 < int((expected != absent).sum()) < expected.numel()
    _check_regime(index, corner_regime)
    offsets = adapters.corner_offsets(index.position_dim)
    corners, _ = index.lookup(b[..., None], l[..., None], c[..., None, :] + offsets)  # one by one
    assert torch.equal(index.corner_rows(expected).to(torch.int64), corners)
    wide = torch.full((200, 20), -7, dtype=torch.int32)
    for out in (torch.empty(200, 12, dtype=torch.int32), torch.empty(200, 12, dtype=torch.int64), wide[:, 3:15]):
        got = index.base_cell_ids(b, l, c, out=out)
        assert got is out and torch.equal(got.long(), expected)
    assert bool((wide[:, :3] == -7).all()) and bool((wide[:, 15:] == -7).all())  # nothing written outside the slice
    # broadcast batch / level as the fused deformable encoder passes them ([S, 1] and [1, J])
    out = torch.empty(200, 12, dtype=torch.int32)
    index.base_cell_ids(b[:, :1], l[:1], c, out=out)
    assert torch.equal(out.long(), index.base_cell_ids(b[:, :1].expand(200, 12), l[:1].expand(200, 12), c))
    empty = torch.empty(0, 12, dtype=torch.int32)
    assert index.base_cell_ids(b[:0], l[:0], c[:0], out=empty) is empty
    with pytest.raises(ValueError, match=r"out must have shape base_cells.shape\[:-1\]=\(200, 12\)"):
        index.base_cell_ids(b, l, c, out=torch.empty(200, 11, dtype=torch.int32))
    with pytest.raises(TypeError, match="out must be an int32 or int64 tensor"):
        index.base_cell_ids(b, l, c, out=torch.empty(200, 12))


@pytest.mark.parametrize("slots", [CORNER_REGIMES["hybrid"][0], CORNER_REGIMES["hashed"][0]])
def test_base_cell_ids_query_that_did_not_run_is_an_error(slots, monkeypatch):
    """The corner table's CPU query writes the ids into the caller's buffer; a spconv query that
    raises the no-CUDA message without doing its work is still an error there (never ids left as
    the buffer held them), with and without ``out=``."""
    from test_spconv_compat import _FakeCppTable

    monkeypatch.setattr(coordinate_index, "DENSE_TABLE_BYTES", slots)
    monkeypatch.setattr(coordinate_index, "PAGED_TABLE_BYTES", 0)  # spconv's table, not pages
    index, gen = _small_index("cpu")
    b, l, c = _random_queries(index, 100, gen)
    table, _ = index._corner_table()
    real = table._table
    msg = "HashTable_query.cc(1)\nspconv not compiled with cuda, don't support cuda"
    table._table = _FakeCppTable(real, query_error=msg, query_does_work=False)
    # levels per column ([1, J]) and batch per row: the per-column path's query on the worker thread
    bc, lc, cc = b[:96, None] % index.batch_size, torch.tensor([[0, 0, 1, 1]]), c[:96, None, :].expand(96, 4, 3)
    try:
        for out in (None, torch.zeros(100, dtype=torch.int32)):
            with pytest.raises(RuntimeError, match="HashTable.query did not write every result"):
                index.base_cell_ids(b, l, c, out=out)
        for out in (None, torch.zeros(96, 4, dtype=torch.int32)):
            with pytest.raises(RuntimeError, match="HashTable.query did not write every result"):
                index.base_cell_ids(bc, lc, cc, out=out)
        table._table = _FakeCppTable(real, query_error=msg)  # the work done: the message is swallowed
        assert torch.equal(index.base_cell_ids(b, l, c, out=torch.zeros(100, dtype=torch.int32)).long(),
                           index.base_cell_ids(b, l, c))
        assert torch.equal(index.base_cell_ids(bc, lc, cc, out=torch.zeros(96, 4, dtype=torch.int32)).long(),
                           index.base_cell_ids(bc.expand(96, 4).reshape(-1), lc.expand(96, 4).reshape(-1), cc.reshape(-1, 3)).view(96, 4))
    finally:
        table._table = real


def test_out_of_level_coords_never_alias():
    # level 1 is smaller than level 0: (l=1, y=3) lies inside the stack extent but outside level 1;
    # a key computed with level 1's own shape would alias (l=1, y=1, x=...) or level 0 voxels.
    levels = make_levels([[(0, 3, 0), (0, 1, 1)], [(0, 1, 1), (0, 0, 0)]], [[4, 4], [2, 2]], 1, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    # (l=0, [2, 4]) is beyond the extent on x: a key without the bounds check would wrap onto (3, 0)
    b = torch.zeros(7, dtype=torch.long)
    l = torch.tensor([1, 1, 1, 0, 0, 1, 0])
    c = torch.tensor([[3, 0], [1, 2], [0, -2], [-1, 3], [2, 4], [1, 1], [3, 0]])
    rows, found = index.lookup(b, l, c)
    assert rows.tolist() == [-1, -1, -1, -1, -1, 2, 0] and found.tolist() == [False] * 5 + [True] * 2


def test_lookup_broadcasts():
    levels = make_levels([[(0, 1, 1), (1, 2, 3)], [(1, 0, 1)]], [[3, 4], [2, 2]], 2, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    c = torch.tensor([[[1, 1], [2, 3]], [[0, 1], [0, 0]]])  # [2, 2, 2]
    rows, found = index.lookup(torch.tensor(1), torch.tensor([[0], [1]]), c)
    assert rows.shape == (2, 2) and rows.tolist() == [[-1, 1], [2, -1]]
    assert found.tolist() == [[False, True], [True, False]]
    rows, _ = index.lookup(torch.tensor([0, 1]), torch.tensor(0), torch.tensor([1, 1]))
    assert rows.tolist() == [0, -1]


def test_index_from_coo_stack_row_order_and_multilevel_features():
    levels = make_levels([[(1, 2, 3), (0, 0, 1)], [(0, 1, 1)]], [[3, 4], [2, 2]], 2, 2)
    stacked, shapes = spconv_to_coo_stack(levels)
    index = SparseCoordinateIndex.from_coo_stack(stacked, shapes)
    idx = stacked.indices()
    assert torch.equal(index.batch_indices, idx[0]) and torch.equal(index.level_indices, idx[-1])
    assert torch.equal(index.spatial_indices, idx[1:-1].T)
    rows, found = index.lookup(idx[0], idx[-1], idx[1:-1].T)
    assert torch.equal(rows, torch.arange(3)) and found.all()
    features, same = multilevel_features(stacked, shapes, index=index)
    assert same is index and torch.equal(features, stacked.values())
    # spconv list: rows are the concatenation of the levels
    features, sp_index = multilevel_features(levels)
    assert torch.equal(features, torch.cat([lvl.features for lvl in levels]))
    assert multilevel_features(levels, index=sp_index)[1] is sp_index
    assert sp_index.level_indices.tolist() == [0, 0, 1]


def test_index_attributes_and_to():
    levels = make_levels([[(1, 0, 2, 3)], [(0, 1, 1, 0)]], [[2, 3, 4], [2, 2, 2]], 2, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    assert (index.n_voxels, index.n_levels, index.position_dim, index.batch_size) == (2, 2, 3, 2)
    assert index.level_spatial_shapes.tolist() == [[2, 3, 4], [2, 2, 2]]
    assert index.spatial_indices.dtype == torch.int64 and index.spatial_indices.tolist() == [[0, 2, 3], [1, 1, 0]]
    moved = index.to("cpu")
    assert moved.lookup(torch.tensor([0]), torch.tensor([1]), torch.tensor([[1, 1, 0]]))[0].tolist() == [1]
    assert "n_voxels=2" in repr(index)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (spconv CUDA HashTable)")
def test_index_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    shapes = [[41, 160, 140], [21, 80, 70]]
    voxels = [
        _unravel(torch.randperm(2 * math.prod(s), generator=gen)[:5000].tolist(), [2, *s]) for s in shapes
    ]
    levels = make_levels(voxels, shapes, 2, 1)
    index = SparseCoordinateIndex.from_spconv(levels)
    cuda_index = index.to("cuda")
    b, l, c = _random_queries(index, 20_000, gen)
    rows, found = index.lookup(b, l, c)
    rows_c, found_c = cuda_index.lookup(b.cuda(), l.cuda(), c.cuda())
    assert torch.equal(rows_c.cpu(), rows) and torch.equal(found_c.cpu(), found)
    dup = make_levels([[(0, 1, 1, 1), (0, 1, 1, 1)]], [[2, 2, 2]], 1, 1)
    dup[0] = SparseConvTensor(dup[0].features.cuda(), dup[0].indices.cuda(), [2, 2, 2], 1)
    with pytest.raises(ValueError, match="duplicate coordinates"):
        SparseCoordinateIndex.from_spconv(dup)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (spconv CUDA HashTable)")])]


def _small_index(device):
    gen = torch.Generator().manual_seed(5)
    shapes = [[9, 40, 35], [5, 20, 18]]
    voxels = [_unravel(torch.randperm(2 * math.prod(s), generator=gen)[:700].tolist(), [2, *s]) for s in shapes]
    index = SparseCoordinateIndex.from_spconv(make_levels(voxels, shapes, 2, 1))
    return (index if device == "cpu" else index.to(device)), gen


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_lookups_equal_compacted_queries(device, corner_regime):
    """Out-of-range queries go to the hash table with the key -1 (no compaction): the rows equal
    those of querying only the in-range keys and scattering them back (the former CUDA path)."""
    from adapters.spconv_compat import hash_query

    index, gen = _small_index(device)
    b, l, c = (t.to(device) for t in _random_queries(index, 6000, gen, margin=3))
    keys, valid = index._query_keys(b, l, c)
    assert 0 < int(valid.sum()) < valid.numel() and bool((keys[~valid] == -1).all())
    expected = torch.full_like(keys, -1)
    values, found = hash_query(index._table, keys[valid])
    expected[valid] = torch.where(found, values, -1)
    rows, found = index.lookup(b, l, c)
    assert torch.equal(rows, expected) and torch.equal(found, expected >= 0)
    assert bool(found.any())
    # base cells: querying every cell's key (guard keys for cells outside the key space, keys of
    # their own for cells outside their level) equals querying only the in-level cells; the ids
    # of out-of-range cells are the all-absent row
    table, corner_rows = index._corner_table()
    absent = corner_rows.shape[0] - 1
    # per-level bounds of base cells: batch and level in range, every axis in [-1, shape_l - 1]
    shape = index.level_spatial_shapes[l.clamp(0, index.n_levels - 1)]
    valid = (b >= 0) & (b < index.batch_size) & (l >= 0) & (l < index.n_levels) & ((c >= -1) & (c < shape)).all(-1)
    keys = index._base_cell_keys(b, l, c)
    expected = torch.full_like(keys, absent)
    if device == "cpu":  # the direct-address part and the hash table (_ids_of_keys)
        expected[valid] = index._ids_of_keys(keys[valid], torch.empty(int(valid.sum()), dtype=torch.int32)).long()
    else:
        values, hit = hash_query(table, keys[valid])
        expected[valid] = torch.where(hit, values.long(), absent)
    _check_regime(index, corner_regime)
    ids = index.base_cell_ids(b, l, c)
    assert torch.equal(ids, expected) and bool((ids != absent).any()) and bool((ids[~valid] == absent).all())


@pytest.mark.parametrize("device", DEVICES)
def test_base_cell_ids_equal_corner_enumeration_out_of_range(device, corner_regime):
    """The corner rows of every base cell (ids by the one-clamp key routine _base_cell_keys) equal
    the rows of its 2**D corners looked up one by one in the voxel table (per-level bounds),
    for cells on, past and far beyond every border (-2, the extent, +-2**40), cells outside
    their own level but inside the extent, and batch / level indices out of range: an
    out-of-range cell never aliases another voxel."""
    index, gen = _small_index(device)
    b, l, c = _random_queries(index, 4000, gen, margin=3)
    extent = index.level_spatial_shapes.max(0).values.cpu()
    edges = torch.tensor([-2**40, -3, -2, -1, 0, 1, 2**40])
    c[:700] = edges[torch.randint(0, edges.numel(), (700, c.shape[1]), generator=gen)]
    c[700:900] = extent - torch.randint(-1, 3, (200, c.shape[1]), generator=gen)  # around the key-space edge
    own = index.level_spatial_shapes.cpu()[l[900:1100].clamp(0, index.n_levels - 1)]
    c[900:1100] = own - torch.randint(-1, 3, (200, c.shape[1]), generator=gen)  # around the own level's edge
    b, l, c = (t.to(device) for t in (b, l, c))
    _check_regime(index, corner_regime)
    rows = index.corner_rows(index.base_cell_ids(b, l, c)).to(torch.int64)
    offsets = adapters.corner_offsets(index.position_dim, device)
    expected, _ = index.lookup(b[:, None], l[:, None], c[:, None, :] + offsets)
    assert torch.equal(rows, expected)
    assert bool((rows >= 0).any()) and bool((rows < 0).all(-1).any())
    # the keys of in-level base cells ([-1, shape_l - 1] per axis) are distinct over (batch, level,
    # cell) and never the guard 0; the cells of the extent outside their own level get none of them
    cells = torch.cartesian_prod(*[torch.arange(-1, int(e)) for e in extent]).to(device)
    inside, outside = [], []
    for ll in range(index.n_levels):
        in_level = (cells < index.level_spatial_shapes[ll]).all(-1)
        for bb in range(index.batch_size):
            keys = index._base_cell_keys(torch.tensor(bb, device=device), torch.tensor(ll, device=device), cells)
            inside.append(keys[in_level])
            outside.append(keys[~in_level])
    inside, outside = torch.cat(inside), torch.cat(outside)
    assert inside.unique().numel() == inside.numel() and bool((inside > 0).all())
    assert outside.numel() and not bool(torch.isin(outside, inside).any())


@pytest.mark.parametrize("device", DEVICES)
def test_base_cell_keys_in_range_path_equals_general_path(device, corner_regime):
    """With every batch and level index in range, _base_cell_keys forms the key axis by axis (the
    CPU fast path of the deformable encoder); its keys equal the general path's (taken when one
    index is out of range), also for b [S, 1] and l [1, J] broadcast as the sampling passes them,
    and its ids on cells far beyond every border equal the corners looked up one by one: an
    out-of-range cell never aliases another voxel on this path either."""
    index, gen = _small_index(device)
    n = 3000
    extent = index.level_spatial_shapes.max(0).values.cpu()
    b = torch.randint(0, index.batch_size, (n,), generator=gen)
    l = torch.randint(0, index.n_levels, (n,), generator=gen)
    c = (torch.rand(n, index.position_dim, generator=gen) * (extent + 6)).long() - 3
    edges = torch.tensor([-2**40, -3, -2, -1, 0, 1, 2**40])
    c[:500] = edges[torch.randint(0, edges.numel(), (500, c.shape[1]), generator=gen)]
    c[500:700] = extent - torch.randint(-1, 3, (200, c.shape[1]), generator=gen)
    b, l, c = (t.to(device) for t in (b, l, c))
    fast = index._base_cell_keys(b, l, c)
    general = index._base_cell_keys(torch.cat([b, b.new_tensor([index.batch_size])]), torch.cat([l, l[:1]]),
                                    torch.cat([c, c[:1]]))
    assert torch.equal(fast, general[:-1])
    # broadcast (b [S, 1], l [1, J], cells [S, J, D]) as in the fused deformable encoder
    s, j = 50, n // 50
    fast = index._base_cell_keys(b[:s, None], l[None, :j], c[: s * j].view(s, j, -1))
    general = index._base_cell_keys(b[:s, None].expand(s, j).reshape(-1), l[None, :j].expand(s, j).reshape(-1),
                                    c[: s * j])
    assert fast.shape == (s, j) and torch.equal(fast.reshape(-1), general)
    rows = index.corner_rows(index.base_cell_ids(b, l, c)).to(torch.int64)
    offsets = adapters.corner_offsets(index.position_dim, device)
    expected, _ = index.lookup(b[:, None], l[:, None], c[:, None, :] + offsets)
    assert torch.equal(rows, expected)
    assert bool((rows >= 0).any()) and bool((rows < 0).all(-1).any())


def _column_queries(index, rows, levels, gen):
    """Cells ``[rows, J, D]`` over and past every border (edges -2**40 .. 2**40, around the key-space
    and the own level's edge), batch ``[rows, 1]`` in range, levels ``[1, J]`` as given."""
    dim, j = index.position_dim, len(levels)
    extent = index.level_spatial_shapes.max(0).values
    l = torch.tensor(levels)[None, :]
    b = torch.randint(0, index.batch_size, (rows, 1), generator=gen)
    c = (torch.rand(rows, j, dim, generator=gen) * (extent + 6)).long() - 3
    edges = torch.tensor([-2**40, -3, -2, -1, 0, 1, 2**40])
    c[: rows // 6] = edges[torch.randint(0, edges.numel(), (rows // 6, j, dim), generator=gen)]
    c[rows // 6 : rows // 3] = extent - torch.randint(-1, 3, (rows // 3 - rows // 6, j, dim), generator=gen)
    own = index.level_spatial_shapes[l[0]]
    c[rows // 3 : rows // 2] = own - torch.randint(-1, 3, (rows // 2 - rows // 3, j, dim), generator=gen)
    return b, l, c


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("levels", [[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0], [1, 1, 1], [0, 0]])
def test_base_cell_ids_column_levels_equal_general_path(levels, batch_size, corner_regime):
    """Levels per column ([1, J]) and batch per row ([S, 1]) -- the deformable sampling's layout --
    take the per-column path (one key pass with the columns' bounds; the direct-address columns
    gathered, the other levels' columns read from the pages or spconv's table): its ids equal the
    general path's (the same samples flattened) and the corners looked up one by one, for cells far
    past every border, with levels in blocks or interleaved, every ``out`` kind; an out-of-range
    batch or level (general path) gives the same ids too."""
    gen = torch.Generator().manual_seed(11 + batch_size)
    # the key blocks of _small_index's map (so that CORNER_REGIMES apply) with batch_size 1 too
    shapes = [[9, 40, 35], [5, 20, 18]] if batch_size == 2 else [[9, 40, 73], [5, 20, 39]]
    voxels = [_unravel(torch.randperm(batch_size * math.prod(s), generator=gen)[:700].tolist(), [batch_size, *s]) for s in shapes]
    index = SparseCoordinateIndex.from_spconv(make_levels(voxels, shapes, batch_size, 1))
    _check_regime(index, corner_regime)
    rows = 300
    b, l, c = _column_queries(index, rows, levels, gen)
    j = len(levels)
    flat = index.base_cell_ids(b.expand(rows, j).reshape(-1), l.expand(rows, j).reshape(-1), c.reshape(-1, 3)).view(rows, j)
    offsets = adapters.corner_offsets(3)
    corners, _ = index.lookup(b[..., None].expand(rows, j, 1), l[..., None], c[..., None, :] + offsets)
    assert torch.equal(index.corner_rows(flat).to(torch.int64), corners)
    absent = index.corner_row_table().shape[0] - 1
    assert bool((flat != absent).any()) and bool((flat == absent).any())
    called = []
    column_ids = SparseCoordinateIndex._column_ids
    def spy(self, *args):
        called.append(column_ids(self, *args))
        return called[-1]
    SparseCoordinateIndex._column_ids = spy
    try:
        assert torch.equal(index.base_cell_ids(b, l, c), flat)
        wide = torch.full((rows, j + 5), -7, dtype=torch.int32)
        for out in (torch.empty(rows, j, dtype=torch.int32), torch.empty(rows, j, dtype=torch.int64), wide[:, 2 : 2 + j]):
            got = index.base_cell_ids(b, l, c, out=out)
            assert got is out and torch.equal(got.long(), flat)
        assert bool((wide[:, :2] == -7).all()) and bool((wide[:, 2 + j :] == -7).all())
        assert called and all(called)  # every call above took the per-column path
        # a batch index or a level out of range: the general path, the same ids for the others
        b_bad, l_bad = b.clone(), l.clone()
        b_bad[0, 0], l_bad[0, -1] = batch_size, index.n_levels
        called.clear()
        for bb, ll in ((b_bad, l), (b, l_bad)):
            got = index.base_cell_ids(bb, ll, c)
            expect = flat.clone()
            if bb is b_bad:
                expect[0] = absent
            else:
                expect[:, -1] = absent
            assert torch.equal(got, expect)
        assert called == [False, False]
    finally:
        SparseCoordinateIndex._column_ids = column_ids


def test_paged_table_layout_and_budget(monkeypatch):
    """The paged part of the corner table: the smallest directory + pages over the page sizes, every
    stored key found at its id and every other key of the span the absent id; over the budget none."""
    gen = torch.Generator().manual_seed(3)
    n_keys = 5000
    keys = torch.randperm(n_keys, generator=gen)[:300]
    keys[:50] = torch.arange(2000, 2050)  # a dense run
    ids = torch.randperm(300, generator=gen).to(torch.int32)
    paged = coordinate_index._paged_table(keys, ids, n_keys, 999, 17)
    shift, first, directory, pages = paged
    sizes = {}
    for sh in coordinate_index._PAGE_SHIFTS:
        sizes[sh] = 4 * ((n_keys + (1 << sh) - 1) >> sh) + 4 * ((torch.unique(keys >> sh).numel() + 1) << sh)
    assert first == 17 and sizes[shift] == min(sizes.values())
    assert directory.dtype == pages.dtype == torch.int32 and 4 * (directory.numel() + pages.numel()) == sizes[shift]
    rel = torch.arange(n_keys)
    got = pages[rel + directory[rel >> shift].long()]
    expected = torch.full((n_keys,), 999, dtype=torch.int32)
    expected[keys] = ids
    assert torch.equal(got, expected)
    monkeypatch.setattr(coordinate_index, "PAGED_TABLE_BYTES", sizes[shift] - 1)
    assert coordinate_index._paged_table(keys, ids, n_keys, 999, 17) is None


@pytest.mark.parametrize("device", DEVICES)
def test_minus_one_key_is_a_miss(device):
    """The key -1 (what out-of-range cells carry) is no stored key and not the table's empty marker."""
    from adapters.spconv_compat import hash_insert, hash_query, new_hash_table

    table = new_hash_table(device, 4)
    hash_insert(table, torch.tensor([0, 5, 2**40], device=device), torch.tensor([7, 8, 9], device=device))
    values, found = hash_query(table, torch.tensor([-1, 5, -1, 0, 3, 2**40, -1], device=device))
    assert found.tolist() == [False, True, False, True, False, True, False]
    assert values[found].tolist() == [8, 7, 9]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lookups_do_not_synchronize():
    """index.lookup / base_cell_ids / lookup_corners issue no host-device synchronisation on CUDA."""
    index, gen = _small_index("cuda")
    b, l, c = (t.cuda() for t in _random_queries(index, 4000, gen, margin=3))
    index._corner_table()  # built once per index (it does synchronise)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows, _ = index.lookup(b, l, c)
        ids = index.base_cell_ids(b, l, c)
        corners = index.lookup_corners(b, l, c)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    cpu = index.to("cpu")
    assert torch.equal(rows.cpu(), cpu.lookup(b.cpu(), l.cpu(), c.cpu())[0])
    assert torch.equal(corners.cpu(), cpu.lookup_corners(b.cpu(), l.cpu(), c.cpu()))
    assert ids.shape == b.shape


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (the index on cuda:1, cuda:0 current)")
def test_index_on_second_cuda_device():
    index, gen = _small_index("cpu")
    b, l, c = _random_queries(index, 3000, gen)
    torch.cuda.set_device(0)
    on_1 = index.to("cuda:1")
    rows, found = on_1.lookup(b.to("cuda:1"), l.to("cuda:1"), c.to("cuda:1"))
    assert rows.device == torch.device("cuda:1")
    assert torch.equal(rows.cpu(), index.lookup(b, l, c)[0])
    assert torch.equal(on_1.lookup_corners(b.to("cuda:1"), l.to("cuda:1"), c.to("cuda:1")).cpu(), index.lookup_corners(b, l, c))


# --- errors ------------------------------------------------------------------------------------
def _levels_2d():
    return make_levels([[(0, 1, 2), (1, 0, 0)], [(1, 1, 1)]], [[3, 4], [2, 2]], 2, 3)


def test_duplicates_are_errors():
    dup = make_levels([[(0, 1, 2), (1, 0, 0), (0, 1, 2)]], [[3, 4]], 2, 1)
    with pytest.raises(ValueError, match=r"duplicate coordinates: 1 of 3 voxels.*rows \[0, 2\] are both \(batch=0, level=0, coords=\[1, 2\]\)"):
        SparseCoordinateIndex.from_spconv(dup)
    with pytest.raises(ValueError, match="duplicate coordinates"):
        spconv_to_coo_stack(dup)
    with pytest.raises(ValueError, match="duplicate coordinates"):
        multilevel_features(dup)
    # a COO stack with a repeated index (coalesce() would silently sum it)
    idx = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0], [1, 0, 0, 0]]).T
    stacked = torch.sparse_coo_tensor(idx, torch.ones(3, 2), (2, 3, 4, 1, 2))
    with pytest.raises(ValueError, match="duplicate coordinates"):
        coo_stack_to_spconv(stacked, [[3, 4]])
    with pytest.raises(ValueError, match="duplicate coordinates"):
        multilevel_features(stacked, [[3, 4]])
    with pytest.raises(ValueError, match="duplicate coordinates"):
        SparseCoordinateIndex.from_coo_stack(stacked, [[3, 4]])
    with pytest.raises(ValueError, match="duplicate coordinates"):
        SparseCoordinateIndex(idx[0], idx[-1], idx[1:-1].T, [[3, 4]], 2)


def test_coo_stack_errors():
    stacked, shapes = spconv_to_coo_stack(_levels_2d())
    with pytest.raises(TypeError, match=r"stacked_feature_maps must be a sparse COO tensor .* got layout torch.strided"):
        coo_stack_to_spconv(stacked.to_dense(), shapes)
    with pytest.raises(TypeError, match="stacked_feature_maps must be a torch.Tensor, got list"):
        coo_stack_to_spconv([stacked], shapes)
    with pytest.raises(ValueError, match=r"exactly one dense \(feature\) dim, got stacked_feature_maps.dense_dim\(\)=0"):
        coo_stack_to_spconv(stacked.to_dense().to_sparse(), shapes)
    four_d = torch.sparse_coo_tensor(torch.zeros(6, 1, dtype=torch.long), torch.ones(1, 2), (1, 2, 2, 2, 2, 1, 2))
    with pytest.raises(ValueError, match=r"2 or 3 spatial dims, got stacked_feature_maps.shape=\(1, 2, 2, 2, 2, 1, 2\)"):
        coo_stack_to_spconv(four_d, [[2, 2, 2, 2]])
    one_d = torch.sparse_coo_tensor(torch.zeros(3, 1, dtype=torch.long), torch.ones(1, 2), (1, 2, 1, 2))
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        coo_stack_to_spconv(one_d, [[2]])
    with pytest.raises(ValueError, match="level_spatial_shapes is required"):
        coo_stack_to_spconv(stacked, None)
    # level-count mismatch
    with pytest.raises(ValueError, match=r"level_spatial_shapes must have shape \[n_levels=2, 2\].*got level_spatial_shapes.shape=\(3, 2\)"):
        coo_stack_to_spconv(stacked, [[3, 4], [2, 2], [1, 1]])
    with pytest.raises(ValueError, match=r"level_spatial_shapes must have shape \[n_levels=2, 2\].*\(2, 3\)"):
        coo_stack_to_spconv(stacked, [[3, 4, 1], [2, 2, 1]])
    with pytest.raises(TypeError, match=r"level_spatial_shapes must have an integer dtype, got level_spatial_shapes.dtype=torch.float32"):
        coo_stack_to_spconv(stacked, shapes.float())
    with pytest.raises(ValueError, match=r"level_spatial_shapes must be positive, got \[\[3, 4\], \[0, 2\]\]"):
        coo_stack_to_spconv(stacked, [[3, 4], [0, 2]])
    with pytest.raises(ValueError, match=r"spatial extent \(3, 4\) is smaller than the per-axis maximum of level_spatial_shapes \[3, 5\]"):
        coo_stack_to_spconv(stacked, [[3, 5], [2, 2]])
    # a voxel outside its own level (inside the stack extent): level 1 is 2x2, voxel at (2, 3)
    idx = torch.tensor([[0, 2, 3, 1]]).T
    bad = torch.sparse_coo_tensor(idx, torch.ones(1, 3), (2, 3, 4, 2, 3))
    with pytest.raises(ValueError, match=r"voxel 0 \(batch=0, level=1, coords=\[2, 3\]\) is outside the map.*\[2, 2\]"):
        coo_stack_to_spconv(bad, [[3, 4], [2, 2]])
    with pytest.raises(ValueError, match="is outside the map"):
        multilevel_features(bad, [[3, 4], [2, 2]])
    with pytest.raises(ValueError, match="is outside the map"):
        SparseCoordinateIndex.from_coo_stack(bad, [[3, 4], [2, 2]])


def test_spconv_levels_errors():
    levels = _levels_2d()
    with pytest.raises(TypeError, match="levels must be a list of SparseConvTensor .*got SparseConvTensor"):
        spconv_to_coo_stack(levels[0])
    with pytest.raises(ValueError, match="levels must hold at least one SparseConvTensor, got an empty list"):
        spconv_to_coo_stack([])
    with pytest.raises(TypeError, match="levels\\[1\\] must be a SparseConvTensor, got Tensor"):
        spconv_to_coo_stack([levels[0], levels[1].features])
    # batch-size mismatch
    other = SparseConvTensor(levels[1].features, levels[1].indices, [2, 2], 3)
    with pytest.raises(ValueError, match=r"levels\[1\].batch_size=3 differs from levels\[0\].batch_size=2"):
        spconv_to_coo_stack([levels[0], other])
    # voxel batch index beyond batch_size
    beyond = SparseConvTensor(levels[1].features, torch.tensor([[2, 1, 1]], dtype=torch.int32), [2, 2], 2)
    with pytest.raises(ValueError, match=r"batch=2, level=1.*expected batch in \[0, 2\)"):
        spconv_to_coo_stack([levels[0], beyond])
    # ndim mismatch between levels / wrong ndim
    three_d = SparseConvTensor(torch.ones(1, 3), torch.tensor([[0, 1, 1, 1]], dtype=torch.int32), [2, 2, 2], 2)
    with pytest.raises(ValueError, match=r"levels\[1\].spatial_shape=\[2, 2, 2\] is not 2D like levels\[0\]"):
        spconv_to_coo_stack([levels[0], three_d])
    one_d = SparseConvTensor(torch.ones(1, 3), torch.tensor([[0, 1]], dtype=torch.int32), [4], 1)
    with pytest.raises(ValueError, match=r"levels must be 2D or 3D, got levels\[0\].spatial_shape=\[4\]"):
        spconv_to_coo_stack([one_d])
    # channel mismatch
    narrow = SparseConvTensor(torch.ones(1, 2), levels[1].indices, [2, 2], 2)
    with pytest.raises(ValueError, match=r"levels\[1\].features must have shape \[N, 3\], got \(1, 2\)"):
        spconv_to_coo_stack([levels[0], narrow])
    # non-integer indices (spconv's constructor asserts int32, but the attribute can be replaced)
    floaty = SparseConvTensor(levels[1].features, levels[1].indices, [2, 2], 2)
    floaty.indices = floaty.indices.float()
    with pytest.raises(TypeError, match=r"levels\[1\].indices must be integer, got torch.float32"):
        spconv_to_coo_stack([levels[0], floaty])
    # coordinates outside the level's spatial shape, negative coordinates
    for coords in ([[0, 2, 0]], [[0, 0, -1]]):
        outside = SparseConvTensor(levels[1].features, torch.tensor(coords, dtype=torch.int32), [2, 2], 2)
        with pytest.raises(ValueError, match=r"levels\[1\]: voxel 0 \(batch=0, level=1, coords=.*\) is outside the map.*shape \[2, 2\]"):
            spconv_to_coo_stack([levels[0], outside])
        with pytest.raises(ValueError, match="is outside the map"):
            SparseCoordinateIndex.from_spconv([levels[0], outside])
    # dtype/device mismatch between levels
    doubled = SparseConvTensor(levels[1].features.double(), levels[1].indices, [2, 2], 2)
    with pytest.raises(TypeError, match=r"levels\[1\].features is torch.float64 on cpu, levels\[0\].features is torch.float32"):
        spconv_to_coo_stack([levels[0], doubled])


def test_multilevel_features_errors():
    levels = _levels_2d()
    stacked, shapes = spconv_to_coo_stack(levels)
    with pytest.raises(ValueError, match=r"level_spatial_shapes=\[\[3, 4\], \[2, 3\]\] does not match the SparseConvTensor spatial shapes \[\[3, 4\], \[2, 2\]\]"):
        multilevel_features(levels, [[3, 4], [2, 3]])
    with pytest.raises(ValueError, match=r"level_spatial_shapes=\[\[3, 4\]\] does not match"):
        multilevel_features(levels, [[3, 4]])  # level-count mismatch
    with pytest.raises(TypeError, match="index must be a SparseCoordinateIndex, got dict"):
        multilevel_features(levels, index={})
    # mismatched prebuilt indexes: other voxels, other order, other batch size, other shapes
    other = make_levels([[(0, 1, 2), (1, 0, 1)], [(1, 1, 1)]], [[3, 4], [2, 2]], 2, 3)
    swapped = make_levels([[(1, 0, 0), (0, 1, 2)], [(1, 1, 1)]], [[3, 4], [2, 2]], 2, 3)
    bigger_batch = make_levels([[(0, 1, 2), (1, 0, 0)], [(1, 1, 1)]], [[3, 4], [2, 2]], 3, 3)
    bigger_shape = make_levels([[(0, 1, 2), (1, 0, 0)], [(1, 1, 1)]], [[3, 4], [2, 3]], 2, 3)
    for wrong in (other, swapped, bigger_batch, bigger_shape):
        wrong_index = SparseCoordinateIndex.from_spconv(wrong)
        with pytest.raises(ValueError, match=r"index SparseCoordinateIndex\(.*\) was not built from this map"):
            multilevel_features(levels, index=wrong_index)
    # same voxels, but the COO stack's (coalesced) row order differs from the spconv list's
    crossed = make_levels([[(1, 0, 0)], [(0, 1, 1)]], [[3, 4], [2, 2]], 2, 3)
    crossed_stack, crossed_shapes = spconv_to_coo_stack(crossed)
    with pytest.raises(ValueError, match="was not built from this map"):
        multilevel_features(crossed_stack, crossed_shapes, index=SparseCoordinateIndex.from_spconv(crossed))
    assert multilevel_features(stacked, shapes, index=SparseCoordinateIndex.from_coo_stack(stacked, shapes))[0].shape == (3, 3)
    with pytest.raises(TypeError, match="stacked_feature_maps must be a sparse COO tensor"):
        multilevel_features(stacked.to_dense(), shapes)


def test_index_constructor_and_lookup_errors():
    b = torch.tensor([0, 1])
    l = torch.tensor([0, 0])
    c = torch.tensor([[1, 2], [0, 0]])
    with pytest.raises(TypeError, match=r"spatial_indices must have an integer dtype, got spatial_indices.dtype=torch.float32"):
        SparseCoordinateIndex(b, l, c.float(), [[3, 4]], 2)
    with pytest.raises(TypeError, match=r"batch_indices must have an integer dtype, got batch_indices.dtype=torch.bool"):
        SparseCoordinateIndex(b.bool(), l, c, [[3, 4]], 2)
    with pytest.raises(TypeError, match="level_indices must be a dense"):
        SparseCoordinateIndex(b, l.to_sparse(), c, [[3, 4]], 2)
    with pytest.raises(ValueError, match=r"spatial_indices must have shape \[N, 2\] to match level_spatial_shapes, got spatial_indices.shape=\(2, 3\)"):
        SparseCoordinateIndex(b, l, torch.zeros(2, 3, dtype=torch.long), [[3, 4]], 2)
    with pytest.raises(ValueError, match=r"batch_indices must have shape \[2\], got batch_indices.shape=\(3,\)"):
        SparseCoordinateIndex(torch.tensor([0, 1, 0]), l, c, [[3, 4]], 2)
    with pytest.raises(ValueError, match="batch_size must be a non-negative int, got batch_size=-1"):
        SparseCoordinateIndex(b, l, c, [[3, 4]], -1)
    with pytest.raises(ValueError, match="expected batch in \\[0, 1\\)"):
        SparseCoordinateIndex(b, l, c, [[3, 4]], 1)  # batch-size mismatch with the voxels
    with pytest.raises(ValueError, match="overflows int64 keys"):
        SparseCoordinateIndex(b, l, torch.zeros(2, 3, dtype=torch.long), [[2**21, 2**21, 2**21]], 2)
    with pytest.raises(ValueError, match=r"level_spatial_shapes must have shape \[n_levels, position_dim\].*got level_spatial_shapes.shape=\(2,\)"):
        SparseCoordinateIndex(b, l, c, torch.tensor([3, 4]), 2)
    with pytest.raises(TypeError, match=r"level_spatial_shapes must be an integer tensor or a sequence of per-level int sequences, got \[3, 4\]"):
        SparseCoordinateIndex(b, l, c, [3, 4], 2)
    index = SparseCoordinateIndex(b, l, c, [[3, 4]], 2)
    with pytest.raises(ValueError, match=r"spatial_indices must have a last dim of 2, got spatial_indices.shape=\(2, 3\)"):
        index.lookup(b, l, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"spatial_indices must have an integer dtype, got spatial_indices.dtype=torch.float32"):
        index.lookup(b, l, torch.full((2, 2), -0.5))  # truncation would alias (0, 0)
    with pytest.raises(TypeError, match="batch_indices must have an integer dtype"):
        index.lookup(b.double(), l, c)


def test_public_api():
    assert set(adapters.__all__) >= {
        "SparseCoordinateIndex",
        "coo_stack_to_spconv",
        "spconv_to_coo_stack",
        "multilevel_features",
        "hash_insert",
        "hash_query",
        "patch_spconv_cpu_stream",
    }


@pytest.mark.parametrize(
    "shapes",
    [[(3, 1), (1, 4)], [(2, 3, 4), (4,)], [(5,), ()], [(1,), (7, 1, 1)], [(0, 1), (1, 3)], [(2, 1), (2, 1), (1, 1)]],
)
def test_broadcast_shapes_matches_torch(shapes):
    from adapters import broadcast_shapes

    assert broadcast_shapes(*shapes) == torch.broadcast_shapes(*shapes)


def test_broadcast_shapes_rejects_incompatible():
    from adapters import broadcast_shapes

    with pytest.raises(RuntimeError):
        torch.broadcast_shapes((2, 3), (4,))
    with pytest.raises(RuntimeError, match="do not broadcast"):
        broadcast_shapes((2, 3), (4,))
