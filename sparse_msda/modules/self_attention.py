"""Multi-level query-to-map attention block (global window) with rotary position encoding.

Not the reference's token self-attention (that is
:class:`~sparse_msda.modules.token_self_attention.MultilevelSelfAttentionBlockWithRoPE`): here
external queries attend to every voxel of a sparse map. The block was called
``SparseMultilevelSelfAttentionBlock`` before; that name now raises an ``ImportError`` saying so.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from adapters import SparseCoordinateIndex

from ..functional.self_attention import check_no_background, group_rows_by_batch, multilevel_self_attention, segment_offsets
from ..inputs import largest_level
from .neighborhood_attention import RotaryAttentionBlock

__all__ = ["SparseMultilevelMapAttentionBlock"]


class SparseMultilevelMapAttentionBlock(RotaryAttentionBlock):
    """Multi-level query-to-map attention (pre/post-norm block with residual).

    Each query attends to *every* voxel (all levels) of its own batch item, with one softmax;
    i.e. :class:`~sparse_msda.SparseNeighborhoodAttentionBlock` with windows that cover the
    whole map. Multi-head scaled dot-product attention; queries and keys are rotated (RoPE,
    :class:`~sparse_msda.modules.neighborhood_attention.MultilevelRotaryEncoding`) at their
    (full-scale position, level) so scores depend on relative positions only. Full scale = the
    largest level's frame; a key voxel sits at its cell centre ``c + 0.5`` mapped to full scale
    and its level index; a query at its full-scale position and its level index
    (``query_level_indices``, which enters RoPE only: positions are full-scale for every query,
    as in the neighborhood block and sparse-transformer-layers). Coordinates in spconv axis order, (y, x) / (z, y, x).

    Block: ``x + dropout(out_proj(attn(norm(x))))`` if ``norm_first``, else
    ``norm(x + dropout(out_proj(attn(x))))``. Keys and values are projected from the feature
    maps as given (not normalised), once per voxel (only voxels of items that have queries),
    and keys are rotated once per voxel. A query whose item holds no voxel gets an attention
    branch of exactly zero (output ``x`` with ``norm_first``, ``norm(x)`` otherwise).
    ``query_mask[i] = True``: output row ``i`` is input row ``i`` exactly (not computed).

    Parameter names and shapes are those of the neighborhood block (``norm``, ``q_proj``,
    ``kv_proj``, ``out_proj``, ``rope.freqs``), so either block's ``state_dict`` loads into
    the other.

    Encoder use (every voxel a query): ``query`` = the voxel features, positions = cell
    centres ``c + 0.5`` mapped to full scale
    (:func:`~sparse_msda.functional.neighborhood.full_scale_positions`), ``query_level_indices`` = their levels.

    Cost: time ``O(sum_b Q_b * N_b * embed_dim)`` (``N_b`` voxels of item ``b``), memory
    ``O((Q + N) * embed_dim)``: each item is one
    :func:`torch.nn.functional.scaled_dot_product_attention` call (flash kernel on CPU), no
    ``[Q_b, N_b]`` matrix kept for the backward. Meant for the coarse levels (few voxels) and
    as a reference.

    ``background_embedding`` is not supported (``ValueError``): with a global window every
    in-bounds absent cell would be a key, i.e. the dense grid (see
    :func:`sparse_msda.functional.self_attention.check_no_background`).

    Args:
        embed_dim: feature size of queries and maps; divisible by ``n_heads``.
        n_heads: attention heads (``head_dim = embed_dim // n_heads`` must be even).
        n_levels: levels of the maps.
        position_dim: 2 (y, x) or 3 (z, y, x).
        dropout: dropout on the attention branch (after the output projection).
        bias: bias of the q/k/v and output projections.
        norm_first: pre-norm (True) or post-norm.
        rope_spatial_base_theta, rope_level_base_theta: RoPE frequency bases.
        rope_share_heads: one set of frequencies for all heads.
        rope_freq_group_pattern: ``"single"``, ``"partition"`` (spatial | level), ``"closure"``, ``"axial"`` or ``"spatial_level"``
            (:mod:`sparse_msda.functional.rope`).
        rope_enforce_freq_groups_equal: error if ``head_dim // 2`` does not split equally.

    Raises:
        ValueError: bad levels/position_dim/heads/dropout/RoPE options.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int = 4,
        position_dim: int = 2,
        dropout: float = 0.0,
        bias: bool = False,
        norm_first: bool = True,
        rope_spatial_base_theta: float = 100.0,
        rope_level_base_theta: float = 10.0,
        rope_share_heads: bool = False,
        rope_freq_group_pattern: str = "single",
        rope_enforce_freq_groups_equal: bool = True,
    ) -> None:
        super().__init__(
            embed_dim, n_heads, n_levels, position_dim, dropout, bias, norm_first, rope_spatial_base_theta,
            rope_level_base_theta, rope_share_heads, rope_freq_group_pattern, rope_enforce_freq_groups_equal,
        )
        self.reset_parameters()

    def forward(
        self,
        query: Tensor,
        query_spatial_positions: Tensor,
        query_batch_offsets: Tensor,
        stacked_feature_maps,
        level_spatial_shapes,
        background_embedding: Optional[Tensor] = None,
        query_level_indices: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
        coordinate_index: Optional[SparseCoordinateIndex] = None,
    ) -> Tensor:
        """Attend from each query to every voxel of its batch item (all levels).

        Args:
            query: ``[n_queries, embed_dim]``.
            query_spatial_positions: float ``[n_queries, position_dim]`` at full scale (the
                largest level's frame) for every query; spconv axis order.
            query_batch_offsets: int ``[batch_size + 1]``.
            stacked_feature_maps: COO stack ``[batch, *spatial, n_levels, embed_dim]`` or a list
                of ``SparseConvTensor`` (one per level).
            level_spatial_shapes: ``[n_levels, position_dim]`` (may be None for spconv levels).
            background_embedding: must be None (not supported with a global window, see the
                class docstring); kept for signature compatibility with the neighborhood block.
            query_level_indices: optional int ``[n_queries]`` level of each query (RoPE only).
            query_mask: optional bool ``[n_queries]``; True rows are returned unchanged.
            coordinate_index: optional prebuilt index of the map (reused across layers).

        Returns:
            ``[n_queries, embed_dim]``.

        Raises:
            ValueError: ``background_embedding`` given; shape mismatches (see
                :func:`sparse_msda.inputs.prepare_inputs`). TypeError: wrong dtypes.
        """
        check_no_background(background_embedding)
        aq = self._prepare_queries(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            query_level_indices, query_mask, coordinate_index,
        )
        qb, active, x, pos, batch, levels = aq.inputs, aq.active, aq.x, aq.positions, aq.batch, aq.levels
        index, shapes = qb.index, qb.level_spatial_shapes
        # full-scale positions whatever query_level_indices says, as the neighborhood block
        pos_shapes = shapes[largest_level(shapes)].to(pos.dtype).expand(pos.shape[0], -1)
        batch_size = index.batch_size

        # queries: batch indices are non-decreasing (from the offsets; active keeps the order)
        q_offsets = segment_offsets(batch, batch_size)
        has_queries = q_offsets.diff() > 0
        key_batch = index.batch_indices.to(query.device)
        rows, k_offsets = group_rows_by_batch(key_batch, batch_size, has_queries.to(query.device))
        full = shapes[largest_level(shapes)]

        q = self._rotated_queries(x, pos, pos_shapes, levels, full)
        k, v = self._rotated_keys_values(qb.features, index, rows, query)
        attn, has_key = multilevel_self_attention(q, k, v, q_offsets, k_offsets)
        return self._finish(query, x, attn, has_key, active)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, n_levels={self.n_levels}, "
            f"position_dim={self.position_dim}, bias={self.bias}, norm_first={self.norm_first}, dropout={self.dropout.p}"
        )


_RENAMED = (
    "SparseMultilevelSelfAttentionBlock was renamed SparseMultilevelMapAttentionBlock (queries attend to every "
    "voxel of a sparse map, same arguments and state_dict). It is not sparse-transformer-layers' token "
    "self-attention; that is MultilevelSelfAttentionBlockWithRoPE(embed_dim, n_heads, ...)(x, spatial_positions, "
    "level_indices, level_spatial_shapes, batch_offsets, attn_mask)"
)


def __getattr__(name):
    if name == "SparseMultilevelSelfAttentionBlock":
        raise ImportError(_RENAMED)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
