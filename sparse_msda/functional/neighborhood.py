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
rotated once per voxel. Queries are grouped into tiles (same batch item and same window centre
at the coarsest level, at most ``tile_queries``); a tile's keys are the voxels present in the
union of its queries' windows, looked up once per tile (:func:`build_neighborhood_plan`).
Tiles are padded and batched into chunks: scores by batched matmuls ``[H, T, G, d] x [H, T, d,
U]``, masked to each query's own windows, one softmax per query, values by batched matmuls.
Background slots (absent in-bounds window cells, only with a background embedding) are scored
by matmuls against the window offsets' rotations (:func:`background_scores`) and aggregate the
background value per level. The function saves only ``q, k, v``, the background key/value,
the RoPE frequencies, its output, a ``[H, Q]`` log-sum-exp and the plan's integer indices and
masks; the backward recomputes scores chunk by chunk. No ``[pairs, embed_dim]`` tensor ever
exists; the per-chunk ``[H, T, G, U]`` and ``[H, n, slots]`` buffers are bounded by the
chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from adapters import SparseCoordinateIndex, as_level_spatial_shapes

from .rope import rope_angles, rope_cos_sin

__all__ = [
    "NeighborhoodAttentionFunction",
    "NeighborhoodPlan",
    "PlanChunk",
    "background_scores",
    "build_neighborhood_plan",
    "check_neighborhood_sizes",
    "default_chunk_size",
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
# tiled pair plan
# ---------------------------------------------------------------------------------------------
@dataclass
class PlanChunk:
    """``T`` tiles of the plan, padded to ``G`` queries and ``U`` keys each.

    A tile is a group of queries that share their batch item and their window centre at the
    coarsest level (at most ``tile_queries`` of them, spatially sorted); its keys are the
    voxels present in the union of its queries' windows. Scores are computed densely per tile
    (``[G, U]`` per head, batched matmuls) and ``masked`` removes the (query, key) pairs that
    lie outside the query's own windows, and the padding.
    """

    query: Tensor  # int64 [T, G] query ids; padding = n_queries
    key: Tensor  # int64 [T, U] key rows; padding = n_keys
    query_gather: Tensor  # int64 [T * G] query ids clamped into range (for gathers)
    key_gather: Tensor  # int64 [T * U] key rows clamped into range (for gathers)
    masked: Tensor  # bool [T, G, U] True where query g must not see key u
    bg_masked: Optional[Tensor]  # bool [1, T * G, K] True where a window slot is no background key

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.masked.shape)


@dataclass
class NeighborhoodPlan:
    """Which keys each query attends to, as padded tiles (integer bookkeeping only).

    ``chunks`` partition the queries (every query sits in exactly one tile of one chunk). Key
    rows index the compacted voxel list ``voxel_rows`` (or the index rows if None). With
    ``with_background`` each query also attends to the in-bounds window slots that hold no
    voxel (``PlanChunk.bg_masked`` False), scored against the background key of the slot's level.
    """

    n_queries: int
    batch_size: int
    with_background: bool
    query_batch: Tensor  # int64 [Q]
    centres: Tensor  # int64 [Q, L, D]
    slot_level: Tensor  # int64 [K]
    slot_offset: Tensor  # int64 [K, D]
    level_spatial_shapes: Tensor  # int64 [L, D]
    full_shape: Tensor  # int64 [D]
    n_keys: int  # number of voxel keys the rows refer to
    voxel_rows: Optional[Tensor]  # int64 [n_keys] index rows of the keys, None = all rows in order
    chunks: list  # [PlanChunk]
    pair_counts: Tensor  # int64 [Q] voxel keys of each query
    background_counts: Optional[Tensor]  # int64 [Q] background slots of each query

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    @property
    def n_pairs(self) -> int:
        """Number of (query, voxel key) pairs."""
        return int(self.pair_counts.sum())

    @property
    def n_padded_pairs(self) -> int:
        """Number of (query, key) score entries computed per head (tiles, with padding)."""
        return sum(c.masked.numel() for c in self.chunks)

    def has_keys(self) -> Tensor:
        """bool ``[Q]``: the query attends to at least one key (a voxel, or with background
        any in-bounds window cell)."""
        has = self.pair_counts > 0
        if self.background_counts is not None:
            has = has | (self.background_counts > 0)
        return has


def _clamped_linear_key(batch: Tensor, cells: Tensor, shape: Tensor) -> Tensor:
    """int64 key of (batch, cell) with cells clamped to ``[-1, shape]`` per axis."""
    key = batch.to(torch.int64)
    for axis in range(cells.shape[1]):
        n = int(shape[axis])
        key = key * (n + 2) + (cells[:, axis].clamp(-1, n) + 1)
    return key


def _lexsort(primary: Tensor, secondary: Tensor) -> Tensor:
    """Stable order sorting by ``primary`` then ``secondary`` (ties keep the input order)."""
    if primary.device.type == "cpu":  # numpy: single-threaded and fast on a loaded machine
        return torch.from_numpy(np.lexsort((secondary.numpy(), primary.numpy()))).to(torch.int64)
    order = torch.argsort(secondary, stable=True)
    return order[torch.argsort(primary[order], stable=True)]


def _size_classes(limit: int) -> Tensor:
    """Padded tile sizes 1, 2, 3, 4, 6, 8, 12, 16, ... up to ``limit`` (inclusive)."""
    sizes, s = {limit}, 1
    while s < limit:
        sizes.update(x for x in (s, s + s // 2) if x <= limit)
        s *= 2
    return torch.tensor(sorted(sizes), dtype=torch.int64)


def build_neighborhood_plan(
    index: SparseCoordinateIndex,
    query_batch: Tensor,
    positions: Tensor,
    position_shapes: Tensor,
    neighborhood_sizes: Sequence[int],
    with_background: bool,
    chunk_size: int = 1 << 18,
    tile_queries: int = 32,
    cells_per_chunk: int = 1 << 21,
    compact_rows: bool = True,
) -> NeighborhoodPlan:
    """Group queries into tiles and look up each tile's window cells through the index.

    Tiles: queries sharing (batch item, window centre at the coarsest level), sorted by their
    finest-level centre and split into pieces of at most ``tile_queries``. At every level the
    union of a tile's windows is a box (its queries' centres spread over a few cells); every
    cell of the box is looked up once per tile (``index.lookup``), the present voxels are the
    tile's keys. Tiles are then sorted by size and packed into chunks of at most
    ``chunk_size`` padded (query, key) entries, each with a ``[T, G, U]`` mask of the pairs
    inside each query's own windows.

    Args:
        index: coordinate index of the map.
        query_batch: int64 ``[Q]`` batch item of each query.
        positions: float ``[Q, D]`` in the frame of ``position_shapes``.
        position_shapes: ``[Q, D]`` (or ``[D]``) shape of each query's frame.
        neighborhood_sizes: validated odd sizes, one per level.
        with_background: also record each query's absent in-bounds window slots.
        chunk_size: bound on padded (query, key) entries per chunk (the kernel's buffers are
            ``n_heads`` times that).
        tile_queries: most queries per tile.
        cells_per_chunk: bound on window cells looked up at once (memory of the lookup).
        compact_rows: renumber key rows to the voxels some tile uses (``voxel_rows``).
    """
    device = positions.device
    shapes = index.level_spatial_shapes.to(device)
    n_levels, dim = shapes.shape
    sizes = list(neighborhood_sizes)
    offsets, slot_level = window_offsets(sizes, dim, device=device)
    centres = window_centres(positions, position_shapes, shapes)  # [Q, L, D]
    n_q = positions.shape[0]
    radius = torch.tensor([(s - 1) // 2 for s in sizes], dtype=torch.int64, device=device)
    query_batch = query_batch.to(device=device, dtype=torch.int64)
    coarse, fine = int(torch.argmin(shapes.prod(-1))), int(torch.argmax(shapes.prod(-1)))
    full_shape = shapes[fine]

    # --- tiles: (batch, coarsest centre), spatially sorted, split into pieces ---------------
    tile_key = _clamped_linear_key(query_batch, centres[:, coarse], shapes[coarse])
    fine_key = _clamped_linear_key(torch.zeros_like(query_batch), centres[:, fine], shapes[fine])
    order = _lexsort(tile_key, fine_key).to(device)
    tk = tile_key[order]
    new_tile = torch.ones(n_q, dtype=torch.bool, device=device)
    new_tile[1:] = tk[1:] != tk[:-1]
    tile_id = torch.cumsum(new_tile, 0) - 1
    tile_start = new_tile.nonzero().squeeze(1)
    tile_size = torch.diff(tile_start, append=torch.tensor([n_q], device=device))
    rank = torch.arange(n_q, device=device) - tile_start[tile_id]
    tile_pieces = (tile_size + tile_queries - 1) // tile_queries
    piece = (torch.cumsum(tile_pieces, 0) - tile_pieces)[tile_id] + rank * tile_pieces[tile_id] // tile_size[tile_id]
    n_pieces = int(tile_pieces.sum()) if n_q else 0
    piece_size = torch.bincount(piece, minlength=n_pieces)
    piece_qstart = torch.cumsum(piece_size, 0) - piece_size
    piece_batch = query_batch[order][piece_qstart]

    # --- union box of each piece's windows at each level ------------------------------------
    c_sorted = centres[order].view(n_q, n_levels * dim)
    idx = piece[:, None].expand_as(c_sorted)
    lo = c_sorted.new_zeros(n_pieces, n_levels * dim).scatter_reduce_(0, idx, c_sorted, "amin", include_self=False)
    hi = c_sorted.new_zeros(n_pieces, n_levels * dim).scatter_reduce_(0, idx, c_sorted, "amax", include_self=False)
    r = radius[None, :, None]
    box_lo = torch.maximum(lo.view(-1, n_levels, dim) - r, torch.zeros((), dtype=torch.int64, device=device))
    box_hi = torch.minimum(hi.view(-1, n_levels, dim) + r, shapes[None] - 1)
    ext = (box_hi - box_lo + 1).clamp_min(0).view(-1, dim)  # [P * L, D]
    box_lo = box_lo.reshape(-1, dim)
    n_cells = ext.prod(-1)  # [P * L] piece-major, then level
    cum = torch.cumsum(n_cells, 0)

    # --- look the boxes up (bounded number of cells at a time) ------------------------------
    k_piece, k_row, k_level, k_cell = [], [], [], []
    cum_cpu = cum.cpu()
    o0, n_owner = 0, n_cells.shape[0]
    while o0 < n_owner:
        base = int(cum_cpu[o0 - 1]) if o0 else 0
        o1 = int(torch.searchsorted(cum_cpu, torch.tensor(base + cells_per_chunk), right=True))
        o1 = min(max(o1, o0 + 1), n_owner)
        cnt = n_cells[o0:o1]
        total = int(cum_cpu[o1 - 1]) - base
        if total:
            owner = torch.repeat_interleave(torch.arange(o0, o1, device=device), cnt, output_size=total)
            local = torch.arange(total, device=device) - (cum[owner] - n_cells[owner] - base)
            e = ext[owner]
            cells = torch.empty(total, dim, dtype=torch.int64, device=device)
            for axis in range(dim - 1, -1, -1):
                cells[:, axis] = local % e[:, axis]
                local = local // e[:, axis]
            cells += box_lo[owner]
            lvl, pc = owner % n_levels, owner // n_levels
            rows, found = index.lookup(piece_batch[pc], lvl, cells)
            k_piece.append(pc[found])
            k_row.append(rows[found])
            k_level.append(lvl[found])
            k_cell.append(cells[found])
        o0 = o1
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    k_piece = torch.cat(k_piece) if k_piece else empty
    k_row = torch.cat(k_row) if k_row else empty
    k_level = torch.cat(k_level) if k_level else empty
    k_cell = torch.cat(k_cell) if k_cell else empty.view(0, dim)

    n_keys, voxel_rows = index.n_voxels, None
    if compact_rows:
        used = torch.zeros(index.n_voxels, dtype=torch.bool, device=device)
        used[k_row] = True
        n_used = int(used.sum())
        if n_used < index.n_voxels:
            voxel_rows = used.nonzero().squeeze(1)
            k_row = (torch.cumsum(used, 0) - 1)[k_row]
            n_keys = n_used
    piece_nkeys = torch.bincount(k_piece, minlength=n_pieces)
    piece_kstart = torch.cumsum(piece_nkeys, 0) - piece_nkeys

    # --- pack pieces into chunks: sorted by (padded size class, keys) -----------------------
    classes = _size_classes(tile_queries).to(device)
    g_cls = classes[torch.searchsorted(classes, piece_size)]
    p_order = _lexsort(g_cls.cpu(), piece_nkeys.cpu()).tolist()
    g_list, u_list, gc_list = piece_size.tolist(), piece_nkeys.tolist(), g_cls.tolist()
    groups, cur, cur_g, cur_u, real = [], [], 0, 0, 0
    for p in p_order:
        if u_list[p] == 0 and not with_background:
            continue  # no key at all: the output row stays zero
        g, u = gc_list[p], max(u_list[p], 1)
        new_g, new_u = max(cur_g, g), max(cur_u, u)
        padded = (len(cur) + 1) * new_g * new_u
        work = real + g_list[p] * u
        if cur and (padded > chunk_size or (padded > 1.3 * work and real * 8 > chunk_size)):
            groups.append((cur, cur_g, cur_u))
            cur, cur_g, cur_u, real = [], 0, 0, 0
            new_g, new_u, work = g, u, g_list[p] * u
        cur.append(p)
        cur_g, cur_u, real = new_g, new_u, work
    if cur:
        groups.append((cur, cur_g, cur_u))

    size_l = torch.tensor(sizes, dtype=torch.int64, device=device)
    slot_start = torch.cumsum(size_l**dim, 0) - size_l**dim
    order_pad = torch.cat([order, torch.tensor([n_q], device=device)])
    pair_counts = torch.zeros(n_q + 1, dtype=torch.int64, device=device)
    bg_counts = torch.zeros(n_q + 1, dtype=torch.int64, device=device) if with_background else None
    chunks = []
    n_entries = k_row.shape[0]
    for pieces, G, U in groups:
        pcs = torch.tensor(pieces, dtype=torch.int64, device=device)
        T = pcs.shape[0]
        gi = torch.arange(G, device=device)
        q_valid = gi[None] < piece_size[pcs][:, None]  # [T, G]
        query = order_pad[torch.where(q_valid, piece_qstart[pcs][:, None] + gi[None], n_q)]
        ui = torch.arange(U, device=device)
        k_valid = ui[None] < piece_nkeys[pcs][:, None]  # [T, U]
        kp = (piece_kstart[pcs][:, None] + ui[None]).clamp_max(max(n_entries - 1, 0))
        if n_entries:
            key = torch.where(k_valid, k_row[kp], n_keys)
            klev, kcell = k_level[kp], k_cell[kp]  # [T, U], [T, U, D]
        else:
            key = torch.full((T, U), n_keys, dtype=torch.int64, device=device)
            klev, kcell = torch.zeros_like(key), torch.zeros(T, U, dim, dtype=torch.int64, device=device)
        q_gather = query.clamp_max(max(n_q - 1, 0))
        cq = centres[q_gather]  # [T, G, L, D]
        # centre of query g at the level of key u: gather from [T, G, L * D]
        sel = (klev[:, None, :, None] * dim + torch.arange(dim, device=device)).expand(T, G, U, dim)
        csel = cq.reshape(T, G, -1).gather(2, sel.reshape(T, G, -1)).view(T, G, U, dim)
        rel = kcell[:, None] - csel + radius[klev][:, None, :, None]  # offset + radius, [T, G, U, D]
        allowed = ((rel >= 0) & (rel <= 2 * radius[klev][:, None, :, None])).all(-1)
        allowed &= q_valid[:, :, None] & k_valid[:, None, :]
        pair_counts.index_add_(0, query.reshape(-1), allowed.sum(-1).reshape(-1))
        bg_valid = None
        if with_background:
            cells = cq[:, :, slot_level] + offsets  # [T, G, K, D]
            inside = ((cells >= 0) & (cells < shapes[slot_level])).all(-1)
            inside &= q_valid[..., None]
            t, g, u = allowed.nonzero(as_tuple=True)
            lev = klev[t, u]
            rr = rel[t, g, u]  # [n, D] in [0, size)
            slot = torch.zeros_like(lev)
            for axis in range(dim):
                slot = slot * size_l[lev] + rr[:, axis]
            present = torch.zeros_like(inside)
            present[t, g, slot_start[lev] + slot] = True
            bg_valid = inside & ~present
            bg_counts.index_add_(0, query.reshape(-1), bg_valid.sum(-1).reshape(-1))
        chunks.append(
            PlanChunk(
                query=query,
                key=key,
                query_gather=q_gather.reshape(-1),
                key_gather=key.clamp_max(max(n_keys - 1, 0)).reshape(-1),
                masked=~allowed,
                bg_masked=None if bg_valid is None else ~bg_valid.view(1, T * G, -1),
            )
        )
    return NeighborhoodPlan(
        n_queries=n_q,
        batch_size=index.batch_size,
        with_background=with_background,
        query_batch=query_batch,
        centres=centres,
        slot_level=slot_level,
        slot_offset=offsets,
        level_spatial_shapes=shapes,
        full_shape=full_shape,
        n_keys=n_keys,
        voxel_rows=voxel_rows,
        chunks=chunks,
        pair_counts=pair_counts[:n_q],
        background_counts=bg_counts[:n_q] if with_background else None,
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
def background_scores(q: Tensor, kb: Tensor, freqs: Tensor, centres: Tensor, plan: NeighborhoodPlan, scale: float) -> Tensor:
    """Scores ``[H, n, K]`` (head-major) of queries against the background key of every window slot.

    Args:
        q: ``[n, H, d]`` rotated queries.
        kb: ``[n, L, H, d]`` unrotated background key of each query's batch item and level.
        freqs: ``[H', d/2, D+1]`` RoPE frequencies.
        centres: int64 ``[n, L, D]`` window centres of the queries.

    The background key of an absent cell ``u`` is ``R(u) kb[l]``. With split-half pairs as
    complex numbers and ``u = u_centre + u_offset`` (window centre cell, slot offset),
    ``<q, R(u) k> = Re sum_j q_j conj(k_j) e^{-i theta_j(u_centre)} e^{-i theta_j(u_offset)}``:
    one ``[n, d] x [d, K_l]`` matmul per head and level, no per-(query, slot) key.
    Differentiable (autograd) w.r.t. ``q``, ``kb`` and ``freqs``.
    """
    n, n_heads, head_dim = q.shape
    half = head_dim // 2
    n_levels = plan.n_levels
    q1, q2 = q[:, None, :, :half], q[:, None, :, half:]  # [n, 1, H, d/2]
    k1, k2 = kb[..., :half], kb[..., half:]  # [n, L, H, d/2]
    pr, pi = q1 * k1 + q2 * k2, q2 * k1 - q1 * k2  # q conj(k)
    full = plan.full_shape.to(torch.float64)
    shapes = plan.level_spatial_shapes.to(torch.float64)
    lvl = torch.arange(n_levels, dtype=torch.float64, device=q.device)
    u_c = torch.cat([(centres.to(torch.float64) + 0.5) / shapes * full, lvl[None, :, None].expand(n, -1, 1)], -1)
    cos_c, sin_c = rope_cos_sin(rope_angles(u_c, freqs), q.dtype)  # [n, L, H', d/2]
    w = torch.cat([pr * cos_c + pi * sin_c, pi * cos_c - pr * sin_c], -1)  # [n, L, H, d]
    off = plan.slot_offset.to(torch.float64) / shapes[plan.slot_level] * full
    th_o = rope_angles(torch.cat([off, torch.zeros_like(off[:, :1])], 1), freqs)  # [K, H', d/2]
    cos_o, sin_o = rope_cos_sin(th_o, q.dtype)
    e = torch.cat([cos_o, sin_o], -1).expand(-1, n_heads, -1)  # [K, H, d]
    out = []
    for level in range(n_levels):
        sel = (plan.slot_level == level).nonzero().squeeze(1)
        out.append(torch.einsum("nhj,khj->hnk", w[:, level], e.index_select(0, sel)))
    return torch.cat(out, -1).mul_(scale)


def _level_sums(a_bg: Tensor, slot_level: Tensor, n_levels: int) -> Tensor:
    """Sum ``[H, n, K]`` over the slots of each level: ``[H, n, L]``."""
    return torch.zeros(*a_bg.shape[:2], n_levels, dtype=a_bg.dtype, device=a_bg.device).index_add_(2, slot_level, a_bg)


def default_chunk_size(n_heads: int) -> int:
    """Padded (query, key) entries per chunk: the ``[H, T, G, U]`` score buffers stay near
    2 MiB in float32 (reused by the allocator instead of fresh, page-faulting mappings)."""
    return max(1 << 12, (1 << 19) // max(n_heads, 1))


def _head_major(x: Tensor) -> Tensor:
    """``[N, H, d]`` -> contiguous ``[H, N, d]`` (at least one row: gathers of an empty key set
    read a masked-out zero row)."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1], 1, x.shape[2])
    return x.transpose(0, 1).contiguous()


def _key_major(x: Tensor) -> Tensor:
    """``[H, T, U, d]`` -> contiguous ``[T * U, H, d]`` (``index_add_`` is several times faster
    from a contiguous source)."""
    return x.permute(1, 2, 0, 3).contiguous().view(-1, x.shape[0], x.shape[3])


class NeighborhoodAttentionFunction(torch.autograd.Function):
    """Softmax attention of each query over its window keys, with a recomputing backward.

    Inputs: rotated queries ``q [Q, H, d]``, rotated voxel keys ``k [n_keys, H, d]``, values
    ``v [n_keys, H, d]``, unrotated background keys/values ``bg_k, bg_v [B, L, H, d]`` (or
    None), the RoPE frequencies ``freqs [H', d/2, D+1]`` (background keys only), the plan and
    the score scale. Output ``[Q, H, d]`` (zero for queries without keys).

    Per chunk of tiles (:class:`PlanChunk`): the tiles' queries and keys are gathered
    head-major into ``[H, T, G, d]`` / ``[H, T, U, d]`` blocks, scores by one batched matmul,
    masked to each query's windows, softmax (jointly with the background slots scored by
    :func:`background_scores`), then one batched matmul with the values. The backward
    recomputes the scores chunk by chunk (flash-attention style, from a saved ``[H, Q]``
    log-sum-exp) and scatters key/value gradients with ``index_add_``. Saved: ``q, k, v,
    bg_k, bg_v, freqs``, the output, the log-sum-exp and the plan's integer indices; no
    ``[pairs, embed_dim]`` tensor is kept, and the per-chunk buffers are bounded by the plan's
    chunk size.
    """

    @staticmethod
    def forward(ctx, q, k, v, bg_k, bg_v, freqs, plan: NeighborhoodPlan, scale: float):
        n_q, n_heads, head_dim = q.shape
        with_bg = bg_k is not None
        neg_inf = float("-inf")
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        q_h, k_h, v_h = _head_major(q * scale), _head_major(k), _head_major(v)  # [H, N, d]
        out_h = q.new_zeros(n_heads, n_q + 1, head_dim)  # last row: padding sink
        lse_h = q.new_zeros(n_heads, n_q + 1)
        for c in plan.chunks:
            T, G, U = c.shape
            n = T * G
            qp = q_h.index_select(1, c.query_gather).view(n_heads, T, G, head_dim)
            kp = k_h.index_select(1, c.key_gather).view(n_heads, T, U, head_dim)
            s = torch.matmul(qp, kp.transpose(-1, -2)).masked_fill_(c.masked, neg_inf)  # [H, T, G, U]
            del qp, kp
            m = s.amax(-1)  # [H, T, G]
            if with_bg:
                batch = plan.query_batch.index_select(0, c.query_gather)
                s_bg = background_scores(
                    q.index_select(0, c.query_gather), bg_k.index_select(0, batch), freqs,
                    plan.centres.index_select(0, c.query_gather), plan, scale,
                ).masked_fill_(c.bg_masked, neg_inf)  # [H, n, K]
                m = torch.maximum(m, s_bg.amax(-1).view(n_heads, T, G))
            m = torch.where(m > neg_inf, m, zero)
            s.sub_(m[..., None]).exp_()
            z = s.sum(-1)  # [H, T, G]
            o = torch.matmul(s, v_h.index_select(1, c.key_gather).view(n_heads, T, U, head_dim))  # [H, T, G, d]
            del s
            if with_bg:
                s_bg.sub_(m.view(n_heads, n, 1)).exp_()
                z += s_bg.sum(-1).view(n_heads, T, G)
                a_l = _level_sums(s_bg, plan.slot_level, plan.n_levels)  # [H, n, L]
                o += torch.einsum("hnl,nlhd->hnd", a_l, bg_v.index_select(0, batch)).view(n_heads, T, G, head_dim)
            has = z > 0
            o *= torch.where(has, 1.0 / z, zero)[..., None]
            rows = c.query.view(-1)
            out_h.index_copy_(1, rows, o.view(n_heads, n, head_dim))
            lse_h.index_copy_(1, rows, torch.where(has, m + torch.log(z), zero).view(n_heads, n))
        out = out_h[:, :n_q].transpose(0, 1).contiguous()
        lse_h = lse_h[:, :n_q].contiguous()
        ctx.save_for_backward(q, k, v, bg_k, bg_v, freqs, out, lse_h)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bg_k, bg_v, freqs, out, lse_h = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        need_q, need_k, need_v, need_bk, need_bv, need_f = ctx.needs_input_grad[:6]
        with_bg = bg_k is not None
        n_q, n_heads, head_dim = q.shape
        neg_inf = float("-inf")
        g = grad_out.contiguous()
        delta_h = torch.einsum("qhd,qhd->hq", g, out).contiguous()  # [H, Q] = sum over keys of a <g, v>
        q_h, k_h, v_h, g_h = _head_major(q * scale), _head_major(k), _head_major(v), _head_major(g)
        dq_h = q.new_zeros(n_heads, n_q + 1, head_dim)
        dk = k.new_zeros(plan.n_keys + 1, n_heads, head_dim)
        dv = v.new_zeros(plan.n_keys + 1, n_heads, head_dim)
        dbk = torch.zeros_like(bg_k) if (with_bg and need_bk) else None
        dbv = torch.zeros_like(bg_v) if (with_bg and need_bv) else None
        dfreqs = torch.zeros_like(freqs) if (with_bg and need_f) else None
        for c in plan.chunks:
            T, G, U = c.shape
            n = T * G
            qi = c.query_gather
            qp = q_h.index_select(1, qi).view(n_heads, T, G, head_dim)
            gp = g_h.index_select(1, qi).view(n_heads, T, G, head_dim)
            kp = k_h.index_select(1, c.key_gather).view(n_heads, T, U, head_dim)
            vp = v_h.index_select(1, c.key_gather).view(n_heads, T, U, head_dim)
            lp = lse_h.index_select(1, qi).view(n_heads, T, G, 1)
            dp = delta_h.index_select(1, qi).view(n_heads, T, G, 1)
            a = torch.matmul(qp, kp.transpose(-1, -2)).masked_fill_(c.masked, neg_inf).sub_(lp).exp_()  # [H, T, G, U]
            ds = torch.matmul(gp, vp.transpose(-1, -2)).sub_(dp).mul_(a)  # [H, T, G, U]
            del vp
            keys = c.key.view(-1)
            if need_v:
                dv.index_add_(0, keys, _key_major(torch.matmul(a.transpose(-1, -2), gp)))
            del a
            if need_k:
                dk.index_add_(0, keys, _key_major(torch.matmul(ds.transpose(-1, -2), qp)))
            dq_c = torch.matmul(ds, kp).mul_(scale).view(n_heads, n, head_dim)
            del ds, qp, kp
            if with_bg:
                batch = plan.query_batch.index_select(0, qi)
                gq = gp.view(n_heads, n, head_dim)
                with torch.enable_grad():
                    leaves = [
                        q.index_select(0, qi).detach().requires_grad_(need_q),
                        bg_k.index_select(0, batch).detach().requires_grad_(need_bk),
                        freqs.detach().requires_grad_(need_f),
                    ]
                    s_bg = background_scores(leaves[0], leaves[1], leaves[2], plan.centres.index_select(0, qi), plan, scale)
                with torch.no_grad():
                    a_bg = s_bg.detach().masked_fill(c.bg_masked, neg_inf).sub_(lp.view(n_heads, n, 1)).exp_()  # [H, n, K]
                    gv = torch.einsum("hnd,nlhd->hnl", gq, bg_v.index_select(0, batch))  # <g, bg_v> per level
                    ds_bg = (gv[..., plan.slot_level] - dp.view(n_heads, n, 1)).mul_(a_bg)
                    if need_bv:
                        a_l = _level_sums(a_bg, plan.slot_level, plan.n_levels)
                        dbv.index_add_(0, batch, torch.einsum("hnl,hnd->nlhd", a_l, gq))
                    del a_bg
                wanted = [t for t in leaves if t.requires_grad]
                if wanted:
                    grads = iter(torch.autograd.grad(s_bg, wanted, ds_bg))
                    if need_q:
                        dq_c += next(grads).transpose(0, 1)
                    if need_bk:
                        dbk.index_add_(0, batch, next(grads))
                    if need_f:
                        dfreqs += next(grads)
            dq_h.index_copy_(1, c.query.view(-1), dq_c)
        dq = dq_h[:, :n_q].transpose(0, 1).contiguous() if need_q else None
        dk = dk[: plan.n_keys] if need_k else None
        dv = dv[: plan.n_keys] if need_v else None
        return dq, dk, dv, dbk, dbv, dfreqs, None, None


def sparse_neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: NeighborhoodPlan,
    background_k: Optional[Tensor] = None,
    background_v: Optional[Tensor] = None,
    rope_freqs: Optional[Tensor] = None,
) -> Tensor:
    """Multi-head attention of each query over the keys of its plan (one softmax per query).

    Args:
        q: ``[Q, H, d]`` queries, already rotated at the queries' positions.
        k: ``[n_keys, H, d]`` keys of the plan's voxels (rows as in ``plan.voxel_rows``),
            already rotated at the voxels' positions (:func:`voxel_rope_positions`).
        v: ``[n_keys, H, d]`` values.
        plan: from :func:`build_neighborhood_plan` (its chunk size bounds the buffers).
        background_k, background_v: ``[B, L, H, d]`` projected (unrotated) background
            key/value of each batch item and level; required iff ``plan.with_background``.
            A background key acts rotated at the absent cell's own position.
        rope_freqs: ``[H or 1, d / 2, D + 1]`` frequencies; required with background.

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
    scale = q.shape[-1] ** -0.5
    return NeighborhoodAttentionFunction.apply(q, k, v, background_k, background_v, rope_freqs, plan, scale)
