"""Tests of sparse_msda.lidar on the shipped scan (examples/data) and synthetic maps."""

from pathlib import Path

import numpy as np
import pytest
import torch

import adapters  # noqa: F401  (spconv CPU patches)
import spconv.pytorch as spconv
from sparse_msda import lidar

SCAN = Path(__file__).resolve().parents[1] / "examples" / "data" / "os1_128_1795.bin"
KITTI_SHAPES = [[41, 1600, 1408], [21, 800, 704], [11, 400, 352], [5, 200, 176]]


@pytest.fixture(scope="module")
def points():
    return lidar.load_kitti_bin(SCAN)


@pytest.fixture(scope="module")
def voxels(points):
    return lidar.voxelize(points)


def _rows(indices):
    return sorted(map(tuple, indices.tolist()))


def test_load_kitti_bin(points, tmp_path):
    assert points.dtype == np.float32 and points.shape == (107647, 4)
    assert np.array_equal(points.reshape(-1), np.fromfile(SCAN, np.float32))
    bad = tmp_path / "bad.bin"
    np.arange(6, dtype=np.float32).tofile(bad)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        lidar.load_kitti_bin(bad)


def test_voxelize_matches_numpy_reference(points, voxels):
    """Coordinates, cropping and per-voxel means against an independent numpy voxelisation."""
    assert list(voxels.spatial_shape) == [41, 1600, 1408] and voxels.batch_size == 1
    assert voxels.indices.dtype == torch.int32 and voxels.indices.shape[1] == 4
    lo = np.array([0.0, -40.0, -3.0], np.float32)
    size = np.array([0.05, 0.05, 0.1], np.float32)
    cell = np.floor((points[:, :3] - lo) / size).astype(np.int64)  # (x, y, z)
    keep = ((cell >= 0) & (cell < [1408, 1600, 40])).all(1)
    zyx = cell[keep][:, ::-1]
    uniq, inverse, counts = np.unique(zyx, axis=0, return_inverse=True, return_counts=True)
    mean = np.zeros((len(uniq), 4))
    np.add.at(mean, inverse.reshape(-1), points[keep].astype(np.float64))
    mean /= counts[:, None]
    idx = voxels.indices.numpy()
    assert (idx[:, 0] == 0).all()
    # rows are sorted by (z, y, x), as np.unique's are
    assert np.array_equal(idx[:, 1:], uniq)
    assert np.allclose(voxels.features.numpy(), mean, atol=1e-5)
    # cropping: every voxel's mean point lies in its own cell and inside the range
    xyz = voxels.features[:, :3].numpy()
    assert (xyz >= lo - 1e-4).all() and (xyz <= np.array([70.4, 40.0, 1.0]) + 1e-4).all()
    assert voxels.indices[:, 1].max() < 40  # the padded z cell stays empty


def test_voxelize_bad_input():
    with pytest.raises(ValueError, match=r"points must have shape \[N, >=3\]"):
        lidar.voxelize(np.zeros((5, 2), np.float32))
    with pytest.raises(TypeError, match="points must be a numpy array or torch.Tensor"):
        lidar.voxelize([[0.0, 0.0, 0.0]])


def test_multiscale_levels_match_spconv_sparseconv(voxels):
    levels = lidar.multiscale_levels(voxels)
    assert [list(x.spatial_shape) for x in levels] == KITTI_SHAPES
    assert torch.equal(levels[0].indices, voxels.indices)
    # independent reference: spconv's own SparseConv3d(k=3, s=2) stages of VoxelBackBone8x
    current = voxels
    for level, padding in enumerate(lidar.VOXEL_BACKBONE_8X_PADDINGS, start=1):
        conv = spconv.SparseConv3d(current.features.shape[1], 1, 3, 2, padding=padding, bias=False)
        with torch.no_grad():
            current = conv(current)
        assert list(current.spatial_shape) == KITTI_SHAPES[level]
        assert _rows(current.indices) == _rows(levels[level].indices)
        ours = levels[level].indices.to(torch.int64)
        assert ((ours[:, 1:] >= 0) & (ours[:, 1:] < torch.tensor(KITTI_SHAPES[level]))).all()
    assert all(x.indices.dtype == torch.int32 for x in levels)


def test_multiscale_levels_features_are_receptive_field_means():
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 3], [1, 1, 1, 1]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    x = spconv.SparseConvTensor(feats, idx, [5, 5, 5], 2)
    level1 = lidar.multiscale_levels(x, strides=(1, 2), paddings=[(1, 1, 1)])[1]
    got = {tuple(i): float(f) for i, f in zip(level1.indices.tolist(), level1.features[:, 0])}
    # x=0 -> out 0 (k=1) ; x=1 -> out 0 (k=2), 1 (k=0) ; x=3 -> out 1 (k=2), 2 (k=0)
    assert got[(0, 0, 0, 0)] == 2.0 and got[(0, 0, 0, 1)] == 4.0 and got[(0, 0, 0, 2)] == 5.0
    assert list(level1.spatial_shape) == [3, 3, 3]
    # (1,1,1) contributes to outputs {0,1}^3 of batch item 1
    assert sum(k[0] == 1 for k in got) == 8 and all(v == 7.0 for k, v in got.items() if k[0] == 1)


def test_multiscale_levels_channels_and_errors(voxels):
    a = lidar.multiscale_levels(voxels, channels=8, seed=3)
    b = lidar.multiscale_levels(voxels, channels=8, seed=3)
    c = lidar.multiscale_levels(voxels, channels=8, seed=4)
    assert all(x.features.shape[1] == 8 and x.features.dtype == torch.float32 for x in a)
    assert all(torch.equal(x.features, y.features) for x, y in zip(a, b))
    assert not torch.equal(a[0].features, c[0].features)
    with pytest.raises(ValueError, match="strides must start with 1"):
        lidar.multiscale_levels(voxels, strides=(2, 4))
    with pytest.raises(ValueError, match="power-of-2 multiple"):
        lidar.multiscale_levels(voxels, strides=(1, 3))
    with pytest.raises(TypeError, match="sparse_tensor must be a SparseConvTensor"):
        lidar.multiscale_levels(voxels.features)


def test_stack_batch(voxels):
    other = voxels.replace_feature(voxels.features * 2)
    batch = lidar.stack_batch([voxels, other])
    assert batch.batch_size == 2 and list(batch.spatial_shape) == [41, 1600, 1408]
    n = voxels.indices.shape[0]
    assert batch.indices.shape[0] == 2 * n
    assert torch.equal(batch.indices[:n], voxels.indices) and torch.equal(batch.features[n:], 2 * voxels.features)
    assert (batch.indices[n:, 0] == 1).all() and torch.equal(batch.indices[n:, 1:], voxels.indices[:, 1:])
    levels = lidar.multiscale_levels(batch)
    single = lidar.multiscale_levels(voxels)
    for x, y in zip(levels, single):
        assert x.indices.shape[0] == 2 * y.indices.shape[0]
    with pytest.raises(ValueError, match="spatial_shape"):
        lidar.stack_batch([voxels, spconv.SparseConvTensor(voxels.features, voxels.indices, [41, 1600, 1409], 1)])


def test_bev_levels(voxels):
    shapes = [[200, 176], [100, 88]]
    levels = lidar.bev_levels(voxels, shapes)
    idx = voxels.indices.to(torch.int64)
    for (h, w), level in zip(shapes, levels):
        assert list(level.spatial_shape) == [h, w] and level.indices.shape[1] == 3
        expected = {(0, y * h // 1600, x * w // 1408) for y, x in idx[:, 2:].tolist()}
        assert set(map(tuple, level.indices.tolist())) == expected
    # features: mean of the column's voxels
    y, x = levels[0].indices[0, 1:].tolist()
    members = (idx[:, 2] * 200 // 1600 == y) & (idx[:, 3] * 176 // 1408 == x)
    assert torch.allclose(levels[0].features[0], voxels.features[members].mean(0), atol=1e-5)


@pytest.mark.parametrize("occupancy", [0.0, 0.05, 0.3])
def test_random_bev_levels(occupancy):
    levels = lidar.random_bev_levels(occupancy=occupancy, channels=16, seed=1)
    assert [list(x.spatial_shape) for x in levels] == [[256, 256], [128, 128], [64, 64], [32, 32]]
    for x in levels:
        h, w = x.spatial_shape
        per_item = round(occupancy * h * w)
        assert x.indices.shape[0] == 2 * per_item and x.features.shape == (2 * per_item, 16)
        keys = (x.indices[:, 0].long() * h + x.indices[:, 1]) * w + x.indices[:, 2]
        assert torch.equal(keys, torch.unique(keys))  # distinct and sorted
        assert ((x.indices[:, 1:] >= 0) & (x.indices[:, 1:] < torch.tensor([h, w]))).all()
    again = lidar.random_bev_levels(occupancy=occupancy, channels=16, seed=1)
    assert all(torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices) for a, b in zip(levels, again))


def test_random_sparse_levels_3d_large_grid():
    levels = lidar.random_sparse_levels([[41, 1600, 1408]], occupancy=2e-4, batch_size=1, channels=2)
    x = levels[0]
    assert x.indices.shape[0] == round(2e-4 * 41 * 1600 * 1408)
    assert len(set(map(tuple, x.indices.tolist()))) == x.indices.shape[0]
    with pytest.raises(ValueError, match="occupancy must be in"):
        lidar.random_sparse_levels([[4, 4]], occupancy=1.5)
