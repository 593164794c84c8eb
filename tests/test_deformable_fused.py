"""The deformable attention's fused sampling head on the C++ kernels (functional/deformable_fused.py
over backends/cpu_deformable.py).

The module takes it on the ``cpu`` backend for an encoder (no sampling plan): offsets, softmax and
sampling per chunk of queries, the locations formed in the kernel from offsets and reference
points, the softmax and its backward in the kernel, offsets and logits kept or recomputed in the
backward. Held equal to the unfused PyTorch path (``reference`` backend: ``addcmul`` locations,
``softmax``, ``sparse_deformable_attention``), outputs and every gradient, in both memory modes
and with several chunks; gradchecked in float64; its base cells equal ``_base_cells``.
"""

from __future__ import annotations

import pytest
import torch

from adapters import SparseCoordinateIndex
from adapters import spconv_compat
from sparse_msda import SparseMSDeformableAttention, tuning
from sparse_msda.backends import available_backends
from sparse_msda.backends import cpu_deformable
from sparse_msda.functional import deformable_fused
from sparse_msda.functional.sampling import _base_cells
from tests.test_deformable import SHAPES, random_map, random_queries, randomize

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ kernels are not built here (no compiler)"),
]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused Function (so a test knows the module took the fused path)."""
    calls = []
    apply = cpu_deformable._FusedDeformable.apply
    monkeypatch.setattr(cpu_deformable._FusedDeformable, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


def _module_run(backend, dim, dtype, background, seed=0):
    """Output and gradients (query, positions, values, background, every parameter) of one module call."""
    shapes = SHAPES[dim]
    stack, shapes_t = random_map(shapes, 2, 16, 0.5, dtype, torch.Generator().manual_seed(seed))
    st = stack.coalesce()
    torch.manual_seed(seed)
    module = randomize(SparseMSDeformableAttention(16, 4, len(shapes), 3, dim, backend=backend),
                       torch.Generator().manual_seed(seed + 1)).to(dtype)
    module.plan_below = 0.0  # never a decoder plan: the encoder path
    query, pos, offsets, levels = random_queries([7, 5], shapes, 16, dtype, torch.Generator().manual_seed(seed + 2))
    values = st.values().clone().requires_grad_()
    bg = torch.randn(2, len(shapes), 16, dtype=dtype, generator=torch.Generator().manual_seed(seed + 3)) if background else None
    inputs = [query.requires_grad_(), pos.requires_grad_(), values] + ([bg.requires_grad_()] if background else [])
    sparse = torch.sparse_coo_tensor(st.indices(), values, st.shape, is_coalesced=True)
    out = module(query, pos, offsets, sparse, shapes_t, query_level_indices=levels, background_embedding=bg)
    weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
    return [out, *torch.autograd.grad((out * weight).sum(), inputs + list(module.parameters()))]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("mode", ["keep", "recompute-chunked"])
def test_fused_module_matches_the_pytorch_path(dim, background, mode, fused_calls, monkeypatch):
    """Every output and gradient equal to the unfused reference path, float64; ``recompute-chunked``:
    nothing kept (offsets and logits recomputed in the backward) and chunks of 2 queries."""
    if mode != "keep":
        monkeypatch.setattr(tuning, "DEFORMABLE_KEEP_BYTES", 0)
        monkeypatch.setattr(tuning, "CHUNK_CORNERS", 2 * 4 * 3 * 3)  # 2 queries x heads x levels x points
    fused = _module_run("cpu", dim, torch.float64, background)
    assert fused_calls, "the module did not take the fused path"
    reference = _module_run("reference", dim, torch.float64, background)
    for i, (a, b) in enumerate(zip(fused, reference)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"item {i}: {m}")


@pytest.mark.parametrize("dim", [2, 3])
def test_fused_module_on_spconv_levels_matches(dim, fused_calls, monkeypatch):
    """On a list of spconv levels the fused path takes the levels' feature blocks (projected into
    one table, one gradient per level, no concatenation kept): outputs and every gradient (each
    level's features included) equal to the reference path, float64, nothing kept (recomputed)."""
    import adapters

    monkeypatch.setattr(tuning, "DEFORMABLE_KEEP_BYTES", 0)
    shapes = SHAPES[dim]
    stack, shapes_t = random_map(shapes, 2, 16, 0.5, torch.float64, torch.Generator().manual_seed(11))
    results = []
    for backend in ("cpu", "reference"):
        levels = adapters.coo_stack_to_spconv(stack.coalesce(), shapes_t)
        feats = [lvl.features.requires_grad_() for lvl in levels]
        torch.manual_seed(0)
        module = randomize(SparseMSDeformableAttention(16, 4, len(shapes), 3, dim, backend=backend),
                           torch.Generator().manual_seed(12)).double()
        module.plan_below = 0.0
        query, pos, offsets, lev = random_queries([6, 4], shapes, 16, torch.float64, torch.Generator().manual_seed(13))
        out = module(query.requires_grad_(), pos, offsets, levels, None, query_level_indices=lev)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        results.append([out, *torch.autograd.grad((out * weight).sum(), [query, *feats, *module.parameters()])])
    assert len(fused_calls) == 1
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"item {i}: {m}")


def test_module_prepare_does_not_concatenate_spconv_levels():
    """The deformable module's checked inputs keep spconv levels as blocks (the fused path takes
    them; no ``[N, C]`` concatenation per call); ``all_features()`` concatenates on demand (the
    unfused paths), equal to the levels' features in index row order."""
    import adapters

    shapes = SHAPES[3]
    stack, shapes_t = random_map(shapes, 2, 16, 0.5, torch.float64, torch.Generator().manual_seed(31))
    levels = adapters.coo_stack_to_spconv(stack.coalesce(), shapes_t)
    module = SparseMSDeformableAttention(16, 4, len(shapes), 3, 3).double()
    query, pos, offsets, lev = random_queries([3, 2], shapes, 16, torch.float64, torch.Generator().manual_seed(32))
    qb = module.prepare(query, pos, offsets, levels, None, lev)
    assert qb.features is None and len(qb.feature_parts) == len(levels)
    torch.testing.assert_close(qb.all_features(), torch.cat([lvl.features for lvl in levels]), rtol=0, atol=0)


def test_fused_module_float32_matches(fused_calls):
    fused = _module_run("cpu", 2, torch.float32, True, seed=5)
    assert fused_calls
    reference = _module_run("reference", 2, torch.float32, True, seed=5)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_path_not_taken_for_a_plan_or_the_reference_backend(fused_calls):
    """A decoder (few samples: the sampling plan) and the reference backend take the unfused path."""
    _module_run("reference", 2, torch.float64, False)
    assert not fused_calls
    shapes = SHAPES[2]
    stack, shapes_t = random_map(shapes, 2, 16, 0.5, torch.float64, torch.Generator().manual_seed(0))
    module = SparseMSDeformableAttention(16, 4, len(shapes), 3, backend="cpu").double()
    module.plan_below = 1e9  # every call a "decoder"
    query, pos, offsets, levels = random_queries([3, 2], shapes, 16, torch.float64, torch.Generator().manual_seed(1))
    module(query, pos, offsets, stack, shapes_t, query_level_indices=levels)
    assert not fused_calls


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("keep", [True, False])
def test_fused_gradcheck(dim, keep, monkeypatch):
    """float64 gradcheck of the Function w.r.t. the query, the three linear layers, the reference
    points, the features and the background rows, over two chunks; ``keep=False``: the value
    table, offsets and logits recomputed in the backward."""
    monkeypatch.setattr(tuning, "DEFORMABLE_KEEP_BYTES", 1 << 30 if keep else 0)
    monkeypatch.setattr(tuning, "CHUNK_CORNERS", 2 * 2 * 2 * 2)  # chunks of 2 queries
    gen = torch.Generator().manual_seed(40 + dim)
    shapes = [[4, 5], [2, 3]] if dim == 2 else [[3, 4, 3], [2, 2, 2]]
    stack, shapes_t = random_map(shapes, 2, 4, 0.6, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    h, l, p, c, dh, c_in = 2, 2, 2, 3, 2, 3
    n_q = 4

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).requires_grad_()

    inputs = (
        rand(n_q, c), rand(h * l * p * dim, c, scale=0.5), rand(h * l * p * dim, scale=0.5), rand(h * l * p, c),
        rand(h * l * p), torch.rand(n_q, dim, dtype=torch.float64, generator=gen).requires_grad_(),
        rand(index.n_voxels, c_in), rand(h * dh, c_in), rand(h * dh), rand(2 * l * h, dh),
    )
    batch = torch.tensor([0, 0, 1, 1])

    def f(*args):
        return deformable_fused.fused_deformable_attention(*args, index, batch, h, l, p, backend="cpu")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)

    def blocks(*args):  # the features as three row blocks (one empty): per-block projection and gradients
        *head, features, w_v, b_v, bg = args[:10]
        cut = index.n_voxels // 2
        parts = (features[:cut], features[cut:cut], features[cut:])
        return deformable_fused.fused_deformable_attention(*head, parts, w_v, b_v, bg, index, batch, h, l, p, backend="cpu")

    torch.testing.assert_close(blocks(*inputs), f(*inputs), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(blocks, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("keep", [True, False])
def test_backward_storage_reuse(keep, monkeypatch):
    """The backward's storage reuse changes no gradient: ``grad_in_place=False`` leaves the
    incoming gradient untouched; ``grad_in_place=True`` writes the query's gradient over it (same
    storage) with the same values; a recomputed value table holds the feature blocks' gradients
    afterwards (one storage), a kept one does not; every gradient equal across the modes."""
    monkeypatch.setattr(tuning, "DEFORMABLE_KEEP_BYTES", 1 << 30 if keep else 0)
    monkeypatch.setattr(tuning, "CHUNK_CORNERS", 3 * 2 * 2 * 2)  # chunks of 3 queries
    gen = torch.Generator().manual_seed(23)
    stack, shapes_t = random_map([[4, 5], [2, 3]], 2, 4, 0.6, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    h, l, p, dh, n_q = 2, 2, 2, 3, 7
    c = h * dh  # the query's width equals the output's, as in the module
    weights = (torch.randn(h * l * p * 2, c, dtype=torch.float64, generator=gen) * 0.5, torch.randn(h * l * p * 2, dtype=torch.float64, generator=gen),
               torch.randn(h * l * p, c, dtype=torch.float64, generator=gen), torch.randn(h * l * p, dtype=torch.float64, generator=gen))
    ref = torch.rand(n_q, 2, dtype=torch.float64, generator=gen)
    feats = torch.randn(index.n_voxels, 5, dtype=torch.float64, generator=gen)
    w_v, b_v = torch.randn(c, 5, dtype=torch.float64, generator=gen), torch.randn(c, dtype=torch.float64, generator=gen)
    x0 = torch.randn(n_q, c, dtype=torch.float64, generator=gen)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    cut = index.n_voxels // 3
    grad = torch.randn(n_q, c, dtype=torch.float64, generator=gen)
    results = {}
    for in_place in (False, True):
        x = x0.clone().requires_grad_()
        parts = [feats[:cut].clone().requires_grad_(), feats[cut:].clone().requires_grad_()]
        out = deformable_fused.fused_deformable_attention(
            x, *weights, ref, parts, w_v, b_v, None, index, batch, h, l, p, backend="cpu", grad_in_place=in_place
        )
        g = grad.clone()
        out.backward(g)
        if in_place:
            assert x.grad.data_ptr() == g.data_ptr(), "the query's gradient was not written over the incoming one"
        else:
            torch.testing.assert_close(g, grad, rtol=0, atol=0, msg="grad_in_place=False modified the incoming gradient")
        shared = parts[0].grad.untyped_storage().data_ptr() == parts[1].grad.untyped_storage().data_ptr()
        assert shared != keep, "the feature gradients should share the recomputed table's storage exactly when it is recomputed"
        results[in_place] = [x.grad, parts[0].grad, parts[1].grad]
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_functional_chooses_the_fused_head_through_the_backends(monkeypatch):
    """fused_deformable_attention runs the chosen backend's ``deformable_attention`` (looked up on
    the backend module at call time, so a backend spy sees it); a backend without one (reference)
    is not fusable and an explicit call with it raises ValueError naming it."""
    from sparse_msda.backends import cpu

    gen = torch.Generator().manual_seed(7)
    stack, shapes_t = random_map([[4, 5]], 1, 4, 0.6, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes_t)
    h, l, p, c, dh = 2, 1, 2, 3, 2
    args = (
        torch.randn(3, c, dtype=torch.float64), torch.randn(h * l * p * 2, c, dtype=torch.float64), None,
        torch.randn(h * l * p, c, dtype=torch.float64), None, torch.rand(3, 2, dtype=torch.float64),
        torch.randn(index.n_voxels, c, dtype=torch.float64), torch.randn(h * dh, c, dtype=torch.float64), None, None,
        index, torch.zeros(3, dtype=torch.int64), h, l, p,
    )
    expected = cpu_deformable.deformable_attention(*args)
    calls = []
    original = cpu.deformable_attention
    monkeypatch.setattr(cpu, "deformable_attention", lambda *a: (calls.append(a[15:]), original(*a))[1])
    torch.testing.assert_close(deformable_fused.fused_deformable_attention(*args, backend="cpu"), expected, rtol=0, atol=0)
    assert calls == [(False,)]  # the 15 arguments and grad_in_place
    assert deformable_fused.fusable("cpu", args[0], args[6])
    assert not deformable_fused.fusable("reference", args[0], args[6])
    with pytest.raises(ValueError, match="the reference backend, which has no fused deformable attention"):
        deformable_fused.fused_deformable_attention(*args, backend="reference")


def test_kernel_base_cells_equal_base_cells():
    """The kernel's base cells of given positions equal ``_base_cells`` (NaN, infinities, huge
    and negative coordinates included)."""
    from sparse_msda.functional.cpu_kernels import sampling_kernels

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        pos = (torch.rand(50, 6, 3, generator=gen, dtype=dtype) * 40 - 10)
        pos[0, 0] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        pos[1, 1] = torch.tensor([1e30, -1e30, 0.5], dtype=dtype)
        level = torch.zeros(50, 6, dtype=torch.int64)
        shapes = torch.tensor([[8, 8, 8]])
        got = sampling_kernels(auto=False).sample_base_cells(pos, level, shapes, torch.empty(0, dtype=dtype), 1, 1)
        assert torch.equal(got, _base_cells(pos))


def test_hash_query_equal_at_every_thread_count_and_value_dtype():
    """spconv's CPU query (an OpenMP loop over torch's threads) answers the same at 1 and 3
    threads, for int64 and int32 value tables (the corner table's ids are int32 on CPU), the
    returned values of the table's dtype; restores the caller's thread count."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.unique(torch.randint(0, 100_000, (20_000,), generator=gen))
    query = torch.randint(0, 200_000, (300_000,), generator=gen)
    expect_found = torch.isin(query, keys)
    before = torch.get_num_threads()
    try:
        for value_dtype in (torch.int64, torch.int32):
            table = spconv_compat.new_hash_table(torch.device("cpu"), keys.numel(), value_dtype=value_dtype)
            spconv_compat.hash_insert(table, keys, torch.arange(keys.numel(), dtype=value_dtype))
            for threads in (1, 3):
                torch.set_num_threads(threads)
                values, found = spconv_compat.hash_query(table, query)
                assert values.dtype == value_dtype
                assert torch.equal(found, expect_found) and 0 < int(found.sum()) < query.numel()
                assert torch.equal(keys[values[found].long()], query[found])
    finally:
        torch.set_num_threads(before)
