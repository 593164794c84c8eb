"""The fused CPU sampling kernels (sparse_msda/csrc) against the pure-PyTorch path.

The PyTorch path is itself proven against dense grid_sample (test_deformable.py); here both
paths must agree on outputs and on every gradient, the kernels must pass gradcheck, and the
PyTorch path's chunking must not change results.
"""

import os
import shutil

import pytest
import torch

from adapters import SparseCoordinateIndex
from sparse_msda import tuning
from sparse_msda.functional import sampling
from sparse_msda.functional.cpu_kernels import build_error, sampling_kernels
from tests.test_deformable import random_map


def _built(getter, monkeypatch):
    """The kernels of ``getter`` with the kernels enabled; fail if a compiler is there but the
    build failed, skip (with the reason) if there is no compiler."""
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    k = getter()
    if k is None:
        if shutil.which(os.environ.get("CXX", "c++")) is not None:  # a compiler is there: the build must work
            pytest.fail(f"building the CPU kernels failed: {build_error()!r}")
        pytest.skip("no C++ compiler on this machine: the CPU kernels cannot be built (the PyTorch path is used)")
    return k


@pytest.fixture
def kernels(monkeypatch):
    return _built(sampling_kernels, monkeypatch)


def _problem(dim, with_bg, n, dtype, seed, head_dim=5, n_heads=2, head_per_point=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [[9, 7], [4, 3]] if dim == 2 else [[5, 6, 4], [3, 3, 2]]
    stack, shapes_t = random_map(shapes, 2, 3, 0.5, dtype, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    table = torch.randn(index.n_voxels * n_heads, head_dim, generator=gen, dtype=dtype, requires_grad=True)
    bg = torch.randn(2 * 2 * n_heads, head_dim, generator=gen, dtype=dtype, requires_grad=True) if with_bg else None
    pos = (torch.rand(n, 6, dim, generator=gen, dtype=dtype) * 11 - 2).requires_grad_()  # some outside the map
    w = torch.rand(n, 6, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randint(0, 2, (n, 1), generator=gen)
    lvl = torch.tensor([0, 1, 1, 0, 0, 1])[None, :]
    h = torch.randint(0, n_heads, (n, 6) if head_per_point else (n, 1), generator=gen)

    def f(t, p, weights, background=None, chunk=None):
        return sampling.sparse_weighted_gather(t, index, p, b[: p.shape[0]], lvl, h[: p.shape[0]], n_heads, weights, background, chunk)

    return f, [t for t in (table, pos, w, bg) if t is not None]


def _run(f, inputs, monkeypatch, flag, chunk=None):
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
    out = f(*inputs, chunk=chunk)
    return out, torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_bg", [False, True])
@pytest.mark.parametrize(
    "threads, n_heads, head_per_point, table_copy_bytes",
    [(1, 2, False, None), (2, 2, False, None), (2, 3, True, None), (2, 1, False, None), (2, 1, False, 0)],
)
def test_kernels_match_pytorch_path(kernels, monkeypatch, dim, with_bg, threads, n_heads, head_per_point, table_copy_bytes):
    """Two threads split the table gradient by head (n_heads >= 2, one head per sample or per
    point), else each writes its own copy (``table_copy_bytes=0``: no copy allowed, one thread)."""
    if table_copy_bytes is not None:
        monkeypatch.setattr(tuning, "TABLE_COPY_BYTES", table_copy_bytes)
    f, inputs = _problem(dim, with_bg, 900, torch.float64, 3 + dim, n_heads=n_heads, head_per_point=head_per_point)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out_k, grads_k = _run(f, inputs, monkeypatch, "1")
    finally:
        torch.set_num_threads(prev)
    out_t, grads_t = _run(f, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-12)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_kernels_unrolled_head_dims(kernels, monkeypatch, dim, head_dim):
    """Head dims 16/32/64 take compile-time-unrolled kernels (others the run-time loop)."""
    f, inputs = _problem(dim, True, 300, torch.float64, 41 + dim, head_dim)
    out_k, grads_k = _run(f, inputs, monkeypatch, "1")
    out_t, grads_t = _run(f, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-12)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=0, atol=1e-11)


def test_kernels_float32(kernels, monkeypatch, one_thread):
    f, inputs = _problem(2, True, 600, torch.float32, 11)
    out_k, grads_k = _run(f, inputs, monkeypatch, "1")
    out_t, grads_t = _run(f, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=1e-5, atol=1e-5)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 8, 16, 17, 40])
def test_kernel_softmax_matches_float64(kernels, n):
    """The softmax the kernels take of logit rows (deformable mode; float32: a vectorised
    polynomial exp, ``softmax_row`` in csrc/sparse_sample_cpu.cpp; float64: std::exp) against
    the float64 softmax: logits of every scale, rows whose length is not a multiple of the
    vector width, -inf entries, and rows that come out NaN as torch.softmax's do."""
    gen = torch.Generator().manual_seed(n)
    scale = torch.tensor([1e-3, 0.1, 1.0, 10.0, 60.0, 200.0]).repeat(200)[:, None]
    x = torch.randn(1200, n, generator=gen, dtype=torch.float64) * scale
    x[::7, 0] = -float("inf")  # an absent sample; with n == 1 the whole row, NaN as in torch
    x[5::11, n // 2] += 300.0  # one dominant logit: the others' exp far below float's range
    ref = torch.softmax(x, 1)
    got64 = kernels.sample_softmax(x.contiguous())
    torch.testing.assert_close(got64, ref, rtol=1e-13, atol=1e-15, equal_nan=True)
    x32 = x.float()
    got = kernels.sample_softmax(x32).double()
    ref32 = torch.softmax(x32.double(), 1)  # exact softmax of the float32 logits
    assert torch.equal(got.isnan(), ref32.isnan())
    fin = ~ref32.isnan()
    # float32 logits x - max (rounded in float32, as torch's float softmax does): relative error
    # up to |x - max| * 2**-24, plus the exp's own ~2 ulp
    bound = 3e-7 * ref32 + 2**-24 * (x32.double() - x32.double().amax(1, keepdim=True)).abs() * ref32 + 1.7e-38  # x - max < -87: 0
    bound = bound.nan_to_num(nan=1.7e-38)  # -inf logits: weight 0 exactly
    assert bool(((got - ref32).abs()[fin] <= bound[fin]).all())
    torch.testing.assert_close(got, torch.softmax(x32, 1).double(), rtol=1e-5, atol=1e-7, equal_nan=True)


def test_kernel_softmax_exp_accuracy_and_non_finite(kernels):
    """exp(t) for t in [-87, 0] (row [t, 0]: weight e^t / (1 + e^t)) within 3e-7 relative of
    float64 (float32's own rounding is 6e-8); beyond -87 the weight is 0 (true value < 2e-38);
    NaN and +inf logits make the row NaN, -inf logits weigh 0."""
    t = torch.linspace(-87.0, 0.0, 200001, dtype=torch.float64).float()
    rows = torch.stack([t, torch.zeros_like(t)], 1)
    got = kernels.sample_softmax(rows)[:, 0].double()
    e = torch.exp(t.double())
    ref = e / (1 + e)
    assert float(((got - ref).abs() / ref).max()) < 3e-7
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [[0.0, -inf, 1.0, 2.0], [nan, 0.0, 1.0, 2.0], [inf, 0.0, 1.0, 2.0], [-inf] * 4, [-100.0, 0.0, -88.0, -86.0]]
    )
    for dtype in (torch.float32, torch.float64):
        got = kernels.sample_softmax(x.to(dtype))
        ref = torch.softmax(x.double(), 1).to(dtype)
        assert torch.equal(got.isnan(), ref.isnan())
        torch.testing.assert_close(got[[0, 4]], ref[[0, 4]], rtol=1e-6, atol=1e-37)
        assert float(got[0, 1]) == 0.0


def test_kernel_forward_writes_into_the_given_output(kernels, monkeypatch):
    """``sample_forward(..., out_into)`` (the fused deformable path writes each chunk into its slice
    of the whole output) returns that tensor, with the values of a fresh result."""
    f, inputs = _problem(2, True, 50, torch.float64, 5)
    seen = []
    real = kernels.sample_forward

    class Spy:  # the cpu backend calls sampling_kernels(auto=False).sample_forward
        def __getattr__(self, name):
            return getattr(kernels, name)

        def sample_forward(self, *args):
            fresh = real(*args[:-1], torch.empty(0))
            into = torch.full_like(fresh, float("nan"))
            got = real(*args[:-1], into)
            seen.append(got.data_ptr() == into.data_ptr() and torch.equal(got, fresh))
            return real(*args)

    from sparse_msda.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "sampling_kernels", lambda auto=False: Spy())
    with torch.no_grad():
        f(*inputs)
    assert seen == [True]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_bg", [False, True])
def test_kernels_gradcheck(kernels, monkeypatch, dim, with_bg, one_thread):
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    f, inputs = _problem(dim, with_bg, 7, torch.float64, 21 + dim)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_bg", [False, True])
def test_pytorch_path_gradcheck_and_chunking(monkeypatch, dim, with_bg, one_thread):
    """The pure-PyTorch path (the one CUDA tensors take): gradcheck, and many small chunks
    (forward and recomputing backward) equal one chunk."""
    f, inputs = _problem(dim, with_bg, 9, torch.float64, 31 + dim)
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    out1, grads1 = _run(f, inputs, monkeypatch, "0")
    out2, grads2 = _run(f, inputs, monkeypatch, "0", chunk=2**dim)  # one sample per chunk
    torch.testing.assert_close(out1, out2, rtol=0, atol=1e-12)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    """No compiler / ninja: one RuntimeWarning, then the PyTorch path (same results)."""
    import torch.utils.cpp_extension as cpp_extension

    from sparse_msda.functional import cpu_kernels

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert cpu_kernels.sampling_kernels() is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.sampling_kernels() is None  # warned once only
        f, inputs = _problem(2, True, 20, torch.float64, 51)
        out = f(*inputs)
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    torch.testing.assert_close(out, f(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("flag", ["0", "1"])
def test_inference_forward_matches(monkeypatch, flag):
    """Under no_grad the kernels hash and gather chunk by chunk and keep nothing: same output."""
    f, inputs = _problem(3, True, 200, torch.float64, 61)
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
    out = f(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(f(*inputs, chunk=64), out, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# neighborhood attention kernel (csrc/neighborhood_attention_cpu.cpp) against the PyTorch path
# (which test_neighborhood.py proves against a naive loop)
# ---------------------------------------------------------------------------------------------
from sparse_msda.functional import neighborhood  # noqa: E402
from sparse_msda.functional.cpu_kernels import neighborhood_kernels  # noqa: E402
from tests.window_maps import make_map, random_queries  # noqa: E402


@pytest.fixture
def nbhd_kernels(monkeypatch):
    return _built(neighborhood_kernels, monkeypatch)


def _nbhd_problem(dim, background, head_dim, n_heads, share_heads, dtype, seed, tile_queries=3, shapes=None, voxels_out=None,
                  query_counts=(48, 32)):
    """A plan over a random two-item map (queries partly outside it, one empty region) and random
    inputs of the attention function; returns (plan, [q, k, v, bg_k, bg_v, freqs]).
    ``voxels_out``: a list that receives the map's voxels ``(b, level, cell)``."""
    shapes = shapes or ([[12, 10], [6, 5], [3, 3]] if dim == 2 else [[8, 8, 8], [4, 4, 4], [2, 2, 2]])
    sizes = [3, 5, 3] if dim == 2 else [3, 3, 3]
    _, voxels, _ = make_map(shapes, 2, 0.3, 1, seed=seed)
    if voxels_out is not None:
        voxels_out.extend(voxels)
    idx = SparseCoordinateIndex(
        torch.tensor([v[0] for v in voxels]), torch.tensor([v[1] for v in voxels]),
        torch.tensor([v[2] for v in voxels]), shapes, dim,
    )
    pos, offsets = random_queries(list(query_counts), shapes[0], seed=seed + 1, lo=[-3] * dim, hi=[s + 3 for s in shapes[0]])
    batch = torch.repeat_interleave(torch.arange(2), offsets.diff())
    full = torch.tensor(shapes[0], dtype=torch.float64)
    plan = neighborhood.build_neighborhood_plan(idx, batch, pos, full, sizes, background, chunk_size=40, tile_queries=tile_queries)
    g = torch.Generator().manual_seed(seed + 2)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()  # noqa: E731
    n_q, L = pos.shape[0], len(shapes)
    q, k, v = rnd(n_q, n_heads, head_dim), rnd(plan.n_keys, n_heads, head_dim), rnd(plan.n_keys, n_heads, head_dim)
    bk = rnd(2, L, n_heads, head_dim) if background else None
    bv = rnd(2, L, n_heads, head_dim) if background else None
    fr = rnd(1 if share_heads else n_heads, head_dim // 2, dim + 1) if background else None
    return plan, [q, k, v, bk, bv, fr]


def _nbhd_run(plan, inputs, monkeypatch, flag):
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
    q, k, v, bk, bv, fr = inputs
    out = neighborhood.sparse_neighborhood_attention(q, k, v, plan, bk, bv, fr)
    live = [t for t in inputs if t is not None]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return out, torch.autograd.grad((out * w).sum(), live)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize(
    "threads, n_heads, head_dim, share_heads, tile_queries",
    [(1, 2, 4, False, 3), (2, 2, 4, True, 1), (2, 3, 6, False, 3), (2, 2, 16, False, 32), (2, 1, 32, True, 3), (2, 2, 64, False, 32)],
)
def test_neighborhood_kernel_matches_pytorch_path(
    nbhd_kernels, monkeypatch, dim, background, threads, n_heads, head_dim, share_heads, tile_queries
):
    """Outputs and the gradients of q, k, v, the background key/value and the RoPE frequencies
    agree (float64), for run-time and unrolled head dims, split over 1 or 2 threads, with tiles of
    one query (the kernel's row path) or of up to 3 or 32 (mostly the blocked path)."""
    plan, inputs = _nbhd_problem(dim, background, head_dim, n_heads, share_heads, torch.float64, seed=30 + dim, tile_queries=tile_queries)
    sizes = set(plan.tiles.query_count.tolist())
    assert max(sizes) <= 2 if tile_queries == 1 else tile_queries == 3 or max(sizes) > 2
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out_k, grads_k = _nbhd_run(plan, inputs, monkeypatch, "1")
    finally:
        torch.set_num_threads(prev)
    # the forward recorded the plan's per-query counts: as the PyTorch packing counts them
    _, (pairs, slots) = neighborhood._pack_chunks(plan)
    assert torch.equal(plan.pair_counts, pairs) and (pairs == 0).any() and plan.n_pairs > 0
    assert (plan.background_counts is None) == (slots is None) and (slots is None or torch.equal(plan.background_counts, slots))
    out_t, grads_t = _nbhd_run(plan, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=1e-10, atol=1e-10)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("background", [False, True])
def test_neighborhood_kernel_float32(nbhd_kernels, monkeypatch, background, one_thread):
    """float32 (the polynomial exp of the kernel) within float32 round-off of the PyTorch path."""
    plan, inputs = _nbhd_problem(2, background, 32, 2, False, torch.float32, seed=41, tile_queries=32)
    out_k, grads_k = _nbhd_run(plan, inputs, monkeypatch, "1")
    out_t, grads_t = _nbhd_run(plan, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=2e-5, atol=2e-5)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("background, share_heads", [(False, False), (True, False), (True, True)])
def test_neighborhood_kernel_gradcheck(nbhd_kernels, monkeypatch, background, share_heads, one_thread):
    plan, inputs = _nbhd_problem(2, background, 4, 2, share_heads, torch.float64, seed=51)
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    live = [t for t in inputs if t is not None]

    def fn(*xs):
        q, k, v, *rest = xs
        bk, bv, fr = rest if background else (None, None, None)
        return neighborhood.sparse_neighborhood_attention(q, k, v, plan, bk, bv, fr)

    assert torch.autograd.gradcheck(fn, live, eps=1e-6, atol=1e-7)


def test_neighborhood_kernel_no_key_rows_are_zero(nbhd_kernels, monkeypatch):
    """Queries whose windows hold no voxel (no background) get exact zeros, no NaN, and zero
    gradients."""
    plan, inputs = _nbhd_problem(2, False, 8, 2, False, torch.float64, seed=61)
    none = ~plan.has_keys()
    assert none.any() and (~none).any()
    out, grads = _nbhd_run(plan, inputs, monkeypatch, "1")
    assert torch.isfinite(out).all() and (out[none] == 0).all()
    assert (grads[0][none] == 0).all()


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize(
    "dim, tile_queries, shapes, query_counts",
    [(2, 3, None, (48, 32)), (3, 3, None, (48, 32)), (2, 64, [[12, 10], [6, 5], [1, 1]], (160, 32))],
)
def test_neighborhood_windows_match_naive_membership(nbhd_kernels, monkeypatch, dim, tile_queries, shapes, query_counts, background):
    """The plan's windows (kernel_tiles()[13:], enumerated once by the kernel and reused by every
    forward and backward): key bit g of entry e is set iff the cell of the entry's key lies within
    the radius of query g's window centre at the key's level on every axis; slot bit k of query i
    iff the slot's cell is in bounds and holds no voxel; counts are the bits' popcounts. With a
    1x1 coarsest level (one tile per item, up to 64 queries) the key bits take two words per entry,
    and the kernel still equals the PyTorch path. Without background (the kernel's other
    enumeration: all of a tile's queries per entry at once) there are no slot bits and no slots."""
    voxels = []
    plan, inputs = _nbhd_problem(dim, background, 4, 2, False, torch.float64, seed=71, tile_queries=tile_queries, shapes=shapes,
                                 voxels_out=voxels, query_counts=query_counts)
    tiles = plan.kernel_tiles()
    key_bits, slot_bits, counts = (x.numpy().astype("int64") & 0xFFFFFFFF for x in tiles[13:16])
    most = int(plan.tiles.query_count.max())
    assert key_bits.shape == (plan.tiles.key_row.shape[0], (most + 31) // 32)
    assert (most > 32) == (tile_queries == 64)
    present = {(b, lv, c) for b, lv, c in voxels}
    radius = [(s - 1) // 2 for s in plan.neighborhood_sizes]
    shapes_l = plan.level_spatial_shapes.tolist()
    t = plan.tiles
    pairs, slots = [0] * plan.n_queries, [0] * plan.n_queries
    qs, ks = t.query_start.tolist() + [plan.n_queries], t.key_start.tolist() + [t.key_row.shape[0]]
    for tile in range(len(qs) - 1):
        b = int(t.batch[tile])
        for g, i in enumerate(t.query_order[qs[tile]:qs[tile + 1]].tolist()):
            centre = plan.centres[i].tolist()
            for e in range(ks[tile], ks[tile + 1]):
                r = int(t.key_row[e])
                lv, cell = int(t.row_level[r]), t.row_cell[r].tolist()
                inside = all(abs(c - m) <= radius[lv] for c, m in zip(cell, centre[lv]))
                assert bool((key_bits[e, g // 32] >> (g % 32)) & 1) == inside, (tile, g, e)
                pairs[i] += inside
            for k in range(plan.slot_level.shape[0] if background else 0):
                lv = int(plan.slot_level[k])
                cell = tuple(c + o for c, o in zip(centre[lv], plan.slot_offset[k].tolist()))
                absent = all(0 <= c < n for c, n in zip(cell, shapes_l[lv])) and (b, lv, cell) not in present
                assert bool((slot_bits[i, k // 32] >> (k % 32)) & 1) == absent, (i, k)
                slots[i] += absent
    assert counts[0].tolist() == pairs and counts[1].tolist() == slots and sum(pairs) > 0 and (sum(slots) > 0) == background
    assert slot_bits.shape == (plan.n_queries, (plan.slot_level.shape[0] + 31) // 32 if background else 0)
    out_k, grads_k = _nbhd_run(plan, inputs, monkeypatch, "1")
    out_t, grads_t = _nbhd_run(plan, inputs, monkeypatch, "0")
    torch.testing.assert_close(out_k, out_t, rtol=1e-10, atol=1e-10)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=1e-9, atol=1e-10)


def test_neighborhood_attention_rejects_inputs_that_do_not_fit_the_plan():
    """Both paths share these checks (they run before the dispatch to the kernel)."""
    plan, (q, k, v, bk, bv, fr) = _nbhd_problem(2, True, 4, 2, False, torch.float64, seed=71)
    f = neighborhood.sparse_neighborhood_attention
    with pytest.raises(ValueError, match="exactly when the plan was built with_background"):
        f(q, k, v, plan)  # background plan, no background key/value
    with pytest.raises(ValueError, match="exactly when the plan was built with_background"):
        f(q, k, v, plan, bk, None, fr)
    with pytest.raises(ValueError, match="rope_freqs is required"):
        f(q, k, v, plan, bk, bv, None)
    with pytest.raises(ValueError, match=r"do not match the plan \(n_queries="):
        f(q[:-1], k, v, plan, bk, bv, fr)
    with pytest.raises(ValueError, match=r"do not match the plan"):
        f(q, k[:-1], v, plan, bk, bv, fr)
    plain, (q2, k2, v2, *_) = _nbhd_problem(2, False, 4, 2, False, torch.float64, seed=71)
    with pytest.raises(ValueError, match="exactly when the plan was built with_background"):
        f(q2, k2, v2, plain, bk, bv, fr)  # plan without background, background given


# ---------------------------------------------------------------------------------------------
# the dispatch guard: by default a kernel runs only on the vector ISAs it was measured faster on
# ---------------------------------------------------------------------------------------------
from sparse_msda.functional import cpu_kernels  # noqa: E402


class _KernelsBuiltFor:
    """Stands in for a compiled extension built for ``isa``; it has no kernels, so a dispatch
    that used it would raise AttributeError."""

    def __init__(self, isa):
        self.isa = isa

    def simd_isa(self):
        return self.isa


@pytest.mark.parametrize(
    "isa, flag, used",
    [
        ("avx512", None, True),
        ("avx2", None, True),
        ("avx", None, False),
        ("sse2", None, False),
        ("neon", None, False),
        ("generic", None, False),
        ("sse2", "1", True),  # forced
        ("avx2", "0", False),  # disabled
    ],
)
def test_dispatch_uses_kernels_only_on_measured_isas(monkeypatch, isa, flag, used):
    fake = _KernelsBuiltFor(isa)
    monkeypatch.setattr(cpu_kernels, "_load", lambda name: fake if cpu_kernels.kernels_enabled() else None)
    if flag is None:
        monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", flag)
    assert (cpu_kernels.sampling_kernels() is fake) is used
    assert (cpu_kernels.neighborhood_kernels() is fake) is used
    assert cpu_kernels.neighborhood_kernels(auto=False) is (fake if flag != "0" else None)


def test_unmeasured_isa_runs_the_pytorch_path(monkeypatch):
    """A build for an ISA outside KERNEL_WINS is never called: both attention functions give the
    PyTorch path's results (the stand-in has no kernels to call)."""
    f, inputs = _problem(2, True, 30, torch.float64, 71)
    plan, nb_inputs = _nbhd_problem(2, True, 8, 2, False, torch.float64, seed=72)
    out_s, grads_s = _run(f, inputs, monkeypatch, "0")
    out_n, grads_n = _nbhd_run(plan, nb_inputs, monkeypatch, "0")
    monkeypatch.setattr(cpu_kernels, "_load", lambda name: _KernelsBuiltFor("sse2"))
    monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS")
    out = f(*inputs)
    assert torch.equal(out, out_s)
    q, k, v, bk, bv, fr = nb_inputs
    assert torch.equal(neighborhood.sparse_neighborhood_attention(q, k, v, plan, bk, bv, fr), out_n)


def _expected_isa(macros) -> str:
    """The label csrc/simd.h must pick for a compiler target with these predefined macros."""
    defined = {line.split()[1] for line in macros if line.startswith("#define ")}
    if "__AVX512F__" in defined:
        return "avx512"
    if "__AVX2__" in defined and "__FMA__" in defined:
        return "avx2"
    if "__AVX__" in defined:
        return "avx"
    if "__SSE2__" in defined:
        return "sse2"
    return "neon" if "__ARM_NEON" in defined else "generic"


def test_built_kernels_target_the_requested_isa(kernels, nbhd_kernels, monkeypatch):
    """Both extensions report the vector ISA of the -march they were built for (so their vector
    width is that ISA's register, simd.h), and the default dispatch follows KERNEL_WINS."""
    macros = cpu_kernels._predefined_macros(cpu_kernels._compiler(), cpu_kernels.target_march())
    expected = _expected_isa(macros)
    assert kernels.simd_isa() == expected and nbhd_kernels.simd_isa() == expected
    monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS")
    assert (cpu_kernels.neighborhood_kernels() is nbhd_kernels) is (expected in cpu_kernels.KERNEL_WINS)
    assert (cpu_kernels.sampling_kernels() is kernels) is (expected in cpu_kernels.KERNEL_WINS)
