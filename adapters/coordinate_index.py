"""Hashed coordinate index over the voxels of a multi-level sparse map.

The index answers "which feature row holds voxel (b, l, coords)?" for millions of
lookups at once, through spconv's ``HashTable`` (CPU and CUDA). It is built once
per multi-level map and reused as long as the voxel *coordinates* do not change
(every layer of an encoder): only features change between layers.

Row convention: row ``r`` of the index is row ``r`` of the concatenated feature
matrix returned by :func:`adapters.multilevel_features` for the same map, i.e.

* a list of ``SparseConvTensor`` (one per level): ``torch.cat([lvl.features for lvl in levels])``,
  levels in order, each level's rows in its own order;
* a COO stack ``[batch, *spatial, n_levels, channels]``: the rows of
  ``stacked.coalesce().values()`` (sorted by batch, spatial coords, level).

Keys are linearised as ``((b * L + l) * S_0 + c_0) * S_1 + c_1 ...`` with ``S`` the
per-axis maximum over levels; an overflow of int64 is a clear error. Coordinates
that are negative or outside their own level's shape, and batch/level indices out
of range, are reported "not found" and never reach the table, so they can never
alias another voxel.

The interpolation corners of deformable sampling are found per *base cell* through a second
table (``lookup_corners`` / ``base_cell_ids``): base-cell keys take one block per level laid out
with the level's own shape (``_base_cell_keys``), so on CPU the blocks of the smallest levels can be
read as one direct-address int32 table (bounded by ``DENSE_TABLE_BYTES``), the larger levels' as a
paged direct-address table (a directory over pages of consecutive keys, only the pages holding a
base cell stored; bounded by ``PAGED_TABLE_BYTES``), and only what fits in neither goes to
spconv's hash table (CUDA: every level in spconv's table).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .spconv_compat import hash_insert, hash_query, new_hash_table, query_cpu, query_cpu_async, table_size
from .validation import as_level_spatial_shapes, broadcast_shapes, check_index_range, check_integer_tensor, check_voxel_bounds

__all__ = ["SparseCoordinateIndex", "corner_offsets"]

_MAX_KEY = 2**62
#: memory bound of the corner table's paged direct-address part (CPU): the key blocks past the
#: dense prefix (:data:`DENSE_TABLE_BYTES`) as a directory over pages of ``2**shift`` consecutive
#: keys (one int32 per page) and, for the pages holding at least one base cell, the pages
#: themselves (``2**shift`` int32 ids each; one shared all-absent page). A lookup is two reads, no
#: hash probe. Used while directory and pages fit in this many bytes (``shift`` in 3..8, the
#: smallest), else those levels stay in spconv's hash table. Real scan: the 3D encoder's finest
#: level (99.5M keys, 164k base cells at batch 1) takes 12 MiB at ``shift`` 6.
PAGED_TABLE_BYTES = 64 << 20
_PAGE_SHIFTS = range(3, 9)
#: most columns (the last axis of the base cells) for which base_cell_ids reads the levels per column
_MAX_COLUMNS = 1024

#: memory bound of the corner table's direct-address part: the key blocks of the smallest levels
#: (each ``batch_size * prod(shape + 3)`` int32 ids, the guard key first) are kept as one dense
#: int32 table while its size stays within this many bytes -- one read per query instead of a hash
#: probe (spconv's CPU query: ~15 ns per key on 2 cores); the other levels stay in spconv's hash
#: table. Real scan: the 3D encoder's three coarser levels (61 MiB), every BEV level (1 MiB)
DENSE_TABLE_BYTES = 64 << 20


def corner_offsets(position_dim: int, device=None) -> torch.Tensor:
    """``[2**position_dim, position_dim]`` int64 offsets of the interpolation corners of a cell.

    Corner ``k`` of base cell ``c`` is ``c + corner_offsets[k]``; the first axis is the most
    significant bit of ``k`` (``(0, 0), (0, 1), (1, 0), (1, 1)`` in 2D).
    """
    k = torch.arange(2**position_dim, device=device)
    shifts = torch.arange(position_dim - 1, -1, -1, device=device)
    return (k[:, None] >> shifts[None, :]) & 1


def _paged_table(rel_keys: torch.Tensor, ids: torch.Tensor, n_keys: int, absent: int, first: int):
    """The paged direct-address table of keys ``first + rel_keys`` (``rel_keys`` int64 ``[m]``, distinct,
    in ``[0, n_keys)``) holding int32 ``ids`` (every other key: ``absent``), or None when it would
    take more than :data:`PAGED_TABLE_BYTES`.

    Returns ``(shift, first, directory, pages)``: page ``p`` holds the keys ``first + (p << shift)``
    onwards; ``directory[p]`` (int32) is the offset from a key's relative value to its slot in
    ``pages`` (``slot = rel + directory[rel >> shift]``), so a page without base cells points into
    the all-absent page 0. Shift: the smallest table over :data:`_PAGE_SHIFTS`.
    """
    best = None
    for shift in _PAGE_SHIFTS:
        n_dir = (n_keys + (1 << shift) - 1) >> shift
        used = torch.unique(torch.bitwise_right_shift(rel_keys, shift))
        size = 4 * n_dir + 4 * ((used.numel() + 1) << shift)
        if best is None or size < best[0]:
            best = (size, shift, n_dir, used)
    size, shift, n_dir, used = best
    if size > PAGED_TABLE_BYTES or n_keys >= 2**31:  # int32 offsets (and bounded memory)
        return None
    page = torch.arange(n_dir, dtype=torch.int64)
    offset = torch.bitwise_left_shift(page, shift).neg_()  # every page: page 0 (absent)
    offset[used] += torch.bitwise_left_shift(torch.arange(1, used.numel() + 1), shift)
    pages = torch.full(((used.numel() + 1) << shift,), absent, dtype=torch.int32)
    pages[rel_keys + offset[torch.bitwise_right_shift(rel_keys, shift)]] = ids
    return shift, first, offset.to(torch.int32), pages


class SparseCoordinateIndex:
    """Hash index of a multi-level sparse voxel map.

    Args:
        batch_indices: ``[N]`` integer batch index of each row.
        level_indices: ``[N]`` integer level index of each row.
        spatial_indices: ``[N, position_dim]`` integer coordinates of each row in its
            level's grid, spconv axis order ((y, x) or (z, y, x)).
        level_spatial_shapes: ``[n_levels, position_dim]`` shape of each level's grid.
        batch_size: number of batch items (items may hold no voxel).

    Attributes:
        n_voxels, n_levels, position_dim, batch_size, device
        level_spatial_shapes: int64 ``[n_levels, position_dim]``
        batch_indices, level_indices: int64 ``[N]``; spatial_indices: int64 ``[N, position_dim]``

    Raises:
        ValueError: coordinates outside their level, duplicate voxels, shape mismatches,
            key-space overflow.
    """

    def __init__(
        self,
        batch_indices: torch.Tensor,
        level_indices: torch.Tensor,
        spatial_indices: torch.Tensor,
        level_spatial_shapes,
        batch_size: int,
    ) -> None:
        check_integer_tensor("batch_indices", batch_indices)
        check_integer_tensor("level_indices", level_indices)
        check_integer_tensor("spatial_indices", spatial_indices)
        device = spatial_indices.device
        shapes = as_level_spatial_shapes(level_spatial_shapes, device=device)
        n_levels, dim = shapes.shape
        if spatial_indices.ndim != 2 or spatial_indices.shape[1] != dim:
            raise ValueError(
                f"spatial_indices must have shape [N, {dim}] to match level_spatial_shapes, "
                f"got spatial_indices.shape={tuple(spatial_indices.shape)}"
            )
        n = spatial_indices.shape[0]
        for name, t in (("batch_indices", batch_indices), ("level_indices", level_indices)):
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {name}.shape={tuple(t.shape)}")
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size=}")

        self.batch_size = batch_size
        self.level_spatial_shapes = shapes
        self.batch_indices = batch_indices.to(torch.int64)
        self.level_indices = level_indices.to(torch.int64)
        self.spatial_indices = spatial_indices.to(torch.int64)
        # per-axis extent of the key space as Python ints, read once here (one device sync on
        # CUDA) so that key computations never read them back from the device per call
        self._axis_extent: tuple[int, ...] = tuple(int(e) for e in shapes.max(0).values.tolist())
        # Python ints: no wrap-around; the base-cell keys of lookup_corners take 3 more slots per
        # axis and one more (batch, level) slot (_base_cell_keys), the larger of the two key spaces
        key_space = (batch_size * n_levels + 1) * math.prod(e + 3 for e in self._axis_extent)
        if key_space >= _MAX_KEY:
            raise ValueError(
                f"key space (batch_size * n_levels + 1) * prod(max spatial shape + 3) = {key_space} overflows int64 keys"
            )
        self._cell_key_consts: dict = {}  # device -> the constants of _base_cell_keys (_key_layout)

        check_voxel_bounds("SparseCoordinateIndex", self.batch_indices, self.level_indices, self.spatial_indices, shapes, batch_size)
        keys, _ = self._query_keys(self.batch_indices, self.level_indices, self.spatial_indices)
        self._table = new_hash_table(device, n)
        hash_insert(self._table, keys, torch.arange(n, dtype=torch.int64, device=device))
        size = table_size(self._table)
        if size is None:  # CUDA table: no size, count distinct keys instead
            size = int(torch.unique(keys).numel()) if n else 0
        if size != n:
            uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
            rows = (counts[inverse] > 1).nonzero().squeeze(1)[:2].tolist()
            r = rows[0]
            raise ValueError(
                f"duplicate coordinates: {n - size} of {n} voxels repeat a (batch, level, coords) key, "
                f"expected each voxel once; e.g. rows {rows} are both (batch={int(self.batch_indices[r])}, "
                f"level={int(self.level_indices[r])}, coords={self.spatial_indices[r].tolist()})"
            )

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_spconv(cls, levels) -> "SparseCoordinateIndex":
        """Index of a list of ``SparseConvTensor`` (one per level); see module docstring for row order."""
        from .conversion import check_spconv_levels

        levels, batch_size, shapes = check_spconv_levels(levels)
        for i, lvl in enumerate(levels):  # per-level check, so that errors name the level's own row
            idx = lvl.indices.to(torch.int64)
            check_voxel_bounds(
                f"levels[{i}]", idx[:, 0], torch.full_like(idx[:, 0], i), idx[:, 1:], shapes, batch_size
            )
        indices = torch.cat([lvl.indices for lvl in levels]).to(torch.int64)
        level_indices = torch.cat(
            [torch.full((lvl.indices.shape[0],), i, dtype=torch.int64, device=indices.device) for i, lvl in enumerate(levels)]
        )
        return cls(indices[:, 0], level_indices, indices[:, 1:], shapes, batch_size)

    @classmethod
    def from_coo_stack(cls, stacked: torch.Tensor, level_spatial_shapes) -> "SparseCoordinateIndex":
        """Index of a COO stack ``[batch, *spatial, n_levels, channels]`` (rows in coalesced order)."""
        from .conversion import check_coo_stack, coalesce_checked

        stacked, shapes = check_coo_stack(stacked, level_spatial_shapes)
        idx = coalesce_checked(stacked, shapes).indices()
        return cls(idx[0], idx[-1], idx[1:-1].T, shapes, stacked.shape[0])

    # -- queries --------------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return self.spatial_indices.shape[0]

    @property
    def n_levels(self) -> int:
        return self.level_spatial_shapes.shape[0]

    @property
    def position_dim(self) -> int:
        return self.level_spatial_shapes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.spatial_indices.device

    def lookup(
        self,
        batch_indices: torch.Tensor,
        level_indices: torch.Tensor,
        spatial_indices: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Find the feature rows of voxels.

        Args:
            batch_indices: integer ``[...]`` (broadcastable with the others).
            level_indices: integer ``[...]``.
            spatial_indices: integer ``[..., position_dim]``, spconv axis order.

        Returns:
            ``(rows, found)``: int64 ``[...]`` rows (``-1`` where not found) and a bool
            ``[...]`` mask. Out-of-range batch, level or coordinates are not found.

        Raises:
            TypeError: a non-integer input (a float would be truncated towards zero and could
                alias another voxel: floor positions before looking them up).
            ValueError: ``spatial_indices.shape[-1] != position_dim``.
        """
        check_integer_tensor("batch_indices", batch_indices)
        check_integer_tensor("level_indices", level_indices)
        check_integer_tensor("spatial_indices", spatial_indices)
        c = spatial_indices.to(torch.int64)
        if c.ndim == 0 or c.shape[-1] != self.position_dim:
            raise ValueError(
                f"spatial_indices must have a last dim of {self.position_dim}, got spatial_indices.shape={tuple(c.shape)}"
            )
        b = batch_indices.to(torch.int64)
        l = level_indices.to(torch.int64)
        try:
            shape = broadcast_shapes(b.shape, l.shape, c.shape[:-1])
        except RuntimeError as err:
            raise ValueError(
                f"batch_indices.shape={tuple(b.shape)}, level_indices.shape={tuple(l.shape)} and "
                f"spatial_indices.shape[:-1]={tuple(c.shape[:-1])} must broadcast to one shape"
            ) from err
        b, l = b.expand(shape), l.expand(shape)
        c = c.expand(*shape, self.position_dim)
        keys, _ = self._query_keys(b.reshape(-1), l.reshape(-1), c.reshape(-1, self.position_dim))
        if not self.n_voxels or not keys.numel():
            rows = torch.full(shape, -1, dtype=torch.int64, device=c.device)
            return rows, rows >= 0
        # every key is queried as it is, out-of-bounds ones too: they carry the key -1, which no
        # voxel has (keys are >= 0) and which is not the table's empty-slot marker either (CPU:
        # a hash map; CUDA int64 tables: INT64_MAX), so it is a plain miss -- no compaction
        # (`keys[valid]`, `rows[valid] = ...`), hence no host sync on CUDA
        rows, found = hash_query(self._table, keys)
        rows = rows.masked_fill_(~found, -1).reshape(shape)
        return rows, rows >= 0

    def lookup_boxes(
        self,
        batch_indices: torch.Tensor,
        level_indices: torch.Tensor,
        box_lo: torch.Tensor,
        box_extent: torch.Tensor,
        cells_per_chunk: int = 1 << 19,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The voxels present in boxes of cells, one hash query per cell of every box.

        Equivalent to :meth:`lookup` of every cell of every box (boxes in order, each box's
        cells in row-major order, last axis fastest), keeping the cells found; but the keys
        of a box's cells are generated from the key of its first cell and the key strides,
        without materialising the cells' coordinates (a few passes per cell instead of ~30).

        Args:
            batch_indices, level_indices: integer ``[P]`` batch item and level of each box.
            box_lo: integer ``[P, position_dim]`` first cell of each box (spconv axis order).
            box_extent: integer ``[P, position_dim]`` cells per axis, ``>= 0`` (a zero extent is
                an empty box). A non-empty box must lie inside its level's grid.
            cells_per_chunk: bound on the cells queried at once (memory); a larger box is
                queried alone.

        Returns:
            ``(box, rows)``: int64 ``[M]`` the box of each voxel found and its row, in box order
            and within a box in row-major order of the cells. The voxel's cell is
            ``spatial_indices[rows]``.

        Raises:
            TypeError: a non-integer input. ValueError: shapes, an out-of-range batch or level, a
                negative extent or a non-empty box outside its level's grid.
        """
        dim, device = self.position_dim, self.device
        for name, t in (("batch_indices", batch_indices), ("level_indices", level_indices), ("box_lo", box_lo), ("box_extent", box_extent)):
            check_integer_tensor(name, t)
        n_boxes = box_lo.shape[0] if box_lo.ndim == 2 else -1
        if box_lo.ndim != 2 or box_lo.shape[1] != dim or box_extent.shape != box_lo.shape:
            raise ValueError(
                f"box_lo and box_extent must have shape [P, {dim}], got box_lo.shape={tuple(box_lo.shape)}, "
                f"box_extent.shape={tuple(box_extent.shape)}"
            )
        for name, t in (("batch_indices", batch_indices), ("level_indices", level_indices)):
            if t.shape != (n_boxes,):
                raise ValueError(f"{name} must have shape [{n_boxes}] (one per box), got {name}.shape={tuple(t.shape)}")
        if not isinstance(cells_per_chunk, int) or cells_per_chunk < 1:
            raise ValueError(f"cells_per_chunk must be a positive int, got {cells_per_chunk=}")
        b, l = batch_indices.to(device=device, dtype=torch.int64), level_indices.to(device=device, dtype=torch.int64)
        lo, ext = box_lo.to(device=device, dtype=torch.int64), box_extent.to(device=device, dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if n_boxes == 0:
            return empty, empty
        check_index_range("batch_indices", b, self.batch_size)
        check_index_range("level_indices", l, self.n_levels)
        nonempty = (ext > 0).all(-1)
        bad = (ext < 0).any(-1) | (nonempty & ((lo < 0) | (lo + ext > self.level_spatial_shapes[l])).any(-1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"box {i} (box_lo={lo[i].tolist()}, box_extent={ext[i].tolist()}) must have extents >= 0 and lie "
                f"inside level {int(l[i])}'s grid {self.level_spatial_shapes[int(l[i])].tolist()}"
            )
        n_cells = torch.where(nonempty, ext.prod(-1), 0)
        if not self.n_voxels or not bool(nonempty.any()):
            return empty, empty
        # key of a cell = key(box_lo) + sum_a local_a * stride_a (the key layout of _query_keys)
        strides = [math.prod(self._axis_extent[a + 1 :]) for a in range(dim)]
        key_lo, _ = self._query_keys(b, l, torch.where(nonempty[:, None], lo, 0))  # empty boxes: any in-grid key
        row_len = ext[:, -1]  # a box is enumerated as rows along its last axis
        n_rows = torch.where(nonempty, ext[:, :-1].prod(-1), 0)  # prod of nothing (1D) is 1
        cum = torch.cumsum(n_cells, 0)
        cum_cpu = cum.cpu()
        # CPU: the hits go straight into two buffers sized for every cell (virtual memory: only the
        # pages written become resident), then one copy of the filled part; no per-chunk result
        # tensors that would leave the heap fragmented. CUDA: per-chunk results, concatenated.
        direct = self.device.type == "cpu"
        if direct:
            box_out = torch.empty(int(cum_cpu[-1]), dtype=torch.int64)
            row_out = torch.empty(int(cum_cpu[-1]), dtype=torch.int64)
        boxes, rows, n_found = [], [], 0
        p0 = 0
        while p0 < n_boxes:
            base = int(cum_cpu[p0 - 1]) if p0 else 0
            p1 = int(torch.searchsorted(cum_cpu, torch.tensor(base + cells_per_chunk), right=True))
            p1 = min(max(p1, p0 + 1), n_boxes)
            total = int(cum_cpu[p1 - 1]) - base
            if total:
                nr = n_rows[p0:p1]
                n_r = int(nr.sum())
                row_box = torch.repeat_interleave(torch.arange(p0, p1, device=device), nr, output_size=n_r)
                j = torch.arange(n_r, device=device) - (torch.cumsum(nr, 0) - nr)[row_box - p0]
                row_key = key_lo[row_box]
                for axis in range(dim - 2, -1, -1):  # the row's cell on the leading axes
                    e = ext[row_box, axis]
                    row_key += (j % e) * strides[axis]
                    j = j // e
                rl = row_len[row_box]
                # keys of the cells: the row's first key + the cell's position along the row
                start = torch.cumsum(rl, 0) - rl
                keys = torch.repeat_interleave(row_key - start, rl, output_size=total)
                keys += torch.arange(total, device=device)
                values, found = hash_query(self._table, keys)
                hit = found.nonzero().squeeze(1)
                del keys, found
                # the box of each hit: the first box whose cells end after it (bookkeeping of
                # this call's own enumeration, not a voxel search)
                box = torch.searchsorted(cum[p0:p1] - base, hit, right=True).add_(p0)
                if direct:
                    m = hit.shape[0]
                    box_out[n_found : n_found + m] = box
                    torch.index_select(values, 0, hit, out=row_out[n_found : n_found + m])
                    n_found += m
                else:
                    boxes.append(box)
                    rows.append(values.index_select(0, hit))
            p0 = p1
        if direct:
            return box_out[:n_found].clone(), row_out[:n_found].clone()
        return (torch.cat(boxes), torch.cat(rows)) if boxes else (empty, empty)

    def _query_keys(self, b: torch.Tensor, l: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[...]`` of cells ``c`` (``-1`` where out of bounds) and the in-bounds mask.

        ``b`` and ``l`` broadcast against ``c.shape[:-1]`` (per-level bounds are gathered at their
        size, not at the cells'); one pass per axis.
        """
        n_levels = self.n_levels
        valid = (b >= 0) & (b < self.batch_size) & (l >= 0) & (l < n_levels)
        bounds = self.level_spatial_shapes[l.clamp(0, n_levels - 1)]  # [..., D]
        key = b * n_levels + l
        for axis in range(self.position_dim):
            ca = c[..., axis]
            extent = self._axis_extent[axis]
            inside = (ca >= 0) & (ca < bounds[..., axis])
            if axis == 0:  # broadcast to the cells' shape once, then in place
                valid, key = valid & inside, key * extent + ca
            else:
                valid &= inside
                key.mul_(extent).add_(ca)
        key.masked_fill_(~valid, -1)
        return key, valid

    def _key_layout(self, device: torch.device) -> tuple:
        """Per-device constants of the base-cell key layout (:meth:`_base_cell_keys`), built once.

        Returns ``(start [L], per_b [L], upper [L, D], strides [L, D], lower, order)``: int64 tensors
        on ``device`` (``start`` includes the ``+2`` slot shift of every axis), ``lower`` the 0-dim
        ``-2``, ``order`` the levels in key-space order (Python list).
        """
        layout = self._cell_key_consts.get(device)
        if layout is None:
            shapes = [[int(e) for e in row] for row in self.level_spatial_shapes.tolist()]
            radix = [[e + 3 for e in row] for row in shapes]
            strides = [[math.prod(r[a + 1 :]) for a in range(len(r))] for r in radix]
            per_b = [math.prod(r) for r in radix]
            # levels by block size, smallest first (the blocks the corner table keeps dense, see
            # _corner_table, are a prefix of the key space); key 0: the guard of out-of-range (b, l)
            order = sorted(range(len(shapes)), key=lambda lv: (per_b[lv], lv))
            start, at = [0] * len(shapes), 1
            for lv in order:
                start[lv] = at + 2 * sum(strides[lv])
                at += self.batch_size * per_b[lv]
            t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
            layout = (t(start), t(per_b), t(shapes), t(strides), t(-2), order)
            self._cell_key_consts[device] = layout
        return layout

    def _level_block(self, level: int) -> tuple[int, int]:
        """``[first, stop)`` keys of ``level``'s block (every batch item) in the base-cell key space."""
        start, per_b, _, strides, _, _ = self._key_layout(torch.device("cpu"))
        first = int(start[level]) - 2 * int(strides[level].sum())
        return first, first + self.batch_size * int(per_b[level])

    def _base_cell_keys(self, b: torch.Tensor, l: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Keys ``[...]`` of base cells ``cells [..., D]`` in the corner table's key space (the one
        layout of the table and of its queries); ``b``, ``l`` int64 broadcastable to ``cells.shape[:-1]``.

        Each level ``l`` has a block of its own, ``batch_size`` items of ``prod(S_l + 3)`` keys
        (``S_l``: the level's own shape), the blocks ordered by size (smallest first) after the
        guard key 0. Axis ``a`` of a base cell ``c`` of level ``l`` takes the slot
        ``clamp(c_a, -2, S_la) + 2`` out of ``S_la + 3``: the table's base cells (``c_a`` in
        ``[-1, S_la - 1]``) take slots ``1 .. S_la``; a coordinate below ``-1`` or at or above
        ``S_la`` lands in slot 0 or ``S_la + 2``, which no stored base cell holds, so it is a
        plain miss and never aliases another cell. ``(b, l)`` out of range takes the guard key 0
        (never stored). The blocks are dense in the cells of their level, so a small level's block
        can be a direct-address table (:meth:`_corner_table`). Cost on CPU with every ``(b, l)`` in
        range: the level's constants gathered at ``l``'s size, one clamp of the cells, then per
        axis one multiply-add over the cells (int64, exact: the constructor checks the key space)
        and the batch part when ``batch_size > 1``; otherwise one clamp of the cells, one product
        with the strides and a guard per cell.
        """
        start, per_b, upper, strides, lower, _ = self._key_layout(cells.device)
        b_ok, l_ok = (b >= 0) & (b < self.batch_size), (l >= 0) & (l < self.n_levels)
        if cells.device.type == "cpu" and bool(b_ok.all()) and bool(l_ok.all()):
            # every (b, l) in range (the usual case; checked at their own sizes): no [...] mask;
            # the levels' bounds and strides gathered at l's size (e.g. [J] in the deformable
            # encoder), one clamp of the cells, one multiply-add per axis
            dim, st = self.position_dim, strides[l]
            clamped = torch.minimum(cells, upper[l]).clamp_min_(int(lower))
            key = torch.addcmul(start[l], clamped[..., 0], st[..., 0])  # broadcast to the cells' shape
            for axis in range(1, dim - 1):
                key.addcmul_(clamped[..., axis], st[..., axis])
            if dim > 1:
                key.add_(clamped[..., dim - 1])  # the last axis' stride is 1
            if self.batch_size > 1:  # (batch_size 1: every batch index in range is 0)
                key.addcmul_(b, per_b[l])
            return key
        ok = b_ok & l_ok
        lv = torch.where(ok, l, 0)
        clamped = torch.clamp(cells, lower, upper[lv])
        key = (clamped * strides[lv]).sum(-1) + torch.addcmul(start[lv], torch.where(ok, b, 0), per_b[lv])
        return torch.where(ok, key, 0)

    def lookup_corners(
        self, batch_indices: torch.Tensor, level_indices: torch.Tensor, base_cells: torch.Tensor
    ) -> torch.Tensor:
        """Rows of the ``2**D`` interpolation corners of base cells, one hash query per cell.

        Bilinear (trilinear) sampling at a point reads the cells ``base + corner_offsets(D)[k]``
        around it. Instead of ``2**D`` lookups per point, the index keeps (built once, on first
        use, through spconv's ``HashTable``) a table of every base cell that has at least one
        voxel among its corners, holding the rows of those corners; a point then costs one
        query (on CPU, for the smallest levels within :data:`DENSE_TABLE_BYTES`, one read of a
        direct-address table over the level's key block instead of a hash probe; for the others
        within :data:`PAGED_TABLE_BYTES`, two reads of the paged table). Base cells range over
        ``[-1, shape_l - 1]`` per axis (a point in the first half of cell 0 has base cell -1). Equivalent to ``corner_rows(base_cell_ids(...))``.

        Args:
            batch_indices: integer ``[M]``.
            level_indices: integer ``[M]``.
            base_cells: integer ``[M, position_dim]``, spconv axis order.

        Returns:
            int64 ``[M, 2**position_dim]``: the row of corner ``k`` of each base cell, ``-1``
            where the corner is absent or outside its level (never another voxel's row).
        """
        return self.corner_rows(self.base_cell_ids(batch_indices, level_indices, base_cells)).to(torch.int64)

    def base_cell_ids(
        self,
        batch_indices: torch.Tensor,
        level_indices: torch.Tensor,
        base_cells: torch.Tensor,
        *,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Ids of base cells in the corner table (one hash query per cell); see :meth:`corner_rows`.

        Args:
            batch_indices, level_indices: integer, broadcastable to ``base_cells.shape[:-1]``.
            base_cells: integer ``[..., position_dim]``, spconv axis order.
            out: optional int32 or int64 tensor of shape ``base_cells.shape[:-1]`` on the index's
                device that receives the ids (and is returned), e.g. a slice of a caller's int32
                id buffer: on CPU the ids are written straight into it, no int64 result and no
                conversion pass (the corner table of an index with fewer than ``2**31`` base
                cells holds int32 ids).

        Returns:
            int64 ``base_cells.shape[:-1]`` ids (``out`` when given); a base cell none of whose
            corners holds a voxel (including one outside the level, or with an out-of-range batch
            or level) gets the id of an all-absent row.
        """
        for name, t in (("batch_indices", batch_indices), ("level_indices", level_indices), ("base_cells", base_cells)):
            check_integer_tensor(name, t)
        dim = self.position_dim
        lead = base_cells.shape[:-1]
        try:
            ok = base_cells.ndim >= 1 and base_cells.shape[-1] == dim and (
                broadcast_shapes(batch_indices.shape, level_indices.shape, lead) == lead
            )
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"base cells take base_cells [..., {dim}] and batch_indices / level_indices broadcastable to its "
                f"leading shape, got {tuple(batch_indices.shape)}, {tuple(level_indices.shape)}, {tuple(base_cells.shape)}"
            )
        if out is not None:
            if not isinstance(out, torch.Tensor) or out.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"out must be an int32 or int64 tensor, got {type(out).__name__} {getattr(out, 'dtype', '')}")
            if out.shape != lead or out.device != self.device:
                raise ValueError(
                    f"out must have shape base_cells.shape[:-1]={tuple(lead)} on {self.device}, "
                    f"got out.shape={tuple(out.shape)} on {out.device}"
                )
        table, corner_rows = self._corner_table()
        absent = corner_rows.shape[0] - 1  # the last row of the table is all -1
        if not self.n_voxels or not base_cells.numel():
            if out is None:
                return torch.full(lead, absent, dtype=torch.int64, device=base_cells.device)
            return out.fill_(absent)
        b, l = batch_indices.to(torch.int64), level_indices.to(torch.int64)
        int32_ids = self.device.type == "cpu" and (table is None or table.value_dtype == torch.int32)
        if int32_ids and len(lead) >= 2 and lead[-1] <= _MAX_COLUMNS:
            # the levels vary along the last axis only and the batch along the leading ones (the
            # deformable sampling's [S, 1] batch and [1, J] levels): per column block of a level
            direct = out is not None and out.dtype == torch.int32 and out.is_contiguous()
            buffer = out if direct else torch.empty(lead, dtype=torch.int32)
            if self._column_ids(b, l, base_cells.to(torch.int64), buffer):
                if direct or out is None:
                    return buffer if direct else buffer.to(torch.int64)
                return out.copy_(buffer)
        keys = self._base_cell_keys(b, l, base_cells.to(torch.int64))
        # out-of-range cells carry guard keys that no base cell holds: plain misses (_base_cell_keys)
        keys = keys.expand(lead).reshape(-1)
        if not int32_ids:
            # every level hashed, int64 ids: CUDA, or a CPU index of 2**31 base cells or more
            ids, found = hash_query(table, keys)
            ids = ids.masked_fill_(~found, absent).view(lead)
            return ids if out is None else out.copy_(ids)
        # CPU: the ids are written into `out` itself where it can hold them (contiguous int32),
        # else into a buffer that is copied out
        direct = out is not None and out.dtype == torch.int32 and out.is_contiguous()
        buffer = out.view(-1) if direct else torch.empty(keys.shape[0], dtype=torch.int32)
        self._ids_of_keys(keys, buffer)
        if direct:
            return out
        return buffer.view(lead).to(torch.int64) if out is None else out.copy_(buffer.view(lead))

    def corner_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., 2**D]`` rows of the corners of base cells given by :meth:`base_cell_ids` ids.

        Corner ``k`` is ``base + corner_offsets(D)[k]``; ``-1`` where absent or outside the
        level. The dtype is int32 when the index holds fewer than ``2**31`` voxels, else int64.
        """
        _, corner_rows = self._corner_table()
        return corner_rows.index_select(0, ids.reshape(-1)).view(*ids.shape, corner_rows.shape[1])

    def corner_row_table(self) -> torch.Tensor:
        """The ``[n_base_cells + 1, 2**D]`` table behind :meth:`corner_rows` (built on first use).

        Row ``id`` holds the corner rows of the base cell with that id; the last row is all -1.
        For kernels that read corner rows themselves from :meth:`base_cell_ids` ids.
        """
        return self._corner_table()[1]

    def _corner_table(self):
        """(hash table of the hashed levels' base-cell keys -> id, or None; ``[n_base_cells + 1, 2**D]``
        corner rows), built on first use with the direct-address parts (``self._dense``: the dense
        prefix; ``self._paged``: :func:`_paged_table` of the rest while it fits, else the hash table)."""
        if getattr(self, "_corners", None) is None:
            dim, device = self.position_dim, self.device
            offsets = corner_offsets(dim, device)
            k = offsets.shape[0]
            row_dtype = torch.int32 if self.n_voxels < 2**31 else torch.int64
            self._dense = self._paged = None
            if not self.n_voxels:
                self._corners = (None, torch.full((1, k), -1, dtype=row_dtype, device=device))
                return self._corners
            n_cand = self.n_voxels * k
            # candidate c = v * K + j: the base cell of which voxel v is corner j, in [-1, shape - 1]
            cells = (self.spatial_indices[:, None, :] - offsets).reshape(-1, dim)
            keys = self._base_cell_keys(
                self.batch_indices.repeat_interleave(k), self.level_indices.repeat_interleave(k), cells
            )
            first = new_hash_table(device, n_cand)  # key -> one representative candidate
            hash_insert(first, keys, torch.arange(n_cand, dtype=torch.int64, device=device))
            rep, _ = hash_query(first, keys)
            del first
            is_rep = torch.zeros(n_cand, dtype=torch.bool, device=device)
            is_rep[rep] = True
            unique = is_rep.nonzero().squeeze(1)
            ids = torch.full((n_cand,), -1, dtype=torch.int64, device=device)
            ids[unique] = torch.arange(unique.numel(), device=device)
            cand = torch.arange(n_cand, device=device)
            corner_rows = torch.full((unique.numel() + 1, k), -1, dtype=row_dtype, device=device)
            corner_rows[ids[rep], cand % k] = (cand // k).to(row_dtype)
            # CPU: int32 ids while they fit (base_cell_ids writes them into the caller's int32
            # buffer directly); CUDA tables keep int64 values and every level hashed
            id_dtype = torch.int32 if device.type == "cpu" and unique.numel() < 2**31 - 1 else torch.int64
            unique_keys = keys[unique]
            n_dense = self._dense_prefix() if id_dtype == torch.int32 else 0
            if n_dense:  # the small levels' blocks (a prefix of the key space) as a direct-address table
                dense = torch.full((n_dense,), unique.numel(), dtype=torch.int32)  # absent: the all -1 row
                in_dense = unique_keys < n_dense
                dense[unique_keys[in_dense]] = in_dense.nonzero().squeeze(1).to(torch.int32)
                self._dense = dense
            hashed = (unique_keys >= n_dense).nonzero().squeeze(1)
            table = self._paged = None
            if hashed.numel() and id_dtype == torch.int32:  # the other levels: pages while they fit
                n_keys = self._level_block(self._key_layout(torch.device("cpu"))[5][-1])[1]
                self._paged = _paged_table(unique_keys[hashed] - n_dense, hashed.to(torch.int32), n_keys - n_dense,
                                           unique.numel(), n_dense)
            if hashed.numel() and self._paged is None:
                table = new_hash_table(device, hashed.numel(), value_dtype=id_dtype)
                hash_insert(table, unique_keys[hashed], hashed.to(id_dtype))
            self._corners = (table, corner_rows)
        return self._corners

    def _paged_ids(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Ids of base-cell keys ``[n]`` past the dense prefix from the paged table (``self._paged``)
        into the int32 ``[n]`` contiguous ``out``; ``keys`` (int64, contiguous) is overwritten."""
        shift, first, directory, pages = self._paged
        rel = keys.sub_(first) if first else keys
        rel.add_(directory.index_select(0, torch.bitwise_right_shift(rel, shift)))  # the key's slot in its page
        return torch.index_select(pages, 0, rel, out=out)

    def _dense_prefix(self) -> int:
        """Keys ``[0, n)`` kept as a direct-address int32 table (0: none): the guard key and the
        blocks of the smallest levels (key-space order) while the table stays within
        :data:`DENSE_TABLE_BYTES`."""
        n = 0
        for level in self._key_layout(torch.device("cpu"))[5]:
            stop = self._level_block(level)[1]
            if 4 * stop > DENSE_TABLE_BYTES:
                break
            n = stop
        return n

    def _ids_of_keys(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Corner-table ids of base-cell keys ``[n]`` (CPU) into the int32 ``[n]`` contiguous ``out``:
        direct-address reads for the keys of the dense prefix (guard included), the paged table or
        one spconv query for the rest; a miss is the all-absent row. ``keys`` is overwritten."""
        table, corner_rows = self._corner_table()
        absent = corner_rows.shape[0] - 1
        dense = self._dense
        if dense is None and self._paged is not None:  # every level paged
            return self._paged_ids(keys, out)
        if dense is None:  # every level hashed: the query writes the ids, the misses then in place
            return out.masked_fill_(query_cpu(table, keys, out).view(torch.bool), absent)
        if dense.shape[0] == self._level_block(self._key_layout(torch.device("cpu"))[5][-1])[1]:
            return torch.index_select(dense, 0, keys, out=out)  # every level dense: one gather
        far = keys >= dense.shape[0]
        where = far.nonzero().squeeze(1)
        far_keys = keys.index_select(0, where)
        torch.index_select(dense, 0, keys.masked_fill_(far, 0), out=out)  # far keys read the guard (absent)
        values = torch.empty(far_keys.shape[0], dtype=torch.int32)
        if self._paged is not None:
            return out.index_copy_(0, where, self._paged_ids(far_keys, values))
        if table is None:  # the levels past the dense prefix hold no base cell
            return out.index_fill_(0, where, absent)
        empty = query_cpu(table, far_keys, values).view(torch.bool)
        return out.index_copy_(0, where, values.masked_fill_(empty, absent))

    def _column_ids(self, b: torch.Tensor, l: torch.Tensor, cells: torch.Tensor, out: torch.Tensor) -> bool:
        """:meth:`base_cell_ids` (CPU, int32 ids) of cells ``[..., J, D]`` whose level varies along the
        last axis only (``l`` broadcastable from ``[J]``) and whose batch along the leading axes only
        (``b``'s last dim 1), every batch and level index in range, into the contiguous int32 ``out``
        ``[..., J]``; False (nothing written) where these conditions do not hold.

        The keys of :meth:`_base_cell_keys` (with ``[J]`` levels and ``[rows, 1]`` batches). The
        columns of the direct-address levels are read from the dense table in one gather; those of
        the other levels are copied out (their keys replaced by the guard key 0, whose dense entry
        is the all-absent row) and read from the paged table
        (:meth:`_paged_ids`), or queried in spconv's table on the worker thread while the gather
        runs. A level's out-of-range cells keep keys inside its own block, so the split by column is
        exact. No mask, compaction or scatter over all samples (what :meth:`_ids_of_keys` needs when
        any sample may be of any level).
        """
        lead, dim = cells.shape[:-1], self.position_dim
        n_cols = lead[-1]
        if l.numel() > 1 and (l.ndim > len(lead) or l.numel() != l.shape[-1] or l.shape[-1] != n_cols):
            return False
        if b.ndim > len(lead) or (b.ndim and b.shape[-1] != 1):
            return False
        levels = l.reshape(-1).expand(n_cols)
        rows_b = b.expand(*lead[:-1], 1).reshape(-1, 1)
        if not (bool(((levels >= 0) & (levels < self.n_levels)).all()) and bool(((rows_b >= 0) & (rows_b < self.batch_size)).all())):
            return False
        table, corner_rows = self._corner_table()
        absent = corner_rows.shape[0] - 1
        dense = self._dense
        key = self._base_cell_keys(rows_b, levels, cells.reshape(-1, n_cols, dim))  # [rows, J]
        ids = out.view(-1, n_cols)
        dense_levels = self._dense_levels()
        hashed = [j for j, lv in enumerate(levels.tolist()) if not dense_levels[lv]]
        if not hashed:  # every column's level is in the direct-address table
            torch.index_select(dense, 0, key.view(-1), out=out.view(-1))
            return True
        if len(hashed) == n_cols:  # no column in the direct-address table: as any keys
            self._ids_of_keys(key.view(-1), out.view(-1))
            return True
        if hashed == list(range(hashed[0], hashed[-1] + 1)):  # a block of columns: slices
            cols = slice(hashed[0], hashed[-1] + 1)
            far_keys = key[:, cols].contiguous()
        else:
            cols = torch.tensor(hashed)
            far_keys = key.index_select(1, cols)
        values = torch.empty(far_keys.shape, dtype=torch.int32)
        wait = None
        if self._paged is not None:
            self._paged_ids(far_keys.view(-1), values.view(-1))
        elif table is not None:  # spconv's query on the worker thread while the dense gather runs
            wait = query_cpu_async(table, far_keys.view(-1), values.view(-1))
        else:  # the levels past the dense prefix hold no base cell
            values.fill_(absent)
        if isinstance(cols, slice):  # the guard key 0 reads the all-absent row
            key[:, cols] = 0
        else:
            key.index_fill_(1, cols, 0)
        torch.index_select(dense, 0, key.view(-1), out=out.view(-1))
        if wait is not None:
            values.masked_fill_(wait().view(values.shape).view(torch.bool), absent)
        if isinstance(cols, slice):
            ids[:, cols] = values
        else:
            ids.index_copy_(1, cols, values)
        return True

    def _dense_levels(self) -> list:
        """Per level: True when its key block lies in the direct-address table (``self._dense``)."""
        n_dense = 0 if self._dense is None else self._dense.shape[0]
        return [self._level_block(lv)[1] <= n_dense for lv in range(self.n_levels)]

    def matches(self, batch_indices: torch.Tensor, level_indices: torch.Tensor, spatial_indices: torch.Tensor) -> bool:
        """True when the given per-row coordinates are exactly those the index was built from (O(N))."""
        return (
            spatial_indices.shape == self.spatial_indices.shape
            and torch.equal(spatial_indices.to(torch.int64), self.spatial_indices)
            and torch.equal(batch_indices.to(torch.int64), self.batch_indices)
            and torch.equal(level_indices.to(torch.int64), self.level_indices)
        )

    def to(self, device) -> "SparseCoordinateIndex":
        """The same index on another device (rebuilt there)."""
        return SparseCoordinateIndex(
            self.batch_indices.to(device),
            self.level_indices.to(device),
            self.spatial_indices.to(device),
            self.level_spatial_shapes.to(device),
            self.batch_size,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_voxels={self.n_voxels}, batch_size={self.batch_size}, "
            f"level_spatial_shapes={self.level_spatial_shapes.tolist()}, device={self.device})"
        )
