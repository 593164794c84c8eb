"""float16 / bfloat16 / ``torch.autocast`` (issue 13) against float64 references.

Policy under test (``sparse_msda/functional/precision.py``): the sampling gather and the
neighborhood attention compute in float32 for float16 / bfloat16 inputs (softmax shifted,
sums in float32), return the input dtype, and every gradient comes back in its own input's
dtype; positions never drop below float32.

Every reference is the same computation in float64 on the SAME rounded inputs and parameters
(the low-precision tensors cast up exactly), so the error measured is what the low-precision
run adds, not the rounding of its inputs. Tolerances are multiples of the dtype's machine
epsilon ``eps = torch.finfo(dtype).eps`` (float16 ``2**-10``, bfloat16 ``2**-7``); each test
says why its multiple.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import SparseCoordinateIndex
from sparse_msda import (
    LevelProjection,
    MultilevelSelfAttentionBlockWithRoPE,
    SparseMSDAEncoder,
    SparseMSDeformableAttention,
    SparseMSDeformableAttentionBlock,
    SparseMultilevelMapAttentionBlock,
    SparseNeighborhoodAttentionBlock,
)
from sparse_msda import tuning
from sparse_msda.backends.reference import NeighborhoodAttentionFunction
from sparse_msda.functional.neighborhood import build_neighborhood_plan, sparse_neighborhood_attention
from sparse_msda.lidar import random_sparse_levels
from tests.conftest import cpu_backends
from tests.test_cpu_kernels import _problem
from tests.window_maps import make_map, random_queries

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny problems

LOW = [torch.float16, torch.bfloat16]
PATHS = cpu_backends()  # SPARSE_MSDA_BACKEND: every backend that runs CPU tensors here (cpu: the C++ kernels, reference)


def eps(dtype):
    return torch.finfo(dtype).eps


def rel_err(a, b):
    """Norm-wise relative error ``|a - b| / |b|`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- functional operations -------------------------------------------------------------------
def _plan_problem(seed=11, background=False):
    shapes, sizes = [[8, 8], [4, 4]], [3, 3]
    _, voxels, _ = make_map(shapes, 2, 0.3, 1, seed=seed)
    idx = SparseCoordinateIndex(
        torch.tensor([v[0] for v in voxels]), torch.tensor([v[1] for v in voxels]),
        torch.tensor([v[2] for v in voxels]), shapes, 2,
    )
    pos, offsets = random_queries([40, 30], [8, 8], seed=seed + 1)
    batch = torch.repeat_interleave(torch.arange(2), offsets.diff())
    plan = build_neighborhood_plan(
        idx, batch, pos, torch.tensor([8.0, 8.0], dtype=torch.float64), sizes, background, chunk_size=64, tile_queries=4
    )
    assert plan.n_pairs > 0
    return plan


def _large_score_qkv(plan, dtype, n_heads=2, head_dim=4, seed=0):
    """q, k, v whose scaled scores reach ~39.5 (below the unshifted-softmax bound of 60, far
    above float16's exp overflow at ~11.1): every q and k is nearly the same direction with
    norm ``sqrt(79)`` so ``scale * |q| |k| = 0.5 * 79 = 39.5``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n_heads, head_dim, generator=g, dtype=torch.float64), dim=-1)

    def rows(n):
        x = u + 0.05 * torch.randn(n, n_heads, head_dim, generator=g, dtype=torch.float64)
        return (torch.nn.functional.normalize(x, dim=-1) * 79**0.5).to(dtype)

    v = torch.randn(plan.n_keys, n_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    return rows(plan.n_queries), rows(plan.n_keys), v


@pytest.mark.parametrize("path", PATHS)
def test_float16_large_scores_neighborhood_attention(path, monkeypatch):
    """Issue 13's bug: float16 q/k/v with a score bound of 39.5 gave a non-finite output (the
    PyTorch path skipped the max shift below a bound of 60, and exp overflows float16 above
    ~11). Compared to float64 on the same inputs: the float32 compute is exact to ~1e-6, the
    float16 output and gradients are rounded once (<= eps / 2 relative), so ``eps``."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    plan = _plan_problem()
    q, k, v = (t.requires_grad_() for t in _large_score_qkv(plan, torch.float16))
    q64, k64 = q.detach().double(), k.detach().double()
    bound = float((q64.norm(dim=-1).amax(0) * k64.norm(dim=-1).amax(0)).max()) * 0.5  # what the path checks
    top = float(torch.einsum("qhd,khd->qkh", q64, k64).max()) * 0.5
    assert bound < tuning.SOFTMAX_NO_SHIFT_BOUND and top > 11.1  # exp(top) overflows float16
    out = sparse_neighborhood_attention(q, k, v, plan)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_neighborhood_attention(q64, k64, v64, plan)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    e = eps(torch.float16)
    torch.testing.assert_close(out.double(), ref, rtol=e, atol=e * float(ref.detach().abs().max()))
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == torch.float16, name
        torch.testing.assert_close(a.double(), b, rtol=e, atol=e * float(b.abs().max()), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", LOW)
def test_reference_function_shifts_softmax_in_low_precision(dtype):
    """The PyTorch-path Function itself (what a backend calls), fed float16 / bfloat16 directly:
    the softmax is always max-shifted below float32, so large scores stay finite. Its sums run
    in the input dtype here (the public op casts to float32 first), hence a looser ``8 eps``:
    the softmax sum over up to ~30 keys and the value sum round at each of a few steps."""
    plan = _plan_problem(seed=21)
    q, k, v = _large_score_qkv(plan, dtype, seed=1)
    out = NeighborhoodAttentionFunction.apply(q, k, v, None, None, None, plan, 0.5)
    assert torch.isfinite(out).all()
    ref = NeighborhoodAttentionFunction.apply(q.double(), k.double(), v.double(), None, None, None, plan, 0.5)
    assert rel_err(out, ref) < 8 * eps(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("background", [False, True])
def test_neighborhood_attention_low_precision(path, dtype, background, monkeypatch):
    """Random (moderate) scores, with and without background keys: output and the gradients of
    q, k, v, background k/v and the RoPE frequencies. float32 compute from exact inputs, one
    rounding to the dtype at the end: ``eps`` relative (plus ``eps`` times the largest entry
    for entries near zero)."""
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    plan = _plan_problem(seed=31, background=background)
    g = torch.Generator().manual_seed(2)
    H, d = 2, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    inputs = [rnd(plan.n_queries, H, d), rnd(plan.n_keys, H, d), rnd(plan.n_keys, H, d)]
    if background:
        inputs += [rnd(2, 2, H, d), rnd(2, 2, H, d), rnd(H, d // 2, 3)]
    out = sparse_neighborhood_attention(*inputs[:3], plan, *inputs[3:])
    assert out.dtype == dtype
    w = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = sparse_neighborhood_attention(*ref_in[:3], plan, *ref_in[3:])
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_in)
    e = eps(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=e, atol=e * float(ref.detach().abs().max()))
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=e, atol=e * float(b.abs().max()), msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("background", [False, True])
def test_sampling_low_precision(path, dtype, background, monkeypatch):
    """The sampling gather with a float16 / bfloat16 table, positions and weights: output and
    every gradient (table, positions, weights, background) in the input dtype, within one
    rounding (``eps``) of float64 on the same inputs."""
    f, inputs64 = _problem(2, background, 300, torch.float64, 7)
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    monkeypatch.setenv("SPARSE_MSDA_BACKEND", path)
    out = f(*inputs)
    assert out.dtype == dtype
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = f(*ref_in)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_in)
    e = eps(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=e, atol=e * float(ref.detach().abs().max()))
    for name, a, b in zip(["table", "positions", "weights", "background"], grads, ref_grads):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, rtol=e, atol=e * float(b.abs().max()), msg=lambda m: f"d{name}: {m}")


# --- modules ---------------------------------------------------------------------------------
SHAPES = [[8, 10, 6], [4, 5, 3]]  # two 3D levels, (z, y, x)
C, HEADS = 8, 2


def _perturb(module, seed=1, scale=0.2):
    """Move every parameter off its (often zero / symmetric) init so every path matters; RoPE
    frequencies stay in their groups."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in module.modules():
            if hasattr(m, "freq_mask"):
                m.freqs.mul_(m.freq_mask)
    return module


def _levels(dtype, channels=C):
    return random_sparse_levels(SHAPES, 0.12, 2, channels, seed=3, dtype=dtype)


def _queries(n=(11, 9)):
    pos, offsets = random_queries(list(n), SHAPES[0], seed=4)
    return pos, offsets


def _attention_call(with_background):
    """``f(module, dtype) -> (output, float inputs)`` for the (query, positions, offsets, maps)
    attention modules; the query and map features are the leaves whose gradients are checked."""
    def f(module, dtype):
        pos, offsets = _queries()
        levels = [lvl.replace_feature(lvl.features.to(dtype).requires_grad_()) for lvl in _levels(torch.float64)]
        query = torch.randn(pos.shape[0], C, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        query = query.to(dtype).requires_grad_()
        kw = {}
        if with_background:
            bg = torch.randn(2, len(SHAPES), C, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            kw["background_embedding"] = bg.to(dtype).requires_grad_()
        out = module(query, pos.to(dtype), offsets, levels, None, **kw)
        return out, [query, *(lvl.features for lvl in levels), *kw.values()]
    return f


def _encoder_call(module, dtype):
    levels = [lvl.replace_feature(lvl.features.to(dtype).requires_grad_()) for lvl in _levels(torch.float64)]
    out = module(levels)
    return torch.cat([o.features for o in out]), [lvl.features for lvl in levels]


def _projection_call(module, dtype):
    levels = [lvl.replace_feature(lvl.features.to(dtype).requires_grad_()) for lvl in _levels(torch.float64, 5)]
    out = module(levels)
    return torch.cat([o.features for o in out]), [lvl.features for lvl in levels]


def _token_call(module, dtype):
    gen = torch.Generator().manual_seed(8)
    levels = torch.randint(0, 2, (20,), generator=gen)
    shapes = torch.tensor(SHAPES)
    pos = (torch.rand(20, 3, generator=gen, dtype=torch.float64) * shapes[levels]).floor()
    x = torch.randn(20, C, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    out = module(x, pos, levels, shapes, torch.tensor([0, 12, 20]))
    return out, [x]


MODULES = {
    "SparseMSDeformableAttention": (lambda: SparseMSDeformableAttention(C, HEADS, 2, 2, position_dim=3), _attention_call(True)),
    "SparseMSDeformableAttentionBlock": (
        lambda: SparseMSDeformableAttentionBlock(C, HEADS, 2, 2, bias=True, position_dim=3), _attention_call(False)
    ),
    "SparseNeighborhoodAttentionBlock": (
        lambda: SparseNeighborhoodAttentionBlock(C, HEADS, 2, [3, 3], position_dim=3, bias=True), _attention_call(True)
    ),
    "SparseMultilevelMapAttentionBlock": (
        lambda: SparseMultilevelMapAttentionBlock(C, HEADS, n_levels=2, position_dim=3, bias=True), _attention_call(False)
    ),
    "MultilevelSelfAttentionBlockWithRoPE": (
        lambda: MultilevelSelfAttentionBlockWithRoPE(C, HEADS, position_dim=3), _token_call
    ),
    "SparseMSDAEncoder": (
        lambda: SparseMSDAEncoder(C, HEADS, 2, 2, n_points=2, neighborhood_sizes=[3, 3], position_dim=3), _encoder_call
    ),
    "LevelProjection": (lambda: LevelProjection([5, 5], C), _projection_call),
}


class _SameSamplingPositions:
    """Record the deformable sampling locations of one run and replay them (values only) in
    another: ``replayed = own + (recorded - own).detach()``, so the float64 reference samples
    at exactly the low-precision run's positions while its gradients flow as usual.

    Why: the gradient of a bilinear sample w.r.t. its position is ``v_hi - v_lo``, which jumps
    where the position crosses a cell centre. A position rounded by ``delta`` crosses one with
    probability ``~delta``, and each crossing changes that sample's gradient by O(1): compared
    at its own (unrounded) positions the reference's position-dependent gradients differ by
    O(sqrt(eps)) norm-wise, a property of bilinear sampling, not of the precision policy."""

    def __init__(self, monkeypatch):
        from sparse_msda.modules import deformable_attention as da

        self.recorded, self.replay, self.i = [], False, 0
        plan_fn, attn_fn = da.plan_deformable_sampling, da.sparse_deformable_attention

        def locations(own):
            if not self.replay:
                return own
            rec = self.recorded[self.i]
            return own + (rec.to(own.dtype) - own).detach()

        def plan(index, batch, locs, *a, **k):
            return plan_fn(index, batch, locations(locs), *a, **k)

        def attend(value, index, batch, locs, *a, **k):
            locs = locations(locs)
            if self.replay:
                self.i += 1
            else:
                self.recorded.append(locs.detach())
            return attn_fn(value, index, batch, locs, *a, **k)

        monkeypatch.setattr(da, "plan_deformable_sampling", plan)
        monkeypatch.setattr(da, "sparse_deformable_attention", attend)


def _run_module(module, call, dtype, autocast):
    """Output, input gradients and parameter gradients of ``call(module, dtype)`` (forward
    under ``torch.autocast("cpu", autocast)`` when given; backward outside, as PyTorch's AMP
    recipe does)."""
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            out, inputs = call(module, dtype)
    else:
        out, inputs = call(module, dtype)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.double() * w).sum(), inputs + params, allow_unused=True)
    return out, grads[: len(inputs)], grads[len(inputs):], params


@pytest.mark.parametrize("mode", ["float16", "bfloat16", "autocast-bfloat16"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_low_precision(name, mode, monkeypatch):
    """Each module in float16 / bfloat16 (module and inputs cast) and under CPU autocast
    (float32 module and inputs) against its float64 copy holding the same rounded parameters,
    fed the same rounded inputs and sampling at the same positions (:class:`_SameSamplingPositions`).

    Error sources: every linear layer's output is rounded to the dtype (<= eps / 2 each, about
    six roundings on the longest path of a block), the attention ops add one rounding (they
    compute in float32). Output: ``4 eps`` norm-wise (measured today: <= 2 eps over six seeds
    and all modules). Gradients see those roundings in the forward and again in the backward:
    ``16 eps`` per block (measured <= 7 eps), ``48 eps`` for the two-layer encoder, where a
    layer's rounded output is the next one's input (measured <= 23 eps). A gradient's dtype
    must be its parameter's.
    """
    make, call = MODULES[name]
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(mode, torch.float32)
    autocast = torch.bfloat16 if mode.startswith("autocast") else None
    low = autocast or dtype
    torch.manual_seed(0)
    module = _perturb(make()).to(dtype)
    ref_module = copy.deepcopy(module).double()
    same = _SameSamplingPositions(monkeypatch)
    out, in_grads, p_grads, params = _run_module(module, call, dtype, autocast)
    same.replay = True
    ref, ref_in_grads, ref_p_grads, _ = _run_module(ref_module, call, torch.float64, None)
    # autocast: a residual stream stays in the input's float32 (a float32 + bfloat16 sum)
    expected = (low,) if autocast is None else (low, dtype)
    assert out.dtype in expected, f"output dtype {out.dtype}, expected one of {expected}"
    assert torch.isfinite(out).all()
    e = eps(low)
    assert rel_err(out, ref) < 4 * e, f"output: relative error {rel_err(out, ref):.3g} >= 4 eps = {4 * e:.3g}"
    tol = 48 if name == "SparseMSDAEncoder" else 16
    named = [f"input {i}" for i in range(len(in_grads))] + [n for n, p in module.named_parameters() if p.requires_grad]
    for n, a, b, t in zip(named, (*in_grads, *p_grads), (*ref_in_grads, *ref_p_grads), (*([None] * len(in_grads)), *params)):
        if b is None:
            assert a is None, n
            continue
        assert a is not None, n
        if t is not None:
            assert a.dtype == t.dtype, f"{n}: gradient dtype {a.dtype}, parameter dtype {t.dtype}"
        if float(b.norm()) > 0:
            err = rel_err(a, b)
            assert err < tol * e, f"{n}: relative gradient error {err:.3g} >= {tol} eps = {tol * e:.3g}"
