"""Conversion between COO stacks and lists of spconv ``SparseConvTensor``.

COO stack: a ``torch.sparse_coo_tensor`` of shape ``[batch, *spatial, n_levels, channels]``
with sparse dims (batch, spatial axes, level) and one dense feature dim. Its spatial extent
is (at least) the per-axis maximum of ``level_spatial_shapes``; each voxel's coordinates
must lie inside its own level's shape.

spconv list: one ``SparseConvTensor`` per level, int32 indices ``[N_l, 1 + ndim]`` (batch,
then spatial axes in spconv order: (y, x) in 2D, (z, y, x) in 3D), the level's exact
``spatial_shape`` and a common ``batch_size``.

Order: rows of the COO stack are taken in coalesced order (sorted by batch, spatial
coordinates, level), so within each level of :func:`coo_stack_to_spconv`'s output voxels are
sorted by (batch, *coords). :func:`spconv_to_coo_stack` returns a coalesced stack. Hence
coo -> spconv -> coo reproduces indices and values exactly, and spconv -> coo -> spconv
returns the same voxels and bitwise-equal features, each level sorted by (batch, *coords).
Gradients flow through the features both ways.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from spconv.pytorch import SparseConvTensor

from .coordinate_index import SparseCoordinateIndex
from .validation import as_level_spatial_shapes, check_tensor, check_voxel_bounds

__all__ = [
    "check_coo_stack",
    "check_spconv_levels",
    "coalesce_checked",
    "coo_stack_to_spconv",
    "multilevel_features",
    "spconv_to_coo_stack",
]

MultiLevelMap = Union[torch.Tensor, Sequence[SparseConvTensor]]


def check_coo_stack(stacked, level_spatial_shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a COO stack against ``level_spatial_shapes``; returns ``(stacked, shapes[int64 L x D])``."""
    check_tensor("stacked_feature_maps", stacked, sparse=True)
    if stacked.dense_dim() != 1:
        raise ValueError(
            "stacked_feature_maps must have exactly one dense (feature) dim, "
            f"got stacked_feature_maps.dense_dim()={stacked.dense_dim()}"
        )
    dim = stacked.sparse_dim() - 2
    if dim not in (2, 3):
        raise ValueError(
            "stacked_feature_maps must have shape [batch, *spatial, n_levels, channels] with 2 or 3 spatial dims, "
            f"got stacked_feature_maps.shape={tuple(stacked.shape)}"
        )
    if level_spatial_shapes is None:
        raise ValueError("level_spatial_shapes is required when stacked_feature_maps is a COO stack")
    shapes = as_level_spatial_shapes(level_spatial_shapes, device=stacked.device)
    if shapes.shape != (stacked.shape[-2], dim):
        raise ValueError(
            f"level_spatial_shapes must have shape [n_levels={stacked.shape[-2]}, {dim}] for stacked_feature_maps "
            f"of shape {tuple(stacked.shape)}, got level_spatial_shapes.shape={tuple(shapes.shape)}"
        )
    extent = shapes.max(0).values.tolist()
    if any(s < e for s, e in zip(stacked.shape[1:-2], extent)):
        raise ValueError(
            f"stacked_feature_maps spatial extent {tuple(stacked.shape[1:-2])} is smaller than the per-axis "
            f"maximum of level_spatial_shapes {extent}"
        )
    return stacked, shapes


def coalesce_checked(stacked: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """The coalesced form of a checked COO stack, with every voxel inside its own level.

    Duplicate coordinates are an error: ``coalesce()`` would silently sum them.
    """
    if stacked.is_coalesced():
        idx = stacked.indices()
        check_voxel_bounds("stacked_feature_maps", idx[0], idx[-1], idx[1:-1].T, shapes, stacked.shape[0])
        return stacked
    raw = stacked._indices()
    # validates bounds and rejects duplicates
    SparseCoordinateIndex(raw[0], raw[-1], raw[1:-1].T, shapes, stacked.shape[0])
    return stacked.coalesce()


def check_spconv_levels(levels) -> tuple[list[SparseConvTensor], int, torch.Tensor]:
    """Validate a list of ``SparseConvTensor``; returns ``(levels, batch_size, shapes[int64 L x D])``."""
    if isinstance(levels, SparseConvTensor) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list of SparseConvTensor (one per level), got {type(levels).__name__}")
    if len(levels) == 0:
        raise ValueError("levels must hold at least one SparseConvTensor, got an empty list")
    for i, lvl in enumerate(levels):
        if not isinstance(lvl, SparseConvTensor):
            raise TypeError(f"levels[{i}] must be a SparseConvTensor, got {type(lvl).__name__}")
    first = levels[0]
    batch_size, channels, dim = first.batch_size, first.features.shape[-1], len(first.spatial_shape)
    if dim not in (2, 3):
        raise ValueError(f"levels must be 2D or 3D, got levels[0].spatial_shape={list(first.spatial_shape)}")
    for i, lvl in enumerate(levels):
        if lvl.batch_size != batch_size:
            raise ValueError(f"levels[{i}].batch_size={lvl.batch_size} differs from levels[0].batch_size={batch_size}")
        if len(lvl.spatial_shape) != dim:
            raise ValueError(f"levels[{i}].spatial_shape={list(lvl.spatial_shape)} is not {dim}D like levels[0]")
        if lvl.features.ndim != 2 or lvl.features.shape[-1] != channels:
            raise ValueError(
                f"levels[{i}].features must have shape [N, {channels}], got {tuple(lvl.features.shape)}"
            )
        if lvl.indices.ndim != 2 or lvl.indices.shape != (lvl.features.shape[0], 1 + dim):
            raise ValueError(
                f"levels[{i}].indices must have shape [{lvl.features.shape[0]}, {1 + dim}], got {tuple(lvl.indices.shape)}"
            )
        if lvl.indices.dtype.is_floating_point:
            raise TypeError(f"levels[{i}].indices must be integer, got {lvl.indices.dtype}")
        if lvl.features.dtype != first.features.dtype or lvl.features.device != first.features.device:
            raise TypeError(
                f"levels[{i}].features is {lvl.features.dtype} on {lvl.features.device}, "
                f"levels[0].features is {first.features.dtype} on {first.features.device}"
            )
    shapes = as_level_spatial_shapes([list(lvl.spatial_shape) for lvl in levels], device=first.features.device)
    return list(levels), batch_size, shapes


def coo_stack_to_spconv(stacked: torch.Tensor, level_spatial_shapes) -> list[SparseConvTensor]:
    """Split a COO stack ``[batch, *spatial, n_levels, channels]`` into one ``SparseConvTensor`` per level.

    Args:
        stacked: sparse COO tensor, sparse dims (batch, *spatial, level), one dense feature dim.
        level_spatial_shapes: ``[n_levels, ndim]`` ints, each level's grid shape (spconv axis order).

    Returns:
        ``n_levels`` tensors with int32 indices ``[N_l, 1 + ndim]``, the level's exact
        ``spatial_shape`` and ``batch_size = stacked.shape[0]``; voxels sorted by (batch, *coords).
        Gradients flow to ``stacked``'s values.

    Raises:
        TypeError / ValueError: not a COO stack, shape mismatches, voxels outside their level,
        duplicate coordinates.
    """
    stacked, shapes = check_coo_stack(stacked, level_spatial_shapes)
    stacked = coalesce_checked(stacked, shapes)
    idx, values = stacked.indices(), stacked.values()
    out = []
    for level, shape in enumerate(shapes.tolist()):
        rows = (idx[-1] == level).nonzero().squeeze(1)
        level_indices = idx[:-1, rows].T.to(torch.int32).contiguous()
        out.append(SparseConvTensor(values[rows], level_indices, shape, stacked.shape[0]))
    return out


def spconv_to_coo_stack(levels: Sequence[SparseConvTensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one ``SparseConvTensor`` per level into a coalesced COO stack.

    Args:
        levels: ``SparseConvTensor`` s with a common batch size, ndim and channel count.

    Returns:
        ``(stacked, level_spatial_shapes)``: a coalesced sparse COO tensor
        ``[batch, *max_spatial, n_levels, channels]`` (differentiable w.r.t. every level's
        features) and int64 ``[n_levels, ndim]`` shapes.

    Raises:
        TypeError / ValueError: mismatched levels, voxels outside their level, duplicates.
    """
    index = SparseCoordinateIndex.from_spconv(levels)  # validates bounds, rejects duplicates
    levels = list(levels)
    shapes = index.level_spatial_shapes
    features = torch.cat([lvl.features for lvl in levels])
    coo_indices = torch.cat([index.batch_indices[None], index.spatial_indices.T, index.level_indices[None]])
    size = (index.batch_size, *shapes.max(0).values.tolist(), len(levels), features.shape[-1])
    stacked = torch.sparse_coo_tensor(coo_indices, features, size, check_invariants=False).coalesce()
    return stacked, shapes


def multilevel_features(
    stacked_feature_maps: MultiLevelMap,
    level_spatial_shapes=None,
    index: Optional[SparseCoordinateIndex] = None,
    concatenate: bool = True,
) -> tuple[Optional[torch.Tensor], SparseCoordinateIndex]:
    """Feature rows of a multi-level sparse map and its coordinate index.

    Args:
        stacked_feature_maps: a COO stack ``[batch, *spatial, n_levels, channels]`` or a list of
            ``SparseConvTensor`` (one per level; ``level_spatial_shapes`` may then be None).
        level_spatial_shapes: ``[n_levels, ndim]``; checked against the spconv levels if given.
        index: a prebuilt :class:`SparseCoordinateIndex` of this map (e.g. built once for all
            layers of an encoder). It is checked (O(N)) to hold exactly the map's voxels in the
            same row order; otherwise one is built.
        concatenate: False: for a list of ``SparseConvTensor`` return None instead of the
            concatenation of the levels' features (for a caller that uses the levels' feature
            blocks themselves: an ``[N, channels]`` copy saved); a COO stack's values are
            returned either way (no copy).

    Returns:
        ``(features, index)``: ``[N, channels]`` rows in the index's row order (differentiable),
        and the index.
    """
    if isinstance(stacked_feature_maps, torch.Tensor):
        stacked, shapes = check_coo_stack(stacked_feature_maps, level_spatial_shapes)
        stacked = coalesce_checked(stacked, shapes)
        idx = stacked.indices()
        b, l, c = idx[0], idx[-1], idx[1:-1].T
        features, batch_size = stacked.values(), stacked.shape[0]
        n_rows = features.shape[0]
    else:
        levels, batch_size, shapes = check_spconv_levels(stacked_feature_maps)
        if level_spatial_shapes is not None:
            given = as_level_spatial_shapes(level_spatial_shapes, device=shapes.device)
            if not torch.equal(given, shapes):
                raise ValueError(
                    f"level_spatial_shapes={given.tolist()} does not match the SparseConvTensor "
                    f"spatial shapes {shapes.tolist()}"
                )
        features = torch.cat([lvl.features for lvl in levels]) if concatenate else None
        n_rows = sum(lvl.features.shape[0] for lvl in levels)
        if index is None:
            return features, SparseCoordinateIndex.from_spconv(levels)
        all_idx = torch.cat([lvl.indices for lvl in levels])
        b, c = all_idx[:, 0], all_idx[:, 1:]
        l = torch.repeat_interleave(
            torch.arange(len(levels), device=all_idx.device),
            torch.tensor([lvl.indices.shape[0] for lvl in levels], device=all_idx.device),
        )
    if index is None:
        return features, SparseCoordinateIndex(b, l, c, shapes, batch_size)
    if not isinstance(index, SparseCoordinateIndex):
        raise TypeError(f"index must be a SparseCoordinateIndex, got {type(index).__name__}")
    if (
        index.n_voxels != n_rows
        or index.batch_size != batch_size
        or not torch.equal(index.level_spatial_shapes, shapes.to(index.device))
        or not index.matches(b, l, c)
    ):
        raise ValueError(
            f"index {index!r} was not built from this map (n_voxels={n_rows}, "
            f"batch_size={batch_size}, level_spatial_shapes={shapes.tolist()}) or its voxels are in another order"
        )
    return features, index
