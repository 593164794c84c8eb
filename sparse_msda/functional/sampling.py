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
hashing), once per forward (never again in backward), so memory scales with voxels and
samples, never with the spatial extent. The lookups run in chunks of ~512k corners: the
integer temporaries of the key computation stay bounded, and only the corners that hold a
value (present voxels, or background sites) are kept, as flat entry numbers and value-table
rows.

The interpolation and the weighted sum over samples (the attention sum of deformable
attention) are one ``F.embedding_bag(..., per_sample_weights=..., mode='sum')`` over those
present corners; ``[queries, heads, levels, points, corners, head_dim]`` (or even
``[..., corners]``) is never materialised. A custom autograd Function gives the gradients
of the value table (a transposed gather), of the sample weights and, analytically through
the interpolation weights, of the positions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters import SparseCoordinateIndex
from adapters.coordinate_index import corner_offsets

__all__ = ["LOOKUP_CHUNK", "corner_bits", "lookup_corners", "sparse_weighted_gather"]

#: number of corner lookups per ``SparseCoordinateIndex.lookup`` call
LOOKUP_CHUNK = 1 << 19


#: ``[2**D, D]`` corner offsets, ``corner_bits(D)[k]`` = bits of ``k``, first axis most significant
corner_bits = corner_offsets


@torch.no_grad()
def lookup_corners(
    index: SparseCoordinateIndex,
    base: Tensor,
    batch_indices: Tensor,
    level_indices: Tensor,
    head_indices: Optional[Tensor] = None,
    n_heads: int = 1,
    background_row_offset: Optional[int] = None,
    chunk: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """The corners of every sample that hold a value, via ``index.lookup_corners``.

    Corner ``k`` of sample ``(s, j)`` is the cell ``base[s, j] + corner_bits(D)[k]``; its
    flat entry number is ``(s * J + j) * K + k`` with ``K = 2**D``.

    Args:
        index: coordinate index of the map.
        base: ``[S, J, D]`` base cells (integer, or integral floats).
        batch_indices, level_indices, head_indices: integer tensors broadcastable to ``[S, J]``
            (``head_indices`` None means head 0).
        n_heads: heads per voxel row of the value table.
        background_row_offset: when given, a corner inside its level's grid but absent from
            the map holds the background row ``background_row_offset + (b * n_levels + l) *
            n_heads + h``; otherwise absent corners hold nothing.
        chunk: corners per lookup call (default :data:`LOOKUP_CHUNK`).

    Returns:
        ``(entries, rows)``: int64 ``[M]`` flat entry numbers of the corners that hold a value
        (ascending) and ``[M]`` their value-table rows (``voxel_row * n_heads + head`` or a
        background row; int32 when the table has fewer than 2**31 rows, else int64).
    """
    n_samples, n_per, dim = base.shape
    bits = corner_bits(dim, base.device)  # [K, D]
    k = bits.shape[0]
    b = batch_indices.to(torch.int64).expand(n_samples, n_per)
    l = level_indices.to(torch.int64).expand(n_samples, n_per)
    h = None if head_indices is None else head_indices.to(torch.int64).expand(n_samples, n_per)
    shapes = index.level_spatial_shapes.to(base.device)
    n_rows = index.n_voxels * n_heads + (0 if background_row_offset is None else index.batch_size * index.n_levels * n_heads)
    idx_dtype = torch.int32 if n_rows < 2**31 else torch.int64
    entries, rows = [], []
    step = max(1, (chunk or LOOKUP_CHUNK) // max(1, n_per * k))
    for start in range(0, n_samples, step):
        sl = slice(start, start + step)
        base_sl = base[sl].to(torch.int64)  # [s, J, D]
        lb, ll = b[sl, :, None], l[sl, :, None]
        # one hash query per sample: the index returns the rows of all K corners of its base cell
        r = index.lookup_corners(b[sl].reshape(-1), l[sl].reshape(-1), base_sl.reshape(-1, dim))
        r = r.view(*base_sl.shape[:-1], k)  # [s, J, K]
        found = r >= 0
        if h is not None and n_heads > 1:
            r = r * n_heads + h[sl, :, None]
        if background_row_offset is not None:
            coords = base_sl[:, :, None, :] + bits  # [s, J, K, D]
            inside = ((coords >= 0) & (coords < shapes[ll])).all(-1)
            bg = (lb * index.n_levels + ll) * n_heads + background_row_offset
            if h is not None:
                bg = bg + h[sl, :, None]
            r = torch.where(found, r, bg)
            found = found | inside
        hit = found.reshape(-1).nonzero().squeeze(1)
        entries.append(hit + start * n_per * k)
        rows.append(r.reshape(-1).index_select(0, hit).to(idx_dtype))
    if not entries:
        return torch.zeros(0, dtype=torch.int64, device=base.device), torch.zeros(0, dtype=idx_dtype, device=base.device)
    return torch.cat(entries), torch.cat(rows)


def _row_dots(table: Tensor, rows: Tensor, grad_out: Tensor, bags: Tensor, chunk: int = 1 << 17) -> Tensor:
    """``out[m] = <table[rows[m]], grad_out[bags[m]]>`` in chunks (never ``[M, Dh]`` at once)."""
    out = grad_out.new_empty(rows.shape[0])
    for s in range(0, rows.shape[0], chunk):
        gathered = F.embedding(rows[s : s + chunk], table)
        out[s : s + chunk] = (gathered * grad_out.index_select(0, bags[s : s + chunk])).sum(-1)
    return out


def _bag_offsets(bags: Tensor, n_bags: int) -> Tensor:
    """Start offsets ``[n_bags]`` of ascending bag ids ``bags``."""
    counts = torch.bincount(bags, minlength=n_bags)
    offsets = torch.zeros(n_bags, dtype=torch.int64, device=bags.device)
    if n_bags > 1:
        offsets[1:] = counts.cumsum(0)[:-1]
    return offsets


def _entry_factors(frac: Tensor, entries: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per present corner: sample number ``[M]``, per-axis factors and corner bits (lists of ``[M]``).

    Corner ``k`` of a sample with fractional offsets ``f`` has weight ``prod_d fac_d`` with
    ``fac_d = f_d`` where bit ``d`` of ``k`` (most significant first) is set, else ``1 - f_d``.
    One ``[M]`` tensor per axis keeps the transient memory low.
    """
    dim = frac.shape[-1]
    k = 2**dim
    samples = torch.div(entries, k, rounding_mode="floor")
    corner = entries - samples * k
    flat = frac.reshape(-1, dim)
    factors, bits = [], []
    for d in range(dim):
        bit = ((corner >> (dim - 1 - d)) & 1).to(torch.bool)
        f = flat[:, d].contiguous().index_select(0, samples)
        factors.append(torch.where(bit, f, 1.0 - f))
        bits.append(bit)
    return samples, factors, bits


def _prod(tensors: list[Tensor], like: Tensor) -> Tensor:
    if not tensors:
        return torch.ones_like(like)
    out = tensors[0]
    for t in tensors[1:]:
        out = out * t
    return out


class _InterpolatedGather(torch.autograd.Function):
    """Bilinear/trilinear interpolation and weighted sum over samples, fused.

    ``out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * table[row(s, j, k)]`` over the corners
    that hold a value (``entries`` / ``rows`` from :func:`lookup_corners`; all others are
    zero), ``c_k`` the interpolation weights. Forward is one ``embedding_bag`` over those
    corners only. Backward computes the value/gradient dot product of each such corner once;
    from them, analytically, the gradients of ``a`` and ``frac`` (scatter-added per sample);
    the table gradient is a transposed gather (corners sorted by table row, one
    ``embedding_bag``). Saved: ``frac [S, J, D]``, ``a [S, J]``, ``entries`` and ``rows``:
    work and memory are linear in samples and in *present* corners; nothing of size
    ``[samples, corners]`` or ``[samples, corners, head_dim]`` is formed.
    """

    @staticmethod
    def forward(ctx, table, frac, attn, entries, rows):
        n_samples, n_per, dim = frac.shape
        samples, factors, _ = _entry_factors(frac, entries)
        weights = _prod(factors, samples) * attn.reshape(-1).index_select(0, samples)
        bags = torch.div(samples, n_per, rounding_mode="floor")
        offsets = _bag_offsets(bags, n_samples).to(rows.dtype)
        out = F.embedding_bag(rows, table, offsets, per_sample_weights=weights, mode="sum")
        ctx.save_for_backward(table, frac, attn, entries, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, frac, attn, entries, rows = ctx.saved_tensors
        n_samples, n_per, dim = frac.shape
        grad_out = grad_out.contiguous()
        samples, factors, bits = _entry_factors(frac, entries)
        corner_w = _prod(factors, samples)
        a = attn.reshape(-1).index_select(0, samples)
        bags = torch.div(samples, n_per, rounding_mode="floor")
        g_table = g_frac = g_attn = None
        if ctx.needs_input_grad[0]:
            sorted_rows, perm = torch.sort(rows, stable=True)
            offsets = _bag_offsets(sorted_rows.to(torch.int64), table.shape[0])
            g_table = F.embedding_bag(
                bags.index_select(0, perm), grad_out, offsets,
                per_sample_weights=(corner_w * a).index_select(0, perm), mode="sum",
            )
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dots = _row_dots(table, rows, grad_out, bags)  # [M]
            if ctx.needs_input_grad[2]:
                g_attn = grad_out.new_zeros(n_samples * n_per).index_add_(0, samples, dots * corner_w).view(n_samples, n_per)
            if ctx.needs_input_grad[1]:
                # d c / d f_d = sign_d * prod_{e != d} fac_e, sign_d = +1 where bit d is set else -1
                da = dots * a
                g_frac = grad_out.new_zeros(n_samples * n_per, dim)
                for d in range(dim):
                    excl = _prod([factors[e] for e in range(dim) if e != d], corner_w) * da
                    g_frac[:, d].index_add_(0, samples, torch.where(bits[d], excl, -excl))
                g_frac = g_frac.view(n_samples, n_per, dim)
        return g_table, g_frac, g_attn, None, None


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
    n_value_rows = table.shape[0]
    if background_table is not None:
        table = torch.cat([table, background_table.to(table.dtype)])
    entries, rows = lookup_corners(
        index, base, batch_indices, level_indices, head_indices, n_heads,
        background_row_offset=None if background_table is None else n_value_rows,
    )
    if sample_weights is None:
        sample_weights = table.new_ones(n_samples, n_per)
    if table.shape[0] == 0:  # no voxel and no background: no corner holds a value
        table = table.new_zeros(1, table.shape[1]) + 0 * table.sum()
    return _InterpolatedGather.apply(table, frac, sample_weights.to(table.dtype), entries, rows)
