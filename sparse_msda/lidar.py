"""LiDAR scans to multi-level spconv maps, without a learned backbone.

Utilities for examples, tests and benchmarks: they turn a real scan (KITTI ``.bin`` layout)
into the multi-level sparse maps that an spconv backbone such as OpenPCDet's
``VoxelBackBone8x`` produces, with the same coordinates and spatial shapes but *untrained*
features (pooled means of the input voxels, optionally through a seeded random projection).

Conventions (as everywhere in sparse-msda):

* Every map is a ``spconv.pytorch.SparseConvTensor`` with int32 indices ``[N, 1 + ndim]``:
  (batch, z, y, x) in 3D, (batch, y, x) in 2D -- spconv's axis order.
* Points are ``[N, 4]`` float32 (x, y, z, reflectivity) in metres, x forward, y left, z up.
* Voxel grid: ``voxel_size`` and ``point_range`` are given in (x, y, z) order like OpenPCDet;
  voxel ``(z, y, x)`` covers ``[min + i * size, min + (i + 1) * size)`` on each axis.
  The KITTI setting ``voxel_size=(0.05, 0.05, 0.1)``, ``point_range=(0, -40, -3, 70.4, 40, 1)``
  gives a 40 x 1600 x 1408 grid; like OpenPCDet (``grid_size[::-1] + [1, 0, 0]``) the spconv
  ``spatial_shape`` gets one extra z cell: ``[41, 1600, 1408]``.
* Rows of every returned map are sorted by (batch, *coords).

Functions:

* :func:`load_kitti_bin` -- read a scan.
* :func:`voxelize` -- mean-of-points voxels of one scan (spconv's ``PointToVoxel``).
* :func:`stack_batch` -- put several single-frame maps into one batch.
* :func:`multiscale_levels` -- the 4 levels of a ``VoxelBackBone8x``-shaped pyramid
  (``[41,1600,1408]``, ``[21,800,704]``, ``[11,400,352]``, ``[5,200,176]``), coordinates exactly
  those of spconv's ``SparseConv3d(kernel_size=3, stride=2)`` stages.
* :func:`bev_levels` -- a 2D bird's-eye-view pyramid (z collapsed) with given level shapes.
* :func:`random_sparse_levels` / :func:`random_bev_levels` -- synthetic maps of controlled
  occupancy (the reference benchmark setting: 4 BEV levels 256..32, 5 % occupancy).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from spconv.pytorch import SparseConvTensor

__all__ = [
    "KITTI_POINT_RANGE",
    "KITTI_VOXEL_SIZE",
    "VOXEL_BACKBONE_8X_PADDINGS",
    "bev_levels",
    "load_kitti_bin",
    "multiscale_levels",
    "random_bev_levels",
    "random_sparse_levels",
    "stack_batch",
    "voxelize",
]

KITTI_VOXEL_SIZE = (0.05, 0.05, 0.1)
KITTI_POINT_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
#: Padding (z, y, x) of the three stride-2 ``SparseConv3d(k=3)`` stages of OpenPCDet's VoxelBackBone8x.
VOXEL_BACKBONE_8X_PADDINGS = ((1, 1, 1), (1, 1, 1), (0, 1, 1))


def load_kitti_bin(path: str | os.PathLike) -> np.ndarray:
    """Read a KITTI-layout scan: a flat little-endian float32 array of (x, y, z, reflectivity).

    Returns:
        float32 ``[N, 4]``.

    Raises:
        ValueError: the file size is not a multiple of 16 bytes.
    """
    raw = np.fromfile(path, dtype="<f4")
    if raw.size % 4:
        raise ValueError(f"{os.fspath(path)!r} holds {raw.size} float32 values, not a multiple of 4 (x, y, z, r)")
    return raw.reshape(-1, 4).astype(np.float32, copy=False)


def _check_points(points) -> torch.Tensor:
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"points must be a numpy array or torch.Tensor, got {type(points).__name__}")
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must have shape [N, >=3] (x, y, z, ...), got points.shape={tuple(points.shape)}")
    return points.to(torch.float32).contiguous()


def voxelize(
    points,
    voxel_size: Sequence[float] = KITTI_VOXEL_SIZE,
    point_range: Sequence[float] = KITTI_POINT_RANGE,
    *,
    z_padding: int = 1,
    max_voxels: Optional[int] = None,
) -> SparseConvTensor:
    """Voxelise one scan with spconv's ``PointToVoxel``; each voxel holds the mean of its points.

    Args:
        points: ``[N, F]`` (x, y, z, features...) numpy array or tensor, F >= 3.
        voxel_size: (x, y, z) voxel edge lengths in metres.
        point_range: (x_min, y_min, z_min, x_max, y_max, z_max); points outside are dropped.
        z_padding: extra z cells added to the spconv ``spatial_shape`` (OpenPCDet adds 1, so the
            KITTI grid 40 x 1600 x 1408 becomes ``[41, 1600, 1408]``); no voxel lies there.
        max_voxels: capacity (default: the number of points, i.e. no voxel is ever dropped).

    Returns:
        A batch-size-1 ``SparseConvTensor``: float32 features ``[V, F]`` (mean of *all* points of
        the voxel), int32 indices ``[V, 4]`` (0, z, y, x) sorted by (z, y, x).
    """
    from spconv.pytorch.utils import PointToVoxel

    pts = _check_points(points)
    if len(voxel_size) != 3 or len(point_range) != 6:
        raise ValueError(f"voxel_size must have 3 and point_range 6 entries, got {voxel_size=}, {point_range=}")
    if not isinstance(z_padding, int) or z_padding < 0:
        raise ValueError(f"z_padding must be a non-negative int, got {z_padding=}")
    capacity = max(int(max_voxels if max_voxels is not None else pts.shape[0]), 1)
    gen = PointToVoxel(
        vsize_xyz=[float(v) for v in voxel_size],
        coors_range_xyz=[float(v) for v in point_range],
        num_point_features=pts.shape[1],
        max_num_voxels=capacity,
        max_num_points_per_voxel=1,  # features are averaged over *all* points below, via pc_voxel_id
        device=pts.device,
    )
    _, coords, _, point_voxel = gen.generate_voxel_with_id(pts)
    n_voxels = coords.shape[0]
    grid = list(gen.grid_size)  # (z, y, x)
    del gen
    kept = point_voxel >= 0
    ids = point_voxel[kept]
    sums = torch.zeros(n_voxels, pts.shape[1], dtype=torch.float64, device=pts.device).index_add_(0, ids, pts[kept].double())
    counts = torch.bincount(ids, minlength=n_voxels).clamp_min(1)
    features = (sums / counts[:, None]).to(torch.float32)
    coords = coords.to(torch.int64)
    order = _lex_order(coords, grid)
    indices = torch.cat([torch.zeros(n_voxels, 1, dtype=torch.int32, device=pts.device), coords[order].to(torch.int32)], 1)
    shape = [grid[0] + z_padding, grid[1], grid[2]]
    return SparseConvTensor(features[order], indices, shape, 1)


def _lex_order(coords: torch.Tensor, extent: Sequence[int]) -> torch.Tensor:
    """Permutation sorting integer rows ``coords [N, D]`` lexicographically (each axis < extent)."""
    key = torch.zeros(coords.shape[0], dtype=torch.int64, device=coords.device)
    for axis, size in enumerate(extent):
        key = key * int(size) + coords[:, axis].to(torch.int64)
    return torch.argsort(key)


def stack_batch(frames: Sequence[SparseConvTensor]) -> SparseConvTensor:
    """Put several maps with the same ``spatial_shape`` into one batch.

    Args:
        frames: ``SparseConvTensor`` s (any batch size each); item ``b`` of frame ``f`` becomes
            batch item ``sum(frames[:f].batch_size) + b``.

    Returns:
        One ``SparseConvTensor`` whose ``batch_size`` is the sum, rows sorted by (batch, *coords).
    """
    frames = list(frames)
    if not frames or not all(isinstance(f, SparseConvTensor) for f in frames):
        raise TypeError("frames must be a non-empty sequence of SparseConvTensor")
    shape = list(frames[0].spatial_shape)
    offset, indices, features = 0, [], []
    for i, f in enumerate(frames):
        if list(f.spatial_shape) != shape:
            raise ValueError(f"frames[{i}].spatial_shape={list(f.spatial_shape)} differs from frames[0]'s {shape}")
        idx = f.indices.clone()
        idx[:, 0] += offset
        indices.append(idx)
        features.append(f.features)
        offset += f.batch_size
    idx = torch.cat(indices)
    order = _lex_order(idx, [offset, *shape])
    return SparseConvTensor(torch.cat(features)[order], idx[order].contiguous(), shape, offset)


def _downsample(x: SparseConvTensor, padding: Sequence[int], kernel: int = 3, stride: int = 2) -> SparseConvTensor:
    """Output sites and receptive-field mean features of ``SparseConvNd(kernel, stride, padding)``.

    Output site ``o`` is active iff some input ``i`` satisfies ``i = o * stride - padding + k``
    with ``0 <= k < kernel`` on every axis -- exactly spconv's (non-submanifold) rule.
    """
    ndim = len(x.spatial_shape)
    idx = x.indices.to(torch.int64)
    dev = idx.device
    in_shape = torch.tensor(x.spatial_shape, dtype=torch.int64, device=dev)
    pad = torch.tensor(list(padding), dtype=torch.int64, device=dev)
    out_shape = (in_shape + 2 * pad - kernel) // stride + 1
    b, c = idx[:, 0], idx[:, 1:]
    # all kernel offsets k in [0, kernel)^ndim
    offsets = torch.cartesian_prod(*[torch.arange(kernel, device=dev)] * ndim).reshape(-1, ndim)
    num = c[:, None, :] + pad - offsets[None]  # [N, K, D]
    o = torch.div(num, stride, rounding_mode="floor")
    ok = ((num % stride) == 0).all(-1) & (o >= 0).all(-1) & (o < out_shape).all(-1)
    src = torch.arange(idx.shape[0], device=dev)[:, None].expand_as(ok)[ok]
    out_idx = torch.cat([b[src, None], o[ok]], 1)
    key = out_idx[:, 0]
    for axis in range(ndim):
        key = key * out_shape[axis] + out_idx[:, axis + 1]
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    sums = torch.zeros(uniq.numel(), x.features.shape[1], dtype=torch.float64, device=dev).index_add_(
        0, inverse, x.features[src].double()
    )
    counts = torch.bincount(inverse, minlength=uniq.numel())
    out_coords = torch.empty(uniq.numel(), ndim + 1, dtype=torch.int64, device=dev)
    rest = uniq.clone()
    for axis in range(ndim, 0, -1):
        out_coords[:, axis] = rest % out_shape[axis - 1]
        rest = rest // out_shape[axis - 1]
    out_coords[:, 0] = rest
    features = (sums / counts[:, None]).to(x.features.dtype)
    return SparseConvTensor(features, out_coords.to(torch.int32), out_shape.tolist(), x.batch_size)


def _project(levels: list[SparseConvTensor], channels: Optional[int], seed: int) -> list[SparseConvTensor]:
    """Seeded random linear projection (+ tanh) of every level's features to ``channels``."""
    if channels is None:
        return levels
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int or None, got {channels=}")
    out = []
    for level, x in enumerate(levels):
        gen = torch.Generator().manual_seed(seed * 1009 + level)
        f = x.features.to(torch.float32)
        f = (f - f.mean(0)) / f.std(0).clamp_min(1e-6) if f.shape[0] > 1 else f
        w = (torch.randn(f.shape[1], channels, generator=gen) / f.shape[1] ** 0.5).to(f.device)
        bias = (0.1 * torch.randn(channels, generator=gen)).to(f.device)
        out.append(x.replace_feature(torch.tanh(f @ w + bias)))
    return out


def multiscale_levels(
    sparse_tensor: SparseConvTensor,
    strides: Sequence[int] = (1, 2, 4, 8),
    *,
    channels: Optional[int] = None,
    seed: int = 0,
    paddings: Optional[Sequence[Sequence[int]]] = None,
) -> list[SparseConvTensor]:
    """A ``VoxelBackBone8x``-shaped multi-level map of a voxelised scan, without learned weights.

    Level ``l`` (total stride ``strides[l]``) is obtained from the previous one by
    ``log2(strides[l] / strides[l-1])`` stages of ``SparseConvNd(kernel_size=3, stride=2)``
    *site* propagation (same output coordinates and shapes as spconv); its features are the
    mean of the contributing input voxels' features. With ``channels`` every level's features
    then go through a seeded random projection ``tanh(standardise(f) @ W_l + b_l)``.

    For the KITTI grid ``[41, 1600, 1408]`` and the default strides the levels have shapes
    ``[41,1600,1408]``, ``[21,800,704]``, ``[11,400,352]``, ``[5,200,176]``.

    Args:
        sparse_tensor: level 0, e.g. from :func:`voxelize` (2D or 3D, any batch size).
        strides: total stride of each level; the first must be 1, each a power-of-2 multiple
            of the previous.
        channels: output feature channels (``None``: keep the pooled input features).
        seed: seed of the projections.
        paddings: padding of each stride-2 stage (default: VoxelBackBone8x's
            ``(1,1,1), (1,1,1), (0,1,1)`` in 3D then 1; 1 everywhere in 2D).

    Returns:
        ``len(strides)`` ``SparseConvTensor`` s, rows sorted by (batch, *coords).
    """
    if not isinstance(sparse_tensor, SparseConvTensor):
        raise TypeError(f"sparse_tensor must be a SparseConvTensor, got {type(sparse_tensor).__name__}")
    strides = [int(s) for s in strides]
    if not strides or strides[0] != 1:
        raise ValueError(f"strides must start with 1, got {strides=}")
    stages = []
    for prev, cur in zip(strides, strides[1:]):
        ratio = cur // prev if prev > 0 else 0
        if cur <= prev or cur % prev or ratio & (ratio - 1):
            raise ValueError(f"each stride must be a power-of-2 multiple (> 1) of the previous one, got {strides=}")
        stages.append(ratio.bit_length() - 1)
    ndim = len(sparse_tensor.spatial_shape)
    n_stages = sum(stages)
    if paddings is None:
        default = list(VOXEL_BACKBONE_8X_PADDINGS) if ndim == 3 else []
        paddings = (default + [(1,) * ndim] * n_stages)[:n_stages]
    if len(paddings) < n_stages or any(len(p) != ndim for p in paddings[:n_stages]):
        raise ValueError(f"paddings must give {n_stages} {ndim}-tuples, got {paddings=}")
    order = _lex_order(sparse_tensor.indices, [sparse_tensor.batch_size, *sparse_tensor.spatial_shape])
    current = SparseConvTensor(
        sparse_tensor.features[order], sparse_tensor.indices[order], list(sparse_tensor.spatial_shape),
        sparse_tensor.batch_size,
    )
    levels, stage = [current], 0
    for n in stages:
        for _ in range(n):
            current = _downsample(current, paddings[stage])
            stage += 1
        levels.append(current)
    return _project(levels, channels, seed)


def bev_levels(
    sparse_tensor: SparseConvTensor,
    shapes: Sequence[Sequence[int]] = ((200, 176), (100, 88), (50, 44), (25, 22)),
    *,
    channels: Optional[int] = None,
    seed: int = 0,
) -> list[SparseConvTensor]:
    """A 2D bird's-eye-view pyramid of a 3D map: z collapsed, then pooled to each level's shape.

    BEV cell ``(y', x')`` of a level with shape ``(H, W)`` holds the mean features of every
    voxel ``(z, y, x)`` with ``y * H // Y == y'`` and ``x * W // X == x'`` (``(Y, X)`` the input's
    y/x shape); it exists iff at least one such voxel does.

    Args:
        sparse_tensor: a 3D ``SparseConvTensor`` (e.g. from :func:`voxelize`).
        shapes: ``(H, W)`` of each level (default: the VoxelBackBone8x BEV ``[200, 176]`` and
            three halvings).
        channels / seed: as in :func:`multiscale_levels`.

    Returns:
        ``len(shapes)`` 2D ``SparseConvTensor`` s, indices (batch, y, x), rows sorted.
    """
    if not isinstance(sparse_tensor, SparseConvTensor) or len(sparse_tensor.spatial_shape) != 3:
        raise TypeError("sparse_tensor must be a 3D SparseConvTensor")
    shapes = [[int(v) for v in s] for s in shapes]
    if not shapes or any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of positive (H, W) pairs, got {shapes=}")
    _, in_y, in_x = (int(v) for v in sparse_tensor.spatial_shape)
    idx = sparse_tensor.indices.to(torch.int64)
    feats = sparse_tensor.features.double()
    levels = []
    for h, w in shapes:
        b, y, x = idx[:, 0], idx[:, 2] * h // in_y, idx[:, 3] * w // in_x
        key = (b * h + y) * w + x
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        sums = torch.zeros(uniq.numel(), feats.shape[1], dtype=torch.float64, device=feats.device).index_add_(0, inverse, feats)
        counts = torch.bincount(inverse, minlength=uniq.numel())
        coords = torch.stack([uniq // (h * w), (uniq // w) % h, uniq % w], 1).to(torch.int32)
        levels.append(
            SparseConvTensor((sums / counts[:, None]).to(sparse_tensor.features.dtype), coords, [h, w], sparse_tensor.batch_size)
        )
    return _project(levels, channels, seed)


def _sample_sites(n_sites: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct uniformly random ints in ``[0, n_sites)``, sorted."""
    if k >= n_sites:
        return torch.arange(n_sites)
    if n_sites <= 1 << 24:
        return torch.randperm(n_sites, generator=gen)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(n_sites, (int(1.1 * (k - chosen.numel())) + 16,), generator=gen)
        chosen = torch.unique(torch.cat([chosen, draw]))
    return chosen[torch.randperm(chosen.numel(), generator=gen)[:k]].sort().values


def random_sparse_levels(
    shapes: Sequence[Sequence[int]],
    occupancy: float = 0.05,
    batch_size: int = 2,
    channels: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[SparseConvTensor]:
    """Synthetic multi-level map (2D or 3D): each batch item of each level holds exactly
    ``round(occupancy * prod(shape))`` distinct uniformly random sites with N(0, 1) features.

    Returns:
        ``len(shapes)`` ``SparseConvTensor`` s on the CPU, rows sorted by (batch, *coords); seeded.
    """
    shapes = [[int(v) for v in s] for s in shapes]
    if not shapes or len({len(s) for s in shapes}) != 1 or len(shapes[0]) not in (2, 3) or min(map(min, shapes)) <= 0:
        raise ValueError(f"shapes must be a non-empty list of positive 2D or 3D shapes of one ndim, got {shapes=}")
    if not 0.0 <= occupancy <= 1.0:
        raise ValueError(f"occupancy must be in [0, 1], got {occupancy=}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size=}")
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for shape in shapes:
        n_sites = int(np.prod(shape))
        k = int(round(occupancy * n_sites))
        coords = []
        for b in range(batch_size):
            flat = _sample_sites(n_sites, k, gen)
            parts, rest = [], flat
            for size in reversed(shape):
                parts.append(rest % size)
                rest = rest // size
            coords.append(torch.stack([torch.full_like(flat, b), *reversed(parts)], 1))
        idx = torch.cat(coords).to(torch.int32)
        feats = torch.randn(idx.shape[0], channels, generator=gen).to(dtype)
        levels.append(SparseConvTensor(feats, idx, shape, batch_size))
    return levels


def random_bev_levels(
    shapes: Sequence[Sequence[int]] = ((256, 256), (128, 128), (64, 64), (32, 32)),
    occupancy: float = 0.05,
    batch_size: int = 2,
    channels: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[SparseConvTensor]:
    """The reference benchmark setting: 4 BEV levels 256^2..32^2 at 5 % occupancy, batch 2,
    256 channels (see :func:`random_sparse_levels`)."""
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"random_bev_levels needs 2D shapes, got {shapes=}")
    return random_sparse_levels(shapes, occupancy, batch_size, channels, seed, dtype)
