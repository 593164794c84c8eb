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

from adapters import SparseCoordinateIndex, as_level_spatial_shapes, broadcast_shapes, multilevel_features
from adapters.validation import check_index_range

from .sampling import SamplingPlan, plan_sampling, sparse_weighted_gather

__all__ = [
    "deformable_sample_indices",
    "multilevel_sparse_bilinear_grid_sample",
    "plan_deformable_sampling",
    "sparse_bilinear_sample",
    "sparse_deformable_attention",
    "sparse_split_heads",
]


def sparse_split_heads(sparse_tensor: Tensor, n_heads: int) -> Tensor:
    """Split the feature dim of a sparse COO map into heads, the head becoming a sparse dim (as
    sparse-transformer-layers).

    Args:
        sparse_tensor: sparse COO ``[batch, *spatial, n_levels, embed_dim]`` (one dense dim).
        n_heads: number of heads; must divide ``embed_dim``.

    Returns:
        Coalesced sparse COO ``[batch, *spatial, n_levels, n_heads, embed_dim // n_heads]`` whose
        sparse dims are ``batch, *spatial, level, head`` (each site repeated for every head) and
        whose one dense dim is ``head_dim``; differentiable w.r.t. the values.

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
    nnz, head_dim = st.values().shape[0], embed_dim // n_heads
    heads = torch.arange(n_heads, device=st.device).repeat(nnz)
    indices = torch.cat((st.indices().repeat_interleave(n_heads, dim=1), heads[None]), 0)
    values = st.values().reshape(nnz * n_heads, head_dim)
    # sites sorted, heads ascending within a site: already coalesced order
    return torch.sparse_coo_tensor(indices, values, (*st.shape[:-1], n_heads, head_dim), is_coalesced=True)


def _check_duplicates(sparse_tensor: Tensor) -> None:
    if not sparse_tensor.is_coalesced():  # coalesce() would silently sum duplicate coordinates
        raw = sparse_tensor._indices()
        n_unique = torch.unique(raw, dim=1).shape[1]
        if n_unique != raw.shape[1]:
            raise ValueError(
                f"sparse_tensor has duplicate coordinates: {raw.shape[1] - n_unique} of {raw.shape[1]} entries repeat "
                "a (batch, *coords, level[, head]) site, expected each voxel once"
            )


def _heads_dense(sparse_tensor: Tensor, complete_heads_required: bool) -> Tensor:
    """A head-split map with the head as a sparse dim (:func:`sparse_split_heads`) as one with
    the head dense: ``[batch, *spatial, n_levels, n_heads, head_dim]``, sparse dims ``batch,
    *spatial, level``. A (site, head) absent from the input is zero; with
    ``complete_heads_required`` (a background is given) it is an error instead."""
    _check_duplicates(sparse_tensor)
    st = sparse_tensor.coalesce()
    n_heads, head_dim = st.shape[-2], st.shape[-1]
    idx = st.indices()
    sites, inverse = torch.unique(idx[:-1], dim=1, return_inverse=True)
    if sites.shape[1] * n_heads == idx.shape[1]:
        values = st.values().reshape(-1, n_heads, head_dim)  # coalesced: heads ascending within a site
    else:
        if complete_heads_required:
            raise ValueError(
                "sparse_tensor (head as a sparse dim) lacks some heads of some sites; with a background_embedding "
                "such a (site, head) is ambiguous: give every site all heads (sparse_split_heads does)"
            )
        values = st.values().new_zeros(sites.shape[1], n_heads, head_dim)
        values = values.index_put((inverse, idx[-1]), st.values())
    return torch.sparse_coo_tensor(sites, values, (*st.shape[:-2], n_heads, head_dim), is_coalesced=True)


def _as_int(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {name}.dtype={t.dtype}")
    return t.to(torch.int64)


def sparse_bilinear_sample(
    sparse_tensor,
    spatial_positions: Tensor,
    batch_indices: Tensor,
    level_spatial_shapes=None,
    level_indices: Optional[Tensor] = None,
    head_indices: Optional[Tensor] = None,
    background_embedding: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Bilinearly (trilinearly in 3D) sample a multi-level sparse map at arbitrary points, with
    index tensors broadcast numpy-style against the points (ours; for the reference's
    alignment see :func:`multilevel_sparse_bilinear_grid_sample`).

    Equivalent to ``F.grid_sample(align_corners=False, padding_mode='zeros')`` on the
    densified level, with positions in absolute level cells instead of ``[-1, 1]``:
    position ``p`` (axis order ``(y, x)`` / ``(z, y, x)``) interpolates the cell centres
    ``i + 0.5`` around it. Corners outside the level are zero; corners absent from the map
    are zero or ``background_embedding[b, l]``.

    Args:
        sparse_tensor: COO stack ``[batch, *spatial, n_levels, C]``, head-split COO stack
            ``[batch, *spatial, n_levels, n_heads, head_dim]`` (the head a sparse dim, see
            :func:`sparse_split_heads`, or dense), or a list of ``SparseConvTensor`` (one per level).
        spatial_positions: float ``[..., D]`` positions in the cells of the sampled level.
        batch_indices: integer, broadcastable to ``[...]``.
        level_spatial_shapes: ``[n_levels, D]`` (may be None for a list of SparseConvTensor).
        level_indices: integer, broadcastable to ``[...]``: the level sampled by each point.
            May be None only for a single-level map.
        head_indices: integer, broadcastable to ``[...]`` (head-split maps only). None
            samples every head.
        background_embedding: value of an absent site, ``[batch, n_levels, C]`` or
            ``[batch, n_levels, n_heads, head_dim]`` (same space as the map's values).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or None (automatic, or
            ``$SPARSE_MSDA_BACKEND``): the implementation of the sampling
            (:func:`sparse_msda.backends.choose_backend`).

    Returns:
        ``[..., C]``; for a head-split map ``[..., head_dim]`` with ``head_indices``, else
        ``[..., n_heads, head_dim]``.

    Raises:
        TypeError / ValueError: wrong kinds, dtypes or shapes (messages name the argument).
    """
    n_heads = 1
    if level_spatial_shapes is not None and not isinstance(level_spatial_shapes, Tensor):
        # a nested sequence: checked (and made a tensor) first, so that a bad one is reported as
        # such and the head-split layout below can be recognised from its position_dim
        level_spatial_shapes = as_level_spatial_shapes(level_spatial_shapes)
    if isinstance(sparse_tensor, Tensor) and sparse_tensor.layout != torch.sparse_coo:
        raise TypeError(
            f"sparse_tensor must be a sparse COO stack or a list of SparseConvTensor, got a tensor of layout {sparse_tensor.layout}"
        )
    if (
        isinstance(sparse_tensor, Tensor)
        and sparse_tensor.layout == torch.sparse_coo
        and sparse_tensor.dense_dim() == 1
        and isinstance(level_spatial_shapes, Tensor)
        and sparse_tensor.sparse_dim() == level_spatial_shapes.shape[-1] + 3
    ):  # head as a sparse dim (sparse_split_heads)
        sparse_tensor = _heads_dense(sparse_tensor, background_embedding is not None)
    if isinstance(sparse_tensor, Tensor) and sparse_tensor.layout == torch.sparse_coo and sparse_tensor.dense_dim() == 2:
        _check_duplicates(sparse_tensor)
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
    # what the kernels index with: checked here, before any lookup (an out-of-range batch item
    # would read another item's voxels or, with a background, outside the background table)
    check_index_range("batch_indices", b, index.batch_size)
    check_index_range("level_indices", l, index.n_levels)

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
        table, index, pos, flat_idx(b), flat_idx(l), flat_idx(h), n_heads=n_heads, background_table=bg_table,
        backend=backend,
    )
    return out.reshape(*lead, head_dim)


class SeedShapeError(ValueError, RuntimeError):
    """A shape the reference answers with ``RuntimeError`` (its default index modes); a
    ``ValueError`` here, so both ``except`` clauses catch it."""


def multilevel_sparse_bilinear_grid_sample(
    sparse_tensor: Tensor,
    spatial_positions: Tensor,
    batch_indices: Tensor,
    level_spatial_shapes: Tensor,
    level_indices: Optional[Tensor] = None,
    head_indices: Optional[Tensor] = None,
    background_embedding: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Sample a head-split multi-level sparse map, with the index alignment of
    sparse-transformer-layers (its signature and conventions; 2D and 3D).

    Sampling is ``F.grid_sample(align_corners=False, padding_mode='zeros')`` on the densified
    level in absolute cell coordinates (cell ``i`` covers ``[i, i + 1)``, centre ``i + 0.5``);
    see the README's differences table for the map edges (the reference clamps there).

    Args:
        sparse_tensor: sparse COO ``[batch, *spatial, n_levels, n_heads, head_dim]`` with the
            head a sparse dim (:func:`sparse_split_heads`; a dense head dim is accepted too).
            Batch size, levels and heads are read from its shape.
        spatial_positions: float ``[N, ..., L', H', D]`` in the cells of the sampled level,
            axis order of the tensor (``(i, j)`` = ``(y, x)``; ``(z, y, x)`` in 3D).
        batch_indices: int with shape exactly ``spatial_positions.shape[:-3]``.
        level_spatial_shapes: ``[n_levels, D]``.
        level_indices: int ``[L']``: the level of each position along dim ``-3``; default
            ``arange(n_levels)`` (then ``L' == n_levels``).
        head_indices: int ``[H']``: the head along dim ``-2``; default ``arange(n_heads)``.
        background_embedding: ``[batch, n_levels, n_heads, head_dim]``: the value of absent
            sites (default zero).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or None (automatic, or
            ``$SPARSE_MSDA_BACKEND``): the implementation of the sampling
            (:func:`sparse_msda.backends.choose_backend`).

    Returns:
        ``[N, ..., L', H', head_dim]``.

    Raises:
        ValueError: shapes that do not line up as above (a map that is not head-split, an
            un-split ``[batch, *spatial, L, C]`` stack or spconv levels: use
            :func:`sparse_bilinear_sample`); :class:`SeedShapeError` (also a ``RuntimeError``,
            as the reference) when a default index mode does not fit. TypeError: dtypes.
    """
    if not isinstance(sparse_tensor, Tensor) or sparse_tensor.layout != torch.sparse_coo:
        raise ValueError(
            "sparse_tensor must be a head-split sparse COO tensor [batch, *spatial, n_levels, n_heads, head_dim] "
            f"(sparse_split_heads), got {type(sparse_tensor).__name__}; for spconv levels or un-split stacks use "
            "sparse_msda.functional.deformable.sparse_bilinear_sample"
        )
    if not isinstance(level_spatial_shapes, Tensor) or level_spatial_shapes.ndim != 2:
        raise ValueError(
            f"level_spatial_shapes must be a [n_levels, D] tensor, got {getattr(level_spatial_shapes, 'shape', level_spatial_shapes)!r}"
        )
    dim = level_spatial_shapes.shape[1]
    if sparse_tensor.ndim != dim + 4 or sparse_tensor.dense_dim() not in (1, 2):
        raise ValueError(
            f"Expected a {dim + 4}D head-split sparse tensor [batch, *spatial({dim}), n_levels, n_heads, head_dim] with the "
            f"head a sparse dim (sparse_split_heads), got shape {tuple(sparse_tensor.shape)} with "
            f"sparse_dim={sparse_tensor.sparse_dim()}; an un-split stack [batch, *spatial, n_levels, C] is sampled by "
            "sparse_msda.functional.deformable.sparse_bilinear_sample"
        )
    n_levels, n_heads = sparse_tensor.shape[-3], sparse_tensor.shape[-2]
    if not isinstance(spatial_positions, Tensor) or spatial_positions.ndim < 4 or spatial_positions.shape[-1] != dim:
        raise ValueError(
            f"spatial_positions must have shape [N, ..., L, H, {dim}], got {tuple(getattr(spatial_positions, 'shape', ()))}"
        )
    if not isinstance(batch_indices, Tensor) or tuple(spatial_positions.shape[:-3]) != tuple(batch_indices.shape):
        raise ValueError(
            "Shape mismatch for spatial_positions and batch_indices: batch_indices.shape must equal "
            f"spatial_positions.shape[:-3], got {tuple(spatial_positions.shape)} and {tuple(getattr(batch_indices, 'shape', ()))}"
        )
    if level_spatial_shapes.shape[0] != n_levels:
        raise ValueError(
            "Number of feature levels in level_spatial_shapes does not match number of levels in sparse_tensor: "
            f"{level_spatial_shapes.shape[0]} != {n_levels}"
        )
    device = spatial_positions.device
    level_indices = _seed_axis_indices("level_indices", level_indices, spatial_positions, -3, "n_levels", n_levels, device)
    head_indices = _seed_axis_indices("head_indices", head_indices, spatial_positions, -2, "n_heads", n_heads, device)
    b = _as_int("batch_indices", batch_indices)[..., None, None]
    lvl = _as_int("level_indices", level_indices)[:, None]
    h = _as_int("head_indices", head_indices)
    for name, t, n in (("level_indices", lvl, n_levels), ("head_indices", h, n_heads)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{name} must lie in [0, {n}), got range [{int(t.min())}, {int(t.max())}]")
    lead = spatial_positions.shape[:-1]
    return sparse_bilinear_sample(
        sparse_tensor, spatial_positions, b.expand(lead), level_spatial_shapes, lvl.expand(lead), h.expand(lead),
        background_embedding, backend=backend,
    )


def _seed_axis_indices(name, indices, spatial_positions, axis, count_name, count, device):
    """The reference's index mode for ``spatial_positions``' dim ``axis`` (-3: levels, -2: heads):
    ``arange(count)`` when ``indices`` is None (that dim must then have ``count`` entries), else a
    1-D tensor with one entry per element of that dim."""
    size = spatial_positions.shape[axis]
    if indices is None:
        if size != count:
            raise SeedShapeError(
                f"Default {name} mode assumes that spatial_positions.shape[{axis}] == {count_name}, got {size} and {count}"
            )
        return torch.arange(count, device=device)
    if not isinstance(indices, Tensor) or indices.ndim != 1 or indices.shape[0] != size:
        raise ValueError(
            f"Shape mismatch for spatial_positions and {name}: {name} must be [spatial_positions.shape[{axis}]], "
            f"got {tuple(spatial_positions.shape)} and {tuple(getattr(indices, 'shape', ()))}"
        )
    return indices


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
    backend: Optional[str] = None,
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
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or None (automatic, or
            ``$SPARSE_MSDA_BACKEND``): the implementation of the sampling
            (:func:`sparse_msda.backends.choose_backend`).

    Returns:
        ``[Q, n_heads * head_dim]``.

    Raises:
        TypeError / ValueError: shapes that do not fit together, ``batch_indices`` outside
            ``[0, index.batch_size)``, a level count other than the index's.
    """
    if not isinstance(value, Tensor) or value.ndim != 3:
        raise ValueError(f"value must be [N, n_heads, head_dim], got {getattr(value, 'shape', type(value).__name__)}")
    n_voxels, n_heads, head_dim = value.shape
    if (
        not isinstance(sampling_locations, Tensor)
        or sampling_locations.ndim != 5
        or sampling_locations.shape[1] != n_heads
        or sampling_locations.shape[2] != index.n_levels
        or sampling_locations.shape[4] != index.position_dim
    ):
        raise ValueError(
            f"sampling_locations must be [Q, n_heads={n_heads}, n_levels={index.n_levels}, n_points, {index.position_dim}], "
            f"got {tuple(getattr(sampling_locations, 'shape', ()))}"
        )
    q, _, n_levels, n_points, dim = sampling_locations.shape
    if not isinstance(attention_weights, Tensor) or attention_weights.shape != sampling_locations.shape[:4]:
        raise ValueError(
            f"attention_weights must have shape {tuple(sampling_locations.shape[:4])}, got {tuple(getattr(attention_weights, 'shape', ()))}"
        )
    if not isinstance(batch_indices, Tensor) or batch_indices.shape != (q,):
        raise ValueError(f"batch_indices must have shape [{q}], got {tuple(getattr(batch_indices, 'shape', ()))}")
    check_index_range("batch_indices", _as_int("batch_indices", batch_indices), index.batch_size)
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
        backend=backend,
    )
    return out.reshape(q, n_heads * head_dim)
