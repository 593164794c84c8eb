"""Windows of the multi-level neighborhood attention: which cells each query attends to.

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
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from adapters import as_level_spatial_shapes

__all__ = [
    "CENTRE_LIMIT",
    "check_finite_positions",
    "check_neighborhood_sizes",
    "get_multilevel_neighborhoods",
    "window_centres",
    "window_offsets",
]


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
        contiguous int64 ``[Q, L, D]``: ``floor(positions / position_shapes * shape_l)`` in
        float64, clamped to ``[-CENTRE_LIMIT, CENTRE_LIMIT]`` before the integer conversion (a
        huge position stays outside the map and no later ``centre +- radius`` overflows).
        Positions must be finite (:func:`check_finite_positions`); a NaN would give an
        arbitrary centre.
    """
    p = positions.detach().to(torch.float64)
    ps = position_shapes.to(device=p.device, dtype=torch.float64)
    if ps.ndim == 1:
        ps = ps.expand_as(p)
    ls = level_spatial_shapes.to(device=p.device, dtype=torch.float64)
    c = torch.floor(p[:, None, :] / ps[:, None, :] * ls[None])
    return c.clamp_(-CENTRE_LIMIT, CENTRE_LIMIT).to(torch.int64).contiguous()


#: window centres are clamped to this magnitude (far outside any grid, far from int64 overflow)
CENTRE_LIMIT = float(2**40)


def check_finite_positions(name: str, positions: Tensor) -> None:
    """Raise ValueError naming the first query whose position has a NaN or infinite coordinate
    (the written policy: a non-finite query position is an error; a huge finite one is a query
    outside the map)."""
    ok = torch.isfinite(positions).all(-1) if positions.ndim else torch.isfinite(positions)
    if not bool(ok.all()):
        bad = int((~ok).reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite (NaN / inf positions have no cell), got query {bad} at "
            f"{positions[bad].tolist() if positions.ndim > 1 else positions[bad].item()}"
        )


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
    check_finite_positions("query_fullscale_spatial_positions", pos)
    sizes = check_neighborhood_sizes(neighborhood_sizes, n_levels)
    full = shapes[int(torch.argmax(shapes.prod(-1)))]
    centres = window_centres(pos, full, shapes)
    offsets, slot_level = window_offsets(sizes, dim, device=pos.device)
    cells = centres[:, slot_level] + offsets[None]
    oob = ((cells < 0) | (cells >= shapes[slot_level][None])).any(-1)
    return cells, oob, slot_level
