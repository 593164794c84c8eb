"""Validation and normalisation of the attention layers' public inputs.

Shared by the deformable and the neighborhood attention. Conventions:

* Queries of batch item ``b`` are rows ``query_batch_offsets[b]:query_batch_offsets[b+1]``.
* ``query_spatial_positions`` are floats ``[n_queries, position_dim]`` in the frame of the
  query's own level (``query_level_indices``; default: the level with the largest area or
  volume), axis order as the tensor, i.e. spconv's (y, x) / (z, y, x). Cell ``i`` covers
  ``[i, i + 1)``; its centre is ``i + 0.5``.
* A position ``p`` at level ``q`` maps to level ``l`` as ``p / shape_q * shape_l``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from adapters import SparseCoordinateIndex, multilevel_features
from adapters.validation import check_index_range

from .functional.precision import position_dtype

__all__ = [
    "QueryBatch",
    "check_dropout",
    "check_embed_heads",
    "check_position_dim",
    "check_query",
    "largest_level",
    "prepare_inputs",
]


def check_embed_heads(embed_dim: int, n_heads: int) -> None:
    if not isinstance(embed_dim, int) or not isinstance(n_heads, int) or embed_dim <= 0 or n_heads <= 0:
        raise ValueError(f"embed_dim and n_heads must be positive ints, got {embed_dim=}, {n_heads=}")
    if embed_dim % n_heads != 0:
        raise ValueError(f"embed_dim must be divisible by n_heads, got {embed_dim=}, {n_heads=}")


def check_dropout(dropout, name: str = "dropout") -> float:
    """``dropout`` as a float: a probability in ``[0, 1]`` (``nn.Dropout``'s range; 1 drops the
    whole branch in training), not a bool. The one dropout check of every module."""
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {name}={dropout!r}")
    return float(dropout)


def check_position_dim(position_dim: int) -> None:
    if position_dim not in (2, 3):
        raise ValueError(f"position_dim must be 2 or 3, got {position_dim=}")


def largest_level(level_spatial_shapes: Tensor) -> int:
    """Index of the level with the largest area (2D) or volume (3D); the first on ties."""
    return int(torch.argmax(level_spatial_shapes.prod(-1)))


def check_query(query, embed_dim: int, dtype: Optional[torch.dtype] = None) -> None:
    """The dtype policy of every module: ``query`` is a floating-point ``[n_queries, embed_dim]``
    tensor of the module's parameter dtype ``dtype`` (TypeError naming both otherwise; cast the
    query, or the module with ``.to(dtype)``). Feature maps and background embeddings of another
    floating dtype are cast to it."""
    if not isinstance(query, Tensor) or not query.is_floating_point():
        raise TypeError(f"query must be a floating-point tensor, got {getattr(query, 'dtype', type(query).__name__)}")
    if dtype is not None and query.dtype != dtype:
        raise TypeError(
            f"query must have the module's dtype {dtype}, got query.dtype={query.dtype} (cast the query, or the module "
            "with .to(dtype)); the feature maps and background are cast to the module's dtype"
        )
    if query.ndim != 2 or query.shape[1] != embed_dim:
        raise ValueError(f"query must have shape [n_queries, {embed_dim}], got query.shape={tuple(query.shape)}")


@dataclass
class QueryBatch:
    """Normalised inputs of one attention call.

    Attributes:
        features: ``[N_voxels, C]`` voxel features in the index's row order; None when the map
            came as a list of ``SparseConvTensor`` and ``prepare_inputs(concatenate_levels=False)``
            (then ``feature_parts`` holds them: see :meth:`all_features`).
        index: the map's :class:`adapters.SparseCoordinateIndex`.
        level_spatial_shapes: int64 ``[n_levels, position_dim]`` (on the query device).
        batch_indices: int64 ``[n_queries]`` batch item of each query.
        query_level_indices: int64 ``[n_queries]`` level whose frame the positions are in.
        query_level_shapes: float ``[n_queries, position_dim]`` shape of that level.
        feature_parts: when the map came as a list of ``SparseConvTensor``, each level's
            features (cast like ``features``), whose row concatenation is ``features``; else
            None. A consumer that works block by block (the fused deformable attention) takes
            these, so that the concatenation need not outlive the call (e.g. kept for a backward).
    """

    features: Optional[Tensor]
    index: SparseCoordinateIndex
    level_spatial_shapes: Tensor
    batch_indices: Tensor
    query_level_indices: Tensor
    query_level_shapes: Tensor
    feature_parts: Optional[tuple] = None

    def all_features(self) -> Tensor:
        """``features``, or the concatenation of ``feature_parts`` where it was not made."""
        return self.features if self.features is not None else torch.cat(self.feature_parts)


def prepare_inputs(
    query: Tensor,
    query_spatial_positions: Tensor,
    query_batch_offsets: Tensor,
    stacked_feature_maps,
    level_spatial_shapes,
    *,
    embed_dim: int,
    n_levels: int,
    position_dim: int,
    query_level_indices: Optional[Tensor] = None,
    background_embedding: Optional[Tensor] = None,
    index: Optional[SparseCoordinateIndex] = None,
    dtype: Optional[torch.dtype] = None,
    concatenate_levels: bool = True,
) -> QueryBatch:
    """Check every public input of an attention call and normalise it (before any layer runs).

    Policies: ``query`` has the module's dtype ``dtype`` (:func:`check_query`); the features
    (``QueryBatch.features``) are cast to the query's dtype; positions are finite (NaN / inf
    raise, huge finite positions are queries outside the map); every index (offsets, levels)
    lies in its range. Any strides are accepted. ``concatenate_levels=False``: a list of
    ``SparseConvTensor`` levels is not concatenated (``QueryBatch.features`` None, the levels'
    features in ``feature_parts``), for a caller that takes the blocks (saves an ``[N, C]`` copy).

    Raises:
        TypeError: wrong kinds or dtypes (e.g. integer positions, float offsets, a query of
            another dtype than the module's).
        ValueError: shape mismatches, offsets that do not match the batch, levels or
            position dims that differ from the module's, non-finite positions.
    """
    check_query(query, embed_dim, dtype)
    n_queries = query.shape[0]
    if not isinstance(query_spatial_positions, Tensor) or not query_spatial_positions.is_floating_point():
        raise TypeError(
            "query_spatial_positions must be a floating-point tensor (positions are continuous, "
            f"cell i covers [i, i+1)), got {getattr(query_spatial_positions, 'dtype', type(query_spatial_positions).__name__)}"
        )
    if query_spatial_positions.shape != (n_queries, position_dim):
        raise ValueError(
            f"query_spatial_positions must have shape [{n_queries}, {position_dim}], "
            f"got query_spatial_positions.shape={tuple(query_spatial_positions.shape)}"
        )
    finite = torch.isfinite(query_spatial_positions).all(-1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(
            "query_spatial_positions must be finite (a NaN / inf position has no cell; a huge finite one is a "
            f"query outside the map), got query {bad} at {query_spatial_positions[bad].tolist()}"
        )

    features, index = multilevel_features(stacked_feature_maps, level_spatial_shapes, index, concatenate_levels)
    first = features if features is not None else stacked_feature_maps[0].features  # levels agree (checked)
    shapes = index.level_spatial_shapes.to(query.device)
    if shapes.shape != (n_levels, position_dim):
        raise ValueError(
            f"the feature maps have level_spatial_shapes of shape {tuple(shapes.shape)}, "
            f"expected [n_levels={n_levels}, position_dim={position_dim}]"
        )
    if first.shape[-1] != embed_dim:
        raise ValueError(f"feature maps must have {embed_dim} channels, got {first.shape[-1]}")
    if not first.is_floating_point():
        raise TypeError(f"the feature maps must be floating-point, got {first.dtype}")
    features = None if features is None else features.to(query.dtype)
    parts = None
    if not isinstance(stacked_feature_maps, Tensor):  # spconv levels: features is their concatenation
        parts = tuple(lvl.features.to(query.dtype) for lvl in stacked_feature_maps)
    batch_size = index.batch_size

    if not isinstance(query_batch_offsets, Tensor) or query_batch_offsets.is_floating_point():
        raise TypeError(
            f"query_batch_offsets must be an integer tensor, got {getattr(query_batch_offsets, 'dtype', type(query_batch_offsets).__name__)}"
        )
    offsets = query_batch_offsets.to(device=query.device, dtype=torch.int64)
    if offsets.shape != (batch_size + 1,):
        raise ValueError(
            f"query_batch_offsets must have shape [batch_size + 1] = [{batch_size + 1}] for a map of "
            f"batch_size={batch_size}, got query_batch_offsets.shape={tuple(offsets.shape)}"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_queries or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(
            f"query_batch_offsets must rise from 0 to n_queries={n_queries}, got {offsets.tolist()}"
        )
    batch_indices = torch.repeat_interleave(torch.arange(batch_size, device=query.device), offsets.diff())

    if query_level_indices is None:
        levels = torch.full((n_queries,), largest_level(shapes), dtype=torch.int64, device=query.device)
    else:
        if not isinstance(query_level_indices, Tensor) or query_level_indices.is_floating_point():
            raise TypeError("query_level_indices must be an integer tensor")
        if query_level_indices.shape != (n_queries,):
            raise ValueError(
                f"query_level_indices must have shape [{n_queries}], got query_level_indices.shape={tuple(query_level_indices.shape)}"
            )
        levels = query_level_indices.to(device=query.device, dtype=torch.int64)
        check_index_range("query_level_indices", levels, n_levels)

    if background_embedding is not None:
        if not isinstance(background_embedding, Tensor) or not background_embedding.is_floating_point():
            raise TypeError("background_embedding must be a floating-point tensor")
        if background_embedding.shape != (batch_size, n_levels, embed_dim):
            raise ValueError(
                f"background_embedding must have shape [batch_size={batch_size}, n_levels={n_levels}, "
                f"embed_dim={embed_dim}], got background_embedding.shape={tuple(background_embedding.shape)}"
            )

    return QueryBatch(
        features=features,
        index=index,
        level_spatial_shapes=shapes,
        batch_indices=batch_indices,
        query_level_indices=levels,
        query_level_shapes=shapes[levels].to(position_dtype(query_spatial_positions.dtype)),
        feature_parts=parts,
    )
