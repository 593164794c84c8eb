"""Bilinear / trilinear sampling of multi-level sparse maps as a weighted gather.

The sampling is exactly ``F.grid_sample(mode='bilinear', align_corners=False,
padding_mode='zeros')`` on the (implicitly) densified map, written for sparse maps:

* Positions are continuous coordinates in the cells of the level being sampled, axis
  order as the tensor (spconv's ``(y, x)`` / ``(z, y, x)``). Cell ``i`` covers
  ``[i, i + 1)``; its centre is ``i + 0.5``. A position ``p`` interpolates between the
  ``2**position_dim`` cell centres around it: base cell ``floor(p - 0.5)``, fractional
  part ``p - 0.5 - floor(p - 0.5)``. No clamping.
* A corner outside the level's grid contributes zero (grid_sample's zero padding).
* A corner inside the grid but absent from the sparse map contributes zero, or, when a
  background table is given, the background row of its (batch, level[, head]): an absent
  site behaves exactly as if it held that value.

Lookups: one hash query per sample, through
:meth:`adapters.SparseCoordinateIndex.base_cell_ids` (spconv hashing), in the forward only;
the sample's ``2**D`` corner rows are then one row of the index's corner table
(:meth:`~adapters.SparseCoordinateIndex.corner_rows`). The backward reuses the saved int32
base-cell ids and never hashes again.

Compute, two interchangeable paths behind one custom autograd Function that saves only its
inputs and the ``[S, J]`` int32 base-cell ids (memory linear in samples, a few bytes each,
and voxels, never in corners):

* CPU: the fused C++ kernels of :mod:`sparse_msda.functional.cpu_kernels` (one pass per
  sample forward and backward; the table gradient split by head across threads).
* Otherwise (CUDA tensors, mixed dtypes, kernels disabled or not buildable): PyTorch ops in
  chunks of about :data:`CHUNK_CORNERS` corners. In each, the interpolation and the weighted
  sum over samples (the attention sum of deformable attention) are one
  ``F.embedding_bag(..., per_sample_weights=..., mode='sum')`` with a fixed bag of
  ``J * 2**D`` corners per output row; the backward recomputes corner rows and weights chunk
  by chunk. ``[samples, corners, head_dim]`` never exists beyond one chunk.

float16 / bfloat16 tables compute in float32 (cast in, output cast back, gradients in their
inputs' dtypes: :mod:`sparse_msda.functional.precision`), so they take the kernels too.

A decoder can hash its samples before its values exist (:func:`plan_sampling`) and project
only the voxels their corners touch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from adapters import SparseCoordinateIndex, broadcast_shapes
from adapters.validation import check_index_range, check_integer_tensor

from .cpu_kernels import sampling_kernels
from .precision import LOW_PRECISION, autocast_off, upcast

__all__ = ["CHUNK_CORNERS", "TABLE_COPY_BYTES", "SamplingPlan", "plan_sampling", "sparse_weighted_gather"]

#: corners processed per chunk (bounds the ``[corners, head_dim]`` scratch buffer of backward)
CHUNK_CORNERS = 1 << 19

#: memory the CPU kernels' backward may spend on per-thread copies of the table gradient (one
#: copy per extra thread, no atomics); a larger table runs the backward on fewer threads
TABLE_COPY_BYTES = 512 << 20


@dataclass
class _Sampling:
    """Non-tensor context of one sampling call: where each sample's corners live."""

    index: SparseCoordinateIndex
    batch: Tensor  # int64, broadcastable to [S, J]
    level: Tensor  # int64, broadcastable to [S, J]
    head: Optional[Tensor]  # int64, broadcastable to [S, J], or None (head 0)
    n_heads: int
    background_offset: Optional[int]  # first background row of the table, or None
    chunk_corners: int
    inference: bool = False  # no gradient will be asked for: keep nothing for backward
    plan: Optional["SamplingPlan"] = None  # precomputed ids and (compacted) corner table

    def corner_table(self) -> Tensor:
        """``[T, 2**D]`` corner rows per base-cell id (the plan's, else the index's)."""
        return self.plan.corner_table if self.plan is not None else self.index.corner_row_table()

    def corner_rows(self, ids: Tensor) -> Tensor:
        table = self.corner_table()
        return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])

    def steps(self, n_samples: int, n_per: int, dim: int, per_sample: Optional[int] = None):
        """Slices of samples holding about ``chunk_corners`` corners (or ``chunk_corners``
        ``per_sample`` units, e.g. one hash key per (sample, j))."""
        step = max(1, self.chunk_corners // max(1, per_sample if per_sample is not None else n_per * 2**dim))
        for start in range(0, n_samples, step):
            yield slice(start, min(n_samples, start + step))

    def rows_of(self, t: Optional[Tensor], sl: slice) -> Optional[Tensor]:
        """A ``[S | 1, J | 1]`` index tensor restricted to the chunk's samples (None stays None)."""
        if t is None:
            return None
        return t if t.shape[0] == 1 else t[sl]


def _check_positions(index: SparseCoordinateIndex, positions: Tensor) -> None:
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError(f"positions must be a floating-point tensor, got {getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.ndim != 3 or positions.shape[-1] != index.position_dim:
        raise ValueError(
            f"positions must have shape [S, J, {index.position_dim}] for a {index.position_dim}D index, "
            f"got positions.shape={tuple(positions.shape)}"
        )


def _checked_index(name: str, t, n: int, positions: Tensor) -> Tensor:
    """An integer index tensor broadcastable to ``positions.shape[:2]`` with values in ``[0, n)``
    (ValueError naming the argument, range and first bad value): what makes the C++ kernels safe
    to read the table rows it selects."""
    check_integer_tensor(name, t)
    lead = tuple(positions.shape[:2])
    try:
        ok = t.ndim <= 2 and broadcast_shapes(t.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to positions.shape[:2]={lead} without enlarging it, got {name}.shape={tuple(t.shape)}")
    check_index_range(name, t, n)
    return t


def _sample_index(t: Tensor, positions: Tensor) -> Tensor:
    """An integer index broadcastable to ``[S, J]`` as an int64 ``[S | 1, J | 1]`` view on the positions' device."""
    return t.to(device=positions.device, dtype=torch.int64).expand(*broadcast_shapes(t.shape, (1, 1)))


#: base cells are clamped to ``[-2, BASE_CELL_LIMIT]`` (in floating point, before the integer
#: conversion): every corner of such a cell lies outside any level, so huge positions stay
#: "outside the map" and never overflow the int64 arithmetic of the lookups
BASE_CELL_LIMIT = float(2**40)


def _base_cells(positions: Tensor) -> Tensor:
    """int64 base cells ``floor(p - 0.5)`` of positions ``[..., D]``, clamped to ``[-2,
    BASE_CELL_LIMIT]`` before the conversion; a NaN coordinate gives -2 (outside)."""
    base = torch.floor(positions - 0.5)
    return torch.nan_to_num(base, nan=-2.0).clamp_(-2.0, BASE_CELL_LIMIT).to(torch.int64)


def _split(positions: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Base cells (int64, :func:`_base_cells`), fractional offsets (``dtype``) of positions
    ``[..., D]`` and the bool ``[...]`` mask of non-finite samples (any coordinate NaN or
    infinite; their offsets are set to 0 so that no NaN weight reaches a table row)."""
    shifted = positions - 0.5
    floor = torch.floor(shifted)
    bad = ~torch.isfinite(positions).all(-1)
    frac = (shifted - floor).to(dtype).masked_fill_(bad[..., None], 0.0)
    return _base_cells(positions), frac, bad


def _outer(u: Tensor) -> Tensor:
    """``[..., D, 2]`` per-axis factors -> ``[..., 2**D]`` corner weights (first axis most significant)."""
    dim = u.shape[-2]
    w = u[..., 0, :]
    for d in range(1, dim):
        w = (w[..., :, None] * u[..., d, None, :]).flatten(-2)
    return w


def _corners(ctx: _Sampling, ids: Tensor, base: Tensor, frac: Tensor, sl: slice):
    """Table rows ``[c, J, K]``, corner weights ``[c, J, K]``, per-axis factors ``[c, J, D, 2]``,
    the per-axis validity ``(lo, hi)`` of the corners (None without background) and the
    present-corner mask (None with background: absent in-grid corners hold the background)."""
    c, n_per, dim = base.shape
    index = ctx.index
    cr = ctx.corner_rows(ids)  # [c, J, K], -1 absent
    found = cr >= 0
    head = ctx.rows_of(ctx.head, sl)
    if head is not None and ctx.n_heads > 1:
        cr = cr * ctx.n_heads + head.to(cr.dtype)[..., None]
    u = torch.stack([1.0 - frac, frac], -1)  # [c, J, D, 2]
    if ctx.background_offset is None:
        rows = cr.masked_fill(~found, 0)  # weight 0 below: any valid row will do
        return rows, _outer(u) * found, u, None, found
    batch, level = ctx.rows_of(ctx.batch, sl), ctx.rows_of(ctx.level, sl)
    fill = (batch * index.n_levels + level) * ctx.n_heads + ctx.background_offset
    if head is not None:
        fill = fill + head
    rows = torch.where(found, cr, fill.to(cr.dtype)[..., None])
    shape = index.level_spatial_shapes.to(base.device)[level.expand(c, n_per)]  # [c, J, D]
    valid = torch.stack([(base >= 0) & (base < shape), (base >= -1) & (base < shape - 1)], -1)  # [c, J, D, 2]
    u = u * valid
    return rows, _outer(u), u, valid, None


def _cpu_kernels(table: Tensor, positions: Tensor, sampling: _Sampling):
    """The fused CPU kernels when they apply (CPU tensors, one dtype, int32 corner rows), else None."""
    if table.device.type != "cpu" or positions.dtype != table.dtype or table.dtype not in (torch.float32, torch.float64):
        return None
    if sampling.corner_table().dtype != torch.int32:
        return None
    return sampling_kernels()


def _base_cell_ids(sampling: _Sampling, positions: Tensor, only: Optional[slice] = None) -> Tensor:
    """int32 ``[S, J]`` corner-table ids of every sample's base cell (hash queries in chunks), or
    of the samples in slice ``only`` (one chunk)."""
    n_samples, n_per, dim = positions.shape
    if sampling.plan is not None:
        return sampling.plan.ids if only is None else sampling.plan.ids[only]
    if only is not None:
        base = _base_cells(positions[only])
        b, l = sampling.rows_of(sampling.batch, only), sampling.rows_of(sampling.level, only)
        return sampling.index.base_cell_ids(b, l, base).to(torch.int32)
    ids = torch.empty(n_samples, n_per, dtype=torch.int32, device=positions.device)
    for sl in sampling.steps(n_samples, n_per, dim, per_sample=n_per):  # one key per (s, j)
        base = _base_cells(positions[sl])  # [c, J, D]
        b, l = sampling.rows_of(sampling.batch, sl), sampling.rows_of(sampling.level, sl)  # broadcast views
        ids[sl] = sampling.index.base_cell_ids(b, l, base)
    return ids


def _kernel_args(sampling: _Sampling, positions: Tensor) -> tuple:
    """(corner_rows, batch, level, head, shapes, n_heads, bg_offset, n_threads) for the CPU kernels."""
    n_samples, n_per, _ = positions.shape
    index = sampling.index
    corner_rows = sampling.corner_table()
    expand = lambda t: t.expand(n_samples, n_per)  # noqa: E731  (broadcast views: the kernel reads strides)
    head = sampling.head if sampling.head is not None else torch.zeros(1, 1, dtype=torch.int64)
    bg = -1 if sampling.background_offset is None else sampling.background_offset
    return (
        corner_rows, expand(sampling.batch), expand(sampling.level), expand(head),
        index.level_spatial_shapes.contiguous(), sampling.n_heads, bg, torch.get_num_threads(),
    )


@dataclass
class SamplingPlan:
    """Where the corners of a fixed set of samples live, computed once (e.g. before projecting
    values, to project only the voxels the samples touch).

    Attributes:
        ids: int32 ``[S, J]`` base-cell id of every sample, into ``corner_table``.
        corner_table: ``[T, 2**D]`` rows of the corners of each id (``-1`` absent); with
            ``voxel_rows`` the rows are positions in ``voxel_rows`` (the value table then holds
            only those voxels), else voxel rows of the index.
        voxel_rows: int64 ``[N']`` sorted voxel rows that some sample's corner touches, or None.
    """

    ids: Tensor
    corner_table: Tensor
    voxel_rows: Optional[Tensor] = None


@torch.no_grad()
def plan_sampling(
    index: SparseCoordinateIndex,
    positions: Tensor,
    batch_indices: Tensor,
    level_indices: Tensor,
    compact_below: float = 0.5,
) -> SamplingPlan:
    """Hash every sample's base cell once and find the voxels its corners touch.

    Args:
        index: coordinate index of the map.
        positions: float ``[S, J, D]`` in the cells of the sampled level.
        batch_indices, level_indices: integer, broadcastable to ``[S, J]``.
        compact_below: compact (``voxel_rows`` set, corner table renumbered) when fewer than
            this fraction of the map's voxels are touched; else keep the index's voxel rows.

    Returns:
        a :class:`SamplingPlan` for :func:`sparse_weighted_gather` (``plan=``) on the same
        positions, batch and level indices.
    """
    _check_positions(index, positions)
    _checked_index("batch_indices", batch_indices, index.batch_size, positions)
    _checked_index("level_indices", level_indices, index.n_levels, positions)
    n_samples, n_per, _ = positions.shape
    b, l = _sample_index(batch_indices, positions), _sample_index(level_indices, positions)
    sampling = _Sampling(index, b, l, None, 1, None, CHUNK_CORNERS, True)
    ids = _base_cell_ids(sampling, positions.detach())
    uids, inverse = torch.unique(ids, return_inverse=True)
    rows = index.corner_row_table().index_select(0, uids.to(torch.int64))  # [U, K]
    voxel_rows = torch.unique(rows[rows >= 0]).to(torch.int64)
    if voxel_rows.numel() >= compact_below * index.n_voxels:
        return SamplingPlan(ids, index.corner_row_table())
    row_map = torch.full((index.n_voxels,), -1, dtype=rows.dtype, device=rows.device)
    row_map[voxel_rows] = torch.arange(voxel_rows.numel(), dtype=rows.dtype, device=rows.device)
    compact = torch.where(rows >= 0, row_map[rows.clamp(min=0).to(torch.int64)], rows)
    return SamplingPlan(inverse.to(torch.int32).view(n_samples, n_per), compact.contiguous(), voxel_rows)


class _SparseSample(torch.autograd.Function):
    """``out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * table[row(s, j, k)]``.

    Forward hashes each sample's base cell once (ids saved as int32, unless a plan brings
    them) and runs the CPU kernel, or one fixed-bag ``embedding_bag`` per chunk. The PyTorch
    backward recomputes each chunk's rows and weights from the saved ids and positions; per
    corner it forms the value/gradient dot product (a gather into a reused buffer and a
    batched matmul) for the gradients of ``a`` and of the positions (analytically through
    the per-axis factors), and adds the weighted output gradient into the table gradient
    (entries sorted by row, one ``embedding_bag`` per chunk, :func:`_scatter_rows`).
    """

    @staticmethod
    def forward(ctx, table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling):
        n_samples, n_per, dim = positions.shape
        ctx.sampling = sampling
        kernels = _cpu_kernels(table, positions, sampling)
        if kernels is not None:
            positions, weights = positions.contiguous(), weights.contiguous()
            ctx.kernels = kernels
            if sampling.inference:  # ids chunk by chunk, nothing kept
                out = table.new_empty(n_samples, table.shape[1])
                args = _kernel_args(sampling, positions)
                for sl in sampling.steps(n_samples, n_per, dim, per_sample=n_per):
                    ids = _base_cell_ids(sampling, positions, sl)
                    batch, level, head = (t[sl] for t in args[1:4])
                    out[sl] = kernels.sample_forward(
                        table, positions[sl], weights[sl], ids, args[0], batch, level, head, *args[4:]
                    )
                return out
            ids = _base_cell_ids(sampling, positions)
            out = kernels.sample_forward(table, positions, weights, ids, *_kernel_args(sampling, positions))
            ctx.save_for_backward(table, positions, weights, ids)
            return out
        ctx.kernels = None
        out = table.new_empty(n_samples, table.shape[1])
        ids = torch.empty(n_samples, n_per, dtype=torch.int32, device=positions.device)
        with torch.no_grad():
            for sl in sampling.steps(n_samples, n_per, dim):
                c = sl.stop - sl.start
                base, frac, bad = _split(positions[sl], table.dtype)
                chunk_ids = _base_cell_ids(sampling, positions, sl)
                ids[sl] = chunk_ids
                rows, wc, _, _, _ = _corners(sampling, chunk_ids, base, frac, sl)
                psw = (wc * weights[sl, :, None]).view(c, -1)
                out[sl] = F.embedding_bag(rows.view(c, -1), table, per_sample_weights=psw, mode="sum")
                if bool(bad.any()):  # as F.grid_sample: a non-finite location gives NaN
                    out[sl][bad.any(-1)] = float("nan")
        ctx.save_for_backward(table, positions, weights, ids)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        table, positions, weights, ids = ctx.saved_tensors
        sampling = ctx.sampling
        n_samples, n_per, dim = positions.shape
        head_dim = table.shape[1]
        grad_out = grad_out.contiguous()
        need_table, need_pos, need_w = ctx.needs_input_grad[:3]
        if ctx.kernels is not None:
            g_table, g_pos, g_w = ctx.kernels.sample_backward(
                table, positions, weights, ids, *_kernel_args(sampling, positions)[:-1], grad_out,
                need_table, need_pos, need_w, torch.get_num_threads(),
                max(0, TABLE_COPY_BYTES // max(1, table.numel() * table.element_size())),
            )
            return (g_table if need_table else None), (g_pos if need_pos else None), (g_w if need_w else None), None
        g_table = torch.zeros_like(table) if need_table else None
        g_pos = torch.zeros_like(positions) if need_pos else None
        g_w = torch.zeros_like(weights) if need_w else None
        k = 2**dim
        buf = None
        for sl in sampling.steps(n_samples, n_per, dim):
            c = sl.stop - sl.start
            base, frac, bad = _split(positions[sl], table.dtype)
            rows, wc, u, valid, found = _corners(sampling, ids[sl], base, frac, sl)
            if not bool(bad.any()):
                bad = None
            a = weights[sl]
            g = grad_out[sl]
            n = c * n_per * k
            if buf is None:
                buf = table.new_empty(min(n_samples * n_per * k, max(n, sampling.chunk_corners)), head_dim)
            flat = rows.reshape(-1)
            if need_pos or need_w:
                gathered = torch.index_select(table, 0, flat, out=buf[:n]).view(c, n_per * k, head_dim)
                dots = torch.bmm(gathered, g[:, :, None]).view(c, n_per, k)
                if need_w:
                    g_w[sl] = (dots * wc).sum(-1)
                    if bad is not None:  # the sample's value is NaN (F.grid_sample)
                        g_w[sl] = g_w[sl].masked_fill(bad, float("nan"))
                if need_pos:
                    gc = dots * a[..., None]  # dL / d corner weight
                    if found is not None:
                        gc = gc * found
                    g_pos[sl] = _factor_grads(gc, u, valid).to(positions.dtype)
                    if bad is not None:
                        g_pos[sl] = g_pos[sl].masked_fill(bad[..., None], float("nan"))
            if need_table:  # a non-finite sample has weight 0 on every corner: it touches no row
                wa = wc * a[..., None]
                if found is not None:  # absent corners read row 0 with weight 0: keep a NaN weight off it
                    wa = wa.masked_fill(~found, 0.0)
                if bad is not None:
                    wa = wa.masked_fill(bad[..., None], 0.0)
                _scatter_rows(g_table, flat, wa.view(-1), g, n_per * k)
        return g_table, g_pos, g_w, None


def _scatter_rows(g_table: Tensor, rows: Tensor, weights: Tensor, grad: Tensor, bag: int) -> None:
    """``g_table[rows[m]] += weights[m] * grad[m // bag]`` (the transposed weighted gather).

    Entries are sorted by row and each distinct row's weighted sum is one ``embedding_bag``
    over the chunk's output gradient, so the scatter writes each row once per chunk and no
    ``[entries, head_dim]`` product is formed.
    """
    sorted_rows, perm = torch.sort(rows)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    sums = F.embedding_bag(
        torch.div(perm, bag, rounding_mode="floor"), grad, offsets,
        per_sample_weights=weights.index_select(0, perm), mode="sum",
    )
    g_table.index_add_(0, uniq, sums)


def _factor_grads(gc: Tensor, u: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``d L / d frac`` ``[c, J, D]`` from ``d L / d corner weight`` ``[c, J, 2**D]``.

    Corner weight ``k`` is ``prod_d u[d, bit_d(k)]`` with ``u[d] = (1 - f_d, f_d)`` (times
    the corners' validity with a background), so ``dL/du[d, e]`` sums ``gc`` over the
    other axes weighted by their factors, and ``dL/df_d = dL/du[d, 1] - dL/du[d, 0]``
    (each masked by validity).
    """
    dim = u.shape[-2]
    lead = gc.shape[:-1]
    nl = len(lead)
    g = gc.view(*lead, *([2] * dim))
    out = []
    for d in range(dim):
        t = g
        for e in range(dim):
            if e != d:
                shape = [*lead] + [1] * dim
                shape[nl + e] = 2
                t = t * u[..., e, :].reshape(shape)
        du = t.sum([nl + e for e in range(dim) if e != d]) if dim > 1 else t  # [..., 2]
        if valid is None:
            out.append(du[..., 1] - du[..., 0])
        else:
            out.append(du[..., 1] * valid[..., d, 1] - du[..., 0] * valid[..., d, 0])
    return torch.stack(out, -1)


def sparse_weighted_gather(
    table: Tensor,
    index: SparseCoordinateIndex,
    positions: Tensor,
    batch_indices: Tensor,
    level_indices: Tensor,
    head_indices: Optional[Tensor] = None,
    n_heads: int = 1,
    sample_weights: Optional[Tensor] = None,
    background_table: Optional[Tensor] = None,
    chunk_corners: Optional[int] = None,
    plan: Optional[SamplingPlan] = None,
) -> Tensor:
    """``out[s] = sum_j w[s, j] * interp(map[b[s, j], l[s, j], h[s, j]], positions[s, j])``.

    Args:
        table: ``[N * n_heads, Dh]`` values; row ``r * n_heads + h`` is head ``h`` of voxel
            ``r`` of ``index``.
        index: coordinate index of the map (``N`` voxels).
        positions: float ``[S, J, D]`` in the cells of the sampled level.
        batch_indices, level_indices, head_indices: integer, broadcastable to ``[S, J]``
            (``head_indices`` may be None when ``n_heads == 1``).
        n_heads: heads per voxel row.
        sample_weights: ``[S, J]`` weights (e.g. attention weights) or None (all 1).
        background_table: ``[batch * n_levels * n_heads, Dh]`` value of an absent site,
            row ``(b * n_levels + l) * n_heads + h``, or None (absent sites are zero).
        chunk_corners: corners per chunk (default :data:`CHUNK_CORNERS`).
        plan: from :func:`plan_sampling` on the same positions, batch and level indices: no
            hashing here; with ``plan.voxel_rows``, ``table`` holds only those voxels
            (``[N' * n_heads, Dh]``, row ``i * n_heads + h`` for voxel ``voxel_rows[i]``).

    Returns:
        ``[S, Dh]``; differentiable w.r.t. table, positions, sample_weights, background_table.

    Raises:
        TypeError / ValueError: every argument is checked before any lookup or kernel runs:
            batch / level / head indices outside ``[0, batch_size)``, ``[0, n_levels)``,
            ``[0, n_heads)`` (the message names the argument, the range and the first bad
            value), a table or background table whose row count does not match the index
            (or plan) and ``n_heads``, weights or a plan of another shape.

    A sample with a NaN or infinite coordinate follows ``F.grid_sample``: its output row is NaN,
    it adds nothing to any table row's gradient, and its own position and weight gradients are NaN.
    """
    _check_positions(index, positions)
    n_samples, n_per, dim = positions.shape
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive int, got {n_heads=}")
    if not isinstance(table, Tensor) or not table.is_floating_point() or table.ndim != 2:
        raise TypeError(f"table must be a floating-point [rows, Dh] tensor, got {getattr(table, 'shape', type(table).__name__)}")
    _checked_index("batch_indices", batch_indices, index.batch_size, positions)
    _checked_index("level_indices", level_indices, index.n_levels, positions)
    if head_indices is not None:
        _checked_index("head_indices", head_indices, n_heads, positions)
    n_voxel_rows = index.n_voxels
    if plan is not None:
        if not isinstance(plan, SamplingPlan):
            raise TypeError(f"plan must be a SamplingPlan (from plan_sampling), got {type(plan).__name__}")
        if tuple(plan.ids.shape) != (n_samples, n_per) or plan.ids.dtype != torch.int32:
            raise ValueError(f"plan.ids must be int32 [{n_samples}, {n_per}] (plan_sampling of these positions), got {tuple(plan.ids.shape)}")
        if plan.corner_table.ndim != 2 or plan.corner_table.shape[1] != 2**dim:
            raise ValueError(f"plan.corner_table must be [T, {2**dim}], got {tuple(plan.corner_table.shape)}")
        check_index_range("plan.ids", plan.ids, plan.corner_table.shape[0])
        if plan.voxel_rows is not None:
            n_voxel_rows = plan.voxel_rows.shape[0]
        if plan.corner_table is not index.corner_row_table() and plan.corner_table.numel():
            if int(plan.corner_table.max()) >= n_voxel_rows:
                raise ValueError(f"plan.corner_table refers to voxel rows beyond the {n_voxel_rows} of the plan")
    if table.shape[0] != n_voxel_rows * n_heads:
        raise ValueError(
            f"table must have n_voxels * n_heads = {n_voxel_rows} * {n_heads} = {n_voxel_rows * n_heads} rows"
            f"{' (plan.voxel_rows)' if plan is not None and plan.voxel_rows is not None else ''}, got table.shape={tuple(table.shape)}"
        )
    if background_table is not None:
        n_bg = index.batch_size * index.n_levels * n_heads
        if not isinstance(background_table, Tensor) or background_table.shape != (n_bg, table.shape[1]):
            raise ValueError(
                f"background_table must have shape [batch_size * n_levels * n_heads, Dh] = [{n_bg}, {table.shape[1]}], "
                f"got {tuple(getattr(background_table, 'shape', ()))}"
            )
    if sample_weights is not None and (not isinstance(sample_weights, Tensor) or sample_weights.shape != (n_samples, n_per)):
        raise ValueError(f"sample_weights must have shape [{n_samples}, {n_per}], got {tuple(getattr(sample_weights, 'shape', ()))}")
    n_value_rows = table.shape[0]
    if background_table is not None:
        table = torch.cat([table, background_table.to(table.dtype)])
    if sample_weights is None:
        sample_weights = table.new_ones(n_samples, n_per)
    if table.shape[0] == 0:  # no voxel and no background: no corner holds a value
        table = table.new_zeros(1, table.shape[1]) + 0 * table.sum()
    sampling = _Sampling(
        index, _sample_index(batch_indices, positions), _sample_index(level_indices, positions),
        None if head_indices is None else _sample_index(head_indices, positions), n_heads,
        None if background_table is None else n_value_rows, chunk_corners or CHUNK_CORNERS,
        inference=not (torch.is_grad_enabled() and any(t.requires_grad for t in (table, positions, sample_weights))),
        plan=plan,
    )
    sample_weights = sample_weights.to(table.dtype)
    with autocast_off(table.device.type):  # float32 compute for float16 / bfloat16 (precision.py)
        if table.dtype in LOW_PRECISION:
            table32, weights32 = upcast(table, sample_weights)
            return _SparseSample.apply(table32, positions.float(), weights32, sampling).to(table.dtype)
        return _SparseSample.apply(table, positions, sample_weights, sampling)
