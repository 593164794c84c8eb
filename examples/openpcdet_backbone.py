"""The OpenPCDet drop-in on a real scan: ``SparseMSDABackBone8x`` on OpenPCDet's ``batch_dict``.

    python examples/openpcdet_backbone.py                        # shipped frame, batch 2 (the frame twice)
    python examples/openpcdet_backbone.py --batch crops          # batch 2 = left and right half of the frame
    python examples/openpcdet_backbone.py --backward --layers 2  # forward + backward, 2 encoder layers
    python examples/openpcdet_backbone.py --levels x_conv1,x_conv2,x_conv3,x_conv4

Builds the ``batch_dict`` OpenPCDet's ``MeanVFE`` hands to ``BACKBONE_3D`` (``voxel_features``:
mean x, y, z, intensity of each voxel's points; ``voxel_coords``: (batch, z, y, x); ``batch_size``)
on the KITTI grid (``grid_size`` [1408, 1600, 40], spconv shape [41, 1600, 1408]), runs the plain
``VoxelBackBone8x`` and the same backbone with sparse MSDA before ``conv_out`` (same backbone
weights), checks the contract (levels, indices, ``conv_out`` output), and prints voxel counts,
median times (plain backbone, whole drop-in, the attention part alone) and the process's peak
memory. Uses OpenPCDet's own ``VoxelBackBone8x`` when ``pcdet`` is importable, else the stand-in
with its interface (``examples/framework_standins.py``). Weights are untrained (seeded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from framework_standins import VoxelBackBone8xStandIn  # noqa: E402

from sparse_msda.integrations import SparseMSDABackBone8x  # noqa: E402
from sparse_msda.lidar import KITTI_POINT_RANGE, KITTI_VOXEL_SIZE, load_kitti_bin, voxelize  # noqa: E402

DEFAULT_FRAME = Path(__file__).resolve().parent / "data" / "os1_128_1795.bin"
GRID_SIZE = np.array([1408, 1600, 40])  # OpenPCDet's KITTI grid_size (x, y, z)


def base_backbone():
    """OpenPCDet's ``VoxelBackBone8x`` when installed, else the stand-in; and its name."""
    try:
        from pcdet.models.backbones_3d import VoxelBackBone8x

        return VoxelBackBone8x, "OpenPCDet VoxelBackBone8x"
    except ImportError:
        return VoxelBackBone8xStandIn, "VoxelBackBone8xStandIn (OpenPCDet not installed)"


def make_batch_dict(frames: list) -> dict:
    """OpenPCDet's ``batch_dict`` after ``MeanVFE`` for a list of ``[N, 4]`` point clouds."""
    features, coords = [], []
    for b, points in enumerate(frames):
        vox = voxelize(points, KITTI_VOXEL_SIZE, KITTI_POINT_RANGE)
        features.append(vox.features)
        idx = vox.indices.clone()
        idx[:, 0] = b
        coords.append(idx)
    return {"voxel_features": torch.cat(features), "voxel_coords": torch.cat(coords), "batch_size": len(frames)}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", nargs="?", default=str(DEFAULT_FRAME))
    parser.add_argument("--batch", choices=("twice", "crops"), default="twice",
                        help="batch 2 = the frame twice, or its left (y >= 0) and right (y < 0) halves")
    parser.add_argument("--levels", default="x_conv2,x_conv3,x_conv4", help="levels that get attention")
    parser.add_argument("--max-points", type=int, default=None, help="a seeded random subset of the points (faster)")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    points = load_kitti_bin(args.scan)
    if args.max_points is not None and points.shape[0] > args.max_points:
        keep = np.random.default_rng(0).choice(points.shape[0], args.max_points, replace=False)
        points = points[np.sort(keep)]
    frames = [points, points] if args.batch == "twice" else [points[points[:, 1] >= 0], points[points[:, 1] < 0]]
    base_cls, base_name = base_backbone()
    levels = args.levels.split(",")
    cfg = {"BASE_BACKBONE": "VoxelBackBone8x", "MSDA": {
        "ATTENTION_LEVELS": levels, "EMBED_DIM": args.embed_dim, "NUM_HEADS": args.heads,
        "NUM_LAYERS": args.layers, "NUM_POINTS": args.points}}
    torch.manual_seed(0)
    plain = base_cls(model_cfg=cfg, input_channels=4, grid_size=GRID_SIZE)
    model = SparseMSDABackBone8x(cfg, 4, GRID_SIZE, base_backbone=base_cls)
    model.load_state_dict(plain.state_dict(), strict=False)  # same backbone weights
    plain.train(args.backward)
    model.train(args.backward)

    msda_times = []
    model.msda.register_forward_pre_hook(lambda *_: msda_times.append(-time.perf_counter()))
    model.msda.register_forward_hook(lambda *_: msda_times.__setitem__(-1, msda_times[-1] + time.perf_counter()))

    def run(net):
        batch_dict = make_batch_dict(frames)
        if args.backward:
            batch_dict["voxel_features"].requires_grad_(True)
        t = time.perf_counter()
        out = net(batch_dict)
        if args.backward:
            loss = out["encoded_spconv_tensor"].features.square().mean()
            loss.backward()
        return time.perf_counter() - t, out

    print(f"scan {Path(args.scan).name}: {points.shape[0]} points; batch 2 = {args.batch}; base {base_name}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.set_grad_enabled(args.backward):
        plain_times = [run(plain)[0] for _ in range(args.repeats)]
        plain_peak = peak_rss_mib()
        times, outs = zip(*(run(model) for _ in range(args.repeats)))
    ref, out = run(plain)[1], outs[-1]

    feats, ref_feats = out["multi_scale_3d_features"], ref["multi_scale_3d_features"]
    for name in feats:
        a, b = feats[name], ref_feats[name]
        assert torch.equal(a.indices, b.indices) and list(a.spatial_shape) == list(b.spatial_shape)
        assert a.batch_size == 2 and a.features.shape == b.features.shape
        counts = torch.bincount(a.indices[:, 0].long(), minlength=2).tolist()
        print(f"  {name}: spatial shape {list(a.spatial_shape)}, voxels per item {counts}, "
              f"{a.features.shape[1]} channels, {'attention' if name in levels else 'backbone only'}")
    enc, enc_ref = out["encoded_spconv_tensor"], ref["encoded_spconv_tensor"]
    assert torch.equal(enc.indices, enc_ref.indices) and torch.isfinite(enc.features).all()
    print(f"  encoded_spconv_tensor: {list(enc.spatial_shape)}, {enc.indices.shape[0]} voxels x "
          f"{enc.features.shape[1]} channels, stride {out['encoded_spconv_tensor_stride']}")
    queries = sum(feats[n].indices.shape[0] for n in levels)
    what = "forward+backward" if args.backward else "forward"
    print(f"{what}, median of {args.repeats} (embed {args.embed_dim}, {args.heads} heads, {args.layers} layer(s), "
          f"{queries} queries on {levels}):")
    print(f"  plain backbone             {statistics.median(plain_times):7.2f} s")
    print(f"  backbone + sparse MSDA     {statistics.median(times):7.2f} s   (attention part, forward: "
          f"{statistics.median(msda_times):.2f} s)")
    print(f"  peak RSS: {plain_peak:.0f} MiB after the plain backbone, {peak_rss_mib():.0f} MiB after the drop-in")


if __name__ == "__main__":
    main()
