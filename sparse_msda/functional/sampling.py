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

__all__ = ["LOOKUP_CHUNK", "bilinear_corner_weights", "corner_bits", "lookup_corners", "sparse_weighted_gather"]

#: number of corner lookups per ``SparseCoordinateIndex.lookup`` call
LOOKUP_CHUNK = 1 << 20


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
    head_indices: Optional[Tensor] = None,
    n_heads: int = 1,
    with_inside: bool = False,
    chunk: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Table rows of the ``2**D`` interpolation corners of every sample, via ``index.lookup``.

    Args:
        index: coordinate index of the map.
        base: int64 ``[S, J, D]`` base cells.
        batch_indices, level_indices, head_indices: integer tensors broadcastable to ``[S, J]``
            (``head_indices`` None means head 0).
        n_heads: heads per voxel row of the value table.
        with_inside: also return where corners lie inside their level's grid.
        chunk: corners per lookup call (default :data:`LOOKUP_CHUNK`).

    Returns:
        ``(rows, found, inside)``: int32 (int64 for tables of 2**31 rows or more)
        ``[S, J, K]`` value-table rows ``voxel_row * n_heads + head`` (0 where the corner is
        absent or outside), bool ``[S, J, K]`` found mask, and bool ``[S, J, K]`` inside mask
        (None unless ``with_inside``).
    """
    n_samples, n_per, dim = base.shape
    bits = corner_bits(dim, base.device)  # [K, D]
    k = bits.shape[0]
    b = batch_indices.to(torch.int64).expand(n_samples, n_per)
    l = level_indices.to(torch.int64).expand(n_samples, n_per)
    h = None if head_indices is None else head_indices.to(torch.int64).expand(n_samples, n_per)
    shapes = index.level_spatial_shapes.to(base.device)
    idx_dtype = torch.int32 if index.n_voxels * n_heads < 2**31 else torch.int64
    rows = torch.empty(n_samples, n_per, k, dtype=idx_dtype, device=base.device)
    found = torch.empty(n_samples, n_per, k, dtype=torch.bool, device=base.device)
    inside = torch.empty(n_samples, n_per, k, dtype=torch.bool, device=base.device) if with_inside else None
    step = max(1, (chunk or LOOKUP_CHUNK) // max(1, n_per * k))
    for start in range(0, n_samples, step):
        sl = slice(start, start + step)
        coords = base[sl, :, None, :] + bits  # [s, J, K, D]
        lb, ll = b[sl, :, None], l[sl, :, None]
        r, f = index.lookup(lb, ll, coords)
        if h is not None and n_heads > 1:
            r = r * n_heads + h[sl, :, None]
        rows[sl] = r.masked_fill_(~f, 0)
        found[sl] = f
        if with_inside:
            inside[sl] = ((coords >= 0) & (coords < shapes[ll])).all(-1)
    return rows, found, inside


def _sampled_dots(table: Tensor, grad_out: Tensor, rows: Tensor, chunk_elements: int = 1 << 22) -> Tensor:
    """``out[s, e] = <table[rows[s, e]], grad_out[s]>``, in chunks of ``chunk_elements`` gathered values.

    (``torch.sparse.sampled_addmm`` would avoid the gather but rejects repeated rows within a
    bag, which are common: two points of a head often share a corner.)
    """
    n_bags, per_bag = rows.shape
    out = grad_out.new_empty(n_bags, per_bag)
    step = max(1, chunk_elements // max(1, per_bag * table.shape[1]))
    for s in range(0, n_bags, step):
        gathered = F.embedding(rows[s : s + step], table)  # [s, E, Dh]
        out[s : s + step] = torch.bmm(gathered, grad_out[s : s + step, :, None]).squeeze(-1)
    return out


def _corner_factors(frac: Tensor) -> list[Tensor]:
    """Per-axis factors ``[..., 2]`` = ``(1 - f_d, f_d)``, shaped to broadcast over ``[..., 2, ..., 2]``."""
    dim = frac.shape[-1]
    out = []
    for d in range(dim):
        f = torch.stack([1.0 - frac[..., d], frac[..., d]], -1)  # [..., 2]
        out.append(f.view(*frac.shape[:-1], *([1] * d), 2, *([1] * (dim - 1 - d))))
    return out


def _corner_weights_from_factors(factors: list[Tensor]) -> Tensor:
    w = factors[0]
    for f in factors[1:]:
        w = w * f
    return w


def _transposed_gather(grad_out: Tensor, weights: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``W^T grad_out`` for ``W[s, rows[s, e]] += weights[s, e]``: ``[n_rows, Dh]``.

    The entries are sorted by table row once (integer sort), then one ``embedding_bag``
    sums the weighted ``grad_out`` rows of each table row.
    """
    per_bag = rows.shape[1]
    flat = rows.reshape(-1)
    sorted_rows, perm = torch.sort(flat)
    counts = torch.bincount(sorted_rows.to(torch.int64), minlength=n_rows)
    offsets = torch.zeros(n_rows, dtype=torch.int64, device=flat.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    bag_of_entry = torch.div(perm, per_bag, rounding_mode="floor")
    return F.embedding_bag(bag_of_entry, grad_out, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[perm])


class _InterpolatedGather(torch.autograd.Function):
    """Bilinear/trilinear interpolation and weighted sum over samples, fused.

    ``out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * V(s, j, k)`` where ``c_k`` are the
    interpolation weights of corner ``k`` and ``V`` is ``table[rows]`` for found corners,
    ``bg_table[bg_rows]`` for corners inside the grid but absent (when a background is
    given) and 0 otherwise. Forward is one ``embedding_bag`` over the table (plus one over
    the tiny background table). Backward computes the per-corner value/gradient dot
    products ``G`` once (sampled dense-dense products) and from them, analytically, the
    gradients of ``a`` and ``frac``; table gradients are transposed gathers. Only
    ``frac [S, J, D]``, ``a [S, J]``, the int32 rows and bool masks are saved.
    """

    @staticmethod
    def forward(ctx, table, frac, attn, rows, found, bg_table, bg_rows, absent):
        n_samples, n_per, dim = frac.shape
        k = 2**dim
        factors = _corner_factors(frac)
        bil = _corner_weights_from_factors(factors).reshape(n_samples, n_per, k)
        aw = bil * attn[..., None]
        weights = (aw * found).reshape(n_samples, n_per * k)
        out = F.embedding_bag(rows.reshape(n_samples, n_per * k), table, per_sample_weights=weights, mode="sum")
        if bg_table is not None:
            out = out + F.embedding_bag(bg_rows, bg_table, per_sample_weights=(aw * absent).sum(-1), mode="sum")
        ctx.save_for_backward(table, frac, attn, rows, found, bg_table, bg_rows, absent)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, frac, attn, rows, found, bg_table, bg_rows, absent = ctx.saved_tensors
        n_samples, n_per, dim = frac.shape
        k = 2**dim
        grad_out = grad_out.contiguous()
        factors = _corner_factors(frac)
        bil = _corner_weights_from_factors(factors).reshape(n_samples, n_per, k)
        rows2 = rows.reshape(n_samples, n_per * k)
        g_table = g_frac = g_attn = g_bg = None
        if ctx.needs_input_grad[0]:
            weights = (bil * attn[..., None] * found).reshape(n_samples, n_per * k)
            g_table = _transposed_gather(grad_out, weights, rows2, table.shape[0])
        if ctx.needs_input_grad[5]:
            bg_w = (bil * attn[..., None] * absent).sum(-1)
            g_bg = _transposed_gather(grad_out, bg_w, bg_rows, bg_table.shape[0])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dots = _sampled_dots(table, grad_out, rows2).view(n_samples, n_per, k) * found
            if bg_table is not None:
                dots = dots + _sampled_dots(bg_table, grad_out, bg_rows)[..., None] * absent
            if ctx.needs_input_grad[2]:
                g_attn = (dots * bil).sum(-1)
            if ctx.needs_input_grad[1]:
                grid = dots.view(n_samples, n_per, *([2] * dim))
                parts = []
                for d in range(dim):
                    others = [f for e, f in enumerate(factors) if e != d]
                    partial = grid if not others else grid * _corner_weights_from_factors(others)
                    partial = partial.transpose(2 + d, -1).reshape(n_samples, n_per, k // 2, 2)
                    parts.append((partial[..., 1] - partial[..., 0]).sum(-1))
                g_frac = torch.stack(parts, -1) * attn[..., None]
        return g_table, g_frac, g_attn, None, None, g_bg, None, None


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
        ``[S, Dh]``; differentiable w.r.t. table, positions, sample_weights, background_table.
    """
    n_samples, n_per, dim = positions.shape
    shifted = positions - 0.5
    base = torch.floor(shifted.detach())
    frac = (shifted - base).to(table.dtype)
    with_bg = background_table is not None
    rows, found, inside = lookup_corners(
        index, base.to(torch.int64), batch_indices, level_indices, head_indices, n_heads, with_inside=with_bg
    )
    if sample_weights is None:
        sample_weights = table.new_ones(n_samples, n_per)
    bg_rows = absent = None
    if with_bg:
        with torch.no_grad():
            absent = inside & ~found
            b = batch_indices.to(torch.int64).expand(n_samples, n_per)
            l = level_indices.to(torch.int64).expand(n_samples, n_per)
            h = torch.zeros((), dtype=torch.int64, device=b.device) if head_indices is None else head_indices.to(torch.int64)
            bg_rows = (b * index.n_levels + l) * n_heads + h.expand(n_samples, n_per)
        background_table = background_table.to(table.dtype)
    if table.shape[0] == 0:  # no voxel at all: every corner is absent; a zero row keeps shapes valid
        table = table.new_zeros(1, table.shape[1]) + 0 * table.sum()
    return _InterpolatedGather.apply(
        table, frac, sample_weights.to(table.dtype), rows, found, background_table, bg_rows, absent
    )
