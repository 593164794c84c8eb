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

Compute: :func:`sparse_weighted_gather` checks its arguments and hands the call to one backend
(:func:`sparse_msda.backends.choose_backend`, or its ``backend=`` argument), whose custom
autograd Function saves only its inputs and the ``[S, J]`` int32 base-cell ids (memory linear
in samples, a few bytes each, and voxels, never in corners):

* ``cpu`` (:mod:`sparse_msda.backends.cpu`): the fused C++ kernels (one pass per sample forward
  and backward; the table gradient split by head across threads);
* ``reference`` (:mod:`sparse_msda.backends.reference`, the specification; CUDA tensors, other
  dtypes, kernels disabled or not buildable): PyTorch ops in chunks of about
  :data:`sparse_msda.tuning.CHUNK_CORNERS` corners, each one fixed-bag ``F.embedding_bag(...,
  per_sample_weights=..., mode='sum')`` over ``J * 2**D`` corners per output row; the backward
  recomputes corner rows and weights chunk by chunk;
* ``triton`` (``sparse_msda.backends.triton``): CUDA.

float16 / bfloat16 tables compute in float32 (cast in, output cast back, gradients in their
inputs' dtypes: :mod:`sparse_msda.functional.precision`), so they take the kernels too.

A decoder can hash its samples before its values exist (:func:`plan_sampling`) and project
only the voxels their corners touch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from adapters import SparseCoordinateIndex, broadcast_shapes
from adapters.validation import check_index_range, check_integer_tensor

from .. import tuning
from ..backends import check_backend_name, choose_backend
from .precision import LOW_PRECISION, autocast_off, upcast

__all__ = ["SamplingPlan", "plan_sampling", "sparse_weighted_gather"]


def __getattr__(name: str):
    """``CHUNK_CORNERS`` / ``TABLE_COPY_BYTES`` moved to :mod:`sparse_msda.tuning` (read there)."""
    if name in ("CHUNK_CORNERS", "TABLE_COPY_BYTES"):
        return getattr(tuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _Sampling:
    """Context of one sampling call: where each sample's corners live.

    Built by :func:`sparse_weighted_gather` around the coordinate index (``index``); inside the
    ``sparse_msda::weighted_gather`` custom op it is rebuilt from tensors alone
    (:meth:`from_tensors`: the corner table and the level shapes instead of the index), since
    nothing but tensors and numbers crosses an op boundary (:meth:`op_args`).
    """

    index: Optional[SparseCoordinateIndex]
    batch: Tensor  # int64, broadcastable to [S, J]
    level: Tensor  # int64, broadcastable to [S, J]
    head: Optional[Tensor]  # int64, broadcastable to [S, J], or None (head 0)
    n_heads: int
    background_offset: Optional[int]  # first background row of the table, or None
    chunk_corners: int
    inference: bool = False  # no gradient will be asked for: keep nothing for backward
    plan: Optional["SamplingPlan"] = None  # precomputed ids and (compacted) corner table
    corners: Optional[Tensor] = None  # the corner table itself (from_tensors)
    shapes: Optional[Tensor] = None  # int64 [L, D] level shapes (from_tensors)

    @classmethod
    def from_tensors(cls, corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners) -> "_Sampling":
        """The context of :meth:`op_args` (``background_offset < 0``: no background)."""
        bg = None if background_offset < 0 else background_offset
        return cls(None, batch, level, head, n_heads, bg, chunk_corners, corners=corner_table, shapes=level_shapes)

    def op_args(self) -> tuple:
        """``(corner_table, batch, level, head, level_shapes, n_heads, background_offset,
        chunk_corners)``: the context as the custom op's arguments (``-1``: no background)."""
        bg = -1 if self.background_offset is None else self.background_offset
        return (self.corner_table(), self.batch, self.level, self.head, self.level_spatial_shapes,
                self.n_heads, bg, self.chunk_corners)

    @property
    def level_spatial_shapes(self) -> Tensor:
        return self.shapes if self.shapes is not None else self.index.level_spatial_shapes

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    def corner_table(self) -> Tensor:
        """``[T, 2**D]`` corner rows per base-cell id (the plan's, else the index's)."""
        if self.corners is not None:
            return self.corners
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


def _base_cell_ids(sampling: _Sampling, positions: Tensor, only: Optional[slice] = None) -> Tensor:
    """int32 ``[S, J]`` corner-table ids of every sample's base cell (hash queries in chunks), or
    of the samples in slice ``only`` (one chunk)."""
    n_samples, n_per, dim = positions.shape
    if sampling.plan is not None:
        return sampling.plan.ids if only is None else sampling.plan.ids[only]
    if only is not None:
        base = _base_cells(positions[only])
        b, l = sampling.rows_of(sampling.batch, only), sampling.rows_of(sampling.level, only)
        return sampling.index.base_cell_ids(b, l, base, out=torch.empty(base.shape[:-1], dtype=torch.int32, device=base.device))
    ids = torch.empty(n_samples, n_per, dtype=torch.int32, device=positions.device)
    for sl in sampling.steps(n_samples, n_per, dim, per_sample=n_per):  # one key per (s, j)
        base = _base_cells(positions[sl])  # [c, J, D]
        b, l = sampling.rows_of(sampling.batch, sl), sampling.rows_of(sampling.level, sl)  # broadcast views
        sampling.index.base_cell_ids(b, l, base, out=ids[sl])
    return ids


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
    sampling = _Sampling(index, b, l, None, 1, None, tuning.CHUNK_CORNERS, True)
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
    backend: Optional[str] = None,
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
        chunk_corners: corners per chunk (default :data:`sparse_msda.tuning.CHUNK_CORNERS`).
        plan: from :func:`plan_sampling` on the same positions, batch and level indices: no
            hashing here; with ``plan.voxel_rows``, ``table`` holds only those voxels
            (``[N' * n_heads, Dh]``, row ``i * n_heads + h`` for voxel ``voxel_rows[i]``).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or None (automatic, or
            ``$SPARSE_MSDA_BACKEND``): :func:`sparse_msda.backends.choose_backend`.

    Returns:
        ``[S, Dh]``; differentiable w.r.t. table, positions, sample_weights, background_table.

    Raises:
        TypeError / ValueError: every argument is checked before any lookup or kernel runs:
            batch / level / head indices outside ``[0, batch_size)``, ``[0, n_levels)``,
            ``[0, n_heads)`` (the message names the argument, the range and the first bad
            value), a table or background table whose row count does not match the index
            (or plan) and ``n_heads``, weights or a plan of another shape; a ``backend`` that is
            unknown, unavailable or does not support the tensors.

    A sample with a NaN or infinite coordinate follows ``F.grid_sample``: its output row is NaN,
    it adds nothing to any table row's gradient, and its own position and weight gradients are NaN.
    """
    _check_positions(index, positions)
    check_backend_name(backend)
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
        None if background_table is None else n_value_rows, chunk_corners or tuning.CHUNK_CORNERS,
        inference=not (torch.is_grad_enabled() and any(t.requires_grad for t in (table, positions, sample_weights))),
        plan=plan,
    )
    sample_weights = sample_weights.to(table.dtype)
    with autocast_off(table.device.type):  # float32 compute for float16 / bfloat16 (precision.py)
        if table.dtype in LOW_PRECISION:
            table32, weights32 = upcast(table, sample_weights)
            return _gather(table32, positions.float(), weights32, sampling, backend).to(table.dtype)
        return _gather(table, positions, sample_weights, sampling, backend)


def _gather(table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling, backend: Optional[str]) -> Tensor:
    """The weighted gather of the backend :func:`~sparse_msda.backends.choose_backend` picks."""
    module = choose_backend("weighted_gather", table, positions, sampling.corner_table(), backend=backend)
    return module.weighted_gather(table, positions, weights, sampling)
