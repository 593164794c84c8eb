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

Memory: :class:`NeighborhoodAttentionFunction` keeps only the pair plan (int32 indices), the
per-voxel rotated keys and values, the rotated queries, the output and a per-(query, head)
log-sum-exp. Its backward recomputes the gathers chunk by chunk, so no
``[n_queries, keys_per_query, embed_dim]`` tensor is ever alive; peak extra memory is a few
``[chunk_pairs, embed_dim]`` buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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

    Pairs are sorted by query, then by window slot. ``pair_row[p]`` is the key row (into the
    compacted voxel list ``voxel_rows``, or the index rows if ``voxel_rows`` is None) or ``-1``
    for an absent in-bounds cell that takes the background embedding (only when
    ``with_background``). Out-of-bounds cells never form pairs.
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

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    @property
    def n_pairs(self) -> int:
        return self.pair_row.shape[0]

    @property
    def pair_counts(self) -> Tensor:
        return self.pair_offsets.diff()

    def chunks(self, chunk_pairs: int) -> list[tuple[int, int]]:
        """Query ranges ``[q0, q1)`` holding at most ``chunk_pairs`` pairs (or one query)."""
        offsets = self.pair_offsets.cpu()
        n = self.n_queries
        bounds, q0 = [], 0
        while q0 < n:
            target = int(offsets[q0]) + chunk_pairs
            q1 = int(torch.searchsorted(offsets, torch.tensor(target), right=True)) - 1
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
        with_background: keep absent in-bounds cells as background pairs.
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
    parts = []  # (query, level, slot, row) per level and chunk
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
            if with_background:
                inside = ((cells >= 0) & (cells < shape)).all(-1)
                keep = inside
            else:
                keep = found
            u_count = keep.sum(1)
            u_start = torch.cumsum(u_count, 0) - u_count
            u_slot = level_slots[level].expand(keep.shape)[keep]
            u_row = rows[keep]  # -1 where absent (background)
            q_count = u_count[inverse]
            total = int(q_count.sum())
            q_start = torch.cumsum(q_count, 0) - q_count
            pair_query = torch.repeat_interleave(torch.arange(q0, q1, device=device), q_count, output_size=total)
            local = pair_query - q0
            src = u_start[inverse][local] + torch.arange(total, device=device) - q_start[local]
            parts.append((pair_query, level, u_slot[src], u_row[src]))
    if parts:
        pair_query = torch.cat([p[0] for p in parts])
        sort_key = pair_query * n_levels + torch.cat([torch.full_like(p[0], p[1]) for p in parts])
        order = torch.argsort(sort_key, stable=True)
        pair_query = pair_query[order]
        pair_slot = torch.cat([p[2] for p in parts])[order].to(torch.int32)
        pair_row = torch.cat([p[3] for p in parts])[order]
        counts = torch.bincount(pair_query, minlength=n_q)
    else:
        pair_slot = torch.zeros(0, dtype=torch.int32, device=device)
        pair_row = torch.zeros(0, dtype=torch.int64, device=device)
        counts = torch.zeros(n_q, dtype=torch.int64, device=device)
    pair_offsets = torch.zeros(n_q + 1, dtype=torch.int64, device=device)
    pair_offsets[1:] = torch.cumsum(counts, 0)

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
class _Chunk:
    """Pairs of queries ``[q0, q1)``: global query of each pair, key row into the extended key
    table (voxels, then ``B * L`` background rows), and the background pairs' rotation."""

    def __init__(self, plan: NeighborhoodPlan, q0: int, q1: int, freqs: Optional[Tensor], dtype: torch.dtype):
        p0, p1 = int(plan.pair_offsets[q0]), int(plan.pair_offsets[q1])
        device = plan.pair_offsets.device
        self.q0, self.q1 = q0, q1
        counts = plan.pair_offsets[q0 + 1 : q1 + 1] - plan.pair_offsets[q0:q1]
        self.local = torch.repeat_interleave(torch.arange(q1 - q0, device=device), counts, output_size=p1 - p0)
        self.qi = self.local + q0
        rows = plan.pair_row[p0:p1].to(torch.int64)
        self.bg_idx = None
        if plan.with_background:
            bg_idx = (rows < 0).nonzero().squeeze(1)
            if bg_idx.numel():
                slot = plan.pair_slot[p0:p1][bg_idx].to(torch.int64)
                level = plan.slot_level[slot]
                query = self.qi[bg_idx]
                batch = plan.query_batch[query]
                rows = rows.clone()
                rows[bg_idx] = plan.n_keys + batch * plan.n_levels + level
                cells = plan.centres[query, level] + plan.slot_offset[slot]
                self.positions = voxel_rope_positions(cells, level, plan.level_spatial_shapes, plan.full_shape)
                angles = rope_angles(self.positions, freqs)
                self.cos, self.sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
                self.bg_idx = bg_idx
        self.rows = rows

    def keys_values(self, k_ext: Tensor, v_ext: Tensor) -> tuple[Tensor, Tensor]:
        kp = k_ext.index_select(0, self.rows)
        if self.bg_idx is not None:
            kp.index_copy_(0, self.bg_idx, rotate_pairs(kp.index_select(0, self.bg_idx), self.cos, self.sin))
        return kp, v_ext.index_select(0, self.rows)


def _extend(keys: Tensor, background: Optional[Tensor]) -> Tensor:
    if background is None:
        return keys
    return torch.cat([keys, background.reshape(-1, *keys.shape[1:])])


def default_chunk_pairs(embed_dim: int) -> int:
    """Pairs per chunk: ~32 MiB per float32 ``[pairs, embed_dim]`` buffer."""
    return max(1024, (1 << 23) // max(embed_dim, 1))


class NeighborhoodAttentionFunction(torch.autograd.Function):
    """Softmax attention of each query over its plan's keys, with a recomputing backward.

    Inputs: rotated queries ``q [Q, H, d]``, rotated voxel keys ``k [n_keys, H, d]``, values
    ``v [n_keys, H, d]``, unrotated background keys/values ``bg_k, bg_v [B, L, H, d]`` (or
    None), the RoPE frequencies ``freqs [H', d/2, D+1]`` (used for background keys only), the
    plan, the score scale and the chunk size. Output ``[Q, H, d]`` (zero for queries
    without keys). Saves ``q, k, v, bg_k, bg_v, freqs``, the output and a ``[Q, H]``
    log-sum-exp; the backward regathers keys/values per chunk of queries.
    """

    @staticmethod
    def forward(ctx, q, k, v, bg_k, bg_v, freqs, plan: NeighborhoodPlan, scale: float, chunk_pairs: int):
        n_q, n_heads, head_dim = q.shape
        k_ext, v_ext = _extend(k, bg_k), _extend(v, bg_v)
        out = q.new_zeros(n_q, n_heads, head_dim)
        lse = q.new_full((n_q, n_heads), float("-inf"))
        for q0, q1 in plan.chunks(chunk_pairs):
            c = _Chunk(plan, q0, q1, freqs, q.dtype)
            if c.rows.numel() == 0:
                continue
            kp, vp = c.keys_values(k_ext, v_ext)
            s = (q.index_select(0, c.qi) * kp).sum(-1) * scale  # [P, H]
            del kp
            n = q1 - q0
            m = q.new_full((n, n_heads), float("-inf"))
            m.scatter_reduce_(0, c.local[:, None].expand(-1, n_heads), s, reduce="amax", include_self=True)
            e = torch.exp(s - m.index_select(0, c.local))
            z = q.new_zeros(n, n_heads).index_add_(0, c.local, e)
            lse[q0:q1] = m + torch.log(z)
            a = e / z.index_select(0, c.local)
            out[q0:q1] = q.new_zeros(n, n_heads, head_dim).index_add_(0, c.local, a[..., None] * vp)
        ctx.save_for_backward(q, k, v, bg_k, bg_v, freqs, out, lse)
        ctx.plan, ctx.scale, ctx.chunk_pairs = plan, scale, chunk_pairs
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bg_k, bg_v, freqs, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        need_q, need_k, need_v, need_bk, need_bv, need_f = ctx.needs_input_grad[:6]
        g = grad_out.contiguous()
        k_ext, v_ext = _extend(k, bg_k), _extend(v, bg_v)
        delta = (g * out).sum(-1)  # [Q, H] = sum_p a_p <g, v_p>
        dq = torch.zeros_like(q)
        dk_ext = torch.zeros_like(k_ext)
        dv_ext = torch.zeros_like(v_ext)
        dfreqs = torch.zeros(freqs.shape, dtype=torch.float64, device=freqs.device) if (need_f and freqs is not None) else None
        half = q.shape[-1] // 2
        for q0, q1 in plan.chunks(ctx.chunk_pairs):
            c = _Chunk(plan, q0, q1, freqs, q.dtype)
            if c.rows.numel() == 0:
                continue
            kp, vp = c.keys_values(k_ext, v_ext)
            qp, gp = q.index_select(0, c.qi), g.index_select(0, c.qi)
            a = torch.exp((qp * kp).sum(-1) * scale - lse.index_select(0, c.qi))  # [P, H]
            dv_ext.index_add_(0, c.rows, a[..., None] * gp)
            ds = a * ((gp * vp).sum(-1) - delta.index_select(0, c.qi)) * scale
            del vp, gp
            dq.index_add_(0, c.qi, ds[..., None] * kp)
            dkp = ds[..., None] * qp
            del qp
            if c.bg_idx is not None:
                dkb = dkp.index_select(0, c.bg_idx)
                if dfreqs is not None:
                    kb = kp.index_select(0, c.bg_idx)  # rotated background keys
                    dtheta = -dkb[..., :half] * kb[..., half:] + dkb[..., half:] * kb[..., :half]  # [Pb, H, d/2]
                    contrib = torch.einsum("phj,pk->hjk", dtheta.to(torch.float64), c.positions)
                    dfreqs += contrib.sum(0, keepdim=True) if freqs.shape[0] == 1 else contrib
                dkp.index_copy_(0, c.bg_idx, rotate_pairs(dkb, c.cos, -c.sin))
            del kp
            dk_ext.index_add_(0, c.rows, dkp)
        n_keys = k.shape[0]
        dk = dk_ext[:n_keys] if need_k else None
        dv = dv_ext[:n_keys] if need_v else None
        dbk = dk_ext[n_keys:].reshape(bg_k.shape) if (need_bk and bg_k is not None) else None
        dbv = dv_ext[n_keys:].reshape(bg_v.shape) if (need_bv and bg_v is not None) else None
        dfr = dfreqs.to(freqs.dtype) if dfreqs is not None else None
        return (dq if need_q else None), dk, dv, dbk, dbv, dfr, None, None, None


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
            Background keys are rotated per pair at the absent cell's own position.
        rope_freqs: ``[H or 1, d / 2, D + 1]`` frequencies; required with background.
        chunk_pairs: pairs processed at once (memory bound); default ~32 MiB per buffer.

    Returns:
        ``[Q, H, d]``, zero rows for queries without keys.
    """
    if plan.with_background != (background_k is not None) or (background_k is None) != (background_v is None):
        raise ValueError("background_k/background_v must be given exactly when the plan keeps background pairs")
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
