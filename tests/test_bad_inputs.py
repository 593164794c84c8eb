"""Regression tests of issue 10's six findings (hostile inputs at the public boundary).

Each test failed on the code before the fix (segfault / heap garbage / silent wrong answer /
raw torch error) and pins the written policy (README, "Bad input").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from adapters import SparseCoordinateIndex
from sparse_msda import (
    SparseMSDeformableAttention,
    SparseMSDeformableAttentionBlock,
    SparseMultilevelMapAttentionBlock,
    SparseNeighborhoodAttentionBlock,
)
from sparse_msda.backends import cpu as cpu_backend
from sparse_msda.functional import neighborhood as nbh
from sparse_msda.functional.deformable import sparse_bilinear_sample
from sparse_msda.functional.sampling import sparse_weighted_gather
from tests.conftest import cpu_backends

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PATHS = cpu_backends()  # SPARSE_MSDA_BACKEND: every backend that runs CPU tensors here (cpu: the C++ kernels, reference)


def _issue_map(dtype=torch.float64):
    """The issue's minimal case: one level [8, 8], batch 2, 4 voxels."""
    idx = torch.tensor([[0, 4, 4, 0], [0, 4, 5, 0], [1, 3, 3, 0], [1, 5, 4, 0]]).T
    vals = torch.randn(4, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return torch.sparse_coo_tensor(idx, vals, (2, 8, 8, 1, 8)).coalesce(), [[8, 8]]


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a segfault fails the test instead of killing pytest)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------ finding 1: out-of-bounds indices
@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_batch_index_in_subprocess(path):
    """batch_indices=[10**6] with a background segfaulted (SIGSEGV) in the CPU kernel."""
    proc = _run_isolated(f"""
        import os; os.environ["SPARSE_MSDA_BACKEND"] = "{path}"
        import torch
        from tests.test_bad_inputs import _issue_map
        from sparse_msda import multilevel_sparse_bilinear_grid_sample, sparse_split_heads
        from sparse_msda.functional.deformable import sparse_bilinear_sample
        st, shapes = _issue_map()
        bg = torch.randn(2, 1, 8, dtype=torch.float64)
        try:
            sparse_bilinear_sample(st, torch.tensor([[4.3, 4.7]], dtype=torch.float64),
                torch.tensor([10**6]), shapes, torch.tensor([0]), background_embedding=bg)
        except ValueError as err:
            print("ValueError:", err)
        try:  # the seed-API function (head-split map, positions [N, L, H, D])
            multilevel_sparse_bilinear_grid_sample(sparse_split_heads(st, 1), torch.tensor([[[[4.3, 4.7]]]], dtype=torch.float64),
                torch.tensor([10**6]), torch.tensor(shapes), background_embedding=bg[:, :, None])
        except ValueError as err:
            print("ValueError (seed API):", err)
    """)
    assert proc.returncode == 0, f"crashed (rc={proc.returncode}): {proc.stderr[-2000:]}"
    assert "ValueError:" in proc.stdout and "batch_indices" in proc.stdout and "1000000" in proc.stdout
    assert "ValueError (seed API): batch_indices must lie in [0, 2)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_bg", [True, False])
@pytest.mark.parametrize("bad_batch", [2, -1])
def test_out_of_range_batch_and_level_raise(monkeypatch, path, with_bg, bad_batch):
    """b = batch_size gave heap garbage, b = -1 the last voxel's features (both paths)."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    st, shapes = _issue_map()
    pos = torch.tensor([[4.3, 4.7], [3.5, 3.5]], dtype=torch.float64)
    bg = torch.randn(2, 1, 8, dtype=torch.float64) if with_bg else None
    with pytest.raises(ValueError, match=rf"batch_indices must lie in \[0, 2\).*{bad_batch}"):
        sparse_bilinear_sample(st, pos, torch.tensor([0, bad_batch]), shapes, torch.tensor([0, 0]), background_embedding=bg)
    for bad_level in (1, -1):
        with pytest.raises(ValueError, match=rf"level_indices must lie in \[0, 1\).*{bad_level}"):
            sparse_bilinear_sample(st, pos, torch.tensor([0, 1]), shapes, torch.tensor([0, bad_level]), background_embedding=bg)


@pytest.mark.parametrize("path", PATHS)
def test_weighted_gather_checks_indices_before_the_kernel(monkeypatch, path):
    """The lower-level gather (the only way to the C++ sampling kernel) checks batch, level and head."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    st, shapes = _issue_map()
    index = SparseCoordinateIndex.from_coo_stack(st, shapes)
    table = torch.randn(4 * 2, 4, dtype=torch.float64)
    bg = torch.randn(2 * 1 * 2, 4, dtype=torch.float64)
    pos = torch.full((3, 1, 2), 4.3, dtype=torch.float64)
    ok = dict(batch_indices=torch.zeros(3, 1, dtype=torch.int64), level_indices=torch.zeros(1, 1, dtype=torch.int64),
              head_indices=torch.ones(3, 1, dtype=torch.int64))
    for name, bad, rng in (("batch_indices", 7, "[0, 2)"), ("level_indices", 3, "[0, 1)"), ("head_indices", 2, "[0, 2)")):
        args = dict(ok)
        args[name] = torch.full_like(args[name], bad)
        with pytest.raises(ValueError, match=rf"{name} must lie in {re.escape(rng)}.*{bad}"):
            sparse_weighted_gather(table, index, pos, n_heads=2, background_table=bg, **args)


# ------------------------------------------------------------------ finding 2: one query corrupting its tile
def _nbh_case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [[16, 16], [8, 8]]
    rows = []
    for lvl, (h, w) in enumerate(shapes):
        cells = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        cells = cells[torch.rand(len(cells), generator=g) < 0.4]
        rows.append(torch.cat([torch.zeros(len(cells), 1, dtype=torch.int64), cells, torch.full((len(cells), 1), lvl)], 1))
    idx = torch.cat(rows).T
    st = torch.sparse_coo_tensor(idx, torch.randn(idx.shape[1], 16, generator=g, dtype=dtype), (1, 16, 16, 2, 16)).coalesce()
    n_q = 12
    pos = torch.rand(n_q, 2, generator=g, dtype=dtype) * 4 + 6
    # queries just beyond the top/bottom border (coarse centre clamped to -1 / 8) still see keys
    pos[0:4, 0] = 16.0 + torch.rand(4, generator=g, dtype=dtype) * 0.9
    pos[4:8, 0] = -torch.rand(4, generator=g, dtype=dtype) * 0.9
    query = torch.randn(n_q, 16, generator=g, dtype=dtype)
    block = SparseNeighborhoodAttentionBlock(16, 2, n_levels=2, neighborhood_sizes=[3, 3]).to(dtype)
    return block, query, pos, torch.tensor([0, n_q]), st, shapes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_bg", [False, True])
@pytest.mark.parametrize("bad", [1e30, -1e19, 1e19, 3e38])
def test_huge_query_position_does_not_change_other_queries(monkeypatch, path, with_bg, bad):
    """A 1e19 / 1e30 position made every other query of its tile lose all its keys."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    block, query, pos, offsets, st, shapes = _nbh_case()
    bg = torch.randn(1, 2, 16, dtype=torch.float64) if with_bg else None
    ref = block(query, pos, offsets, st, shapes, background_embedding=bg)
    pos2 = pos.clone()
    # query 9 moves far beyond the border, next to the border queries: same tile as them
    pos2[9] = torch.tensor([bad, pos[0 if bad > 0 else 4, 1]], dtype=pos.dtype)
    out = block(query, pos2, offsets, st, shapes, background_embedding=bg)
    others = torch.arange(len(pos)) != 9
    torch.testing.assert_close(out[others], ref[others], atol=1e-12, rtol=1e-12)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[9], query[9])  # outside the map: no key, attention branch zero (pre-norm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_query_position_raises(monkeypatch, path, bad):
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    block, query, pos, offsets, st, shapes = _nbh_case()
    pos[5, 0] = bad
    with pytest.raises(ValueError, match=r"query_spatial_positions must be finite.*query 5"):
        block(query, pos, offsets, st, shapes)
    msda = SparseMSDeformableAttention(16, 2, n_levels=2, n_points=2).to(torch.float64)
    with pytest.raises(ValueError, match=r"query_spatial_positions must be finite.*query 5"):
        msda(query, pos, offsets, st, shapes)
    with pytest.raises(ValueError, match=r"must be finite"):
        nbh.get_multilevel_neighborhoods(pos, shapes, [3, 3])


def test_window_centres_are_clamped_before_integer_conversion():
    shapes = torch.tensor([[16, 16], [8, 8]])
    pos = torch.tensor([[1e30, -1e30], [1e19, 5.0], [5.0, 5.0]], dtype=torch.float64)
    c = nbh.window_centres(pos, shapes[0], shapes)
    assert c.abs().max() <= 2**40  # clamped: no INT64_MIN / wrap-around
    torch.testing.assert_close(c[2], torch.tensor([[5, 5], [2, 2]]))
    cells, oob, _ = nbh.get_multilevel_neighborhoods(pos, shapes, [3, 5])
    assert oob[0].all() and oob[1].all() and not oob[2].all()


# ------------------------------------------------------------------ finding 3: non-contiguous inputs
@pytest.mark.parametrize("path", PATHS)
def test_column_major_positions_accepted(monkeypatch, path):
    """``stack.indices()[1:-1].T + 0.5`` is column-major: the neighborhood block rejected it."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    block, query, pos, offsets, st, shapes = _nbh_case()
    pos_t = pos.T.contiguous().T  # same values, column-major
    assert not pos_t.is_contiguous()
    ref = block(query, pos, offsets, st, shapes)
    torch.testing.assert_close(block(query, pos_t, offsets, st, shapes), ref, atol=0, rtol=0)
    q_t = query.T.contiguous().T
    torch.testing.assert_close(block(q_t, pos_t, offsets, st, shapes), ref, atol=0, rtol=0)
    sa = SparseMultilevelMapAttentionBlock(16, 2, n_levels=2).to(torch.float64)
    torch.testing.assert_close(sa(q_t, pos_t, offsets, st, shapes), sa(query, pos, offsets, st, shapes), atol=0, rtol=0)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with every stride changed (every other element of an interleaved tensor;
    2-D tensors also column-major)."""
    if t.ndim == 2:
        t = t.T.contiguous().T
    out = torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["msda", "msda_block", "nbh", "self", "grid"])
def test_strided_and_expanded_inputs_everywhere(monkeypatch, path, kind):
    """Strided / transposed / expanded query, positions, offsets, levels and background: the same
    output as contiguous inputs, bit for bit, in every module and the grid sample."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    _, query, pos, offsets, st, shapes = _nbh_case()
    n = len(pos)
    levels = torch.zeros(n, dtype=torch.int64)
    bg = torch.randn(1, 1, 16, dtype=torch.float64).expand(1, 2, 16)  # expanded: one row for both levels
    if kind == "grid":
        b = torch.zeros(n, dtype=torch.int64)
        ref = sparse_bilinear_sample(st, pos, b, shapes, levels, background_embedding=bg.contiguous())
        out = sparse_bilinear_sample(st, _strided(pos), b[:1].expand(n), shapes, _strided(levels), background_embedding=bg)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        return
    module = {
        "msda": lambda: SparseMSDeformableAttention(16, 2, n_levels=2, n_points=2),
        "msda_block": lambda: SparseMSDeformableAttentionBlock(16, 2, n_levels=2, n_points=2),
        "nbh": lambda: SparseNeighborhoodAttentionBlock(16, 2, n_levels=2, neighborhood_sizes=[3, 3]),
        "self": lambda: SparseMultilevelMapAttentionBlock(16, 2, n_levels=2),
    }[kind]().double()
    kw = {} if kind == "self" else dict(background_embedding=bg.contiguous())
    ref = module(query, pos, offsets, st, shapes, query_level_indices=levels, **kw)
    kw = {} if kind == "self" else dict(background_embedding=bg)
    q_exp = query[:1].expand(n, 16)  # an expanded query too
    ref_exp = module(q_exp.contiguous(), pos, offsets, st, shapes, query_level_indices=levels, **kw)
    out = module(_strided(query), _strided(pos), _strided(offsets), st, shapes, query_level_indices=levels[:1].expand(n), **kw)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(module(q_exp, pos.T.contiguous().T, offsets, st, shapes, query_level_indices=levels, **kw), ref_exp, atol=0, rtol=0)


# ------------------------------------------------------------------ finding 4: NaN sampling locations
@pytest.mark.parametrize("path", PATHS)
def test_nan_sampling_location_follows_grid_sample(monkeypatch, path):
    """A NaN location: NaN output (as F.grid_sample) in both paths; no NaN in any voxel's gradient."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    st, shapes = _issue_map()
    vals = st.values().clone().requires_grad_()
    st = torch.sparse_coo_tensor(st.indices(), vals, st.shape, is_coalesced=True)
    pos = torch.tensor([[4.3, 4.7], [float("nan"), 4.5], [4.5, float("nan")], [3.5, 3.5]], dtype=torch.float64)
    batch = torch.tensor([0, 0, 1, 1])
    out = sparse_bilinear_sample(st, pos, batch, shapes, torch.zeros(4, dtype=torch.int64))
    # dense reference
    dense = st.detach().to_dense()[..., 0, :].permute(0, 3, 1, 2)  # [B, C, H, W]
    grid = (pos.flip(-1) / 8 * 2 - 1)[:, None, None, :]  # (x, y) in [-1, 1]
    ref = torch.cat([F.grid_sample(dense[b:b + 1], grid[i:i + 1], align_corners=False)[0, :, 0, 0][None]
                     for i, b in enumerate(batch.tolist())])
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[1:3]).all() and torch.isfinite(out[[0, 3]]).all()
    grad_out = torch.zeros_like(out)
    grad_out[[0, 3]] = 1.0  # the loss ignores the NaN rows: every voxel gradient must stay finite
    (g,) = torch.autograd.grad(out, [vals], grad_out)
    assert torch.isfinite(g).all(), g


@pytest.mark.parametrize("path", PATHS)
def test_nan_sample_gradient_stays_in_its_own_rows(monkeypatch, path):
    """sparse_weighted_gather with a NaN sample: table gradient finite and equal to the gradient
    without that sample; NaN only in that sample's own position/weight gradients."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    st, shapes = _issue_map()
    index = SparseCoordinateIndex.from_coo_stack(st, shapes)
    g = torch.Generator().manual_seed(1)
    table = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.tensor([[[4.3, 4.7], [float("nan"), 1.0]], [[3.5, 3.2], [4.6, 4.4]]], dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.tensor([[0], [1]])
    l = torch.zeros(1, 1, dtype=torch.int64)
    out = sparse_weighted_gather(table, index, pos, b, l, sample_weights=w)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    gt, gp, gw = torch.autograd.grad(out, [table, pos, w], torch.ones_like(out))
    w0 = w.detach().clone()
    w0[0, 1] = 0
    pos0 = pos.detach().nan_to_num(0.0)
    t0 = table.detach().clone().requires_grad_()
    (gt0,) = torch.autograd.grad(sparse_weighted_gather(t0, index, pos0, b, l, sample_weights=w0), [t0], torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(gt, gt0)
    assert torch.isfinite(gp[1]).all() and torch.isfinite(gp[0, 0]).all() and torch.isfinite(gw[1]).all()
    assert torch.isfinite(gw[0, 0])


# ------------------------------------------------------------------ finding 5: clear, consistent errors
def _modules(dtype):
    return [
        SparseMSDeformableAttention(16, 2, n_levels=2, n_points=2).to(dtype),
        SparseMSDeformableAttentionBlock(16, 2, n_levels=2, n_points=2).to(dtype),
        SparseNeighborhoodAttentionBlock(16, 2, n_levels=2, neighborhood_sizes=[3, 3]).to(dtype),
        SparseMultilevelMapAttentionBlock(16, 2, n_levels=2).to(dtype),
    ]


@pytest.mark.parametrize("i", range(4))
def test_one_dtype_policy(i):
    """query must have the module's dtype (TypeError naming both); maps and background of another
    float dtype are cast to it, the same in every module."""
    _, query, pos, offsets, st, shapes = _nbh_case(torch.float64)
    m64, m32 = _modules(torch.float64)[i], _modules(torch.float32)[i]
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    with pytest.raises(TypeError, match=r"dtype torch.float64, got query.dtype=torch.float32"):
        m64(query.float(), pos, offsets, st, shapes)
    with pytest.raises(TypeError, match=r"dtype torch.float32, got query.dtype=torch.float64"):
        m32(query, pos, offsets, st, shapes)
    # a float64 map with a float32 module and query: cast to float32
    out = m32(query.float(), pos, offsets, st, shapes)
    assert out.dtype == torch.float32
    st32 = torch.sparse_coo_tensor(st.indices(), st.values().float(), st.shape).coalesce()
    torch.testing.assert_close(out, m32(query.float(), pos, offsets, st32, shapes))
    for bad in (query.long(), query.to(torch.int32)):
        with pytest.raises(TypeError, match="query must be a floating-point tensor"):
            m64(bad, pos, offsets, st, shapes)  # before any layer (LayerNorm) runs


def test_lookup_errors_name_the_argument():
    st, shapes = _issue_map()
    index = SparseCoordinateIndex.from_coo_stack(st, shapes)
    with pytest.raises(ValueError, match=r"batch_indices.*level_indices.*spatial_indices.*broadcast"):
        index.lookup(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"spatial_indices must have a last dim of 2, got spatial_indices.shape=\(\)"):
        index.lookup(torch.tensor(0), torch.tensor(0), torch.tensor(3))
    rows, found = index.lookup(torch.tensor(0), torch.tensor(0), torch.tensor([4, 4]))  # 0-d batch/level are fine
    assert rows.shape == () and bool(found)


def test_dense_map_to_grid_sample_names_sparse_tensor():
    st, shapes = _issue_map()
    with pytest.raises(TypeError, match=r"^sparse_tensor must be"):
        sparse_bilinear_sample(st.to_dense(), torch.zeros(1, 2), torch.tensor([0]), shapes)
    from sparse_msda import multilevel_sparse_bilinear_grid_sample

    with pytest.raises(ValueError, match=r"^sparse_tensor must be a head-split sparse COO"):  # seed API: its ValueError
        multilevel_sparse_bilinear_grid_sample(st.to_dense(), torch.zeros(1, 1, 1, 2), torch.tensor([0]), torch.tensor(shapes))


@pytest.mark.parametrize("bad", [[[12.7, 10.2], [6, 5]], [[12, 10], [6.5, 5]], [[True, 10]]])
def test_non_integral_level_spatial_shapes_rejected(bad):
    from adapters import as_level_spatial_shapes

    with pytest.raises(TypeError, match="level_spatial_shapes"):
        as_level_spatial_shapes(bad)
    assert as_level_spatial_shapes([[12.0, 10], [6, 5]]).tolist() == [[12, 10], [6, 5]]  # integral floats are fine


# ------------------------------------------------------------------ finding 6: background cost
@pytest.mark.parametrize("path", PATHS)
def test_background_cost_follows_use_not_extent(monkeypatch, path):
    """A [2**22, 2**22] map holding 20 voxels: the window-centre rotation tables peaked at 1.7 GB."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    g = torch.Generator().manual_seed(0)
    n = 20
    coords = torch.randint(0, 2**22, (n, 2), generator=g)
    idx = torch.cat([torch.zeros(n, 1, dtype=torch.int64), coords, torch.zeros(n, 1, dtype=torch.int64)], 1).T
    st = torch.sparse_coo_tensor(idx, torch.randn(n, 16, generator=g), (1, 2**22, 2**22, 1, 16)).coalesce()
    block = SparseNeighborhoodAttentionBlock(16, 2, n_levels=1, neighborhood_sizes=[3])
    pos = coords.float() + 0.5
    bg = torch.randn(1, 1, 16)
    out = block(torch.randn(n, 16), pos, torch.tensor([0, n]), st, [[2**22, 2**22]], background_embedding=bg)
    assert torch.isfinite(out).all()
    plan = nbh.build_neighborhood_plan(
        SparseCoordinateIndex.from_coo_stack(st, [[2**22, 2**22]]), torch.zeros(n, dtype=torch.int64), pos,
        torch.tensor([2**22, 2**22]), [3], True,
    )
    cos = cpu_backend._centre_rotation(plan, block.rope.frequencies().detach(), torch.float32)[0]
    assert cos.shape[0] <= n * 2 + 2, cos.shape  # rows per used centre coordinate, not per cell of the axis


def test_neighborhood_attention_background_shape_checked_before_the_kernel():
    """The kernel indexes the background tables by the tiles' batch items: too few rows must raise."""
    st, shapes = _issue_map()
    index = SparseCoordinateIndex.from_coo_stack(st, shapes)
    pos = torch.tensor([[4.5, 4.5], [3.5, 3.5]], dtype=torch.float64)
    plan = nbh.build_neighborhood_plan(index, torch.tensor([0, 1]), pos, torch.tensor([8, 8]), [3], True)
    q = torch.randn(2, 2, 4, dtype=torch.float64)
    kv = torch.randn(plan.n_keys, 2, 4, dtype=torch.float64)
    freqs = torch.rand(2, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"background_k must have shape \[batch, n_levels, H, d\] = \[>= 2, 1, 2, 4\]"):
        nbh.sparse_neighborhood_attention(q, kv, kv, plan, torch.randn(1, 1, 2, 4, dtype=torch.float64), torch.randn(1, 1, 2, 4, dtype=torch.float64), freqs)
    with pytest.raises(ValueError, match=r"query_batch must lie in \[0, 2\).*5"):
        nbh.build_neighborhood_plan(index, torch.tensor([0, 5]), pos, torch.tensor([8, 8]), [3], True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("i", range(4))
def test_float32_huge_position_at_a_coarse_level_keeps_everything_finite(monkeypatch, path, i):
    """3e38 in the frame of the coarse level is inf at the fine level in float32: the query must
    still be a finite query outside the map, and no parameter gradient may turn NaN."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    _, query, pos, offsets, st, shapes = _nbh_case(torch.float32)
    module = _modules(torch.float32)[i]
    levels = torch.ones(len(pos), dtype=torch.int64)  # positions in the coarse [8, 8] frame
    pos = pos / 2
    ref = module(query, pos, offsets, st, shapes, query_level_indices=levels)
    pos[9] = torch.tensor([3e38, -3e38])
    out = module(query, pos, offsets, st, shapes, query_level_indices=levels)
    assert torch.isfinite(out).all()
    if i != 3:  # the global self-attention sees every voxel from anywhere: only finiteness applies
        others = torch.arange(len(pos)) != 9
        torch.testing.assert_close(out[others], ref[others])
    out.sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_self_attention_offsets_must_rise():
    """Falling offsets silently dropped rows (the output had fewer rows than the queries)."""
    from sparse_msda.functional.self_attention import multilevel_self_attention

    q = torch.randn(5, 2, 4)
    k = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="rising from 0"):
        multilevel_self_attention(q, k, k, torch.tensor([0, 4, 3, 5]), torch.tensor([0, 2, 4, 6]))
    with pytest.raises(ValueError, match="rising from 0"):
        multilevel_self_attention(q, k, k, torch.tensor([0, 2, 5]), torch.tensor([1, 2, 6]))


def test_token_self_attention_follows_the_same_policies():
    """MultilevelSelfAttentionBlockWithRoPE: the dtype policy, finite positions (every token
    attends to every other: one NaN position would reach them all), integral shapes."""
    from sparse_msda import MultilevelSelfAttentionBlockWithRoPE

    block = MultilevelSelfAttentionBlockWithRoPE(16, 2).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    pos = torch.rand(5, 2, dtype=torch.float64) * 8
    lvl = torch.zeros(5, dtype=torch.int64)
    shapes = torch.tensor([[8, 8]])
    offsets = torch.tensor([0, 5])
    out = block(x, pos, lvl, shapes, offsets)
    assert torch.isfinite(out).all()
    with pytest.raises(TypeError, match=r"module's dtype torch.float64, got x.dtype=torch.float32"):
        block(x.float(), pos, lvl, shapes, offsets)
    bad = pos.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"spatial_positions must be finite, got token 3"):
        block(x, bad, lvl, shapes, offsets)
    with pytest.raises(TypeError, match="integral"):
        block(x, pos, lvl, torch.tensor([[8.5, 8.0]]), offsets)
