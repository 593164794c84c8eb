"""The Triton backend (sparse_msda/backends/triton) against the reference (pure PyTorch) backend.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py before triton is imported); with one, on CUDA tensors. Problems are tiny (the
interpreter runs each program op by op): every case compares the output and EVERY gradient with
the reference path, which test_deformable.py / test_neighborhood.py prove against dense
``grid_sample`` and a naive loop, and gradcheck in float64.

Tolerances: float64 1e-10 (the kernels compute in float64); float32 2e-5 / 1e-4 (outputs /
gradients; the kernels accumulate in float32 in another order); bfloat16 / float16 inputs: the
kernels compute in float32 and round the result, compared with the reference run in float32 on
the same (rounded) inputs to 2e-2 (bfloat16) / 4e-3 (float16) relative, 1e-2 / 2e-3 absolute.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton==3.9.0 for the CPU interpreter tests)", allow_module_level=True)

from adapters import SparseCoordinateIndex  # noqa: E402
from sparse_msda.backends import triton as triton_backend  # noqa: E402
from sparse_msda.functional import neighborhood, sampling  # noqa: E402
from tests.test_deformable import random_map  # noqa: E402
from tests.window_maps import make_map, random_queries  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Without CUDA the kernels must be decorated for Triton's interpreter (``TRITON_INTERPRET=1``,
    set by conftest.py before anything imports triton)."""
    if not CUDA and not triton_backend.interpreted():
        pytest.skip("no CUDA device, and TRITON_INTERPRET=1 was not set before triton was first imported (conftest.py sets it)")
    yield

TOL = {
    torch.float64: (dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-9, atol=1e-10)),
    torch.float32: (dict(rtol=2e-5, atol=2e-5), dict(rtol=1e-4, atol=1e-4)),
    torch.bfloat16: (dict(rtol=2e-2, atol=1e-2), dict(rtol=2e-2, atol=1e-2)),
    torch.float16: (dict(rtol=4e-3, atol=2e-3), dict(rtol=4e-3, atol=2e-3)),
}


def _ref_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _close(out, ref, grads, ref_grads, dtype):
    tol_out, tol_grad = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), equal_nan=True, **tol_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype or dtype in (torch.bfloat16, torch.float16)
        torch.testing.assert_close(g.float(), r.float(), equal_nan=True, **tol_grad)


# ---------------------------------------------------------------------------------------------
# deformable sampling (weighted gather)
# ---------------------------------------------------------------------------------------------
def _sampling_problem(dim, with_bg, dtype, seed, n=24, n_per=4, n_heads=2, head_dim=5, empty_items=()):
    """A random two-item, two-level map and samples (some outside the map, one with a NaN
    coordinate): returns (call(backend, table, pos, w[, bg]), leaf inputs)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [[9, 7], [4, 3]] if dim == 2 else [[5, 6, 4], [3, 3, 2]]
    stack, shapes_t = random_map(shapes, 2, 3, 0.5, torch.float64, gen, empty_items=empty_items)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t).to(DEVICE)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    table = rnd(index.n_voxels * n_heads, head_dim)
    bg = rnd(2 * 2 * n_heads, head_dim) if with_bg else None
    pos = torch.rand(n, n_per, dim, generator=gen, dtype=torch.float64) * 11 - 2  # some outside the map
    pos[1, 2, dim - 1] = float("nan")  # as F.grid_sample: NaN row, NaN position/weight gradients
    w = torch.rand(n, n_per, generator=gen, dtype=torch.float64)
    b = torch.randint(0, 2, (n, 1), generator=gen)
    lvl = torch.randint(0, 2, (1, n_per), generator=gen)
    h = torch.randint(0, n_heads, (n, n_per), generator=gen)
    # float16 positions: the reference's base-cell clamp (to 2**40) does not fit float16, so they stay float32
    pos_dtype = torch.float32 if dtype == torch.float16 else dtype
    leaves = [t.to(DEVICE, dt).requires_grad_() for t, dt in ((table, dtype), (pos, pos_dtype), (w, dtype), (bg, dtype)) if t is not None]
    b, lvl, h = b.to(DEVICE), lvl.to(DEVICE), h.to(DEVICE)

    def call(backend, t, p, weights, background=None):
        return _gather(backend, t, index, p, b, lvl, h, n_heads, weights, background)

    return call, leaves


def _gather(backend, *args):
    """``sparse_weighted_gather`` on the named backend."""
    if backend == "triton":
        orig = sampling._SparseSample.apply
        sampling._SparseSample.apply = triton_backend.weighted_gather
        try:
            return sampling.sparse_weighted_gather(*args)
        finally:
            sampling._SparseSample.apply = orig
    prev = os.environ.get("SPARSE_MSDA_CPU_KERNELS")
    os.environ["SPARSE_MSDA_CPU_KERNELS"] = "0"  # the PyTorch path
    try:
        return sampling.sparse_weighted_gather(*args)
    finally:
        if prev is None:
            del os.environ["SPARSE_MSDA_CPU_KERNELS"]
        else:
            os.environ["SPARSE_MSDA_CPU_KERNELS"] = prev


def _out_and_grads(fn, leaves, dtype, seed=5):
    """Output and the gradients of ``sum(out * w)`` for random ``w`` rounded to ``dtype`` (the same
    output gradient for the run in the inputs' dtype and the float32 reference of half inputs)."""
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    w = w.to(out.device, out.dtype)
    return out, torch.autograd.grad((out * w).nansum(), leaves)


def _compare_sampling(dim, with_bg, dtype, seed, **kw):
    call, leaves = _sampling_problem(dim, with_bg, dtype, seed, **kw)
    out, grads = _out_and_grads(lambda *x: call("triton", *x), leaves, dtype)
    ref_leaves = [t.detach().to(_ref_dtype(dtype)).requires_grad_() for t in leaves]
    ref, ref_grads = _out_and_grads(lambda *x: call("reference", *x), ref_leaves, dtype)
    assert out.dtype == dtype and torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    _close(out, ref, grads, ref_grads, dtype)
    return out, grads


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_bg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampling_matches_reference(dim, with_bg, dtype):
    """Output, table (and background-table), position and weight gradients; samples outside the
    map and a NaN sample (NaN output row and NaN position/weight gradients, nothing added to any
    table row)."""
    _, grads = _compare_sampling(dim, with_bg, dtype, seed=10 + dim)
    assert torch.isfinite(grads[0]).all() and torch.isnan(grads[1][1, 2]).all() and torch.isnan(grads[2][1, 2])


@pytest.mark.parametrize("dim, with_bg, dtype", [(2, True, torch.bfloat16), (3, False, torch.bfloat16), (3, True, torch.float16)])
def test_sampling_half_precision_inputs(dim, with_bg, dtype):
    """bfloat16/float16 tables, positions and weights: computed in float32, result in the input dtype."""
    _compare_sampling(dim, with_bg, dtype, seed=20 + dim)


def test_sampling_empty_batch_item():
    """A batch item without voxels: its samples read only the background (or nothing)."""
    _compare_sampling(2, True, torch.float64, seed=31, empty_items=(1,))
    _compare_sampling(3, False, torch.float64, seed=32, empty_items=(0,))


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------
def _nbhd_problem(dim, background, dtype, seed, n_heads=2, head_dim=4, share_heads=False, tile_queries=8,
                  counts=(14, 10), empty_items=(), occupancy=0.3, region=None):
    """A plan over a random two-item, three-level map (queries partly outside it) and random
    attention inputs on the device: (plan, [q, k, v, bg_k, bg_v, freqs] with None without background)."""
    shapes = [[12, 10], [6, 5], [3, 3]] if dim == 2 else [[6, 6, 6], [3, 3, 3], [2, 2, 2]]
    sizes = [3, 5, 3] if dim == 2 else [3, 3, 3]
    _, voxels, _ = make_map(shapes, 2, occupancy, 1, seed=seed, empty_items=empty_items)
    cols = list(zip(*voxels)) if voxels else [(), (), ()]
    idx = SparseCoordinateIndex(
        torch.tensor(cols[0], dtype=torch.int64), torch.tensor(cols[1], dtype=torch.int64),
        torch.tensor([list(c) for c in cols[2]], dtype=torch.int64).view(-1, dim), shapes, 2,
    ).to(DEVICE)
    lo, hi = region if region is not None else ([-3] * dim, [s + 3 for s in shapes[0]])
    pos, offsets = random_queries(list(counts), shapes[0], seed=seed + 1, lo=lo, hi=hi)
    batch = torch.repeat_interleave(torch.arange(2), offsets.diff())
    full = torch.tensor(shapes[0], dtype=torch.float64)
    plan = neighborhood.build_neighborhood_plan(
        idx, batch.to(DEVICE), pos.to(DEVICE), full.to(DEVICE), sizes, background, tile_queries=tile_queries
    )
    g = torch.Generator().manual_seed(seed + 2)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 1.5).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    n_q, L = pos.shape[0], len(shapes)
    q, k, v = rnd(n_q, n_heads, head_dim), rnd(plan.n_keys, n_heads, head_dim), rnd(plan.n_keys, n_heads, head_dim)
    bk = rnd(2, L, n_heads, head_dim) if background else None
    bv = rnd(2, L, n_heads, head_dim) if background else None
    fr = rnd(1 if share_heads else n_heads, head_dim // 2, dim + 1) if background else None
    return plan, [q, k, v, bk, bv, fr]


def _attend(backend, plan, q, k, v, bk=None, bv=None, fr=None):
    """``sparse_neighborhood_attention`` on the named backend."""
    if backend == "triton":
        return triton_backend.neighborhood_attention(q, k, v, plan, bk, bv, fr, q.shape[-1] ** -0.5)
    return neighborhood.NeighborhoodAttentionFunction.apply(q, k, v, bk, bv, fr, plan, q.shape[-1] ** -0.5)


def _compare_nbhd(dim, background, dtype, seed, **kw):
    plan, inputs = _nbhd_problem(dim, background, dtype, seed, **kw)
    leaves = [t for t in inputs if t is not None]

    def fn(backend):
        return lambda *x: _attend(backend, plan, *x)

    out, grads = _out_and_grads(fn("triton"), leaves, dtype)
    ref_leaves = [t.detach().to(_ref_dtype(dtype)).requires_grad_() for t in leaves]
    ref, ref_grads = _out_and_grads(fn("reference"), ref_leaves, dtype)
    assert out.dtype == dtype
    _close(out, ref, grads, ref_grads, dtype)
    return plan, out, grads


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neighborhood_matches_reference(dim, background, dtype):
    """Output and the gradients of q, k, v and (with background) the background keys, values and
    RoPE frequencies; some queries have no key (zero rows)."""
    plan, out, _ = _compare_nbhd(dim, background, dtype, seed=40 + dim, share_heads=background and dim == 3)
    none = ~plan.has_keys()
    assert plan.n_pairs > 0 and (out[none] == 0).all()
    assert none.any() or background


@pytest.mark.parametrize("dim, background, dtype", [(2, True, torch.bfloat16), (3, True, torch.float16), (3, False, torch.bfloat16)])
def test_neighborhood_half_precision_inputs(dim, background, dtype):
    _compare_nbhd(dim, background, dtype, seed=50 + dim)


def test_neighborhood_tiles_larger_than_a_block_and_wide_heads():
    """Tiles of up to 32 queries with more keys than one key block (several blocks per tile),
    head dim 32."""
    plan, _, _ = _compare_nbhd(
        2, True, torch.float32, seed=61, head_dim=32, tile_queries=32, counts=(40, 4), occupancy=1.0, region=([0, 0], [4, 3])
    )
    assert int(plan.tiles.key_count.max()) > 32 and int(plan.tiles.query_count.max()) > 16


def test_neighborhood_empty_batch_item_and_no_queries():
    """A batch item without voxels (its queries see only background slots), and a plan without
    queries."""
    _compare_nbhd(2, True, torch.float64, seed=71, empty_items=(1,))
    _compare_nbhd(2, False, torch.float64, seed=72, empty_items=(0,))
    _compare_nbhd(2, True, torch.float64, seed=73, counts=(0, 0))
