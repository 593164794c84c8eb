"""torch.compile over the custom ops (sparse_msda.backends.ops).

* The tensor-level cores compile with ``fullgraph=True`` (any graph break is an error) and give
  the eager outputs and gradients: no break inside the attention ops.
* The attention blocks compile as a whole and match eager, outputs and gradients; Dynamo's
  ``explain`` shows every op call inside a graph and no break raised from the op module. (The
  blocks' Python around the ops still breaks graphs: input validation and the plan/index
  construction are data-dependent: ``.item()``, ``nonzero``, numpy, spconv's hash table.)

Compiler backend ``aot_eager``: Dynamo + AOTAutograd, which is what traces the ops' fake
implementations and registered backward; ``inductor`` would add a C++ code generation and
compile per graph (tens of graphs for a block, minutes on this 2-core machine) and tests nothing
more about the ops. ``automatic_dynamic_shapes`` is off: with it, torch 2.13's Dynamo raises an
internal ``IndexError`` in ``_automatic_dynamic`` on a view tensor held by a plan dataclass
(``pgo.py is_stride_dynamic``) when the block is recompiled.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from adapters import SparseCoordinateIndex
from sparse_msda.backends import available_backends
from sparse_msda.backends.cpu import _centre_rotation
from sparse_msda.functional.neighborhood_plan import background_tables
from sparse_msda.functional.sampling import _base_cell_ids, _Sampling, _sample_index
from tests.conftest import cpu_backends
from tests.test_cpu_kernels import _nbhd_problem
from tests.test_deformable import random_map

pytestmark = pytest.mark.usefixtures("one_thread")

NEEDS_CPU = pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ kernels are not built here (no compiler)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield
    torch._dynamo.reset()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", cpu_backends())
def test_weighted_gather_op_compiles_fullgraph(name):
    gen = torch.Generator().manual_seed(0)
    stack, shapes = random_map([[9, 7], [4, 3]], 2, 3, 0.5, torch.float64, gen)
    index = SparseCoordinateIndex.from_coo_stack(stack, shapes)
    n_heads, n = 2, 40
    table = torch.randn(index.n_voxels * n_heads, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = (torch.rand(n, 6, 2, generator=gen, dtype=torch.float64) * 11 - 2).requires_grad_()
    w = torch.rand(n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b, lvl = torch.randint(0, 2, (n, 1), generator=gen), torch.tensor([0, 1, 1, 0, 0, 1])[None, :]
    h = torch.randint(0, n_heads, (n, 1), generator=gen)
    sampling = _Sampling(index, _sample_index(b, pos), _sample_index(lvl, pos), _sample_index(h, pos), n_heads, None, 64)
    ids = _base_cell_ids(sampling, pos.detach())  # the hash lookups stay outside the op
    args = sampling.op_args()

    def core(t, p, a):
        return torch.ops.sparse_msda.weighted_gather(t, p, a, ids, *args, name).square().sum()

    compiled = torch.compile(core, backend="aot_eager", fullgraph=True)  # a graph break raises
    eager, out = core(table, pos, w), compiled(table, pos, w)
    _close(out, eager)
    for g_c, g_e in zip(torch.autograd.grad(out, (table, pos, w)), torch.autograd.grad(eager, (table, pos, w))):
        _close(g_c, g_e)


@NEEDS_CPU
@pytest.mark.parametrize("background", [False, True])
def test_neighborhood_op_compiles_fullgraph(background):
    plan, (q, k, v, bk, bv, fr) = _nbhd_problem(2, background, 4, 2, False, torch.float64, 3)
    rotation = _centre_rotation(plan, fr.detach(), q.dtype) if background else []
    tiles = plan.kernel_tiles()

    def core(q, k, v, fr, bk, bv):
        tables = background_tables(bk, fr, plan)[0] if background else None
        out = torch.ops.sparse_msda.neighborhood_attention(q, k, v, fr, tables, bv, rotation, tiles, 0.5, "cpu")[0]
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()

    inputs = [t for t in (q, k, v, fr, bk, bv) if t is not None]
    call = (lambda *x: core(*x)) if background else (lambda q, k, v: core(q, k, v, None, None, None))
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    eager, out = call(*inputs), compiled(*inputs)
    _close(out, eager)
    for g_c, g_e in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(eager, inputs)):
        _close(g_c, g_e)


def _recording_aot_eager(graphs):
    """The ``aot_eager`` compiler, recording each graph Dynamo hands it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    inner = aot_autograd(fw_compiler=make_boxed_compiler(record), bw_compiler=make_boxed_compiler(record))
    return inner


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
@pytest.mark.parametrize("kind", ["deformable", "neighborhood"])
def test_blocks_compile_and_match_eager(kind):
    """A deformable block and a neighborhood block (with background): compiled == eager, outputs
    and every gradient; the forward and backward graphs call the ops."""
    from sparse_msda import SparseMSDeformableAttentionBlock
    from tests.test_neighborhood import make_block
    from tests.window_maps import make_map, random_queries

    name = "cpu" if "cpu" in available_backends() else "reference"
    if kind == "neighborhood" and name != "cpu":
        pytest.skip("the reference neighborhood attention is no custom op yet (sparse_msda/backends/ops.py)")
    shapes = [[12, 10], [6, 5], [3, 3]]
    stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=2)
    index = SparseCoordinateIndex.from_coo_stack(stacked.coalesce(), shapes)
    pos, offsets = random_queries([7, 5], shapes[0], seed=3)
    query = torch.randn(pos.shape[0], 16, dtype=torch.float64, requires_grad=True)
    bg = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    if kind == "deformable":
        block = SparseMSDeformableAttentionBlock(16, 2, 3, 2, backend=name).double()
    else:
        block = make_block(16, 2, 3, [3, 5, 3], 2, backend=name)

    def run(query, bg):
        return block(query, pos, offsets, stacked, shapes, background_embedding=bg, coordinate_index=index)

    graphs = []
    out, eager = torch.compile(run, backend=_recording_aot_eager(graphs))(query, bg), run(query, bg)
    _close(out, eager)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    params = [query, bg] + list(block.parameters())
    g_c = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    g_e = torch.autograd.grad((eager * weight).sum(), params, allow_unused=True)
    for a, b in zip(g_c, g_e):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b)
    op = "weighted_gather" if kind == "deformable" else "neighborhood_attention"
    assert any(f"sparse_msda.{op}.default" in g for g in graphs), "the op is not in any forward graph"
    assert any(f"sparse_msda.{op}_backward.default" in g for g in graphs), "the backward op is not in any graph"
