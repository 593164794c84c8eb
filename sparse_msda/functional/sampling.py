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

Every corner is found through :meth:`adapters.SparseCoordinateIndex.lookup` (spconv
hashing), so memory scales with voxels and samples, never with the spatial extent.
The lookups run in chunks of the sample dimension: one call per ~256k corners keeps
the integer temporaries of the key computation cache- and allocator-friendly (a single
call over tens of millions of corners is several times slower on CPU), while the
number of calls stays small.

The interpolation and any weighted sum over samples (the attention sum of deformable
attention) are one ``F.embedding_bag(..., per_sample_weights=..., mode='sum')`` over a
flat value table: ``[queries, heads, levels, points, corners, head_dim]`` is never
materialised. Autograd gives gradients to the table (values), to the per-sample weights
and, through the bilinear weights, to the positions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters import SparseCoordinateIndex

__all__ = ["bilinear_corner_weights", "lookup_corners", "sparse_weighted_gather", "LOOKUP_CHUNK"]

#: number of corner lookups per ``SparseCoordinateIndex.lookup`` call
LOOKUP_CHUNK = 1 << 18


def corner_bits(position_dim: int, device=None) -> Tensor:
    """``[2**position_dim, position_dim]`` int64 offsets of the interpolation corners.

    Corner ``k`` is ``base + corner_bits[k]``; the first axis is the most significant bit
    (same order as :func:`bilinear_corner_weights`).
    """
    k = torch.arange(2**position_dim, device=device)
    shifts = torch.arange(position_dim - 1, -1, -1, device=device)
    return (k[:, None] >> shifts[None, :]) & 1


def bilinear_corner_weights(positions: Tensor) -> tuple[Tensor, Tensor]:
    """Base cells and (differentiable) interpolation weights of continuous positions.

    Args:
        positions: float ``[..., D]`` in level cells (cell ``i`` covers ``[i, i + 1)``).

    Returns:
        ``(base, weights)``: int64 ``[..., D]`` base cell ``floor(p - 0.5)`` and
        ``[..., 2**D]`` weights of the corners ``base + corner_bits(D)[k]``; they sum to 1.
    """
    shifted = positions - 0.5
    base = torch.floor(shifted.detach())
    frac = shifted - base  # [..., D], gradient 1 w.r.t. positions
    factors = torch.stack([1.0 - frac, frac], dim=-1)  # [..., D, 2]
    dim = positions.shape[-1]
    weights = factors[..., 0, :]
    for axis in range(1, dim):
        weights = (weights[..., :, None] * factors[..., axis, None, :]).flatten(-2)
    return base.to(torch.int64), weights


@torch.no_grad()
def lookup_corners(
    index: SparseCoordinateIndex,
    base: Tensor,
    batch_indices: Tensor,
    level_indices: Tensor,
    chunk: int = LOOKUP_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Rows of the ``2**D`` interpolation corners of every sample, via ``index.lookup``.

    Args:
        index: coordinate index of the map.
        base: int64 ``[S, J, D]`` base cells.
        batch_indices, level_indices: integer tensors broadcastable to ``[S, J]``.
        chunk: corners per lookup call.

    Returns:
        ``(rows, inside)``: int64 ``[S, J, K]`` feature rows (``-1`` where the corner is
        absent or outside) and bool ``[S, J, K]``, True where the corner lies inside its
        level's grid (present or not).
    """
    n_samples, n_per, dim = base.shape
    bits = corner_bits(dim, base.device)  # [K, D]
    k = bits.shape[0]
    b = batch_indices.to(torch.int64).expand(n_samples, n_per)
    l = level_indices.to(torch.int64).expand(n_samples, n_per)
    shapes = index.level_spatial_shapes.to(base.device)
    rows = torch.empty(n_samples, n_per, k, dtype=torch.int64, device=base.device)
    inside = torch.empty(n_samples, n_per, k, dtype=torch.bool, device=base.device)
    step = max(1, chunk // max(1, n_per * k))
    for start in range(0, n_samples, step):
        sl = slice(start, start + step)
        coords = base[sl, :, None, :] + bits  # [s, J, K, D]
        lb, ll = b[sl, :, None], l[sl, :, None]
        found_rows, _ = index.lookup(lb, ll, coords)
        rows[sl] = found_rows
        inside[sl] = ((coords >= 0) & (coords < shapes[ll])).all(-1)
    return rows, inside


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

    Returns:
        ``[S, Dh]``.
    """
    n_samples, n_per, dim = positions.shape
    dh = table.shape[-1]
    if head_indices is None:
        head_indices = torch.zeros((), dtype=torch.int64, device=positions.device)
    base, bil = bilinear_corner_weights(positions)  # [S, J, D], [S, J, K]
    rows, inside = lookup_corners(index, base, batch_indices, level_indices)
    with torch.no_grad():
        found = rows >= 0
        h = head_indices.to(torch.int64).expand(n_samples, n_per)[..., None]
        flat = torch.where(found, rows * n_heads + h, 0)
        idx_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64
        k = rows.shape[-1]
        flat = flat.reshape(n_samples, n_per * k).to(idx_dtype)
    weights = bil if sample_weights is None else bil * sample_weights[..., None].to(bil.dtype)
    weights = weights.to(table.dtype)
    if table.shape[0] == 0:  # no voxel at all: every corner is absent
        table = table.new_zeros(1, dh)
    out = F.embedding_bag(flat, table, per_sample_weights=(weights * found).reshape(n_samples, n_per * k), mode="sum")
    if background_table is not None:
        with torch.no_grad():
            absent = inside & ~found
            n_levels = index.n_levels
            b = batch_indices.to(torch.int64).expand(n_samples, n_per)
            l = level_indices.to(torch.int64).expand(n_samples, n_per)
            bg_rows = ((b * n_levels + l) * n_heads + h[..., 0]).to(idx_dtype)
        bg_weights = (weights * absent).sum(-1)  # [S, J]
        out = out + F.embedding_bag(bg_rows, background_table, per_sample_weights=bg_weights, mode="sum")
    return out
