"""Per-level linear projections between a backbone's channel widths and the encoder's ``embed_dim``.

A ``VoxelBackBone8x``-style backbone has a different width per stage (16, 32, 64, 64); the
encoder needs one common width ``embed_dim`` on every level, and the layer after the encoder
(e.g. OpenPCDet's ``conv_out``) needs the stage's own width back:

    levels  --LevelProjection([16, 32, 64, 64], embed_dim)-->  embed_dim on every level
            --SparseMSDAEncoder-->
            --LevelBackProjection(embed_dim, [16, 32, 64, 64])-->  the stages' widths again

Both act on the features only (a ``Linear`` per level, i.e. a 1x1 sparse convolution without
any neighbour search) and return ``SparseConvTensor.replace_feature`` results: indices, spatial
shape, batch size and ``indice_dict`` are passed through, so later sparse convolutions (e.g. a
``SparseInverseConv3d`` with an earlier ``indice_key``) reuse their indice pairs.
"""

from __future__ import annotations

from typing import Sequence

from spconv.pytorch import SparseConvTensor
from torch import nn

__all__ = ["LevelBackProjection", "LevelProjection"]


def _check_widths(name: str, widths) -> list[int]:
    if isinstance(widths, int) or not isinstance(widths, Sequence) or len(widths) == 0:
        raise TypeError(f"{name} must be a non-empty list of channel counts (one per level), got {name}={widths!r}")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise ValueError(f"{name} must hold positive ints, got {name}={list(widths)!r}")
    return list(widths)


def _check_level_list(levels, widths: list[int], what: str, fix: str) -> None:
    if isinstance(levels, SparseConvTensor) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list of SparseConvTensor (one per level), got {type(levels).__name__}")
    if len(levels) != len(widths):
        raise ValueError(f"levels must hold {len(widths)} SparseConvTensor ({what}), got {len(levels)}")
    for i, (lvl, c) in enumerate(zip(levels, widths)):
        if not isinstance(lvl, SparseConvTensor):
            raise TypeError(f"levels[{i}] must be a SparseConvTensor, got {type(lvl).__name__}")
        if lvl.features.ndim != 2 or lvl.features.shape[1] != c:
            raise ValueError(
                f"levels[{i}].features must have shape [N, {c}] ({what}), got {tuple(lvl.features.shape)}; {fix}"
            )


class LevelProjection(nn.Module):
    """Project every level to the encoder's width: ``Linear(in_channels[l], embed_dim)`` per level.

    Args:
        in_channels: the backbone's channel count per level, e.g. ``[16, 32, 64, 64]`` for the
            four stages of OpenPCDet's ``VoxelBackBone8x``.
        embed_dim: the encoder's ``embed_dim``.
        bias: biases of the linear layers.

    Shape:
        ``levels``: ``len(in_channels)`` ``SparseConvTensor`` with features ``[N_l, in_channels[l]]``
        -> the same tensors (indices, spatial shape, batch size, ``indice_dict``) with features
        ``[N_l, embed_dim]``.
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = _check_widths("in_channels", in_channels)
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim=!r}")
        self.embed_dim = embed_dim
        self.proj = nn.ModuleList(nn.Linear(c, embed_dim, bias=bias) for c in self.in_channels)

    def forward(self, levels: Sequence[SparseConvTensor]) -> list[SparseConvTensor]:
        _check_level_list(
            levels, self.in_channels, f"in_channels={self.in_channels}",
            "build LevelProjection with in_channels = the channel count of each level you pass",
        )
        return [x.replace_feature(proj(x.features)) for proj, x in zip(self.proj, levels)]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, embed_dim={self.embed_dim}"


class LevelBackProjection(nn.Module):
    """Project encoded levels back to the widths the next layers expect: ``Linear(embed_dim, c_l)``.

    Args:
        embed_dim: the encoder's ``embed_dim``.
        out_channels: the width each level must have afterwards (e.g. the backbone's stage widths,
            so that ``conv_out`` and any multi-scale consumer accept the levels).
        bias: biases of the linear layers.

    Shape:
        ``levels``: ``len(out_channels)`` ``SparseConvTensor`` with features ``[N_l, embed_dim]``
        -> the same tensors with features ``[N_l, out_channels[l]]``.
    """

    def __init__(self, embed_dim: int, out_channels: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim=!r}")
        self.embed_dim = embed_dim
        self.out_channels = _check_widths("out_channels", out_channels)
        self.proj = nn.ModuleList(nn.Linear(embed_dim, c, bias=bias) for c in self.out_channels)

    def forward(self, levels: Sequence[SparseConvTensor]) -> list[SparseConvTensor]:
        _check_level_list(
            levels, [self.embed_dim] * len(self.out_channels), f"embed_dim={self.embed_dim}",
            "LevelBackProjection takes the encoder's output levels",
        )
        return [x.replace_feature(proj(x.features)) for proj, x in zip(self.proj, levels)]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, out_channels={self.out_channels}"
