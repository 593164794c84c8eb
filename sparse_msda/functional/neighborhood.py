"""Multi-level sparse neighborhood attention: windows, pair plans and a memory-lean kernel.

Conventions (shared with the deformable attention):

* Axis order of positions and coordinates is spconv's: (y, x) in 2D, (z, y, x) in 3D.
* Cell ``i`` of a level covers ``[i, i + 1)``; its centre is ``i + 0.5``. A position ``p`` in
  the frame of level ``q`` maps to level ``l`` as ``p / shape_q * shape_l``.
* "Full scale" is the frame of the largest level (largest area/volume, first on ties).

Windows: at level ``l`` a query attends to the ``s_l ** D`` cells (``s_l`` odd) of the window
centred on the cell containing its position mapped to level ``l``,
``centre = floor(p / shape_q * shape_l)`` (evaluated in float64), offsets ``-(s_l-1)/2 ..
(s_l-1)/2`` per axis. Window slots are numbered level by level, and within a level in
row-major order of the offsets (last axis fastest). Cells outside the level's grid are
never attended to (with or without a background embedding). The union of all levels'
windows forms one softmax.

Kernel and memory (:class:`NeighborhoodAttentionFunction`): keys and values are projected and
rotated once per voxel. Voxel pairs form per-head sparse CSR matrices ``[Q, n_keys]`` (all
heads in one block-diagonal matrix): scores by ``torch.sparse.sampled_addmm`` (SDDMM), the
weighted sum of values by sparse x dense matmuls, key/value gradients through the transposed
CSR. Background slots (absent in-bounds window cells, only with a background embedding) are
scored by one matmul per level against the window offsets' rotations
(:func:`background_scores`) and aggregate the background value per level. The function saves
only ``q, k, v``, the background key/value, the RoPE frequencies, its output, a ``[Q, H]``
log-sum-exp and the plan's integer indices; the backward recomputes scores chunk by chunk of
queries. No ``[pairs, embed_dim]`` tensor ever exists; the ``[H, pairs]`` and
``[queries, H, slots]`` buffers are bounded by the chunk size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from adapters import SparseCoordinateIndex, as_level_spatial_shapes

from .rope import rope_angles, rotate_pairs

__all__ = [
    "NeighborhoodAttentionFunction",
    "NeighborhoodPlan",
    "build_neighborhood_plan",
    "check_neighborhood_sizes",
    "get_multilevel_neighborhoods",
    "query_rope_positions",
    "sparse_neighborhood_attention",
    "voxel_rope_positions",
    "window_centres",
    "window_offsets",
]


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------
def check_neighborhood_sizes(neighborhood_sizes, n_levels: Optional[int] = None) -> list[int]:
    """Validate ``neighborhood_sizes`` (positive odd ints, one per level).

    Raises:
        TypeError: not a sequence of ints.
        ValueError: even or non-positive sizes, or a length other than ``n_levels``.
    """
    if isinstance(neighborhood_sizes, Tensor):
        neighborhood_sizes = neighborhood_sizes.tolist()
    if isinstance(neighborhood_sizes, (str, bytes)) or not isinstance(neighborhood_sizes, Sequence):
        raise TypeError(f"neighborhood_sizes must be a sequence of odd ints, got {neighborhood_sizes=}")
    sizes = list(neighborhood_sizes)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise TypeError(f"neighborhood_sizes must hold ints, got {neighborhood_sizes=}")
    if len(sizes) == 0 or any(s <= 0 or s % 2 == 0 for s in sizes):
        raise ValueError(
            f"neighborhood_sizes must be positive odd ints (a window is centred on the query's cell), got {neighborhood_sizes=}"
        )
    if n_levels is not None and len(sizes) != n_levels:
        raise ValueError(
            f"len(neighborhood_sizes) must equal n_levels={n_levels} (one window per level), "
            f"got {len(sizes)} ({neighborhood_sizes=})"
        )
    return sizes


def window_offsets(neighborhood_sizes: Sequence[int], position_dim: int, device=None) -> tuple[Tensor, Tensor]:
    """Cell offsets of every window slot and the level of each slot.

    Returns:
        ``(offsets, slot_level)``: int64 ``[K, position_dim]`` and ``[K]``,
        ``K = sum(s ** position_dim)``; slots ordered level by level, row-major within a level.
    """
    offsets, levels = [], []
    for level, size in enumerate(neighborhood_sizes):
        r = (size - 1) // 2
        axis = torch.arange(-r, r + 1, dtype=torch.int64, device=device)
        grid = torch.stack(torch.meshgrid(*([axis] * position_dim), indexing="ij"), dim=-1).reshape(-1, position_dim)
        offsets.append(grid)
        levels.append(torch.full((grid.shape[0],), level, dtype=torch.int64, device=device))
    return torch.cat(offsets), torch.cat(levels)


def window_centres(positions: Tensor, position_shapes: Tensor, level_spatial_shapes: Tensor) -> Tensor:
    """Centre cell of each query's window at each level.

    Args:
        positions: float ``[Q, D]`` in the frame whose shape is ``position_shapes``.
        position_shapes: ``[Q, D]`` or ``[D]`` shape of that frame.
        level_spatial_shapes: int ``[L, D]``.

    Returns:
        int64 ``[Q, L, D]``: ``floor(positions / position_shapes * shape_l)`` in float64.
    """
    p = positions.detach().to(torch.float64)
    ps = position_shapes.to(device=p.device, dtype=torch.float64)
    if ps.ndim == 1:
        ps = ps.expand_as(p)
    ls = level_spatial_shapes.to(device=p.device, dtype=torch.float64)
    return torch.floor(p[:, None, :] / ps[:, None, :] * ls[None]).to(torch.int64)


def get_multilevel_neighborhoods(
    query_fullscale_spatial_positions: Tensor,
    level_spatial_shapes,
    neighborhood_sizes: Sequence[int] = (3, 5, 7, 9),
) -> tuple[Tensor, Tensor, Tensor]:
    """Window cells of every query at every level.

    Args:
        query_fullscale_spatial_positions: float ``[n_queries, position_dim]`` positions in the
            frame of the largest level (spconv axis order; cell ``i`` covers ``[i, i + 1)``).
        level_spatial_shapes: int ``[n_levels, position_dim]`` (tensor or nested sequence).
        neighborhood_sizes: one odd window size per level.

    Returns:
        ``(cells, out_of_bounds, cell_levels)``:

        * ``cells``: int64 ``[n_queries, K, position_dim]``, ``K = sum(s ** position_dim)``,
          integer coordinates of each window cell in its own level's grid: the level-``l``
          window is centred on ``floor(p / full_shape * shape_l)``;
        * ``out_of_bounds``: bool ``[n_queries, K]``, True where the cell lies outside its level;
        * ``cell_levels``: int64 ``[K]``, the level of each window slot (the same for every query).

    Raises:
        TypeError: non-float positions, bad shapes argument.
        ValueError: even sizes, ``len(neighborhood_sizes) != n_levels``, position dim mismatch.
    """
    pos = query_fullscale_spatial_positions
    if not isinstance(pos, Tensor) or not pos.is_floating_point():
        raise TypeError(
            "query_fullscale_spatial_positions must be a floating-point tensor (continuous positions, "
            f"cell i covers [i, i+1)), got {getattr(pos, 'dtype', type(pos).__name__)}"
        )
    shapes = as_level_spatial_shapes(level_spatial_shapes, device=pos.device)
    n_levels, dim = shapes.shape
    if pos.ndim != 2 or pos.shape[1] != dim:
        raise ValueError(
            f"query_fullscale_spatial_positions must have shape [n_queries, position_dim={dim}] to match "
            f"level_spatial_shapes, got query_fullscale_spatial_positions.shape={tuple(pos.shape)}"
        )
    sizes = check_neighborhood_sizes(neighborhood_sizes, n_levels)
    full = shapes[int(torch.argmax(shapes.prod(-1)))]
    centres = window_centres(pos, full, shapes)
    offsets, slot_level = window_offsets(sizes, dim, device=pos.device)
    cells = centres[:, slot_level] + offsets[None]
    oob = ((cells < 0) | (cells >= shapes[slot_level][None])).any(-1)
    return cells, oob, slot_level


# ---------------------------------------------------------------------------------------------
# pair plan
# ---------------------------------------------------------------------------------------------
@dataclass
class NeighborhoodPlan:
    """Which keys each query attends to (integer bookkeeping only, no features).

    Pairs (present voxels only) are sorted by query, then by level. ``pair_row[p]`` is the key
    row (into the compacted voxel list ``voxel_rows``, or the index rows if ``voxel_rows`` is
    None) and ``pair_slot[p]`` its window slot. With ``with_background`` the kernel also
    attends to every in-bounds window slot that holds no pair (background cells).
    """

    n_queries: int
    batch_size: int
    with_background: bool
    query_batch: Tensor  # int64 [Q]
    centres: Tensor  # int64 [Q, L, D]
    pair_offsets: Tensor  # int64 [Q + 1] CSR offsets of each query's pairs
    pair_slot: Tensor  # int32 [P]
    pair_row: Tensor  # int32/int64 [P]
    slot_level: Tensor  # int64 [K]
    slot_offset: Tensor  # int64 [K, D]
    level_spatial_shapes: Tensor  # int64 [L, D]
    full_shape: Tensor  # int64 [D]
    n_keys: int  # number of voxel keys the rows refer to
    voxel_rows: Optional[Tensor]  # int64 [n_keys] index rows of the keys, None = all rows in order
    transpose_cache: dict = field(default_factory=dict, repr=False)  # chunk -> (perm, crow) of the CSR transpose

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    @property
    def n_pairs(self) -> int:
        return self.pair_row.shape[0]

    @property
    def pair_counts(self) -> Tensor:
        return self.pair_offsets.diff()

    def has_keys(self) -> Tensor:
        """bool ``[Q]``: the query attends to at least one key (a voxel, or with background
        any in-bounds window cell)."""
        has = self.pair_counts > 0
        if self.with_background:
            radius = torch.stack([self.slot_offset[self.slot_level == l].max(0).values for l in range(self.n_levels)])
            lo, hi = self.centres - radius[None], self.centres + radius[None]  # [Q, L, D]
            overlaps = ((hi >= 0) & (lo < self.level_spatial_shapes[None])).all(-1).any(-1)
            has = has | overlaps
        return has

    def chunks(self, chunk_pairs: int, with_background: bool = False) -> list[tuple[int, int]]:
        """Query ranges ``[q0, q1)`` whose work (voxel pairs, plus every window slot with
        background, plus one per query) is at most ``chunk_pairs`` (or a single query)."""
        n = self.n_queries
        per_query = 1 + (self.slot_level.shape[0] if with_background else 0)
        cost = self.pair_offsets.cpu() + torch.arange(n + 1) * per_query
        bounds, q0 = [], 0
        while q0 < n:
            target = int(cost[q0]) + chunk_pairs
            q1 = int(torch.searchsorted(cost, torch.tensor(target), right=True)) - 1
            q1 = min(max(q1, q0 + 1), n)
            bounds.append((q0, q1))
            q0 = q1
        return bounds


def build_neighborhood_plan(
    index: SparseCoordinateIndex,
    query_batch: Tensor,
    positions: Tensor,
    position_shapes: Tensor,
    neighborhood_sizes: Sequence[int],
    with_background: bool,
    cells_per_chunk: int = 1 << 22,
    compact_rows: bool = True,
) -> NeighborhoodPlan:
    """Look up every query's window cells (one batched ``index.lookup`` per level and chunk).

    Queries sharing (batch, centre cell) at a level are looked up once (coarse levels of an
    encoder hold many queries per cell).

    Args:
        index: coordinate index of the map.
        query_batch: int64 ``[Q]`` batch item of each query.
        positions: float ``[Q, D]`` in the frame of ``position_shapes``.
        position_shapes: ``[Q, D]`` (or ``[D]``) shape of each query's frame.
        neighborhood_sizes: validated odd sizes, one per level.
        with_background: recorded in the plan (the kernel then also attends to the absent
            in-bounds slots; they are derived from ``centres`` and the pairs, not stored).
        cells_per_chunk: bound on window cells looked up at once (memory of the lookup).
        compact_rows: renumber key rows to the voxels used by some pair (``voxel_rows``).
    """
    shapes = index.level_spatial_shapes.to(positions.device)
    n_levels, dim = shapes.shape
    device = positions.device
    offsets, slot_level = window_offsets(neighborhood_sizes, dim, device=device)
    centres = window_centres(positions, position_shapes, shapes)
    n_q, n_slots = positions.shape[0], offsets.shape[0]
    level_slots = [(slot_level == l).nonzero().squeeze(1) for l in range(n_levels)]
    radii = [(s - 1) // 2 for s in neighborhood_sizes]
    qc = max(1, cells_per_chunk // max(n_slots, 1))
    query_batch = query_batch.to(torch.int64)
    parts = []  # (query, level, rank, slot, row) per level and chunk
    level_counts = torch.zeros(n_q, n_levels, dtype=torch.int64, device=device)
    for q0 in range(0, n_q, qc):
        q1 = min(n_q, q0 + qc)
        b = query_batch[q0:q1]
        for level in range(n_levels):
            # centres further than the radius outside the grid have all-outside windows: clamping
            # them to just outside keeps that, and bounds the linearised key below
            r, shape = radii[level], shapes[level]
            centre = torch.minimum(torch.maximum(centres[q0:q1, level], torch.full_like(shape, -r - 1)), shape + r)
            key = b
            for axis in range(dim):
                key = key * (int(shape[axis]) + 2 * r + 2) + (centre[:, axis] + r + 1)
            uniq_key, inverse = torch.unique(key, return_inverse=True)
            first = torch.zeros(uniq_key.shape[0], dtype=torch.int64, device=device).scatter_(
                0, inverse, torch.arange(q1 - q0, device=device)
            )  # a representative query of each distinct (batch, centre)
            cells = centre[first][:, None, :] + offsets[level_slots[level]][None]  # [U, K_l, D]
            rows, found = index.lookup(b[first][:, None], torch.tensor(level, device=device), cells)
            keep = found
            u_count = keep.sum(1)
            u_start = torch.cumsum(u_count, 0) - u_count
            u_slot = level_slots[level].expand(keep.shape)[keep]
            u_row = rows[keep]
            q_count = u_count[inverse]
            total = int(q_count.sum())
            q_start = torch.cumsum(q_count, 0) - q_count
            pair_query = torch.repeat_interleave(torch.arange(q0, q1, device=device), q_count, output_size=total)
            local = pair_query - q0
            rank = torch.arange(total, device=device) - q_start[local]  # rank within (query, level)
            src = u_start[inverse][local] + rank
            level_counts[q0:q1, level] = q_count
            parts.append((pair_query, level, rank, u_slot[src], u_row[src]))
    # place every pair at its (query, level, rank) position: sorted by query, then level (no sort)
    counts = level_counts.sum(1)
    pair_offsets = torch.zeros(n_q + 1, dtype=torch.int64, device=device)
    pair_offsets[1:] = torch.cumsum(counts, 0)
    start = pair_offsets[:-1, None] + torch.cumsum(level_counts, 1) - level_counts  # [Q, L]
    n_pairs = int(pair_offsets[-1])
    pair_slot = torch.zeros(n_pairs, dtype=torch.int32, device=device)
    pair_row = torch.zeros(n_pairs, dtype=torch.int64, device=device)
    for pair_query, level, rank, slot, row in parts:
        dest = start[pair_query, level] + rank
        pair_slot[dest] = slot.to(torch.int32)
        pair_row[dest] = row

    n_keys, voxel_rows = index.n_voxels, None
    if compact_rows:
        present = pair_row >= 0
        used = torch.zeros(index.n_voxels, dtype=torch.bool, device=device)
        used[pair_row[present]] = True
        n_used = int(used.sum())
        if n_used < index.n_voxels:
            voxel_rows = used.nonzero().squeeze(1)
            remap = torch.cumsum(used, 0) - 1
            pair_row = torch.where(present, remap[pair_row.clamp_min(0)], -1)
            n_keys = n_used
    if n_keys < 2**31 - 1:
        pair_row = pair_row.to(torch.int32)
    return NeighborhoodPlan(
        n_queries=n_q,
        batch_size=index.batch_size,
        with_background=with_background,
        query_batch=query_batch.to(torch.int64),
        centres=centres,
        pair_offsets=pair_offsets,
        pair_slot=pair_slot,
        pair_row=pair_row,
        slot_level=slot_level,
        slot_offset=offsets,
        level_spatial_shapes=shapes,
        full_shape=shapes[int(torch.argmax(shapes.prod(-1)))],
        n_keys=n_keys,
        voxel_rows=voxel_rows,
    )


# ---------------------------------------------------------------------------------------------
# RoPE positions
# ---------------------------------------------------------------------------------------------
def query_rope_positions(positions: Tensor, position_shapes: Tensor, levels: Tensor, full_shape: Tensor) -> Tensor:
    """Position vectors ``[Q, D + 1]`` (full-scale position, level) of queries (differentiable)."""
    full = full_shape.to(device=positions.device, dtype=positions.dtype)
    p = positions / position_shapes.to(positions.dtype) * full
    return torch.cat([p, levels.to(positions.dtype)[:, None]], dim=1)


def voxel_rope_positions(
    spatial_indices: Tensor, level_indices: Tensor, level_spatial_shapes: Tensor, full_shape: Tensor
) -> Tensor:
    """Float64 position vectors ``[N, D + 1]`` of cells: centre ``c + 0.5`` mapped to full scale, level."""
    shape = level_spatial_shapes[level_indices].to(torch.float64)
    p = (spatial_indices.to(torch.float64) + 0.5) / shape * full_shape.to(torch.float64)
    return torch.cat([p, level_indices.to(torch.float64)[:, None]], dim=1)


# ---------------------------------------------------------------------------------------------
# attention kernel
# ---------------------------------------------------------------------------------------------
def _stable_argsort(x: Tensor) -> Tensor:
    """Stable argsort; on CPU through numpy's single-threaded radix sort (torch's parallel sort
    is orders of magnitude slower on a loaded 2-core machine)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), kind="stable")).to(torch.int64)
    return torch.argsort(x, stable=True)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():  # torch's "Sparse CSR tensor support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _Chunk:
    """Queries ``[q0, q1)`` of a plan: CSR structure of their voxel pairs for all heads at once
    (block-diagonal ``[H * n, H * n_keys]``, head-major; and its transpose), and, with
    background, the in-bounds absent window slots of each query."""

    def __init__(self, plan: NeighborhoodPlan, q0: int, q1: int, n_heads: int, with_background: bool):
        p0, p1 = int(plan.pair_offsets[q0]), int(plan.pair_offsets[q1])
        device = plan.pair_offsets.device
        n, n_pairs, n_keys = q1 - q0, p1 - p0, plan.n_keys
        self.q0, self.q1, self.n, self.n_pairs, self.n_heads, self.n_keys = q0, q1, n, n_pairs, n_heads, n_keys
        crow = plan.pair_offsets[q0 : q1 + 1] - p0
        self.local = torch.repeat_interleave(torch.arange(n, device=device), crow.diff(), output_size=n_pairs)
        col = plan.pair_row[p0:p1].to(torch.int64)
        heads = torch.arange(n_heads, device=device)[:, None]
        end = torch.tensor([n_heads * n_pairs], device=device)
        self.crow = torch.cat([(crow[None, :-1] + heads * n_pairs).reshape(-1), end])
        self.col = (col[None] + heads * n_keys).reshape(-1)
        cached = plan.transpose_cache.get((q0, q1))
        if cached is None:  # computed in the forward, reused by the backward
            perm_t = _stable_argsort(col)
            crow_t = torch.zeros(n_keys + 1, dtype=torch.int64, device=device)
            crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=n_keys), 0)
            plan.transpose_cache[(q0, q1)] = cached = (perm_t, crow_t)
        self.perm_t, crow_t = cached
        self.crow_t = torch.cat([(crow_t[None, :-1] + heads * n_pairs).reshape(-1), end])
        self.col_t = (self.local[self.perm_t][None] + heads * n).reshape(-1)
        if with_background:
            slots = plan.pair_slot[p0:p1].to(torch.int64)
            present = torch.zeros(n, plan.slot_level.shape[0], dtype=torch.bool, device=device)
            present[self.local, slots] = True
            cells = plan.centres[q0:q1][:, plan.slot_level] + plan.slot_offset[None]  # [n, K, D]
            inside = ((cells >= 0) & (cells < plan.level_spatial_shapes[plan.slot_level][None])).all(-1)
            self.bg_valid = inside & ~present  # [n, K]
            self.batch = plan.query_batch[q0:q1]

    def voxel_scores(self, a: Tensor, b_t: Tensor, alpha: float) -> Tensor:
        """``alpha * <a[h, i], b_t[:, h * n_keys + j]>`` at every pair ``(i, j)``: ``[H, P]``.

        ``a`` is ``[H, n, d]``, ``b_t`` is ``[d, H * n_keys]``."""
        shape = (self.n_heads * self.n, self.n_heads * self.n_keys)
        pattern = _csr(self.crow, self.col, a.new_ones(self.col.shape[0]), shape)
        s = torch.sparse.sampled_addmm(pattern, a.reshape(-1, a.shape[-1]), b_t, beta=0.0, alpha=alpha)
        return s.values().view(self.n_heads, self.n_pairs)

    def gather_sum(self, weights: Tensor, table: Tensor) -> Tensor:
        """``sum_p weights[h, p] * table[h * n_keys + col_p]`` per query: ``[n, H, d]``
        (``table`` is ``[H * n_keys, d]``)."""
        shape = (self.n_heads * self.n, self.n_heads * self.n_keys)
        out = _csr(self.crow, self.col, weights.reshape(-1), shape) @ table
        return out.view(self.n_heads, self.n, -1).transpose(0, 1)

    def scatter_sum(self, weights: Tensor, rows: Tensor) -> Tensor:
        """``sum_p weights[h, p] * rows[h * n + local_p]`` per key: ``[H * n_keys, d]``
        (``rows`` is ``[H * n, d]``)."""
        shape = (self.n_heads * self.n_keys, self.n_heads * self.n)
        return _csr(self.crow_t, self.col_t, weights[:, self.perm_t].reshape(-1), shape) @ rows


def background_scores(
    q: Tensor, bg_k: Tensor, freqs: Tensor, batch: Tensor, centres: Tensor, plan: NeighborhoodPlan, scale: float
) -> Tensor:
    """Scores ``[n, H, K]`` of queries against the background key of every window slot.

    The background key of an absent cell ``u`` is ``R(u) bg_k[b, l]``. With split-half pairs as
    complex numbers and ``u = u_centre + u_offset`` (window centre cell, slot offset),
    ``<q, R(u) k> = Re sum_j q_j conj(k_j) e^{-i theta_j(u_centre)} e^{-i theta_j(u_offset)}``:
    one ``[n, d] x [d, K_l]`` matmul per head and level, no per-(query, slot) key. Differentiable
    (autograd) w.r.t. ``q``, ``bg_k`` and ``freqs``.
    """
    half = q.shape[-1] // 2
    q1, q2 = q[..., :half], q[..., half:]
    full = plan.full_shape.to(torch.float64)
    out = []
    for level in range(plan.n_levels):
        shape = plan.level_spatial_shapes[level].to(torch.float64)
        k = bg_k[batch, level]  # [n, H, d]
        k1, k2 = k[..., :half], k[..., half:]
        pr, pi = q1 * k1 + q2 * k2, q2 * k1 - q1 * k2  # q conj(k)
        lvl = torch.full((centres.shape[0], 1), float(level), dtype=torch.float64, device=q.device)
        th_c = rope_angles(torch.cat([(centres[:, level].to(torch.float64) + 0.5) / shape * full, lvl], 1), freqs)
        cos_c, sin_c = torch.cos(th_c).to(q.dtype), torch.sin(th_c).to(q.dtype)
        wr, wi = pr * cos_c + pi * sin_c, pi * cos_c - pr * sin_c  # [n, H, d/2]
        sel = plan.slot_level == level
        off = plan.slot_offset[sel].to(torch.float64) / shape * full
        th_o = rope_angles(torch.cat([off, torch.zeros_like(off[:, :1])], 1), freqs)  # [K_l, H', d/2]
        e = torch.cat([torch.cos(th_o), torch.sin(th_o)], -1).to(q.dtype).expand(-1, q.shape[1], -1)  # [K_l, H, d]
        out.append(torch.einsum("nhj,khj->nhk", torch.cat([wr, wi], -1), e))
    return torch.cat(out, -1) * scale


def _level_sums(a_bg: Tensor, slot_level: Tensor, n_levels: int) -> Tensor:
    """Sum ``[n, H, K]`` over the slots of each level: ``[n, H, L]``."""
    return torch.zeros(*a_bg.shape[:2], n_levels, dtype=a_bg.dtype, device=a_bg.device).index_add_(2, slot_level, a_bg)


def default_chunk_pairs(embed_dim: int) -> int:
    """Work per chunk (voxel pairs + background slots): bounds the ``[H, pairs]`` and
    ``[n, H, slots]`` buffers to a few MiB each."""
    return 1 << 18


class NeighborhoodAttentionFunction(torch.autograd.Function):
    """Softmax attention of each query over its window keys, with a recomputing backward.

    Inputs: rotated queries ``q [Q, H, d]``, rotated voxel keys ``k [n_keys, H, d]``, values
    ``v [n_keys, H, d]``, unrotated background keys/values ``bg_k, bg_v [B, L, H, d]`` (or
    None), the RoPE frequencies ``freqs [H', d/2, D+1]`` (background keys only), the plan, the
    score scale and the chunk size. Output ``[Q, H, d]`` (zero for queries without keys).

    Voxel pairs are handled as per-head sparse CSR matrices ``[Q, n_keys]``: scores by
    ``sampled_addmm`` (SDDMM), aggregation by sparse-dense matmuls, the backward's key/value
    gradients through the transposed CSR. Background slots are scored by
    :func:`background_scores` and aggregate ``bg_v`` per level. Saved for the backward:
    ``q, k, v, bg_k, bg_v, freqs``, the output, a ``[Q, H]`` log-sum-exp and the plan's
    integer indices; no ``[pairs, embed_dim]`` tensor exists at any time, and the
    ``[H, pairs]`` / ``[n, H, slots]`` buffers are bounded by the chunking.
    """

    @staticmethod
    def forward(ctx, q, k, v, bg_k, bg_v, freqs, plan: NeighborhoodPlan, scale: float, chunk_pairs: int):
        n_q, n_heads, head_dim = q.shape
        with_bg = bg_k is not None
        k_t = k.permute(2, 1, 0).reshape(head_dim, -1)  # [d, H * N], head-major columns
        v_h = v.transpose(0, 1).reshape(-1, head_dim)  # [H * N, d]
        out = q.new_zeros(n_q, n_heads, head_dim)
        lse = q.new_full((n_q, n_heads), float("-inf"))
        for q0, q1 in plan.chunks(chunk_pairs, with_bg):
            c = _Chunk(plan, q0, q1, n_heads, with_bg)
            qc = q[q0:q1]
            m = q.new_full((c.n, n_heads), float("-inf"))
            if c.n_pairs:
                s = c.voxel_scores(qc.transpose(0, 1).contiguous(), k_t, scale)  # [H, P]
                m.scatter_reduce_(0, c.local[:, None].expand(-1, n_heads), s.T, reduce="amax", include_self=True)
            if with_bg:
                s_bg = background_scores(qc, bg_k, freqs, c.batch, plan.centres[q0:q1], plan, scale)
                s_bg = s_bg.masked_fill(~c.bg_valid[:, None, :], float("-inf"))
                m = torch.maximum(m, s_bg.amax(-1))
            m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
            z = q.new_zeros(c.n, n_heads)
            if c.n_pairs:
                e = torch.exp(s - m.T[:, c.local])
                z.index_add_(0, c.local, e.T)
            if with_bg:
                e_bg = torch.exp(s_bg - m[..., None])
                z += e_bg.sum(-1)
            lse[q0:q1] = m + torch.log(z)
            z_inv = torch.where(z > 0, 1.0 / z, torch.zeros((), dtype=z.dtype, device=z.device))
            acc = q.new_zeros(c.n, n_heads, head_dim)
            if c.n_pairs:
                acc += c.gather_sum(e * z_inv.T[:, c.local], v_h)
            if with_bg:
                a_l = _level_sums(e_bg * z_inv[..., None], plan.slot_level, plan.n_levels)  # [n, H, L]
                acc += torch.einsum("nhl,nlhd->nhd", a_l, bg_v[c.batch])
            out[q0:q1] = acc
        ctx.save_for_backward(q, k, v, bg_k, bg_v, freqs, out, lse)
        ctx.plan, ctx.scale, ctx.chunk_pairs = plan, scale, chunk_pairs
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bg_k, bg_v, freqs, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        need_q, need_k, need_v, need_bk, need_bv, need_f = ctx.needs_input_grad[:6]
        with_bg = bg_k is not None
        n_heads = q.shape[1]
        g = grad_out.contiguous()
        head_dim = q.shape[2]
        k_t, v_t = k.permute(2, 1, 0).reshape(head_dim, -1), v.permute(2, 1, 0).reshape(head_dim, -1)  # [d, H*N]
        k_h = k.transpose(0, 1).reshape(-1, head_dim)  # [H * N, d]
        delta = torch.einsum("qhd,qhd->qh", g, out)  # [Q, H] = sum over keys of a <g, v>
        dq = torch.zeros_like(q)
        dk_h = torch.zeros_like(k_h)
        dv_h = torch.zeros_like(k_h)
        dbk = torch.zeros_like(bg_k) if with_bg else None
        dbv = torch.zeros_like(bg_v) if with_bg else None
        dfreqs = torch.zeros_like(freqs) if (with_bg and need_f) else None
        for q0, q1 in plan.chunks(ctx.chunk_pairs, with_bg):
            c = _Chunk(plan, q0, q1, n_heads, with_bg)
            qc, gc, lc, dc = q[q0:q1], g[q0:q1], lse[q0:q1], delta[q0:q1]
            q_h, g_h = qc.transpose(0, 1).contiguous(), gc.transpose(0, 1).contiguous()
            if c.n_pairs:
                a = torch.exp(c.voxel_scores(q_h, k_t, scale) - lc.T[:, c.local])  # [H, P]
                ds = a * (c.voxel_scores(g_h, v_t, 1.0) - dc.T[:, c.local]) * scale
                dq[q0:q1] += c.gather_sum(ds, k_h)
                dk_h += c.scatter_sum(ds, q_h.view(-1, head_dim))
                dv_h += c.scatter_sum(a, g_h.view(-1, head_dim))
            if with_bg:
                with torch.enable_grad():
                    leaves = [
                        qc.detach().requires_grad_(need_q),
                        bg_k.detach().requires_grad_(need_bk),
                        freqs.detach().requires_grad_(need_f),
                    ]
                    s_bg = background_scores(leaves[0], leaves[1], leaves[2], c.batch, plan.centres[q0:q1], plan, scale)
                    with torch.no_grad():
                        a_bg = torch.exp(s_bg - lc[..., None]) * c.bg_valid[:, None, :]
                        gv = torch.einsum("nhd,nlhd->nhl", gc, bg_v[c.batch])  # <g, bg_v> per level
                        ds_bg = a_bg * (gv[..., plan.slot_level] - dc[..., None])
                        if need_bv:
                            a_l = _level_sums(a_bg, plan.slot_level, plan.n_levels)
                            dbv.index_add_(0, c.batch, torch.einsum("nhl,nhd->nlhd", a_l, gc))
                    wanted = [t for t in leaves if t.requires_grad]
                    if wanted:
                        grads = iter(torch.autograd.grad(s_bg, wanted, ds_bg))
                        if need_q:
                            dq[q0:q1] += next(grads)
                        if need_bk:
                            dbk += next(grads)
                        if need_f:
                            dfreqs += next(grads)
        dk = dk_h.view(n_heads, -1, head_dim).transpose(0, 1) if need_k else None
        dv = dv_h.view(n_heads, -1, head_dim).transpose(0, 1) if need_v else None
        return (dq if need_q else None), dk, dv, (dbk if need_bk else None), (dbv if need_bv else None), dfreqs, None, None, None


def sparse_neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: NeighborhoodPlan,
    background_k: Optional[Tensor] = None,
    background_v: Optional[Tensor] = None,
    rope_freqs: Optional[Tensor] = None,
    chunk_pairs: Optional[int] = None,
) -> Tensor:
    """Multi-head attention of each query over the keys of its plan (one softmax per query).

    Args:
        q: ``[Q, H, d]`` queries, already rotated at the queries' positions.
        k: ``[n_keys, H, d]`` keys of the plan's voxels (rows as in ``plan.voxel_rows``),
            already rotated at the voxels' positions (:func:`voxel_rope_positions`).
        v: ``[n_keys, H, d]`` values.
        plan: from :func:`build_neighborhood_plan`.
        background_k, background_v: ``[B, L, H, d]`` projected (unrotated) background
            key/value of each batch item and level; required iff ``plan.with_background``.
            A background key acts rotated at the absent cell's own position.
        rope_freqs: ``[H or 1, d / 2, D + 1]`` frequencies; required with background.
        chunk_pairs: work per chunk (voxel pairs + background slots); bounds the buffers.

    Returns:
        ``[Q, H, d]``, zero rows for queries without keys.
    """
    if plan.with_background != (background_k is not None) or (background_k is None) != (background_v is None):
        raise ValueError("background_k/background_v must be given exactly when the plan was built with_background")
    if plan.with_background and rope_freqs is None:
        raise ValueError("rope_freqs is required to rotate background keys")
    if q.shape[0] != plan.n_queries or k.shape[0] != plan.n_keys or v.shape[0] != plan.n_keys:
        raise ValueError(
            f"q/k/v rows ({q.shape[0]}, {k.shape[0]}, {v.shape[0]}) do not match the plan "
            f"(n_queries={plan.n_queries}, n_keys={plan.n_keys})"
        )
    if chunk_pairs is None:
        chunk_pairs = default_chunk_pairs(q.shape[1] * q.shape[2])
    scale = q.shape[-1] ** -0.5
    return NeighborhoodAttentionFunction.apply(
        q, k, v, background_k, background_v, rope_freqs, plan, scale, int(chunk_pairs)
    )
