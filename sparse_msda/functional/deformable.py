"""Functional sparse multi-scale deformable attention (Deformable DETR on sparse maps).

Conventions (shared by the whole package):

* Axis order of positions and coordinates is the tensor's, i.e. spconv's: ``(y, x)`` in
  2D, ``(z, y, x)`` in 3D. Cell ``i`` covers ``[i, i + 1)``; its centre is ``i + 0.5``.
* Sampling is exactly ``F.grid_sample(mode='bilinear', align_corners=False,
  padding_mode='zeros')`` on the densified map (trilinear in 3D): no clamping; a corner
  outside the level's grid is zero; a corner inside the grid but absent from the sparse
  map is zero, or the background value of its (batch, level) when one is given.
* Maps are COO stacks ``[batch, *spatial, n_levels, channels]`` (optionally head-split,
  ``[batch, *spatial, n_levels, n_heads, head_dim]``) or lists of spconv
  ``SparseConvTensor``, one per level.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from adapters import SparseCoordinateIndex, broadcast_shapes, multilevel_features

from .sampling import SamplingPlan, plan_sampling, sparse_weighted_gather

__all__ = [
    "deformable_sample_indices",
    "multilevel_sparse_bilinear_grid_sample",
    "plan_deformable_sampling",
    "sparse_deformable_attention",
    "sparse_split_heads",
]


def sparse_split_heads(sparse_tensor: Tensor, n_heads: int) -> Tensor:
    """Split the feature dim of a sparse COO map into heads.

    Args:
        sparse_tensor: sparse COO ``[batch, *spatial, n_levels, embed_dim]`` (one dense dim).
        n_heads: number of heads; must divide ``embed_dim``.

    Returns:
        Coalesced sparse COO ``[batch, *spatial, n_levels, n_heads, embed_dim // n_heads]``
        with the same sparse indices (two dense dims); differentiable w.r.t. the values.

    Raises:
        TypeError: not a sparse COO tensor, or ``n_heads`` not an int.
        ValueError: not exactly one dense dim, or ``embed_dim % n_heads != 0``.
    """
    if not isinstance(sparse_tensor, Tensor) or sparse_tensor.layout != torch.sparse_coo:
        raise TypeError(
            f"sparse_tensor must be a sparse COO tensor, got {getattr(sparse_tensor, 'layout', type(sparse_tensor).__name__)}"
        )
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0:
        raise TypeError(f"n_heads must be a positive int, got {n_heads=}")
    if sparse_tensor.dense_dim() != 1:
        raise ValueError(
            f"sparse_tensor must have exactly one dense (feature) dim, got sparse_tensor.dense_dim()={sparse_tensor.dense_dim()}"
        )
    embed_dim = sparse_tensor.shape[-1]
    if embed_dim % n_heads != 0:
        raise ValueError(f"the feature dim must be divisible by n_heads, got {embed_dim=}, {n_heads=}")
    st = sparse_tensor.coalesce()
    values = st.values().reshape(-1, n_heads, embed_dim // n_heads)
    return torch.sparse_coo_tensor(
        st.indices(), values, (*st.shape[:-1], n_heads, embed_dim // n_heads), is_coalesced=True
    )


def _as_int(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {name}.dtype={t.dtype}")
    return t.to(torch.int64)


def multilevel_sparse_bilinear_grid_sample(
    sparse_tensor,
    spatial_positions: Tensor,
    batch_indices: Tensor,
    level_spatial_shapes=None,
    level_indices: Optional[Tensor] = None,
    head_indices: Optional[Tensor] = None,
    background_embedding: Optional[Tensor] = None,
) -> Tensor:
    """Bilinearly (trilinearly in 3D) sample a multi-level sparse map at arbitrary points.

    Equivalent to ``F.grid_sample(align_corners=False, padding_mode='zeros')`` on the
    densified level, with positions in absolute level cells instead of ``[-1, 1]``:
    position ``p`` (axis order ``(y, x)`` / ``(z, y, x)``) interpolates the cell centres
    ``i + 0.5`` around it. Corners outside the level are zero; corners absent from the map
    are zero or ``background_embedding[b, l]``.

    Args:
        sparse_tensor: COO stack ``[batch, *spatial, n_levels, C]``, head-split COO stack
            ``[batch, *spatial, n_levels, n_heads, head_dim]`` (see
            :func:`sparse_split_heads`), or a list of ``SparseConvTensor`` (one per level).
        spatial_positions: float ``[..., D]`` positions in the cells of the sampled level.
        batch_indices: integer, broadcastable to ``[...]``.
        level_spatial_shapes: ``[n_levels, D]`` (may be None for a list of SparseConvTensor).
        level_indices: integer, broadcastable to ``[...]``: the level sampled by each point.
            May be None only for a single-level map.
        head_indices: integer, broadcastable to ``[...]`` (head-split maps only). None
            samples every head.
        background_embedding: value of an absent site, ``[batch, n_levels, C]`` or
            ``[batch, n_levels, n_heads, head_dim]`` (same space as the map's values).

    Returns:
        ``[..., C]``; for a head-split map ``[..., head_dim]`` with ``head_indices``, else
        ``[..., n_heads, head_dim]``.

    Raises:
        TypeError / ValueError: wrong kinds, dtypes or shapes (messages name the argument).
    """
    n_heads = 1
    if isinstance(sparse_tensor, Tensor) and sparse_tensor.layout == torch.sparse_coo and sparse_tensor.dense_dim() == 2:
        if not sparse_tensor.is_coalesced():  # coalesce() would silently sum duplicate coordinates
            raw = sparse_tensor._indices()
            n_unique = torch.unique(raw, dim=1).shape[1]
            if n_unique != raw.shape[1]:
                raise ValueError(
                    f"sparse_tensor has duplicate coordinates: {raw.shape[1] - n_unique} of {raw.shape[1]} entries repeat "
                    "a (batch, *coords, level) site, expected each voxel once"
                )
        st = sparse_tensor.coalesce()
        n_heads, head_dim = st.shape[-2], st.shape[-1]
        flat = torch.sparse_coo_tensor(
            st.indices(), st.values().reshape(-1, n_heads * head_dim), (*st.shape[:-2], n_heads * head_dim), is_coalesced=True
        )
        features, index = multilevel_features(flat, level_spatial_shapes)
        split = True
    else:
        features, index = multilevel_features(sparse_tensor, level_spatial_shapes)
        head_dim = features.shape[-1]
        split = False
    if head_indices is not None and not split:
        raise ValueError("head_indices is given but sparse_tensor is not head-split (use sparse_split_heads)")
    dim = index.position_dim
    if not isinstance(spatial_positions, Tensor) or not spatial_positions.is_floating_point():
        raise TypeError(
            f"spatial_positions must be a floating-point tensor, got {getattr(spatial_positions, 'dtype', type(spatial_positions).__name__)}"
        )
    if spatial_positions.ndim < 1 or spatial_positions.shape[-1] != dim:
        raise ValueError(
            f"spatial_positions must have shape [..., {dim}] for a {dim}D map, got spatial_positions.shape={tuple(spatial_positions.shape)}"
        )
    lead = spatial_positions.shape[:-1]
    b = _as_int("batch_indices", batch_indices)
    if level_indices is None:
        if index.n_levels != 1:
            raise ValueError(f"level_indices is required for a map with n_levels={index.n_levels} > 1")
        level_indices = torch.zeros((), dtype=torch.int64, device=spatial_positions.device)
    l = _as_int("level_indices", level_indices)
    try:
        broadcast_shapes(lead, b.shape, l.shape)
        if head_indices is not None:
            broadcast_shapes(lead, _as_int("head_indices", head_indices).shape)
    except RuntimeError as err:
        raise ValueError(
            f"batch_indices.shape={tuple(b.shape)}, level_indices.shape={tuple(l.shape)}, "
            f"head_indices.shape={None if head_indices is None else tuple(head_indices.shape)} must broadcast to "
            f"spatial_positions.shape[:-1]={tuple(lead)}"
        ) from err
    if broadcast_shapes(lead, b.shape, l.shape) != lead:
        raise ValueError(
            f"batch_indices.shape={tuple(b.shape)} and level_indices.shape={tuple(l.shape)} must broadcast to "
            f"spatial_positions.shape[:-1]={tuple(lead)} without enlarging it"
        )

    if split and head_indices is None:
        # sample every head: a trailing head axis
        lead = (*lead, n_heads)
        spatial_positions = spatial_positions.unsqueeze(-2).expand(*lead, dim)
        b, l = b.unsqueeze(-1), l.unsqueeze(-1)
        h = torch.arange(n_heads, device=spatial_positions.device)
    elif split:
        h = _as_int("head_indices", head_indices)
        if h.numel() and (int(h.min()) < 0 or int(h.max()) >= n_heads):
            raise ValueError(f"head_indices must lie in [0, {n_heads}), got range [{int(h.min())}, {int(h.max())}]")
    else:
        h = torch.zeros((), dtype=torch.int64, device=spatial_positions.device)

    table = features.reshape(-1, head_dim)
    bg_table = None
    if background_embedding is not None:
        expected = (index.batch_size, index.n_levels, n_heads, head_dim) if split else (index.batch_size, index.n_levels, head_dim)
        if not isinstance(background_embedding, Tensor) or not background_embedding.is_floating_point():
            raise TypeError("background_embedding must be a floating-point tensor")
        if tuple(background_embedding.shape) != expected:
            raise ValueError(
                f"background_embedding must have shape {list(expected)}, got background_embedding.shape={tuple(background_embedding.shape)}"
            )
        bg_table = background_embedding.reshape(-1, head_dim).to(table.dtype)

    n = 1
    for s in lead:
        n *= s
    pos = spatial_positions.reshape(n, 1, dim)
    flat_idx = lambda t: t.expand(lead).reshape(n, 1)  # noqa: E731
    out = sparse_weighted_gather(
        table, index, pos, flat_idx(b), flat_idx(l), flat_idx(h), n_heads=n_heads, background_table=bg_table
    )
    return out.reshape(*lead, head_dim)


def deformable_sample_indices(batch_indices: Tensor, n_heads: int, n_levels: int, n_points: int):
    """Batch ``[Q*H, 1]``, level ``[1, L*P]`` and head ``[Q*H, 1]`` indices of the samples of
    multi-scale deformable attention, laid out as ``[queries * heads, levels * points]``."""
    device = batch_indices.device
    q = batch_indices.shape[0]
    return (
        batch_indices.repeat_interleave(n_heads)[:, None],
        torch.arange(n_levels, device=device).repeat_interleave(n_points)[None, :],
        torch.arange(n_heads, device=device).repeat(q)[:, None],
    )


def plan_deformable_sampling(
    index: SparseCoordinateIndex, batch_indices: Tensor, sampling_locations: Tensor, compact_below: float = 0.5
) -> SamplingPlan:
    """Hash the samples of :func:`sparse_deformable_attention` once, before the values exist.

    With few queries (a decoder) the samples touch a fraction of the map; the plan's
    ``voxel_rows`` then says which voxels to project (``value_proj(features[voxel_rows])``)
    and the attention reads that compact table. Arguments as for
    :func:`sparse_deformable_attention`; ``compact_below`` as for :func:`plan_sampling`.
    """
    q, n_heads, n_levels, n_points, dim = sampling_locations.shape
    b, l, _ = deformable_sample_indices(batch_indices, n_heads, n_levels, n_points)
    positions = sampling_locations.detach().reshape(q * n_heads, n_levels * n_points, dim)
    return plan_sampling(index, positions, b, l, compact_below)


def sparse_deformable_attention(
    value: Tensor,
    index: SparseCoordinateIndex,
    batch_indices: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    background_value: Optional[Tensor] = None,
    plan: Optional[SamplingPlan] = None,
) -> Tensor:
    """The sampling + attention sum of multi-scale deformable attention on a sparse map.

    Sparse counterpart of Deformable DETR's ``ms_deform_attn_core_pytorch``.

    Args:
        value: ``[N, n_heads, head_dim]`` projected values, rows in ``index`` order (or, with
            ``plan.voxel_rows``, ``[N', n_heads, head_dim]`` for those voxels only).
        index: coordinate index of the multi-level map.
        batch_indices: int64 ``[Q]`` batch item of each query.
        sampling_locations: float ``[Q, n_heads, n_levels, n_points, D]`` in the cells of
            each sampled level, axis order ``(y, x)`` / ``(z, y, x)``.
        attention_weights: ``[Q, n_heads, n_levels, n_points]`` (already normalised).
        background_value: ``[batch, n_levels, n_heads, head_dim]`` projected value of an
            absent site, or None.
        plan: optional :func:`plan_deformable_sampling` of the same locations.

    Returns:
        ``[Q, n_heads * head_dim]``.
    """
    n_voxels, n_heads, head_dim = value.shape
    q, _, n_levels, n_points, dim = sampling_locations.shape
    b, l, h = deformable_sample_indices(batch_indices, n_heads, n_levels, n_points)
    out = sparse_weighted_gather(
        value.reshape(n_voxels * n_heads, head_dim),
        index,
        sampling_locations.reshape(q * n_heads, n_levels * n_points, dim),
        b,
        l,
        h,
        n_heads=n_heads,
        sample_weights=attention_weights.reshape(q * n_heads, n_levels * n_points),
        background_table=None if background_value is None else background_value.reshape(-1, head_dim),
        plan=plan,
    )
    return out.reshape(q, n_heads * head_dim)
