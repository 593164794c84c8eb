"""Coordinate index benchmark: spconv-HashTable ``SparseCoordinateIndex`` vs sort + searchsorted.

Build and lookup time (and peak memory) for ~1M voxels and ~4M lookups, side by side with the
approach of the public reference implementation of these layers: linearise the (batch, level,
*coords) keys, ``torch.sort`` them once (build), then ``torch.searchsorted`` + compare (lookup).
Both use the same key linearisation and the same bounds mask; the sort-based answers are checked
equal to the index's before timing.

Maps (``--maps``):

* ``scan``: VoxelBackBone8x-shaped 4-level 3D maps (``[41,1600,1408]`` .. ``[5,200,176]``) of
  real scans, batched to reach ~1M voxels (the frame in ``examples/data`` and, when present,
  those in ``../shared/data/lidar``, reused cyclically);
* ``synthetic``: the same 4 shapes, batch 2, uniformly random sites at 0.55 % occupancy
  (~1.17M voxels).

Lookups: half are existing voxels (hits), half uniformly random (batch, level, coords) within the
stack's extent (mostly misses; some outside their own level's shape).

Run from the repository root: ``python -m benchmarks.index`` (``make bench``), ``--quick`` for a
small smoke run.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Case, add_common_args, run_cases, scan_frames, scan_levels

KITTI_SHAPES = [[41, 1600, 1408], [21, 800, 704], [11, 400, 352], [5, 200, 176]]


def _levels(source: str, voxels: int):
    from sparse_msda import lidar

    if source == "scan":
        per_frame = sum(x.indices.shape[0] for x in scan_levels(1))
        return scan_levels(batch_size=max(1, round(voxels / per_frame)))
    per_item_sites = sum(torch.tensor(s).prod().item() for s in KITTI_SHAPES)
    return lidar.random_sparse_levels(KITTI_SHAPES, occupancy=voxels / (2 * per_item_sites), batch_size=2, channels=1)


def _voxel_tensors(levels):
    import adapters

    index = adapters.SparseCoordinateIndex.from_spconv(levels)
    return index, (index.batch_indices, index.level_indices, index.spatial_indices, index.level_spatial_shapes, index.batch_size)


def _queries(index, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_hit = n // 2
    rows = torch.randint(index.n_voxels, (n_hit,), generator=gen)
    extent = index.level_spatial_shapes.max(0).values
    b = torch.cat([index.batch_indices[rows], torch.randint(index.batch_size, (n - n_hit,), generator=gen)])
    l = torch.cat([index.level_indices[rows], torch.randint(index.n_levels, (n - n_hit,), generator=gen)])
    c = torch.cat([index.spatial_indices[rows], (torch.rand(n - n_hit, index.position_dim, generator=gen) * extent).long()])
    return b, l, c


# --- the reference approach: sorted linearised keys + searchsorted --------------------------
def _linearise(b, l, c, shapes):
    extent = shapes.max(0).values
    key = b * shapes.shape[0] + l
    for axis in range(shapes.shape[1]):
        key = key * extent[axis] + c[..., axis]
    return key


def sort_build(b, l, c, shapes, batch_size):
    keys = _linearise(b, l, c, shapes)
    return torch.sort(keys)  # (sorted keys, permutation = row of each sorted key)


def sort_lookup(sorted_keys, perm, shapes, batch_size, b, l, c):
    from adapters.validation import in_bounds

    valid = in_bounds(b, l, c, shapes, batch_size)
    keys = _linearise(b, l, c, shapes)
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=max(sorted_keys.numel() - 1, 0))
    found = valid & (sorted_keys[pos] == keys)
    return torch.where(found, perm[pos], -1), found


# --- benchmark cases (module-level: they run in spawned subprocesses) -------------------------
def setup_build(source: str, voxels: int, method: str):
    import adapters

    _, (b, l, c, shapes, batch_size) = _voxel_tensors(_levels(source, voxels))
    if method == "hash index":
        return lambda: adapters.SparseCoordinateIndex(b, l, c, shapes, batch_size)
    return lambda: sort_build(b, l, c, shapes, batch_size)


def setup_lookup(source: str, voxels: int, lookups: int, method: str):
    index, (b, l, c, shapes, batch_size) = _voxel_tensors(_levels(source, voxels))
    qb, ql, qc = _queries(index, lookups)
    sorted_keys, perm = sort_build(b, l, c, shapes, batch_size)
    rows, found = index.lookup(qb, ql, qc)
    rows_ref, found_ref = sort_lookup(sorted_keys, perm, shapes, batch_size, qb, ql, qc)
    if not (torch.equal(rows, rows_ref) and torch.equal(found, found_ref)):
        raise AssertionError("hash index and sort + searchsorted disagree")
    if method == "hash index":
        return lambda: index.lookup(qb, ql, qc)
    return lambda: sort_lookup(sorted_keys, perm, shapes, batch_size, qb, ql, qc)


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--voxels", type=int, default=1_000_000, help="approximate number of voxels")
    parser.add_argument("--lookups", type=int, default=4_000_000)
    parser.add_argument("--maps", nargs="+", default=["scan", "synthetic"], choices=["scan", "synthetic"])
    args = parser.parse_args()
    if args.quick:
        args.voxels, args.lookups = min(args.voxels, 100_000), min(args.lookups, 200_000)
    if args.device != "cpu":
        raise SystemExit("benchmarks.index runs on the CPU (the CUDA index is exercised by the tests)")

    import adapters  # noqa: F401

    cases = []
    for source in args.maps:
        levels = _levels(source, args.voxels)
        n_voxels = sum(x.indices.shape[0] for x in levels)
        what = (
            f"{levels[0].batch_size} real frames ({len(scan_frames())} distinct)" if source == "scan" else "synthetic, batch 2"
        )
        cols = {"map": what, "voxels": n_voxels}
        for method in ("hash index", "sort + searchsorted"):
            cases.append(Case(f"build / {method}", setup_build, {"source": source, "voxels": args.voxels, "method": method}, cols))
        for method in ("hash index", "sort + searchsorted"):
            cases.append(
                Case(
                    f"lookup / {method}",
                    setup_lookup,
                    {"source": source, "voxels": args.voxels, "lookups": args.lookups, "method": method},
                    {**cols, "lookups": args.lookups},
                )
            )
        del levels
    run_cases(
        cases,
        warmup=args.warmup,
        repeats=args.repeats,
        timeout=args.timeout,
        out=args.out,
        title="### Coordinate index: spconv HashTable vs sort + searchsorted (CPU)",
    )


if __name__ == "__main__":
    main()
