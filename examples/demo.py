"""Demo of the adapter layer on a real LiDAR scan.

Voxelises the shipped Ouster frame (``examples/data/os1_128_1795.bin``) on the KITTI grid,
builds the 4-level VoxelBackBone8x-shaped spconv map (``[41,1600,1408]`` .. ``[5,200,176]``),
converts it to a COO stack and back (checking the round trip is lossless), builds the hashed
coordinate index once and looks up a million voxels (hits, misses and out-of-range
coordinates), checking every answer.

Run: ``make demo`` or ``.venv/bin/python examples/demo.py [--scan PATH] [--queries N]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import adapters
from sparse_msda import lidar

DEFAULT_SCAN = Path(__file__).resolve().parent / "data" / "os1_128_1795.bin"


class Timer:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ms = 1e3 * (time.perf_counter() - self.t0)
        print(f"  {self.label:<44s} {self.ms:9.1f} ms")


def main() -> None:
    # spconv calls torch.fx.is_fx_tracing(), which logs a one-off deprecation notice
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="KITTI-layout .bin scan")
    parser.add_argument("--channels", type=int, default=16, help="feature channels of the map")
    parser.add_argument("--queries", type=int, default=1_000_000, help="number of lookups")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)

    print(f"scan: {args.scan}")
    with Timer("load + voxelise (spconv PointToVoxel)"):
        points = lidar.load_kitti_bin(args.scan)
        voxels = lidar.voxelize(points)
    print(f"  {points.shape[0]:,} points -> {voxels.indices.shape[0]:,} voxels, grid {list(voxels.spatial_shape)}")

    with Timer("multi-level map (SparseConv3d k3 s2 sites)"):
        levels = lidar.multiscale_levels(voxels, channels=args.channels, seed=args.seed)
    for i, lvl in enumerate(levels):
        print(f"    level {i}: spatial_shape {list(lvl.spatial_shape)}, {lvl.indices.shape[0]:,} voxels")

    with Timer("spconv -> COO stack"):
        stacked, shapes = adapters.spconv_to_coo_stack(levels)
    print(f"    COO stack {list(stacked.shape)}, nnz {stacked._nnz():,}")
    with Timer("COO stack -> spconv"):
        back = adapters.coo_stack_to_spconv(stacked, shapes)
    lossless = all(
        list(a.spatial_shape) == list(b.spatial_shape)
        and torch.equal(a.indices, b.indices)
        and torch.equal(a.features, b.features)
        for a, b in zip(levels, back)
    )
    print(f"    round trip lossless (indices and features bitwise equal): {lossless}")
    if not lossless:
        raise SystemExit("round trip was not lossless")

    with Timer("build SparseCoordinateIndex (spconv HashTable)"):
        index = adapters.SparseCoordinateIndex.from_spconv(levels)
    print(f"    {index}")
    features, index = adapters.multilevel_features(levels, index=index)

    # queries: half existing voxels, half uniformly random coordinates in the stack's extent
    # (mostly empty cells, some outside their own level's shape)
    n = args.queries
    n_hit = n // 2
    rows = torch.randint(index.n_voxels, (n_hit,), generator=gen)
    q_b = torch.cat([index.batch_indices[rows], torch.zeros(n - n_hit, dtype=torch.int64)])
    q_l = torch.cat([index.level_indices[rows], torch.randint(index.n_levels, (n - n_hit,), generator=gen)])
    extent = index.level_spatial_shapes.max(0).values
    rand = (torch.rand(n - n_hit, index.position_dim, generator=gen) * extent).long()
    q_c = torch.cat([index.spatial_indices[rows], rand])
    with Timer(f"lookup {n:,} voxels"):
        found_rows, found = index.lookup(q_b, q_l, q_c)
    outside = ~(q_c < index.level_spatial_shapes[q_l]).all(-1)
    print(
        f"    hits {int(found.sum()):,}, misses {int((~found).sum()):,} "
        f"(of which {int(outside.sum()):,} outside their level's shape)"
    )
    # every hit holds exactly the queried voxel; every planted hit is found; out-of-range never found
    ok = (
        torch.equal(index.spatial_indices[found_rows[found]], q_c[found])
        and torch.equal(index.level_indices[found_rows[found]], q_l[found])
        and bool(found[:n_hit].all())
        and torch.equal(found_rows[:n_hit], rows)
        and not bool(found[outside].any())
    )
    print(f"    every answer checked against the voxel list: {ok}")
    print(f"    features of the first hit: {features[found_rows[0]][:4].tolist()} ...")
    if not ok:
        raise SystemExit("lookup check failed")


if __name__ == "__main__":
    main()
