"""Tiled pair plans of the neighborhood attention: which keys each query attends to.

Queries are grouped into tiles (same batch item and same window centre at the coarsest level, at
most ``tile_queries``, :data:`~sparse_msda.tuning.TILE_QUERIES`); a tile's keys are the voxels
present in the union of its queries' windows (:mod:`sparse_msda.functional.windows`), looked up
once per tile through the coordinate index (:func:`build_neighborhood_plan`). The plan holds
integer bookkeeping only and depends on coordinates and positions, not on features: an encoder
builds it once per forward and shares it across layers.

The backends read it in two forms: the C++ kernel the tiles as they are
(:meth:`NeighborhoodPlan.kernel_tiles`), the reference backend the tiles padded and packed into
chunks of at most ``chunk_size`` padded (query, key) entries (:attr:`NeighborhoodPlan.chunks`,
:func:`_pack_chunks`, built on first use). The positions of the window centres and slot offsets
and the background keys rotated at the offsets (:func:`background_tables`) are derived from it
here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from adapters import SparseCoordinateIndex
from adapters.validation import check_index_range, check_integer_tensor

from .. import tuning
from .cpu_kernels import neighborhood_kernels
from .rope import rope_angles, rope_cos_sin, rotate_pairs
from .windows import CENTRE_LIMIT, check_finite_positions, check_neighborhood_sizes, window_centres, window_offsets

__all__ = [
    "NeighborhoodPlan",
    "NeighborhoodTiles",
    "PlanChunk",
    "background_tables",
    "build_neighborhood_plan",
    "default_chunk_size",
]


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
    query_pos: Tensor  # int64 [n] positions in [0, T * G) that hold a query (not padding)
    query_rows: Tensor  # int64 [n] the query ids at those positions
    key_gather: Tensor  # int64 [T * U] key rows clamped into range (for gathers)
    masked: Tensor  # bool [T, G, U] True where query g must not see key u
    bg_masked: Optional[Tensor]  # bool [1, n, K] (real queries, as query_pos) True where a slot is no background key
    batch: int  # the batch item of all the chunk's queries (with background), else -1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.masked.shape)


@dataclass
class NeighborhoodTiles:
    """The plan's tiles as flat lists: tile ``p`` holds the queries
    ``query_order[query_start[p] : query_start[p] + query_count[p]]`` (one batch item,
    ``batch[p]``) and the key entries ``key_start[p] : key_start[p] + key_count[p]``: the
    voxels present in the union of its queries' windows, with their key row (as in
    ``NeighborhoodPlan.voxel_rows``). The level and cell (in that level's grid) of a key are
    held once per key row (``row_level``, ``row_cell``; views of the index's own tensors when
    the rows are not compacted), not per entry: an entry's are ``key_level`` / ``key_cell``.
    A query sees an entry iff the cell lies in its own window at the entry's level."""

    query_order: Tensor  # int64 [Q] query ids, grouped by tile
    query_start: Tensor  # int64 [P]
    query_count: Tensor  # int64 [P]
    batch: Tensor  # int64 [P]
    key_start: Tensor  # int64 [P]
    key_count: Tensor  # int64 [P]
    key_row: Tensor  # int64 [E]
    row_level: Tensor  # int64 [n_keys] level of each key row
    row_cell: Tensor  # int64 [n_keys, D] cell of each key row in its level's grid

    @property
    def n_tiles(self) -> int:
        return self.query_count.shape[0]

    @property
    def key_level(self) -> Tensor:
        """int64 ``[E]`` level of each entry (gathered on each call)."""
        return self.row_level.index_select(0, self.key_row)

    @property
    def key_cell(self) -> Tensor:
        """int64 ``[E, D]`` cell of each entry (gathered on each call)."""
        return self.row_cell.index_select(0, self.key_row)


@dataclass
class NeighborhoodPlan:
    """Which keys each query attends to: tiles of queries with the voxels of their windows
    (integer bookkeeping only).

    Every query sits in exactly one tile (:class:`NeighborhoodTiles`). Key rows index the
    compacted voxel list ``voxel_rows`` (or the index rows if None). With ``with_background``
    each query also attends to the in-bounds window slots that hold no voxel, scored against
    the background key of the slot's level.

    The fused CPU kernel reads the tiles directly. The PyTorch path packs them into padded
    chunks (:attr:`chunks`, built on first use); ``pair_counts`` / ``background_counts``
    come from the kernel's window enumeration where it is available, else from the packing.
    """

    n_queries: int
    batch_size: int
    with_background: bool
    query_batch: Tensor  # int64 [Q]
    centres: Tensor  # int64 [Q, L, D]
    slot_level: Tensor  # int64 [K]
    slot_offset: Tensor  # int64 [K, D]
    slot_ranges: list  # [(k0, k1)] slots of each level
    level_spatial_shapes: Tensor  # int64 [L, D]
    full_shape: Tensor  # int64 [D]
    neighborhood_sizes: list  # one odd size per level
    n_keys: int  # number of voxel keys the rows refer to
    voxel_rows: Optional[Tensor]  # int64 [n_keys] index rows of the keys, None = all rows in order
    tiles: NeighborhoodTiles
    chunk_size: int  # bound on padded (query, key) entries per chunk (PyTorch path)
    tile_queries: int  # most queries per tile
    _chunks: Optional[list] = field(default=None, repr=False)
    _counts: Optional[tuple] = field(default=None, repr=False)
    _kernel_tiles: Optional[list] = field(default=None, repr=False)
    index: Optional[SparseCoordinateIndex] = field(default=None, repr=False)  # the index the rows refer to

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    @property
    def chunks(self) -> list:
        """The tiles padded and packed into chunks (:class:`PlanChunk`) for the PyTorch path;
        queries without any key are in none."""
        if self._chunks is None:
            self._chunks, counts = _pack_chunks(self)
            if self._counts is None:
                self._counts = counts
        return self._chunks

    def _window_counts(self) -> tuple:
        if self._counts is None:
            kernels = neighborhood_kernels() if self.centres.device.type == "cpu" else None
            if kernels is not None:  # the kernel's window enumeration (kernel_tiles) counts them
                pairs, bg = self.kernel_tiles()[15]
                self._counts = (pairs, bg if self.with_background else None)
            else:
                self._chunks, self._counts = _pack_chunks(self)
        return self._counts

    @property
    def pair_counts(self) -> Tensor:
        """int64 ``[Q]``: voxel keys of each query."""
        return self._window_counts()[0]

    @property
    def background_counts(self) -> Optional[Tensor]:
        """int64 ``[Q]``: background slots (absent in-bounds window cells) of each query, or None."""
        return self._window_counts()[1]

    @property
    def n_pairs(self) -> int:
        """Number of (query, voxel key) pairs."""
        return int(self.pair_counts.sum())

    @property
    def n_padded_pairs(self) -> int:
        """Number of (query, key) score entries computed per head by the PyTorch path (with padding)."""
        return sum(c.masked.numel() for c in self.chunks)

    def has_keys(self) -> Tensor:
        """bool ``[Q]``: the query attends to at least one key (a voxel, or with background
        any in-bounds window cell)."""
        has = self.pair_counts > 0
        if self.background_counts is not None:
            has = has | (self.background_counts > 0)
        return has

    def kernel_tiles(self) -> list:
        """The 16 contiguous tensors the CPU kernel reads (see
        ``csrc/neighborhood_attention_cpu.cpp``): 13 int64 of the tiles, then the windows the
        kernel enumerates from them once per plan (``neighborhood_windows``: int32 key bits
        ``[E, W]``, background slot bits ``[Q, SW]``, int64 counts ``[2, Q]``), which every
        forward and backward on the plan reuses; built once (needs the compiled kernel)."""
        if self._kernel_tiles is None:
            t, dev = self.tiles, self.centres.device
            end = lambda n: torch.tensor([n], dtype=torch.int64, device=dev)  # noqa: E731
            radius = torch.tensor([(s - 1) // 2 for s in self.neighborhood_sizes], dtype=torch.int64, device=dev)
            slot_start = torch.tensor([a for a, _ in self.slot_ranges], dtype=torch.int64, device=dev)
            self._kernel_tiles = [
                x.contiguous()
                for x in (
                    torch.cat([t.query_start, end(self.n_queries)]), t.query_order,
                    torch.cat([t.key_start, end(t.key_row.shape[0])]), t.key_row, t.row_level, t.row_cell, t.batch,
                    self.centres, self.level_spatial_shapes, radius, slot_start, self.slot_offset, self.slot_level,
                )
            ]
            windows = neighborhood_kernels(auto=False).neighborhood_windows(
                self._kernel_tiles, self.with_background, torch.get_num_threads()
            )
            self._kernel_tiles += list(windows)
        return self._kernel_tiles


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
    """Padded tile sizes 1, 2, ..., 8, 10, 12, ... up to ``limit`` (inclusive)."""
    return torch.tensor(sorted({*range(1, min(limit, 8) + 1), *range(8, limit + 1, 2), limit}), dtype=torch.int64)


def build_neighborhood_plan(
    index: SparseCoordinateIndex,
    query_batch: Tensor,
    positions: Tensor,
    position_shapes: Tensor,
    neighborhood_sizes: Sequence[int],
    with_background: bool,
    chunk_size: int = 1 << 18,
    tile_queries: int = tuning.TILE_QUERIES,
    cells_per_chunk: int = tuning.LOOKUP_CELLS_PER_CHUNK,
    compact_rows: bool = True,
) -> NeighborhoodPlan:
    """Group queries into tiles and look up each tile's window cells through the index.

    Tiles: queries sharing (batch item, window centre at the coarsest level), sorted by their
    finest-level centre and split into pieces of at most ``tile_queries``. At every level the
    union of a tile's windows is a box (its queries' centres spread over a few cells); every
    cell of the box is looked up once per tile (``index.lookup``), the present voxels are the
    tile's keys. The fused CPU kernel reads the tiles as they are; the PyTorch path packs
    them (on first use of ``plan.chunks``) into chunks of at most ``chunk_size`` padded
    (query, key) entries, each with a ``[T, G, U]`` mask of the pairs inside each query's own
    windows.

    Args:
        index: coordinate index of the map.
        query_batch: int64 ``[Q]`` batch item of each query.
        positions: float ``[Q, D]`` in the frame of ``position_shapes``.
        position_shapes: ``[Q, D]`` (or ``[D]``) shape of each query's frame.
        neighborhood_sizes: validated odd sizes, one per level.
        with_background: also record each query's absent in-bounds window slots.
        chunk_size: bound on padded (query, key) entries per chunk of the PyTorch path (its
            buffers are ``n_heads`` times that).
        tile_queries: most queries per tile.
        cells_per_chunk: bound on window cells looked up at once (memory of the lookup).
        compact_rows: renumber key rows to the voxels some tile uses (``voxel_rows``).
    """
    if not isinstance(index, SparseCoordinateIndex):
        raise TypeError(f"index must be a SparseCoordinateIndex, got {type(index).__name__}")
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError(f"positions must be a floating-point tensor, got {getattr(positions, 'dtype', type(positions).__name__)}")
    n_levels, dim = index.level_spatial_shapes.shape
    if positions.ndim != 2 or positions.shape[1] != dim:
        raise ValueError(f"positions must have shape [n_queries, {dim}], got positions.shape={tuple(positions.shape)}")
    check_finite_positions("positions", positions)
    check_integer_tensor("query_batch", query_batch)
    if query_batch.shape != (positions.shape[0],):
        raise ValueError(f"query_batch must have shape [{positions.shape[0]}], got query_batch.shape={tuple(query_batch.shape)}")
    check_index_range("query_batch", query_batch, index.batch_size)  # indexes the background tables
    sizes = check_neighborhood_sizes(neighborhood_sizes, n_levels)
    if not isinstance(tile_queries, int) or tile_queries < 1:
        raise ValueError(f"tile_queries must be a positive int, got {tile_queries=}")
    device = positions.device
    shapes = index.level_spatial_shapes.to(device)
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
    # a query none of whose windows reaches into its level's grid (e.g. a huge position) sees no
    # cell: it does not widen its piece's box (its neighbours' keys stay exactly theirs)
    c_sorted = centres[order].reshape(n_q, n_levels * dim)
    r_all = radius[None, :, None]
    reach = ((centres + r_all >= 0) & (centres - r_all < shapes[None])).all(-1).any(-1)[order]  # [Q]
    far = 2 * int(CENTRE_LIMIT)
    idx = piece[:, None].expand_as(c_sorted)
    c_lo = torch.where(reach[:, None], c_sorted, far)
    c_hi = torch.where(reach[:, None], c_sorted, -far)
    lo = c_sorted.new_zeros(n_pieces, n_levels * dim).scatter_reduce_(0, idx, c_lo, "amin", include_self=False)
    hi = c_sorted.new_zeros(n_pieces, n_levels * dim).scatter_reduce_(0, idx, c_hi, "amax", include_self=False)
    r = radius[None, :, None]
    box_lo = torch.maximum(lo.view(-1, n_levels, dim) - r, torch.zeros((), dtype=torch.int64, device=device))
    box_hi = torch.minimum(hi.view(-1, n_levels, dim) + r, shapes[None] - 1)
    ext = (box_hi - box_lo + 1).clamp_min(0).view(-1, dim)  # [P * L, D]
    box_lo = box_lo.reshape(-1, dim)
    # --- look the boxes up through the index (bounded number of cells at a time) -----------
    # owner o = piece * n_levels + level; the index enumerates each box's cells in row-major order
    owner_piece = torch.arange(n_pieces, device=device).repeat_interleave(n_levels)
    owner_level = torch.arange(n_levels, device=device).repeat(n_pieces)
    owner, k_row = index.lookup_boxes(piece_batch[owner_piece], owner_level, box_lo, ext, cells_per_chunk=cells_per_chunk)
    k_piece = owner // n_levels
    del owner

    n_keys, voxel_rows = index.n_voxels, None
    row_level, row_cell = index.level_indices.to(device), index.spatial_indices.to(device)
    if compact_rows:
        used = torch.zeros(index.n_voxels, dtype=torch.bool, device=device)
        used[k_row] = True
        n_used = int(used.sum())
        if n_used < index.n_voxels:
            voxel_rows = used.nonzero().squeeze(1)
            k_row = (torch.cumsum(used, 0) - 1)[k_row]
            n_keys = n_used
            row_level, row_cell = row_level.index_select(0, voxel_rows), row_cell.index_select(0, voxel_rows)
    piece_nkeys = torch.bincount(k_piece, minlength=n_pieces)
    piece_kstart = torch.cumsum(piece_nkeys, 0) - piece_nkeys


    size_l = torch.tensor(sizes, dtype=torch.int64)
    slot_start = torch.cumsum(size_l**dim, 0) - size_l**dim
    return NeighborhoodPlan(
        n_queries=n_q,
        batch_size=index.batch_size,
        with_background=with_background,
        query_batch=query_batch,
        centres=centres,
        slot_level=slot_level,
        slot_offset=offsets,
        slot_ranges=[(int(a), int(a + n)) for a, n in zip(slot_start.tolist(), (size_l**dim).tolist())],
        level_spatial_shapes=shapes,
        full_shape=full_shape,
        neighborhood_sizes=sizes,
        n_keys=n_keys,
        voxel_rows=voxel_rows,
        tiles=NeighborhoodTiles(
            query_order=order, query_start=piece_qstart, query_count=piece_size, batch=piece_batch,
            key_start=piece_kstart, key_count=piece_nkeys, key_row=k_row, row_level=row_level, row_cell=row_cell,
        ),
        chunk_size=chunk_size,
        tile_queries=tile_queries,
        index=index,
    )


def _group_pieces_greedy(piece_size, piece_nkeys, g_cls, sort_batch, with_background, chunk_size, bg_slots):
    """The CPU grouping of pieces into chunks: sorted by (batch, padded size class, keys), then
    one greedy pass that closes a chunk when it would exceed ``chunk_size`` padded entries (or
    ``4 * chunk_size`` background entries), change batch item (with background), or waste more
    than ``tuning.PAD_SLACK`` once it holds a sixteenth of a chunk. Returns ``(pieces, chunks)``:
    int64 pieces in chunk order and ``[(start, end, G, U, batch, real queries)]`` ranges into it."""
    p_keys = (piece_nkeys.cpu().numpy(), g_cls.cpu().numpy(), sort_batch.cpu().numpy())
    p_order = np.lexsort(p_keys).tolist()
    g_list, u_list, gc_list, b_list = piece_size.tolist(), piece_nkeys.tolist(), g_cls.tolist(), sort_batch.tolist()
    groups, cur, cur_g, cur_u, real, bgw, cur_b = [], [], 0, 0, 0, 0, -1
    for p in p_order:
        if u_list[p] == 0 and not with_background:
            continue  # no key at all: the output row stays zero
        g, u = gc_list[p], max(u_list[p], 1)
        new_g, new_u = max(cur_g, g), max(cur_u, u)
        padded = (len(cur) + 1) * new_g * new_u
        work, new_bgw = real + g_list[p] * u, bgw + g_list[p] * bg_slots
        if cur and (
            b_list[p] != cur_b
            or padded > chunk_size
            or new_bgw > 4 * chunk_size
            or (padded + new_bgw > tuning.PAD_SLACK * (work + new_bgw) and (real + bgw) * 16 > chunk_size)
        ):
            groups.append((cur, cur_g, cur_u, cur_b))
            cur, cur_g, cur_u, real, bgw = [], 0, 0, 0, 0
            new_g, new_u, work, new_bgw = g, u, g_list[p] * u, g_list[p] * bg_slots
        cur.append(p)
        cur_g, cur_u, real, bgw, cur_b = new_g, new_u, work, new_bgw, b_list[p]
    if cur:
        groups.append((cur, cur_g, cur_u, cur_b))
    pieces = torch.tensor([p for g in groups for p in g[0]], dtype=torch.int64, device=piece_size.device)
    chunks, start = [], 0
    for cur, g, u, b in groups:
        chunks.append((start, start + len(cur), g, u, b, sum(g_list[p] for p in cur)))
        start += len(cur)
    return pieces, chunks


def _group_pieces_on_device(piece_size, piece_nkeys, g_cls, sort_batch, with_background, chunk_size, bg_slots):
    """:func:`_group_pieces_greedy` without its Python loop over pieces, for CUDA: the same sort
    (one stable device sort of a composite key), then each run of one batch item, size class and
    key-count band (keys within a factor ``tuning.PAD_SLACK``) is cut into chunks of as many pieces as
    the ``chunk_size`` (and ``4 * chunk_size`` background) bounds allow for the run's largest
    piece. Same output; three host syncs in all (the kept pieces, the chunk starts, the ranges)."""
    device = piece_size.device
    keep = (piece_nkeys >= 0) if with_background else (piece_nkeys > 0)
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        return idx, []
    classes = torch.unique(g_cls)  # sorted; the class rank orders like the class
    n_cls = classes.numel()
    cls = torch.searchsorted(classes, g_cls[idx])
    u = piece_nkeys[idx].clamp_min(1)
    batch_cls = sort_batch[idx] * n_cls + cls
    _, perm = torch.sort((batch_cls << 32) + u, stable=True)  # (batch, class, keys), ties in piece order
    pieces, u, g, batch_cls = idx[perm], u[perm], g_cls[idx][perm], batch_cls[perm]
    n = pieces.numel()
    band = torch.floor(torch.log(u.to(torch.float64)) / math.log(tuning.PAD_SLACK)).to(torch.int64)
    seg_key = (batch_cls << 12) + band
    new_seg = torch.ones(n, dtype=torch.bool, device=device)
    new_seg[1:] = seg_key[1:] != seg_key[:-1]
    pos = torch.arange(n, device=device)
    seg_start = torch.cummax(torch.where(new_seg, pos, 0), 0).values
    seg_id = torch.cumsum(new_seg, 0) - 1
    u_max = torch.zeros(n, dtype=torch.int64, device=device).scatter_reduce_(0, seg_id, u, "amax", include_self=False)[seg_id]
    cap = (chunk_size // (g * u_max)).clamp_min(1)
    if bg_slots:
        cap = torch.minimum(cap, (4 * chunk_size // (g * bg_slots)).clamp_min(1))
    new_chunk = new_seg | ((pos - seg_start) % cap == 0)
    starts = new_chunk.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([n], device=device)])
    real = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, torch.cumsum(new_chunk, 0) - 1, piece_size[pieces])
    meta = torch.stack([starts, ends, g[starts], u[ends - 1], sort_batch[pieces[starts]], real[: starts.numel()]], 1).tolist()
    return pieces, [tuple(m) for m in meta]


def _pack_chunks(plan: NeighborhoodPlan, grouping: Optional[str] = None) -> tuple[list, tuple]:
    """Pad the plan's tiles and pack them into chunks for the PyTorch path: tiles sorted by
    (padded size class, keys), at most ``plan.chunk_size`` padded (query, key) entries per
    chunk, each with its ``[T, G, U]`` mask of the pairs inside each query's own windows.
    ``grouping``: ``"greedy"`` (:func:`_group_pieces_greedy`, the CPU default) or ``"device"``
    (:func:`_group_pieces_on_device`, the CUDA default: no per-piece Python loop, no numpy).
    Returns ``(chunks, (pair_counts, background_counts or None))``."""
    t = plan.tiles
    device = plan.centres.device
    shapes, centres, offsets, slot_level = plan.level_spatial_shapes, plan.centres, plan.slot_offset, plan.slot_level
    n_levels, dim = shapes.shape
    sizes, with_background, chunk_size = plan.neighborhood_sizes, plan.with_background, plan.chunk_size
    radius = torch.tensor([(s - 1) // 2 for s in sizes], dtype=torch.int64, device=device)
    n_q, n_keys = plan.n_queries, plan.n_keys
    order, piece_qstart, piece_size, piece_batch = t.query_order, t.query_start, t.query_count, t.batch
    piece_kstart, piece_nkeys, k_row, row_level = t.key_start, t.key_count, t.key_row, t.row_level
    # --- pack pieces into chunks: sorted by (padded size class, keys) -----------------------
    classes = _size_classes(plan.tile_queries).to(device)
    g_cls = classes[torch.searchsorted(classes, piece_size)]
    # with background, a chunk holds one batch item (its background keys are one table)
    sort_batch = piece_batch if with_background else torch.zeros_like(piece_batch)
    # background work (real queries x window slots, no padding) counts towards the waste
    # check and has its own bound (4 chunk sizes)
    bg_slots = offsets.shape[0] if with_background else 0
    if grouping is None:
        grouping = "greedy" if device.type == "cpu" else "device"
    if grouping not in ("greedy", "device"):
        raise ValueError(f"grouping must be 'greedy' or 'device', got {grouping=}")
    group = _group_pieces_greedy if grouping == "greedy" else _group_pieces_on_device
    grouped_pieces, groups = group(piece_size, piece_nkeys, g_cls, sort_batch, with_background, chunk_size, bg_slots)

    size_l = torch.tensor(sizes, dtype=torch.int64, device=device)
    slot_start = torch.cumsum(size_l**dim, 0) - size_l**dim
    # int32 copies for the per-chunk masks; centres clamped to just outside the grid (same windows'
    # overlap with the grid, coordinates bounded)
    lim_lo, lim_hi = -radius[None, :, None] - 1, shapes[None] + radius[None, :, None]
    centres32 = torch.minimum(torch.maximum(centres, lim_lo), lim_hi).to(torch.int32)
    row_cell32 = t.row_cell.to(torch.int32)  # per key row; an entry's is row_cell32[k_row[e]]
    radius32, size32, slot_start32 = radius.to(torch.int32), size_l.to(torch.int32), slot_start.to(torch.int32)
    offsets32, shapes32 = offsets.to(torch.int32), shapes.to(torch.int32)
    order_pad = torch.cat([order, torch.tensor([n_q], device=device)])
    pair_counts = torch.zeros(n_q + 1, dtype=torch.int64, device=device)
    bg_counts = torch.zeros(n_q + 1, dtype=torch.int64, device=device) if with_background else None
    chunks = []
    n_entries = k_row.shape[0]
    for start, end, G, U, chunk_batch, n_real_queries in groups:
        pcs = grouped_pieces[start:end]
        T = end - start
        gi = torch.arange(G, device=device)
        q_valid = gi[None] < piece_size[pcs][:, None]  # [T, G]
        # positions t * G + g of the real queries (row-major, as q_valid.nonzero() without its sync)
        n_real = piece_size[pcs]
        t_of = torch.repeat_interleave(torch.arange(T, device=device), n_real, output_size=n_real_queries)
        query_pos = t_of * G + (torch.arange(t_of.shape[0], device=device) - (torch.cumsum(n_real, 0) - n_real)[t_of])
        query = order_pad[torch.where(q_valid, piece_qstart[pcs][:, None] + gi[None], n_q)]
        ui = torch.arange(U, device=device)
        k_valid = ui[None] < piece_nkeys[pcs][:, None]  # [T, U]
        kp = (piece_kstart[pcs][:, None] + ui[None]).clamp_max(max(n_entries - 1, 0))
        if n_entries:
            rk = k_row[kp]
            key = torch.where(k_valid, rk, n_keys)
            klev, kcell32 = row_level[rk], row_cell32[rk]  # [T, U], [T, U, D]
        else:
            key = torch.full((T, U), n_keys, dtype=torch.int64, device=device)
            klev, kcell32 = torch.zeros_like(key), torch.zeros(T, U, dim, dtype=torch.int32, device=device)
        q_gather = query.clamp_max(max(n_q - 1, 0))
        cq = centres32.index_select(0, q_gather.view(-1)).view(T, G, n_levels, dim)
        kr = radius32[klev][:, None, :]  # [T, 1, U]
        kidx = klev[:, None, :].expand(T, G, U)
        allowed = q_valid[:, :, None] & k_valid[:, None, :]
        slot = torch.zeros((), dtype=torch.int32, device=device)
        for axis in range(dim):  # the key's offset from the query's centre at the key's level
            rel = kcell32[:, None, :, axis] - cq[..., axis].gather(2, kidx) + kr  # in [0, 2r] inside the window
            allowed &= (rel >= 0) & (rel <= 2 * kr)
            if with_background:
                slot = slot * size32[klev][:, None, :] + rel
        pair_counts.index_add_(0, query.view(-1), allowed.sum(-1).view(-1))
        bg_valid = None
        if with_background:
            n_slots = slot_level.shape[0]
            slot = torch.where(allowed, slot + slot_start32[klev][:, None, :], n_slots).to(torch.int64)
            present = torch.zeros(T, G, n_slots + 1, dtype=torch.bool, device=device).scatter_(2, slot, True)
            inside = q_valid[..., None].expand(T, G, n_slots).clone()
            for axis in range(dim):
                cell = cq[:, :, slot_level, axis] + offsets32[:, axis]  # [T, G, K]
                inside &= (cell >= 0) & (cell < shapes32[slot_level, axis])
            bg_valid = inside & ~present[..., :n_slots]
            bg_counts.index_add_(0, query.view(-1), bg_valid.sum(-1).view(-1))
        chunks.append(
            PlanChunk(
                query=query,
                key=key,
                query_gather=q_gather.reshape(-1),
                query_pos=query_pos,
                query_rows=query.view(-1).index_select(0, query_pos),
                key_gather=key.clamp_max(max(n_keys - 1, 0)).reshape(-1),
                masked=~allowed,
                bg_masked=None if bg_valid is None else ~bg_valid.view(T * G, -1).index_select(0, query_pos)[None],
                batch=chunk_batch if with_background else -1,
            )
        )
    return chunks, (pair_counts[:n_q], bg_counts[:n_q] if with_background else None)


# ---------------------------------------------------------------------------------------------
# positions of the plan's window centres and slot offsets; background keys at the offsets
# ---------------------------------------------------------------------------------------------
def _centre_positions(centres: Tensor, plan: NeighborhoodPlan) -> Tensor:
    """Float64 position vectors ``[n, L, D + 1]`` of the window-centre cells of queries at every level."""
    full = plan.full_shape.to(torch.float64)
    shapes = plan.level_spatial_shapes.to(torch.float64)
    lvl = torch.arange(plan.n_levels, dtype=torch.float64, device=centres.device)
    p = (centres.to(torch.float64) + 0.5) / shapes * full
    return torch.cat([p, lvl[None, :, None].expand(p.shape[0], -1, 1)], -1)


def _offset_positions(plan: NeighborhoodPlan) -> Tensor:
    """Float64 position vectors ``[K, D + 1]`` of the window slot offsets (level coordinate 0)."""
    full = plan.full_shape.to(torch.float64)
    off = plan.slot_offset.to(torch.float64) / plan.level_spatial_shapes[plan.slot_level].to(torch.float64) * full
    return torch.cat([off, torch.zeros_like(off[:, :1])], 1)


def background_tables(bg_k: Tensor, freqs: Tensor, plan: NeighborhoodPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Background keys rotated at every window slot offset.

    Returns ``(tables, cos_o, sin_o)``: ``tables [B, K, H, d]`` with
    ``tables[b, k] = R(u_offset(k)) bg_k[b, level(k)]``, and the offsets' ``cos``/``sin``
    ``[K, H', d/2]``. The score of a query with a background cell ``u = u_centre + u_offset``
    of its window is ``<R(-u_centre) q, tables[b, k]>`` (rotations compose).
    """
    cos_o, sin_o = rope_cos_sin(rope_angles(_offset_positions(plan), freqs), bg_k.dtype)  # [K, H', d/2]
    tables = rotate_pairs(bg_k[:, plan.slot_level], cos_o, sin_o)  # [B, K, H, d]
    return tables, cos_o, sin_o


def default_chunk_size(n_heads: int) -> int:
    """Padded (query, key) entries per chunk of the PyTorch path:
    :data:`~sparse_msda.tuning.CHUNK_SCORE_ENTRIES` shared by the heads (at least 4096)."""
    return max(1 << 12, tuning.CHUNK_SCORE_ENTRIES // max(n_heads, 1))
