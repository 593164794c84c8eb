"""Toy supervised training of backbone + sparse-MSDA encoder on real LiDAR frames, alone or with DDP.

Task: per-voxel "above ground" segmentation. Every finest-level voxel (0.05 x 0.05 x 0.1 m) is
labelled 1 when the mean height of its points is above ``--ground-z`` (the sensor is ~2 m above
the road, so the ground is near z = -2 m), else 0. Model: the ``VoxelBackBone8x``-shaped spconv
backbone, a per-level linear projection (``sparse_msda.LevelProjection``), ``SparseMSDAEncoder`` over the 4 levels and
a linear head on the encoded finest level; binary cross-entropy.

    python examples/train_toy.py                                  # one process
    torchrun --nproc_per_node=2 examples/train_toy.py             # DDP (gloo on CPU, nccl on GPU)
    python examples/train_toy.py --steps 100 --crop 20 --frames a.bin b.bin

Every step, every rank draws its own augmentation of a frame (random yaw, random point subset;
seeded by ``--seed``, the rank and the step), so the ranks see different data and DDP's
gradient all-reduce keeps their weights identical. The loss (rank 0's, averaged over ranks in
the progress bar) is shown with tqdm. ``--save PREFIX`` writes ``PREFIX.rank{r}.pt`` (the state
dict of every rank, BatchNorm running stats synchronised from rank 0 first).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backbone import LevelProjection, VoxelBackbone8x, crop_points, normalise_features  # noqa: E402

from sparse_msda import SparseMSDAEncoder  # noqa: E402
from sparse_msda.lidar import KITTI_POINT_RANGE, KITTI_VOXEL_SIZE, load_kitti_bin, voxelize  # noqa: E402

DEFAULT_FRAME = Path(__file__).resolve().parent / "data" / "os1_128_1795.bin"


class ToySegmentationNet(nn.Module):
    """Backbone -> projection -> encoder -> linear per-voxel logit on the finest level."""

    def __init__(self, embed_dim: int = 16, n_heads: int = 2, n_layers: int = 1, n_points: int = 2,
                 channels=(16, 16, 32, 32)) -> None:
        super().__init__()
        self.backbone = VoxelBackbone8x(4, channels)
        self.projection = LevelProjection(channels, embed_dim)
        self.encoder = SparseMSDAEncoder(embed_dim, n_heads, n_levels=4, n_layers=n_layers, n_points=n_points,
                                         position_dim=3)
        self.classifier = nn.Linear(embed_dim, 1)

    def forward(self, voxels):
        encoded = self.encoder(self.projection(self.backbone(voxels)))
        return self.classifier(encoded[0].features).squeeze(-1)


def make_batch(points: np.ndarray, ground_z: float, crop, max_points, rng: np.random.Generator):
    """Random yaw (+-15 deg) and point subset of one frame -> (normalised voxels, labels [V])."""
    yaw = rng.uniform(-math.pi / 12, math.pi / 12)
    c, s = math.cos(yaw), math.sin(yaw)
    pts = points.copy()
    pts[:, 0], pts[:, 1] = c * points[:, 0] - s * points[:, 1], s * points[:, 0] + c * points[:, 1]
    pts = crop_points(pts, crop, max_points, seed=int(rng.integers(2**31)))
    voxels = voxelize(pts, KITTI_VOXEL_SIZE, KITTI_POINT_RANGE)
    labels = (voxels.features[:, 2] > ground_z).float()
    return normalise_features(voxels), labels


class _PlainProgress:
    """Fallback when tqdm (the optional ``examples`` extra) is not installed: one line per step."""

    def __init__(self, iterable, desc: str, disable: bool) -> None:
        self.iterable, self.desc, self.disable, self.step = iterable, desc, disable, 0

    def __iter__(self):
        for self.step, item in enumerate(self.iterable, 1):
            yield item

    def set_postfix(self, **kw) -> None:
        if not self.disable:
            print(f"{self.desc} step {self.step}/{len(self.iterable)}: " + ", ".join(f"{k}={v}" for k, v in kw.items()))


def progress(iterable, desc: str, disable: bool):
    """A tqdm progress bar (``pip install tqdm``, part of the ``examples`` extra) or a plain log."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc, disable)
    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", nargs="+", default=[str(DEFAULT_FRAME)], help="KITTI-layout .bin scans")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--crop", type=float, default=10.0, help="keep 0 <= x < CROP, |y| < CROP metres (0: no crop)")
    p.add_argument("--max-points", type=int, default=3000, help="points per sample (0: all)")
    p.add_argument("--ground-z", type=float, default=-1.5, help="label threshold on the voxel mean height (m)")
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--points", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: the problems are tiny, and extra threads "
                   "only spin when the machine is oversubscribed)")
    p.add_argument("--save", default=None, help="write PREFIX.rank{r}.pt state dicts at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = ToySegmentationNet(args.embed_dim, args.heads, args.layers, args.points).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if distributed else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    frames = [load_kitti_bin(f) for f in args.frames]
    crop = args.crop or None
    max_points = args.max_points or None

    bar = progress(range(args.steps), f"train (world {world})", disable=args.quiet or rank != 0)
    losses = []
    for step in bar:
        rng = np.random.default_rng([args.seed, rank, step])
        voxels, labels = make_batch(frames[int(rng.integers(len(frames)))], args.ground_z, crop, max_points, rng)
        voxels = voxels.replace_feature(voxels.features.to(device))
        voxels.indices = voxels.indices.to(device)
        logits = ddp(voxels)
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", voxels=voxels.features.shape[0], pos=f"{float(labels.mean()):.2f}")

    if distributed:  # BatchNorm running stats are per rank; a checkpoint carries rank 0's (as DDP's next forward would)
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, f"{args.save}.rank{rank}.pt")
    if rank == 0:
        k = max(1, min(5, len(losses) // 2))
        print(f"loss: first {k} steps {np.mean(losses[:k]):.4f} -> last {k} steps {np.mean(losses[-k:]):.4f} "
              f"({len(losses)} steps, {world} process(es))")
    if distributed:
        dist.destroy_process_group()
    return {"losses": losses, "model": model}


if __name__ == "__main__":
    main()
