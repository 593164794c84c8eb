"""The piece both framework adapters share: attention over chosen levels of a sparse backbone.

:class:`BackboneLevelEncoder` takes *all* stage outputs of an spconv backbone (e.g. the four
``x_conv1..x_conv4`` of ``VoxelBackBone8x``), and for the chosen ones

    level -> Linear to embed_dim (LevelProjection) -> SparseMSDAEncoder over the chosen levels
          -> Linear back to the stage's width (LevelBackProjection) -> (+ level, if residual)

and returns all levels, the chosen ones replaced in place. Every returned level is a
``replace_feature`` of the backbone's own tensor: indices, spatial shape, batch size and
``indice_dict`` (the indice pairs of every earlier sparse convolution) are the backbone's, so
``conv_out`` and any later ``SparseInverseConv3d(indice_key=...)`` work unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

from spconv.pytorch import SparseConvTensor
from torch import nn

from ..modules.encoder import SparseMSDAEncoder
from ..modules.level_projection import LevelBackProjection, LevelProjection

__all__ = ["BackboneLevelEncoder"]


class BackboneLevelEncoder(nn.Module):
    """Sparse multi-scale attention over chosen stage outputs of an spconv backbone.

    Args:
        level_channels: channel count of every backbone level, e.g. ``[16, 32, 64, 64]``.
        attention_levels: indices (into ``level_channels``) of the levels that get attention,
            ascending, e.g. ``[1, 2, 3]``; default: all levels. The encoder sees them as one
            multi-scale map (``n_levels = len(attention_levels)``).
        embed_dim, n_heads, n_layers, n_points, neighborhood_sizes, dim_feedforward, dropout:
            :class:`sparse_msda.SparseMSDAEncoder` settings (``neighborhood_sizes``: one odd size
            per *attended* level, default 3 each).
        position_dim: spatial dims of the levels (3 for ``VoxelBackBone8x``).
        residual: return ``level + back_projection(encoded)`` (default) instead of the
            back-projection alone, so the stage's own features pass through.

    Shape:
        ``forward(levels)``: ``len(level_channels)`` ``SparseConvTensor`` (common batch size,
        features ``[N_l, level_channels[l]]``) -> the same number, same indices / spatial shapes /
        batch size / ``indice_dict`` and widths; the attended levels carry new features.
    """

    def __init__(
        self,
        level_channels: Sequence[int],
        attention_levels: Optional[Sequence[int]] = None,
        embed_dim: int = 64,
        n_heads: int = 8,
        n_layers: int = 1,
        n_points: int = 4,
        neighborhood_sizes: Optional[Sequence[int]] = None,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.0,
        position_dim: int = 3,
        residual: bool = True,
    ) -> None:
        super().__init__()
        level_channels = list(level_channels)
        if attention_levels is None:
            attention_levels = list(range(len(level_channels)))
        attention_levels = list(attention_levels)
        if (
            not attention_levels
            or any(isinstance(i, bool) or not isinstance(i, int) for i in attention_levels)
            or sorted(set(attention_levels)) != attention_levels
            or attention_levels[0] < 0
            or attention_levels[-1] >= len(level_channels)
        ):
            raise ValueError(
                f"attention_levels must be distinct ascending level indices in [0, {len(level_channels)}) "
                f"(the backbone has {len(level_channels)} levels), got {attention_levels=}"
            )
        self.level_channels, self.attention_levels, self.residual = level_channels, attention_levels, bool(residual)
        widths = [level_channels[i] for i in attention_levels]
        self.projection = LevelProjection(widths, embed_dim)
        self.encoder = SparseMSDAEncoder(
            embed_dim, n_heads, n_levels=len(attention_levels), n_layers=n_layers, n_points=n_points,
            neighborhood_sizes=neighborhood_sizes, position_dim=position_dim,
            dim_feedforward=dim_feedforward, dropout=dropout,
        )
        self.back_projection = LevelBackProjection(embed_dim, widths)

    def forward(self, levels: Sequence[SparseConvTensor]) -> list[SparseConvTensor]:
        if isinstance(levels, SparseConvTensor) or not isinstance(levels, (list, tuple)):
            raise TypeError(f"levels must be a list of SparseConvTensor (one per level), got {type(levels).__name__}")
        if len(levels) != len(self.level_channels):
            raise ValueError(
                f"levels must hold all {len(self.level_channels)} backbone levels "
                f"(level_channels={self.level_channels}), got {len(levels)}"
            )
        levels = list(levels)
        chosen = [levels[i] for i in self.attention_levels]
        encoded = self.back_projection(self.encoder(self.projection(chosen)))
        for i, before, after in zip(self.attention_levels, chosen, encoded):
            levels[i] = before.replace_feature(before.features + after.features) if self.residual else after
        return levels

    def extra_repr(self) -> str:
        return (
            f"level_channels={self.level_channels}, attention_levels={self.attention_levels}, "
            f"residual={self.residual}"
        )
