"""Property-based fuzzing of the public API (issue 10).

Random valid maps (2D / 3D, 1-3 levels, batch 1-3, empty items, empty levels, occupancy 0..1) and
queries whose positions are inside, on borders, outside and huge (1e19, 1e30), plus random
corruptions of every argument. Each case asserts either a clear exception of the right type
(naming the argument), or a finite result equal to the reference path (``F.grid_sample`` on the
densified map; the naive loop of ``tests/test_neighborhood.py``; the PyTorch path for the fused
C++ kernels), and that perturbing one query never changes another query's output.

The corruption cases run in a subprocess (:func:`test_corruptions_in_a_subprocess`), so a segfault
fails that test instead of killing the run.

Examples per test: the ``sparse-msda-ci`` hypothesis profile (derandomized, 100 per test: about
15 s for the whole file on 2 cores); ``SPARSE_MSDA_FUZZ=1 pytest tests/test_fuzz.py
--hypothesis-show-statistics`` runs the random ``sparse-msda-fuzz`` profile (1000 per test;
``SPARSE_MSDA_FUZZ_EXAMPLES=N`` sets either count).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters import SparseCoordinateIndex, as_level_spatial_shapes
from sparse_msda import (
    SparseMSDeformableAttention,
    SparseMSDeformableAttentionBlock,
    SparseMultilevelMapAttentionBlock,
    SparseNeighborhoodAttentionBlock,
    sparse_split_heads,
)
from sparse_msda.functional.deformable import sparse_bilinear_sample
from sparse_msda.functional.sampling import sparse_weighted_gather
from tests.dense_reference import densify_levels
from tests.test_neighborhood import naive_block
from tests.conftest import cpu_backends
from tests.window_maps import make_map

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
settings.register_profile("sparse-msda-ci", max_examples=int(os.environ.get("SPARSE_MSDA_FUZZ_EXAMPLES", 100)), derandomize=True, **_COMMON)
settings.register_profile("sparse-msda-fuzz", max_examples=int(os.environ.get("SPARSE_MSDA_FUZZ_EXAMPLES", 1000)), **_COMMON)
FUZZ = settings.get_profile("sparse-msda-fuzz" if os.environ.get("SPARSE_MSDA_FUZZ") == "1" else "sparse-msda-ci")
INNER = os.environ.get("SPARSE_MSDA_FUZZ_INNER") == "1"  # set by test_corruptions_in_a_subprocess

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HUGE = [1e19, -1e19, 1e30, -1e30, 3e38]


# ----------------------------------------------------------------------------- strategies
@st.composite
def maps(draw, max_levels=3, embed_dim=8):
    """(coo stack, voxel list, features, shapes, batch_size): level 0 is the largest on every axis."""
    dim = draw(st.sampled_from([2, 3]))
    n_levels = draw(st.integers(1, max_levels))
    top = 7 if dim == 2 else 4
    shape = [draw(st.integers(1, top)) for _ in range(dim)]
    shapes = [shape]
    for _ in range(1, n_levels):
        shape = [draw(st.integers(1, s)) for s in shape]
        shapes.append(shape)
    batch = draw(st.integers(1, 3))
    occupancy = draw(st.sampled_from([0.0, 0.15, 0.5, 1.0]))
    empty = draw(st.sets(st.integers(0, batch - 1), max_size=batch))
    seed = draw(st.integers(0, 2**16))
    stacked, voxels, feats = make_map(shapes, batch, occupancy, embed_dim, seed=seed, empty_items=tuple(empty))
    return stacked.coalesce(), voxels, feats, shapes, batch


def coordinate(draw, size: int, hostile: bool = True) -> float:
    """A position on one axis of a level of ``size`` cells: inside, on a border, just outside, far, huge."""
    kinds = ["inside", "inside", "border", "outside"] + (["huge"] if hostile else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "inside":
        return draw(st.floats(0.0, float(size), exclude_max=True, allow_nan=False))
    if kind == "border":
        return draw(st.sampled_from([0.0, 0.5, size - 0.5, float(size), -0.5, size + 0.5, 1e-12, size - 1e-12]))
    if kind == "outside":
        return draw(st.sampled_from([-1.0, -3.7, size + 1.0, size + 4.2, -40.0, size + 40.0]))
    return draw(st.sampled_from(HUGE))


def _tight(pos: torch.Tensor, shape) -> torch.Tensor:
    """Positions clamped to [-60, shape + 60]: the same cells (all outside) for every window and
    sample of these small maps, and no overflow inside the references."""
    s = torch.as_tensor(shape, dtype=pos.dtype)
    return torch.minimum(torch.maximum(pos, torch.full_like(pos, -60.0)), s + 60.0)


def _paths(monkeypatch, f):
    """``f()`` with the fused CPU kernels and with the PyTorch path."""
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
        out.append(f())
    return out


# ----------------------------------------------------------------------------- valid inputs
@FUZZ
@given(data=st.data(), m=maps(), with_bg=st.booleans(), n=st.integers(0, 12))
def test_grid_sample_matches_grid_sample_reference(monkeypatch, data, m, with_bg, n):
    """Sparse bilinear/trilinear sampling == F.grid_sample(align_corners=False) on the densified map
    (NaN locations included), in both paths; each sample depends on its own position only."""
    stacked, voxels, feats, shapes, batch = m
    dim, n_levels, c = len(shapes[0]), len(shapes), feats.shape[1]
    b = torch.tensor([data.draw(st.integers(0, batch - 1)) for _ in range(n)], dtype=torch.int64)
    lv = torch.tensor([data.draw(st.integers(0, n_levels - 1)) for _ in range(n)], dtype=torch.int64)
    pos = torch.tensor([[coordinate(data.draw, shapes[int(lv[i])][a]) for a in range(dim)] for i in range(n)], dtype=torch.float64).reshape(n, dim)
    if n and data.draw(st.booleans()):
        pos[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, dim - 1))] = data.draw(st.sampled_from([float("nan"), float("inf")]))
    bg = torch.randn(batch, n_levels, c, dtype=torch.float64) if with_bg else None
    run = lambda p: sparse_bilinear_sample(stacked, p, b, shapes, lv, background_embedding=bg)  # noqa: E731
    out_k, out_t = _paths(monkeypatch, lambda: run(pos))
    torch.testing.assert_close(out_k, out_t, equal_nan=True)
    # reference: F.grid_sample per sample on the dense level
    idx = stacked.indices()
    dense = densify_levels(stacked.values(), idx[0], idx[-1], idx[1:-1].T, torch.tensor(shapes), batch, bg)
    ref = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        lvl, s = int(lv[i]), torch.tensor(shapes[int(lv[i])], dtype=torch.float64)
        if not torch.isfinite(pos[i]).all():
            # F.grid_sample gives NaN in 2D but 0 in 3D (its CPU 3D kernel skips the corners): the
            # package's policy is NaN in both (tests/test_bad_inputs.py checks the 2D agreement)
            ref[i] = float("nan")
            continue
        grid = (_tight(pos[i], s) / s * 2 - 1).flip(-1).reshape(1, *([1] * dim), dim)
        ref[i] = F.grid_sample(dense[lvl][int(b[i]) : int(b[i]) + 1], grid, align_corners=False).reshape(c)
    torch.testing.assert_close(out_k, ref, equal_nan=True)
    finite = torch.isfinite(pos).all(-1)
    assert torch.isfinite(out_k[finite]).all() and torch.isnan(out_k[~finite]).all()
    if n > 1:  # move one sample anywhere: no other row changes
        i = data.draw(st.integers(0, n - 1))
        pos2 = pos.clone()
        pos2[i] = torch.tensor([coordinate(data.draw, shapes[int(lv[i])][a]) for a in range(dim)], dtype=torch.float64)
        others = torch.arange(n) != i
        torch.testing.assert_close(run(pos2)[others], out_t[others], equal_nan=True, atol=0, rtol=0)


def _queries(data, shapes, batch, n, embed_dim, hostile=True):
    dim = len(shapes[0])
    counts = [0] * batch
    for _ in range(n):
        counts[data.draw(st.integers(0, batch - 1))] += 1
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    levels = torch.tensor([data.draw(st.integers(0, len(shapes) - 1)) for _ in range(n)], dtype=torch.int64)
    pos = torch.tensor(
        [[coordinate(data.draw, shapes[int(levels[i])][a], hostile) for a in range(dim)] for i in range(n)], dtype=torch.float64
    ).reshape(n, dim)
    query = torch.randn(n, embed_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    return query, pos, offsets, levels


def _perturb_one(data, query, pos, levels, shapes):
    i = data.draw(st.integers(0, query.shape[0] - 1))
    q2, p2 = query.clone(), pos.clone()
    p2[i] = torch.tensor([coordinate(data.draw, shapes[int(levels[i])][a]) for a in range(pos.shape[1])], dtype=torch.float64)
    q2[i] = torch.randn(query.shape[1], dtype=torch.float64)
    return i, q2, p2


@FUZZ
@given(data=st.data(), m=maps(), with_bg=st.booleans(), n=st.integers(0, 10))
def test_neighborhood_block_matches_naive_reference(monkeypatch, data, m, with_bg, n):
    """Kernel == PyTorch path == naive loop (positions clamped for the naive loop: the same, empty,
    windows), finite; moving one query (anywhere, huge included) changes no other query's output."""
    stacked, voxels, feats, shapes, batch = m
    n_levels, dim = len(shapes), len(shapes[0])
    sizes = [data.draw(st.sampled_from([1, 3, 5])) for _ in range(n_levels)]
    torch.manual_seed(0)
    block = SparseNeighborhoodAttentionBlock(8, 2, n_levels=n_levels, neighborhood_sizes=sizes, position_dim=dim).double()
    query, pos, offsets, levels = _queries(data, shapes, batch, n, 8)
    bg = torch.randn(batch, n_levels, 8, dtype=torch.float64) if with_bg else None
    run = lambda q, p: block(q, p, offsets, stacked, shapes, background_embedding=bg, query_level_indices=levels)  # noqa: E731
    out_k, out_t = _paths(monkeypatch, lambda: run(query, pos))
    assert torch.isfinite(out_k).all()
    torch.testing.assert_close(out_k, out_t, atol=1e-10, rtol=1e-10)
    if n:
        tight = torch.stack([_tight(pos[i], shapes[int(levels[i])]) for i in range(n)])
        ref = naive_block(block, query, tight, offsets, voxels, feats, shapes, bg, levels)
        torch.testing.assert_close(out_k, ref, atol=1e-9, rtol=1e-9)
    if n > 1:
        i, q2, p2 = _perturb_one(data, query, pos, levels, shapes)
        others = torch.arange(n) != i
        for out, flag in ((out_k, "1"), (out_t, "0")):
            monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
            torch.testing.assert_close(run(q2, p2)[others], out[others], atol=1e-10, rtol=1e-10)


@FUZZ
@given(data=st.data(), m=maps(), with_bg=st.booleans(), n=st.integers(0, 10), block_kind=st.sampled_from(["msda", "msda_block", "self"]))
def test_msda_and_self_attention_finite_and_query_independent(monkeypatch, data, m, with_bg, n, block_kind):
    """MSDA (kernel == PyTorch path) and global self-attention: finite outputs for any finite query
    positions, and moving one query changes no other query's output."""
    stacked, voxels, feats, shapes, batch = m
    n_levels, dim = len(shapes), len(shapes[0])
    torch.manual_seed(1)
    if block_kind == "self":
        module, with_bg = SparseMultilevelMapAttentionBlock(8, 2, n_levels=n_levels, position_dim=dim).double(), False
    elif block_kind == "msda":
        module = SparseMSDeformableAttention(8, 2, n_levels=n_levels, n_points=2, position_dim=dim).double()
    else:
        module = SparseMSDeformableAttentionBlock(8, 2, n_levels=n_levels, n_points=2, position_dim=dim).double()
    query, pos, offsets, levels = _queries(data, shapes, batch, n, 8)
    bg = torch.randn(batch, n_levels, 8, dtype=torch.float64) if with_bg else None
    kw = dict(background_embedding=bg) if with_bg else {}
    run = lambda q, p: module(q, p, offsets, stacked, shapes, query_level_indices=levels, **kw)  # noqa: E731
    out_k, out_t = _paths(monkeypatch, lambda: run(query, pos))
    assert torch.isfinite(out_k).all()
    torch.testing.assert_close(out_k, out_t, atol=1e-10, rtol=1e-10)
    if n > 1:
        i, q2, p2 = _perturb_one(data, query, pos, levels, shapes)
        others = torch.arange(n) != i
        torch.testing.assert_close(run(q2, p2)[others], out_t[others], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- corruptions
def _raises(exc, name, f):
    """``f()`` raises ``exc`` (not a crash, not another type) whose message names ``name``."""
    with pytest.raises(exc) as info:
        f()
    assert name in str(info.value), f"{exc.__name__} does not name {name!r}: {info.value}"


BAD_INT = st.sampled_from([-1, -2, -(10**6), 10**6, 2**31, 2**40, -(2**62)])


@pytest.mark.skipif(not INNER, reason="runs in a subprocess, from test_corruptions_in_a_subprocess")
@FUZZ
@given(data=st.data(), m=maps(), with_bg=st.booleans(), n=st.integers(1, 6))
def test_corrupted_grid_sample_arguments(monkeypatch, data, m, with_bg, n):
    stacked, voxels, feats, shapes, batch = m
    dim, n_levels, c = len(shapes[0]), len(shapes), feats.shape[1]
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", data.draw(st.sampled_from(cpu_backends())))
    split = data.draw(st.booleans())
    n_heads = 2
    mp = sparse_split_heads(stacked, n_heads) if split else stacked
    b = torch.zeros(n, dtype=torch.int64)
    lv = torch.zeros(n, dtype=torch.int64)
    h = torch.zeros(n, dtype=torch.int64) if split else None
    pos = torch.rand(n, dim, dtype=torch.float64) * 3
    bg = torch.randn(batch, n_levels, *((n_heads, c // n_heads) if split else (c,)), dtype=torch.float64) if with_bg else None
    args = dict(sparse_tensor=mp, spatial_positions=pos, batch_indices=b, level_spatial_shapes=torch.tensor(shapes), level_indices=lv,
                head_indices=h, background_embedding=bg)
    which = data.draw(st.sampled_from(
        ["batch", "level", "head", "batch_float", "pos_int", "pos_dim", "bg_shape", "dense", "shape_float", "shape_neg", "shape_levels"]
    ))
    i = data.draw(st.integers(0, n - 1))
    if which == "batch":
        v = data.draw(st.one_of(BAD_INT, st.integers(batch, batch + 3)))
        args["batch_indices"] = b.clone().index_fill_(0, torch.tensor([i]), v)
        exc, name = ValueError, "batch_indices"
    elif which == "level":
        v = data.draw(st.one_of(BAD_INT, st.integers(n_levels, n_levels + 3)))
        args["level_indices"] = lv.clone().index_fill_(0, torch.tensor([i]), v)
        exc, name = ValueError, "level_indices"
    elif which == "head":
        assume(split)
        args["head_indices"] = h.clone().index_fill_(0, torch.tensor([i]), data.draw(st.one_of(BAD_INT, st.just(n_heads))))
        exc, name = ValueError, "head_indices"
    elif which == "batch_float":
        args["batch_indices"] = b.double()
        exc, name = TypeError, "batch_indices"
    elif which == "pos_int":
        args["spatial_positions"] = pos.long()
        exc, name = TypeError, "spatial_positions"
    elif which == "pos_dim":
        args["spatial_positions"] = torch.rand(n, data.draw(st.sampled_from([d for d in (1, 2, 3, 4) if d != dim])), dtype=torch.float64)
        exc, name = ValueError, "spatial_positions"
    elif which == "bg_shape":
        args["background_embedding"] = torch.randn(batch + 1, n_levels, c, dtype=torch.float64)
        exc, name = ValueError, "background_embedding"
    elif which == "dense":
        args["sparse_tensor"] = stacked.to_dense()
        exc, name = TypeError, "sparse_tensor"
    elif which == "shape_float":
        args["level_spatial_shapes"] = [[s + 0.5 for s in shape] for shape in shapes]
        exc, name = TypeError, "level_spatial_shapes"
    elif which == "shape_neg":
        args["level_spatial_shapes"] = [[-s for s in shape] for shape in shapes]
        exc, name = ValueError, "level_spatial_shapes"
    else:
        args["level_spatial_shapes"] = shapes + [shapes[-1]]
        exc, name = ValueError, "level_spatial_shapes"
    _raises(exc, name, lambda: sparse_bilinear_sample(**args))


@pytest.mark.skipif(not INNER, reason="runs in a subprocess, from test_corruptions_in_a_subprocess")
@FUZZ
@given(data=st.data(), m=maps(), n=st.integers(1, 6), kind=st.sampled_from(["msda", "msda_block", "nbh", "self"]))
def test_corrupted_module_arguments(monkeypatch, data, m, n, kind):
    stacked, voxels, feats, shapes, batch = m
    n_levels, dim = len(shapes), len(shapes[0])
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", data.draw(st.sampled_from(cpu_backends())))
    module = {
        "msda": lambda: SparseMSDeformableAttention(8, 2, n_levels=n_levels, n_points=2, position_dim=dim),
        "msda_block": lambda: SparseMSDeformableAttentionBlock(8, 2, n_levels=n_levels, n_points=2, position_dim=dim),
        "nbh": lambda: SparseNeighborhoodAttentionBlock(8, 2, n_levels=n_levels, neighborhood_sizes=[3] * n_levels, position_dim=dim),
        "self": lambda: SparseMultilevelMapAttentionBlock(8, 2, n_levels=n_levels, position_dim=dim),
    }[kind]().double()
    query, pos, offsets, levels = _queries(data, shapes, batch, n, 8, hostile=False)
    args = dict(query=query, query_spatial_positions=pos, query_batch_offsets=offsets, stacked_feature_maps=stacked,
                level_spatial_shapes=shapes, query_level_indices=levels)
    which = data.draw(st.sampled_from(
        ["query_int", "query_dtype", "query_width", "pos_nonfinite", "pos_int", "pos_shape", "offsets_float", "offsets_len",
         "offsets_order", "levels", "levels_float", "bg_shape", "shapes_float"]
    ))
    i = data.draw(st.integers(0, n - 1))
    if which == "query_int":
        args["query"], exc, name = query.long(), TypeError, "query"
    elif which == "query_dtype":
        args["query"], exc, name = query.float(), TypeError, "query"
    elif which == "query_width":
        args["query"], exc, name = torch.randn(n, 6, dtype=torch.float64), ValueError, "query"
    elif which == "pos_nonfinite":
        p = pos.clone()
        p[i, data.draw(st.integers(0, dim - 1))] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        args["query_spatial_positions"], exc, name = p, ValueError, "query_spatial_positions"
    elif which == "pos_int":
        args["query_spatial_positions"], exc, name = pos.long(), TypeError, "query_spatial_positions"
    elif which == "pos_shape":
        args["query_spatial_positions"], exc, name = pos[:, :1], ValueError, "query_spatial_positions"
    elif which == "offsets_float":
        args["query_batch_offsets"], exc, name = offsets.double(), TypeError, "query_batch_offsets"
    elif which == "offsets_len":
        args["query_batch_offsets"], exc, name = torch.cat([offsets, offsets[-1:]]), ValueError, "query_batch_offsets"
    elif which == "offsets_order":
        o = offsets.clone()
        o[-1] = n + data.draw(st.sampled_from([1, -1 - n, 10**6]))
        args["query_batch_offsets"], exc, name = o, ValueError, "query_batch_offsets"
    elif which == "levels":
        v = data.draw(st.one_of(BAD_INT, st.integers(n_levels, n_levels + 2)))
        args["query_level_indices"], exc, name = levels.clone().index_fill_(0, torch.tensor([i]), v), ValueError, "query_level_indices"
    elif which == "levels_float":
        args["query_level_indices"], exc, name = levels.double(), TypeError, "query_level_indices"
    elif which == "bg_shape":
        assume(kind != "self")
        args["background_embedding"], exc, name = torch.randn(batch, n_levels + 1, 8, dtype=torch.float64), ValueError, "background_embedding"
    else:
        args["level_spatial_shapes"], exc, name = [[s + 0.25 for s in shape] for shape in shapes], TypeError, "level_spatial_shapes"
    _raises(exc, name, lambda: module(**args))


@pytest.mark.skipif(not INNER, reason="runs in a subprocess, from test_corruptions_in_a_subprocess")
@FUZZ
@given(data=st.data(), m=maps(max_levels=2))
def test_corrupted_index_and_gather_arguments(monkeypatch, data, m):
    stacked, voxels, feats, shapes, batch = m
    dim, n_levels = len(shapes[0]), len(shapes)
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", data.draw(st.sampled_from(cpu_backends())))
    index = SparseCoordinateIndex.from_coo_stack(stacked, shapes)
    which = data.draw(st.sampled_from(["lookup_broadcast", "lookup_0d", "lookup_float", "table_rows", "weights", "gather_batch",
                                       "gather_level", "gather_head", "shape_bool"]))
    n_heads, s = 2, data.draw(st.integers(1, 5))
    table = torch.randn(index.n_voxels * n_heads, 3, dtype=torch.float64)
    pos = torch.rand(s, 2, dim, dtype=torch.float64) * 4
    zeros = torch.zeros(s, 1, dtype=torch.int64)
    gather = dict(table=table, index=index, positions=pos, batch_indices=zeros, level_indices=zeros, head_indices=zeros, n_heads=n_heads)
    if which == "lookup_broadcast":
        f, exc, name = lambda: index.lookup(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), torch.zeros(5, dim, dtype=torch.int64)), ValueError, "batch_indices"
    elif which == "lookup_0d":
        f, exc, name = lambda: index.lookup(torch.tensor(0), torch.tensor(0), torch.tensor(1)), ValueError, "spatial_indices"
    elif which == "lookup_float":
        f, exc, name = lambda: index.lookup(torch.tensor(0.5), torch.tensor(0), torch.zeros(dim, dtype=torch.int64)), TypeError, "batch_indices"
    elif which == "table_rows":
        rows = index.n_voxels * n_heads + data.draw(st.sampled_from([-1, 1, 7]))
        assume(rows >= 0)
        gather["table"] = torch.randn(rows, 3, dtype=torch.float64)
        f, exc, name = lambda: sparse_weighted_gather(**gather), ValueError, "table"
    elif which == "weights":
        gather["sample_weights"] = torch.rand(s, 3, dtype=torch.float64)
        f, exc, name = lambda: sparse_weighted_gather(**gather), ValueError, "sample_weights"
    elif which in ("gather_batch", "gather_level", "gather_head"):
        key = {"gather_batch": "batch_indices", "gather_level": "level_indices", "gather_head": "head_indices"}[which]
        limit = {"batch_indices": batch, "level_indices": n_levels, "head_indices": n_heads}[key]
        gather[key] = zeros.clone().index_fill_(0, torch.tensor([data.draw(st.integers(0, s - 1))]), data.draw(st.one_of(BAD_INT, st.just(limit))))
        f, exc, name = lambda: sparse_weighted_gather(**gather), ValueError, key
    else:
        f, exc, name = lambda: as_level_spatial_shapes([[True] * dim]), TypeError, "level_spatial_shapes"
    _raises(exc, name, f)


def test_corruptions_in_a_subprocess():
    """The corruption fuzzers above, in a fresh interpreter: a crash (segfault, abort) fails this
    test with its signal instead of killing the test run."""
    env = dict(os.environ, SPARSE_MSDA_FUZZ_INNER="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
           f"{__file__}::test_corrupted_grid_sample_arguments", f"{__file__}::test_corrupted_module_arguments",
           f"{__file__}::test_corrupted_index_and_gather_arguments"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"corruption fuzz failed or crashed (rc={proc.returncode}):\n{tail}"
    assert "3 passed" in proc.stdout, tail
