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

import contextlib
import copy
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
    """``sparse_weighted_gather`` on the named backend (``reference`` is the PyTorch path)."""
    return sampling.sparse_weighted_gather(*args, backend=backend)


def _out_and_grads(fn, leaves, dtype, seed=5):
    """Output and the gradients of ``sum(out * w)`` for random ``w`` rounded to ``dtype`` (the same
    output gradient for the run in the inputs' dtype and the float32 reference of half inputs)."""
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    w = w.to(out.device, out.dtype)
    return out, torch.autograd.grad((out * w).nansum(), leaves)


@contextlib.contextmanager
def _native_low_precision(module):
    """A context in which ``module``'s public op hands float16/bfloat16 tensors to the backend as
    they are (the functional layer casts them to float32 first: precision.py), so the kernels'
    own low-precision path is tested."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "upcast", lambda *tensors: tensors)
        yield


def _compare_sampling(dim, with_bg, dtype, seed, **kw):
    call, leaves = _sampling_problem(dim, with_bg, dtype, seed, **kw)
    with _native_low_precision(sampling):
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
    return neighborhood.sparse_neighborhood_attention(q, k, v, plan, bk, bv, fr, backend=backend)


def _compare_nbhd(dim, background, dtype, seed, **kw):
    plan, inputs = _nbhd_problem(dim, background, dtype, seed, **kw)
    leaves = [t for t in inputs if t is not None]

    def fn(backend):
        return lambda *x: _attend(backend, plan, *x)

    with _native_low_precision(neighborhood):
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


# ---------------------------------------------------------------------------------------------
# the backend layer
# ---------------------------------------------------------------------------------------------
def test_choice_rules(monkeypatch):
    """Automatic choice: triton for CUDA tensors, never for CPU tensors (even under the
    interpreter); ``backend="triton"`` on CPU tensors without the interpreter is a ValueError
    that says so."""
    from sparse_msda.backends import choose_backend

    monkeypatch.delenv("SPARSE_MSDA_BACKEND", raising=False)
    monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS", raising=False)
    x = torch.zeros(2, 2, 4)
    assert choose_backend("neighborhood_attention", x, x, x) is not triton_backend
    if CUDA:
        xc = x.cuda()
        assert choose_backend("neighborhood_attention", xc, xc, xc) is triton_backend
        assert choose_backend("weighted_gather", xc[0], xc) is triton_backend
    else:
        assert choose_backend("weighted_gather", x, x, backend="triton") is triton_backend  # the interpreter
    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend("weighted_gather", x, x, backend="triton")
    assert "TRITON_INTERPRET=1" in triton_backend.SUPPORTS
    monkeypatch.undo()
    monkeypatch.delenv("SPARSE_MSDA_BACKEND", raising=False)
    monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS", raising=False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not triton_backend.supports("weighted_gather", x) and "atomics" in triton_backend.unsupported_reason("weighted_gather", x)
    if CUDA:  # deterministic algorithms requested: the automatic choice avoids the atomics
        assert choose_backend("neighborhood_attention", xc, xc, xc) is not triton_backend


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the automatic choice takes triton for CUDA tensors)")
@pytest.mark.parametrize("background", [False, True])
def test_cuda_neighborhood_block_matches_cpu(background):
    """A SparseNeighborhoodAttentionBlock on CUDA (the automatic choice: triton) equals the same
    block on CPU (reference backend), output and every parameter gradient, float64."""
    from sparse_msda import SparseNeighborhoodAttentionBlock

    shapes, sizes, E, H = [[12, 10], [6, 5], [3, 3]], [3, 5, 3], 16, 2
    torch.manual_seed(0)
    block = SparseNeighborhoodAttentionBlock(E, H, n_levels=3, neighborhood_sizes=sizes, position_dim=2).double()
    stacked, _, _ = make_map(shapes, 2, 0.3, E, seed=2)
    pos, offsets = random_queries([7, 5], shapes[0], seed=3)
    query = torch.randn(pos.shape[0], E, dtype=torch.float64)
    bg = torch.randn(2, 3, E, dtype=torch.float64) if background else None
    outs, grads = [], []
    for dev, backend in (("cpu", "reference"), ("cuda", None)):
        blk = copy.deepcopy(block).to(dev)
        blk.backend = backend
        out = blk(query.to(dev), pos.to(dev), offsets.to(dev), stacked.to(dev), shapes, background_embedding=None if bg is None else bg.to(dev))
        out.square().sum().backward()
        outs.append(out.cpu())
        grads.append([p.grad.cpu() for p in blk.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-9)
