"""The fused C++ CPU kernels as a backend (``sparse_msda/csrc``).

* ``weighted_gather``: :func:`gather_forward` / :func:`gather_backward` (``csrc/sparse_sample_cpu.cpp``):
  interpolation and attention-weighted sum in one pass per sample, forward and backward;
* the deformable attention's whole sampling head (value projection, offsets, softmax, sampling)
  fused per chunk of queries: :func:`deformable_attention`, in :mod:`sparse_msda.backends.cpu_deformable`
  (what :func:`sparse_msda.functional.deformable_fused.fused_deformable_attention` runs here);
* ``neighborhood_attention``: :func:`attention_forward` / :func:`attention_backward`
  (``csrc/neighborhood_attention_cpu.cpp``): scores, softmax and weighted sum per tile and head
  over the plan's tiles, with a recomputing backward.

Supports CPU tensors of one floating dtype, float32 or float64 (and int32 corner tables for the
sampling). The kernels are compiled on first use and cached, by
:mod:`sparse_msda.functional.cpu_kernels` (build directory keyed by torch, compiler, flags, the
target ISA ``$SPARSE_MSDA_CPU_MARCH`` and the source; ``python -m sparse_msda.build_kernels``
prebuilds them). :func:`available` is True once both built (a failed build warns once);
:func:`wins` says whether the automatic choice uses them (their vector ISA is in
:data:`~sparse_msda.functional.cpu_kernels.KERNEL_WINS`). Each kernel is held equal to the
reference backend (outputs and every gradient) and gradchecked in ``tests/test_cpu_kernels.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import tuning
from ..functional.determinism import kernel_threads
from ..functional.cpu_kernels import build_error, kernel_wins, kernels_enabled, neighborhood_kernels, sampling_kernels
from ..functional.neighborhood_plan import NeighborhoodPlan, background_tables
from ..functional.rope import rope_cos_sin
from ..functional.sampling import _base_cell_ids, _Sampling
from . import ops, same_float_dtype
from .cpu_deformable import ABSENT, deformable_attention

__all__ = [
    "SUPPORTS",
    "attention_backward",
    "attention_forward",
    "deformable_attention",
    "gather_backward",
    "gather_forward",
    "available",
    "neighborhood_attention",
    "supports",
    "weighted_gather",
    "wins",
]

#: what :func:`supports` accepts, in words (for error messages)
SUPPORTS = "CPU tensors of one dtype, float32 or float64 (int32 corner tables)"


def available() -> bool:
    """True when both kernels are built (or load from the cache) and not disabled by
    ``SPARSE_MSDA_CPU_KERNELS=0``; builds them on first call (~30 s each)."""
    return kernels_enabled() and sampling_kernels(auto=False) is not None and neighborhood_kernels(auto=False) is not None


def unavailable_reason() -> str:
    if not kernels_enabled():
        return "disabled by SPARSE_MSDA_CPU_KERNELS=0"
    err = build_error()
    return f"the C++ kernels could not be built: {type(err).__name__}: {err}" if err is not None else "the C++ kernels are not built"


def wins() -> bool:
    """Whether the automatic choice uses the kernels: their build's vector ISA is one they were
    measured no slower than the reference on (``KERNEL_WINS``)."""
    ext = sampling_kernels(auto=False)
    return ext is not None and kernel_wins(ext.simd_isa())


def supports(op: str, *tensors: Tensor) -> bool:
    """CPU tensors, one floating dtype in (float32, float64); integer tensors (corner tables)
    int32. ``op`` is ``"weighted_gather"`` or ``"neighborhood_attention"``."""
    tensors = tuple(t for t in tensors if isinstance(t, Tensor))
    if not same_float_dtype(tensors, (torch.float32, torch.float64), "cpu"):
        return False
    return all(t.is_floating_point() or t.dtype == torch.int32 for t in tensors)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def _kernel_args(ctx: _Sampling, positions: Tensor) -> tuple:
    """(corner_rows, batch, level, head, shapes, n_heads, bg_offset) for the CPU kernels."""
    n_samples, n_per, _ = positions.shape
    expand = lambda t: t.expand(n_samples, n_per)  # noqa: E731  (broadcast views: the kernel reads strides)
    head = ctx.head if ctx.head is not None else torch.zeros(1, 1, dtype=torch.int64)
    bg = -1 if ctx.background_offset is None else ctx.background_offset
    return (
        ctx.corner_table(), expand(ctx.batch), expand(ctx.level), expand(head),
        ctx.level_spatial_shapes.contiguous(), ctx.n_heads, bg,
    )


def gather_forward(table: Tensor, positions: Tensor, weights: Tensor, ids: Tensor, ctx: _Sampling) -> Tensor:
    """The ``cpu`` implementation of the ``sparse_msda::weighted_gather`` op: the fused C++
    kernel (``csrc/sparse_sample_cpu.cpp``), one pass per sample."""
    positions, weights = positions.contiguous(), weights.contiguous()
    return sampling_kernels(auto=False).sample_forward(
        table, positions, weights, ids, *_kernel_args(ctx, positions), torch.get_num_threads(), ABSENT, 1, False, ABSENT
    )


def gather_backward(grad_out: Tensor, table: Tensor, positions: Tensor, weights: Tensor, ids: Tensor, ctx: _Sampling, needs) -> tuple:
    """Gradients of ``(table, positions, weights)`` by the C++ kernel: one pass per sample, the
    table gradient split by head across threads (per-thread copies within
    :data:`~sparse_msda.tuning.TABLE_COPY_BYTES`; under ``torch.use_deterministic_algorithms(True)``
    never, so the result does not depend on the thread count: :mod:`sparse_msda.functional.determinism`)."""
    positions, weights = positions.contiguous(), weights.contiguous()
    need_table, need_pos, need_w = (bool(n) for n in needs[:3])
    return sampling_kernels(auto=False).sample_backward(
        table, positions, weights, ids, *_kernel_args(ctx, positions), grad_out,
        need_table, need_pos, need_w, kernel_threads(ctx.n_heads, need_table),  # thread-count invariant if deterministic
        max(0, tuning.TABLE_COPY_BYTES // max(1, table.numel() * table.element_size())), ABSENT, 1, False, ABSENT,
    )


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------
def attention_forward(q, k, v, tables, bg_v, rotation: list, tiles: list, scale: float) -> tuple:
    """The ``cpu`` implementation of the ``sparse_msda::neighborhood_attention`` op: the same
    attention as :class:`sparse_msda.backends.reference.NeighborhoodAttentionFunction`, fused in
    the C++ CPU kernel (``csrc/neighborhood_attention_cpu.cpp``) over the plan's tiles.

    Inputs: ``q [Q, H, d]``, ``k, v [n_keys, H, d]`` as there; with background the window-centre
    rotations (:func:`_centre_rotation` of the RoPE frequencies), ``tables [B, K, H, d]`` (:func:`~sparse_msda.functional.neighborhood_plan.background_tables`,
    built by ordinary autograd ops) and ``bg_v [B, L, H, d]``, else None.

    Per tile and head the kernel scores the tile's queries against its keys by one blocked
    product, takes each query's softmax over its own window keys and background slots, and
    aggregates the values by another product. A background slot is scored with the query
    rotated back by its window centre (:func:`_centre_rotation` tables; the kernel composes
    the per-axis rotations), so nothing of size ``[Q, L, H, d]`` is ever stored. It saves
    the output and a ``[Q, H]`` log-sum-exp; the backward recomputes every score from them,
    and returns the frequencies' gradient through the centre rotations in closed form
    (autograd adds the part through ``tables``). Threads split the heads, so gradient rows
    never collide. Nothing per (query, key) pair is stored.
    """

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if tables is not None:
        tables, bg_v = tables.contiguous(), bg_v.contiguous()
    out, lse, n_keys, n_slots = neighborhood_kernels(auto=False).neighborhood_forward(
        q, k, v, rotation, tables, bg_v, tiles, scale, torch.get_num_threads()
    )
    return out, lse, torch.stack([n_keys, n_slots])


def attention_backward(grad_out, q, k, v, tables, bg_v, rotation: list, tiles: list, out, lse, scale: float, needs) -> tuple:
    """Gradients of ``(q, k, v, freqs (float64), tables, bg_v)`` by the C++ kernel (None where
    not needed): every score recomputed from the saved log-sum-exp; the frequencies' gradient
    through the window-centre rotations in closed form (autograd adds the part through
    ``tables``). Threads split the heads, so gradient rows never collide."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if tables is not None:
        tables, bg_v = tables.contiguous(), bg_v.contiguous()
    return tuple(neighborhood_kernels(auto=False).neighborhood_backward(
        q, k, v, rotation, tables, bg_v, tiles, out, lse, grad_out, scale, [bool(n) for n in needs], torch.get_num_threads(),
    ))


def _centre_rotation(plan: NeighborhoodPlan, freqs: Tensor, dtype: torch.dtype) -> list:
    """Per-axis RoPE rotations of the window-centre cells, for the kernel's background scores.

    Returns ``[cos, sin, rows, full]``: ``cos``/``sin`` ``[R, H', d/2]`` in ``dtype`` hold the
    angle of a centre coordinate ``c`` on axis ``a`` of level ``l`` (cell centre ``c + 0.5``
    mapped to full scale, times the axis' frequencies; axis 0 also carries the level term
    ``l * freqs[..., D]``), and int64 ``rows [Q, L, D]`` the row of each query's centre
    coordinate. Only the coordinates the plan's queries use get a row (``R <= Q * L * D``):
    memory follows the queries, not the map's extent (a ``[2**22, 2**22]`` map with 20 queries
    needs ~40 rows per level). Centres are clamped to ``[-r_l - 1, shape + r_l]`` first (a
    centre outside has no in-bounds window cell, and the kernel then reads no row). Angles in
    float64, reduced before the trigonometry (:func:`rope_cos_sin`); the kernel multiplies the
    ``D`` factors of a centre (angles add)."""
    shapes = plan.level_spatial_shapes.cpu()
    full = plan.full_shape.cpu()
    f64 = freqs.to(torch.float64).cpu()  # [H', d/2, D + 1]
    dim = shapes.shape[1]
    centres = plan.centres.cpu()
    n_q = centres.shape[0]
    rows = torch.empty(n_q, len(plan.neighborhood_sizes), dim, dtype=torch.int64)
    angles, row = [], 0
    for level, size in enumerate(plan.neighborhood_sizes):
        r = (size - 1) // 2
        for axis in range(dim):
            n = int(shapes[level, axis])
            used, inverse = torch.unique(centres[:, level, axis].clamp(-r - 1, n + r), return_inverse=True)
            u = (used.to(torch.float64) + 0.5) / n * float(full[axis])
            ang = u[:, None, None] * f64[None, :, :, axis]
            if axis == 0:
                ang = ang + level * f64[None, :, :, dim]
            angles.append(ang)
            rows[:, level, axis] = inverse + row
            row += used.shape[0]
    cos, sin = rope_cos_sin(torch.cat(angles), dtype)
    return [cos.contiguous(), sin.contiguous(), rows.contiguous(), full.to(torch.int64).contiguous()]


def weighted_gather(table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling) -> Tensor:
    """``out[s] = sum_j weights[s, j] * interp(table, positions[s, j])`` (see
    :func:`sparse_msda.functional.sampling.sparse_weighted_gather`), by the C++ kernel: the
    samples' base cells hashed here, then the ``sparse_msda::weighted_gather`` op
    (:func:`gather_forward`). Without gradients (``sampling.inference``) both run chunk by
    chunk, so not even the ``[S, J]`` ids are held at once."""
    args = sampling.op_args()
    if not sampling.inference:
        with torch.no_grad():
            ids = _base_cell_ids(sampling, positions.detach())
        return ops.weighted_gather(table, positions, weights, ids, *args, "cpu")
    n_samples, n_per, dim = positions.shape
    out = table.new_empty(n_samples, table.shape[1])
    for sl in sampling.steps(n_samples, n_per, dim, per_sample=n_per):
        ids = _base_cell_ids(sampling, positions, sl)
        batch, level, head = (None if x is None else sampling.rows_of(x, sl) for x in args[1:4])
        out[sl] = ops.weighted_gather(table, positions[sl], weights[sl], ids, args[0], batch, level, head, *args[4:], "cpu")
    return out


def neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale) -> Tensor:
    """``[Q, H, d]`` softmax attention of each query over its plan's keys (see
    :func:`sparse_msda.functional.neighborhood.sparse_neighborhood_attention`), by the C++
    kernel through the ``sparse_msda::neighborhood_attention`` op; outside the op the background
    keys are rotated at the window offsets by autograd ops (small: ``[B, K, H, d]``) and the
    window-centre rotations are tabulated (:func:`_centre_rotation`)."""
    tables, rotation, freqs = None, [], None
    if plan.with_background:
        tables = background_tables(background_k, rope_freqs, plan)[0]  # [B, K, H, d]
        with torch.no_grad():
            rotation = _centre_rotation(plan, rope_freqs.detach(), q.dtype)
        freqs = rope_freqs
    out, _, counts = ops.neighborhood_attention(q, k, v, freqs, tables, background_v, rotation, plan.kernel_tiles(), scale, "cpu")
    if plan._counts is None:  # the kernel enumerated every window: the plan's counts come free
        plan._counts = (counts[0], counts[1] if plan.with_background else None)
    return out
