"""A small spconv 3D backbone of OpenPCDet's ``VoxelBackBone8x`` shape, the sparse-MSDA encoder
plugged after it, and a ``SparseConv3d`` BEV head behind it -- the model of the examples.

Shapes on the KITTI grid (voxel 0.05 x 0.05 x 0.1 m, range x 0..70.4, y -40..40, z -3..1):

    voxels           [41, 1600, 1408]   SubMConv3d x2             -> level 0 (stride 1)
    SparseConv3d s2  [21,  800,  704]   + SubMConv3d              -> level 1 (stride 2)
    SparseConv3d s2  [11,  400,  352]   + SubMConv3d              -> level 2 (stride 4)
    SparseConv3d s2  [ 5,  200,  176]   + SubMConv3d (pad 0,1,1)  -> level 3 (stride 8)
    per-level Linear to ``embed_dim`` (sparse_msda.LevelProjection) -> SparseMSDAEncoder -> same 4 levels, new features
    level 3 -> SparseConv3d((3,1,1), stride (2,1,1)) [2, 200, 176] -> height-compressed BEV
    [B, 2 * bev_channels, 200, 176] -> Conv2d heads

Axis order is spconv's (z, y, x) everywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

import sparse_msda  # noqa: F401  (imports adapters first: CPU sparse-conv backward fix)
import spconv.pytorch as spconv
from spconv.pytorch import SparseConvTensor
from sparse_msda import LevelProjection, SparseCoordinateIndex, SparseMSDAEncoder
from sparse_msda.lidar import KITTI_POINT_RANGE, KITTI_VOXEL_SIZE, stack_batch, voxelize

__all__ = [
    "BEVHead",
    "LevelProjection",
    "LidarEncoderNet",
    "VoxelBackbone8x",
    "crop_points",
    "voxelize_frames",
]


def crop_points(points: np.ndarray, crop: Optional[float] = None, max_points: Optional[int] = None,
                seed: int = 0) -> np.ndarray:
    """Keep the points with ``0 <= x < crop`` and ``|y| < crop`` (metres), then at most
    ``max_points`` of them (a seeded random subset). ``None`` disables each option."""
    if crop is not None:
        keep = (points[:, 0] >= 0) & (points[:, 0] < crop) & (np.abs(points[:, 1]) < crop)
        points = points[keep]
    if max_points is not None and points.shape[0] > max_points:
        rng = np.random.default_rng(seed)
        points = points[np.sort(rng.choice(points.shape[0], max_points, replace=False))]
    return points


def normalise_features(voxels: SparseConvTensor) -> SparseConvTensor:
    """Voxel-mean (x, y, z, reflectivity) -> roughly unit-range inputs for the first conv."""
    lo = torch.tensor(KITTI_POINT_RANGE[:3] + (0.0,))
    hi = torch.tensor(KITTI_POINT_RANGE[3:] + (255.0,))
    f = voxels.features
    return voxels.replace_feature((f - lo) / (hi - lo) * 2 - 1)


def voxelize_frames(frames: Sequence[np.ndarray]) -> SparseConvTensor:
    """Voxelise point clouds ([N, 4] x, y, z, reflectivity) on the KITTI grid ``[41, 1600, 1408]``
    with spconv's ``PointToVoxel`` (mean of the points per voxel) and batch them."""
    voxels = [voxelize(p, KITTI_VOXEL_SIZE, KITTI_POINT_RANGE) for p in frames]
    return normalise_features(voxels[0] if len(voxels) == 1 else stack_batch(voxels))


def _block(c_in, c_out, kernel=3, stride=1, padding=1, key=None, subm=True):
    conv_cls = spconv.SubMConv3d if subm else spconv.SparseConv3d
    kwargs = dict(padding=padding, bias=False, indice_key=key)
    if not subm:
        kwargs["stride"] = stride
    return spconv.SparseSequential(conv_cls(c_in, c_out, kernel, **kwargs), nn.BatchNorm1d(c_out), nn.ReLU())


class VoxelBackbone8x(nn.Module):
    """``VoxelBackBone8x``-shaped sparse 3D backbone (small channel counts).

    Args:
        in_channels: voxel feature channels (4: mean x, y, z, reflectivity).
        channels: output channels of the 4 stages (strides 1, 2, 4, 8).

    Forward: ``SparseConvTensor`` [41, 1600, 1408] -> list of 4 ``SparseConvTensor``
    ``[41,1600,1408], [21,800,704], [11,400,352], [5,200,176]``.
    """

    def __init__(self, in_channels: int = 4, channels: Sequence[int] = (16, 32, 48, 64)) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.channels = tuple(channels)
        self.conv1 = spconv.SparseSequential(_block(in_channels, c1, key="subm1"), _block(c1, c1, key="subm1"))
        self.conv2 = spconv.SparseSequential(_block(c1, c2, stride=2, key="spconv2", subm=False), _block(c2, c2, key="subm2"))
        self.conv3 = spconv.SparseSequential(_block(c2, c3, stride=2, key="spconv3", subm=False), _block(c3, c3, key="subm3"))
        self.conv4 = spconv.SparseSequential(
            _block(c3, c4, stride=2, padding=(0, 1, 1), key="spconv4", subm=False), _block(c4, c4, key="subm4")
        )

    def forward(self, x: SparseConvTensor) -> list[SparseConvTensor]:
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        return [x1, x2, x3, x4]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class BEVHead(nn.Module):
    """OpenPCDet's ``conv_out`` + height compression + a 2D conv head.

    ``SparseConv3d(embed_dim, bev_channels, (3, 1, 1), stride (2, 1, 1))`` maps level 3
    ``[5, 200, 176]`` to ``[2, 200, 176]``; ``dense()`` and merging z into channels give the BEV
    map ``[B, 2 * bev_channels, 200, 176]``; a 3x3 ``Conv2d`` + a 1x1 ``Conv2d`` give ``n_outputs``
    score maps (e.g. a centre heatmap).
    """

    def __init__(self, embed_dim: int, bev_channels: int = 32, n_outputs: int = 1) -> None:
        super().__init__()
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(embed_dim, bev_channels, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                                indice_key="spconv_down2"),
            nn.BatchNorm1d(bev_channels),
            nn.ReLU(),
        )
        self.shared = nn.Sequential(nn.Conv2d(2 * bev_channels, bev_channels, 3, padding=1), nn.ReLU())
        self.score = nn.Conv2d(bev_channels, n_outputs, 1)

    def forward(self, level3: SparseConvTensor) -> tuple[SparseConvTensor, torch.Tensor]:
        """Returns the sparse ``conv_out`` output and the ``[B, n_outputs, H, W]`` BEV scores."""
        out = self.conv_out(level3)
        d, h, w = out.spatial_shape
        idx = out.indices.long()
        # height compression (OpenPCDet's HeightCompression): scatter to [B, D, H, W, C], z into channels
        dense = out.features.new_zeros(out.batch_size, d, h, w, out.features.shape[1])
        dense[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = out.features
        bev = dense.permute(0, 4, 1, 2, 3).reshape(out.batch_size, -1, h, w)
        return out, self.score(self.shared(bev))


class LidarEncoderNet(nn.Module):
    """Backbone -> per-level projection -> :class:`sparse_msda.SparseMSDAEncoder` -> BEV head.

    Args:
        embed_dim, n_heads, n_layers, n_points, neighborhood_sizes: encoder settings.
        channels: backbone stage channels.
        bev_channels: channels of the BEV head.

    ``forward(voxels)`` returns a dict with ``levels`` (the backbone's 4 projected levels),
    ``index`` (their :class:`sparse_msda.SparseCoordinateIndex`, built once), ``encoded`` (the
    encoder's 4 levels: same indices and shapes, new features), ``bev`` (the ``conv_out`` sparse
    tensor) and ``scores`` (``[B, 1, 200, 176]``).
    """

    def __init__(self, embed_dim: int = 32, n_heads: int = 4, n_layers: int = 1, n_points: int = 4,
                 neighborhood_sizes: Optional[Sequence[int]] = None, channels: Sequence[int] = (16, 32, 48, 64),
                 bev_channels: int = 32) -> None:
        super().__init__()
        self.backbone = VoxelBackbone8x(4, channels)
        self.projection = LevelProjection(channels, embed_dim)
        self.encoder = SparseMSDAEncoder(
            embed_dim, n_heads, n_levels=4, n_layers=n_layers, n_points=n_points,
            neighborhood_sizes=neighborhood_sizes, position_dim=3,
        )
        self.head = BEVHead(embed_dim, bev_channels)

    def forward(self, voxels: SparseConvTensor) -> dict:
        levels = self.projection(self.backbone(voxels))
        # One coordinate index for the whole multi-scale map: the encoder validates and reuses it
        # for all its layers (instead of building its own), and a decoder can reuse it as well.
        index = SparseCoordinateIndex.from_spconv(levels)
        encoded = self.encoder(levels, coordinate_index=index)
        bev, scores = self.head(encoded[3])
        return {"levels": levels, "index": index, "encoded": encoded, "bev": bev, "scores": scores}
