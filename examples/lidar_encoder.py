"""Sparse multi-scale deformable + neighborhood attention inside an spconv LiDAR pipeline.

    python examples/lidar_encoder.py                       # the shipped Ouster frame
    python examples/lidar_encoder.py path/to/000000.bin    # any KITTI-layout .bin scan
    python examples/lidar_encoder.py --crop 20 --layers 1  # a smaller region, faster

Steps (each one timed):

1. read a KITTI ``.bin`` scan (float32 x, y, z, intensity; metres, x forward, y left, z up);
2. voxelise it with spconv's ``PointToVoxel`` on the KITTI grid (0.05 x 0.05 x 0.1 m voxels,
   x 0..70.4, y -40..40, z -3..1 -> spconv shape ``[41, 1600, 1408]``, mean of points per voxel);
3. run a small ``VoxelBackBone8x``-shaped spconv backbone (strides 1, 2, 4, 8) and project every
   level to ``embed_dim`` with ``sparse_msda.LevelProjection`` (a Linear per level);
4. build the ``SparseCoordinateIndex`` of the 4 levels once, and run ``SparseMSDAEncoder``
   (``--layers`` x [deformable attention + neighborhood attention + feed-forward], every voxel
   of every level a query) -- the output levels keep their indices and shapes;
5. feed the encoded coarsest level to a ``SparseConv3d`` BEV head (OpenPCDet's ``conv_out`` +
   height compression + a conv score map);
6. run one decoder step: 900 object queries at the top-scoring occupied BEV cells attend to the
   encoded map with a ``SparseMSDeformableAttentionBlock`` (reusing the index);
7. write a PNG of the scan's BEV occupancy with the sampling points of a few queries.

The weights are untrained (seeded): the example shows shapes, plumbing and speed, not
detections. ``examples/train_toy.py`` trains the same model on a toy task.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backbone import LidarEncoderNet, crop_points, voxelize_frames  # noqa: E402

from sparse_msda import SparseMSDeformableAttentionBlock  # noqa: E402
from sparse_msda.inputs import largest_level  # noqa: E402
from sparse_msda.lidar import KITTI_POINT_RANGE, load_kitti_bin  # noqa: E402
from sparse_msda.modules.encoder import FeedForwardBlock  # noqa: E402

DEFAULT_FRAME = Path(__file__).resolve().parent / "data" / "os1_128_1795.bin"


def deformable_sampling_locations(
    block: SparseMSDeformableAttentionBlock,
    query: Tensor,
    query_spatial_positions: Tensor,
    level_spatial_shapes: Tensor,
    query_level_indices: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Where ``block`` samples for these queries, and with which attention weights.

    Recomputes, with the block's own layers, the sampling rule documented in
    :mod:`sparse_msda.modules.deformable_attention`: point ``(h, l, k)`` of a query at position
    ``p`` in the frame of its level ``q`` samples level ``l`` at ``p / shape_q * shape_l + offset``.

    Args:
        block: the deformable attention block.
        query: ``[Q, C]`` the block's input queries.
        query_spatial_positions: float ``[Q, D]`` in the frame of each query's level.
        level_spatial_shapes: int ``[L, D]``.
        query_level_indices: ``[Q]`` (default: the largest level, as the block does).

    Returns:
        ``(locations, weights)``: float ``[Q, n_heads, L, n_points, D]`` in the cells of each
        sampled level (spconv axis order) and ``[Q, n_heads, L, n_points]`` softmax weights.
    """
    attn = block.msdeform_attn
    n_q, h, n_l, n_p, d = query.shape[0], attn.n_heads, attn.n_levels, attn.n_points, attn.position_dim
    x = block.q_in_proj(block.norm(query) if block.norm_first else query)
    offsets = attn.sampling_offsets(x).view(n_q, h, n_l, n_p, d).flip(-1)
    weights = attn.attention_weights(x).view(n_q, h, n_l * n_p).softmax(-1).view(n_q, h, n_l, n_p)
    shapes = level_spatial_shapes.to(query_spatial_positions)
    if query_level_indices is None:
        query_level_indices = torch.full((n_q,), largest_level(level_spatial_shapes), dtype=torch.int64,
                                         device=query.device)
    ref = query_spatial_positions / shapes[query_level_indices]
    return ref[:, None, None, None, :] * shapes[None, None, :, None, :] + offsets, weights


class DecoderStep(nn.Module):
    """One Deformable-DETR decoder step on the encoded sparse map (no self-attention).

    ``n_queries`` learned query embeddings are placed at the top-scoring occupied BEV cells of
    each batch item, lifted into the finest level's frame (z: mean height of the finest-level
    voxels of that column), and attend to the encoded 4-level map with a
    :class:`SparseMSDeformableAttentionBlock`, followed by a feed-forward block.
    """

    def __init__(self, embed_dim: int, n_heads: int, n_points: int = 4, n_queries: int = 900) -> None:
        super().__init__()
        self.n_queries = n_queries
        self.query_embed = nn.Embedding(n_queries, embed_dim)
        self.cross_attn = SparseMSDeformableAttentionBlock(embed_dim, n_heads, 4, n_points, position_dim=3)
        self.feedforward = FeedForwardBlock(embed_dim)

    def select_queries(self, encoded, bev, scores) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``n_queries`` occupied BEV cells per batch item.

        Returns ``(positions [Q, 3] in the finest level's frame, batch_offsets [B + 1],
        slot [Q] index into the query embeddings)``.
        """
        dev = bev.indices.device
        fine, shape0 = encoded[0], torch.tensor(encoded[0].spatial_shape, device=dev)
        bev_shape = torch.tensor(bev.spatial_shape[1:], device=dev)  # (H, W) of the BEV grid
        ratio = shape0[1:] / bev_shape  # finest cells per BEV cell, (y, x)
        b, y, x = bev.indices[:, 0].long(), bev.indices[:, 2].long(), bev.indices[:, 3].long()
        h, w = bev_shape.tolist()
        cells = torch.unique((b * h + y) * w + x)
        cb, cy, cx = cells // (h * w), (cells // w) % h, cells % w
        cell_scores = scores[cb, 0, cy, cx]
        # mean z-centre of the finest-level voxels in every BEV column
        fi = fine.indices.long()
        col = (fi[:, 0] * h + (fi[:, 2] / ratio[0]).long()) * w + (fi[:, 3] / ratio[1]).long()
        n_cols = bev.batch_size * h * w
        z_sum = torch.zeros(n_cols, device=dev).index_add_(0, col, fi[:, 1].float() + 0.5)
        z_cnt = torch.bincount(col, minlength=n_cols).float()
        z_default = float(z_sum.sum() / z_cnt.sum().clamp_min(1)) if fi.numel() else shape0[0].item() / 2
        z = torch.where(z_cnt[cells] > 0, z_sum[cells] / z_cnt[cells].clamp_min(1), z_default)
        positions, counts = [], []
        for item in range(bev.batch_size):
            mine = (cb == item).nonzero().squeeze(1)
            top = mine[torch.argsort(cell_scores[mine], descending=True, stable=True)[: self.n_queries]]
            pos = torch.stack([z[top], (cy[top] + 0.5) * ratio[0], (cx[top] + 0.5) * ratio[1]], 1)
            positions.append(pos)
            counts.append(top.numel())
        offsets = torch.zeros(bev.batch_size + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(torch.tensor(counts, device=dev), 0)
        slot = torch.cat([torch.arange(c, device=dev) for c in counts])
        return torch.cat(positions).float(), offsets, slot

    def forward(self, encoded, index, bev, scores) -> dict:
        positions, offsets, slot = self.select_queries(encoded, bev, scores)
        query = self.query_embed(slot)
        out = self.cross_attn(query, positions, offsets, encoded, index.level_spatial_shapes, coordinate_index=index)
        return {"query": query, "positions": positions, "batch_offsets": offsets, "output": self.feedforward(out)}


def plot(path: str, voxels, positions: Tensor, locations: Tensor, weights: Tensor, level_shapes: Tensor,
         voxel_size=(0.05, 0.05, 0.1), point_range=KITTI_POINT_RANGE) -> None:
    """BEV occupancy of the finest voxels + the sampling points (all heads, all levels) of the queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0, y0, x1, y1 = point_range[0], point_range[1], point_range[3], point_range[4]
    ny, nx = voxels.spatial_shape[1], voxels.spatial_shape[2]
    idx = voxels.indices.long()
    # occupancy (voxels per column) pooled to at most ~500 pixels across the occupied region
    span = int((idx[:, 2:].max(0).values - idx[:, 2:].min(0).values).max()) + 1 if idx.numel() else 1
    f = max(1, -(-span // 500))
    gy, gx = -(-ny // f), -(-nx // f)
    occ = torch.bincount((idx[:, 2] // f) * gx + idx[:, 3] // f, minlength=gy * gx).view(gy, gx).float().numpy()
    ex1, ey1 = x0 + gx * f * voxel_size[0], y0 + gy * f * voxel_size[1]

    def metres(p_cells: Tensor, level: int):  # (z, y, x) cells of `level` -> (x, y) metres
        s = level_shapes[level].to(p_cells)
        return (p_cells[..., 2] / s[2] * (x1 - x0) + x0).numpy(), (p_cells[..., 1] / s[1] * (y1 - y0) + y0).numpy()

    fig, ax = plt.subplots(figsize=(9, 9))
    ax.imshow(np.log1p(occ), origin="lower", extent=(x0, ex1, y0, ey1), cmap="Greys", interpolation="nearest",
              vmin=0, vmax=max(float(np.log1p(occ).max()) * 0.7, 1e-6))
    colours = plt.cm.tab10(np.arange(len(positions)) % 10)
    markers = ["o", "s", "^", "D"]
    for q in range(len(positions)):
        for level in range(locations.shape[2]):
            xs, ys = metres(locations[q, :, level].reshape(-1, 3), level)
            size = 400 * weights[q, :, level].reshape(-1).numpy()
            ax.scatter(xs, ys, s=size, color=colours[q], marker=markers[level % 4], alpha=0.7, linewidths=0)
        qx, qy = metres(positions[q], largest_level(level_shapes))
        ax.scatter([qx], [qy], s=180, color=colours[q], marker="*", edgecolors="k")
    if idx.numel():
        xs = idx[:, 3].float() * voxel_size[0] + x0
        ys = idx[:, 2].float() * voxel_size[1] + y0
        pad = 3.0
        ax.set_xlim(float(xs.min()) - pad, float(xs.max()) + pad)
        ax.set_ylim(float(ys.min()) - pad, float(ys.max()) + pad)
    ax.set_xlabel("x (m, forward)")
    ax.set_ylabel("y (m, left)")
    ax.set_title("BEV occupancy; stars: object queries; points: their deformable sampling locations\n"
                 "(marker = level o s ^ D, size = attention weight, all heads)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("frame", nargs="?", default=str(DEFAULT_FRAME), help="KITTI-layout .bin scan (default: shipped Ouster frame)")
    p.add_argument("--layers", type=int, default=1, help="encoder layers (default 1)")
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--points", type=int, default=4, help="deformable sampling points per head and level")
    p.add_argument("--neighborhood", type=int, nargs=4, default=[3, 3, 3, 3], metavar="K",
                   help="neighborhood edge length per level (default 3 3 3 3)")
    p.add_argument("--queries", type=int, default=900, help="object queries of the decoder step")
    p.add_argument("--crop", type=float, default=None, help="keep points with 0 <= x < CROP and |y| < CROP (metres)")
    p.add_argument("--max-points", type=int, default=None, help="random subset of at most this many points")
    p.add_argument("--plot-queries", type=int, default=6, help="queries whose sampling points are drawn")
    p.add_argument("--out", default="out/lidar_encoder.png", help="PNG path ('' to skip the plot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (needs a CUDA spconv build) or cpu; default cuda when available")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}

    def stage(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        sync()
        timings[name] = time.perf_counter() - t
        return out

    sync = lambda: None  # noqa: E731  (replaced once the device is known)

    points = stage("load", lambda: crop_points(load_kitti_bin(args.frame), args.crop, args.max_points, args.seed))
    voxels = stage("voxelize", voxelize_frames, [points])
    device = torch.device(args.device)
    voxels = voxels.replace_feature(voxels.features.to(device))
    voxels.indices = voxels.indices.to(device)
    net = LidarEncoderNet(args.embed_dim, args.heads, args.layers, args.points, args.neighborhood).to(device).eval()
    decoder = DecoderStep(args.embed_dim, args.heads, args.points, args.queries).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        levels = stage("backbone", lambda: net.projection(net.backbone(voxels)))
        from sparse_msda import SparseCoordinateIndex

        index = stage("index", SparseCoordinateIndex.from_spconv, levels)
        encoded = stage("encoder", net.encoder, levels, coordinate_index=index)
        bev, scores = stage("bev_head", net.head, encoded[3])
        dec = stage("decoder", decoder, encoded, index, bev, scores)

    print(f"frame {args.frame}: {len(points)} points -> {voxels.features.shape[0]} voxels")
    print(f"{'level':>5} {'spatial shape':>18} {'voxels':>8}")
    for i, lvl in enumerate(levels):
        same = torch.equal(lvl.indices, encoded[i].indices) and lvl.spatial_shape == encoded[i].spatial_shape
        print(f"{i:>5} {str(list(lvl.spatial_shape)):>18} {lvl.features.shape[0]:>8}  indices preserved: {same}")
    print(f"  BEV conv_out {list(bev.spatial_shape)}: {bev.features.shape[0]} voxels -> scores {tuple(scores.shape)}")
    print(f"  decoder: {dec['positions'].shape[0]} object queries -> {tuple(dec['output'].shape)}")
    print(f"encoder: {args.layers} layer(s), embed_dim={args.embed_dim}, heads={args.heads}, points={args.points}, "
          f"neighborhood={args.neighborhood}; {index.n_voxels} queries")
    print("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))

    if args.out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib, or the 'examples' extra): no plot")
            args.out = ""
    if args.out:
        n = min(args.plot_queries, dec["positions"].shape[0])
        with torch.no_grad():
            loc, w = deformable_sampling_locations(
                decoder.cross_attn, dec["query"][:n], dec["positions"][:n], index.level_spatial_shapes)
        t = time.perf_counter()
        cpu_voxels = voxels.replace_feature(voxels.features.cpu())
        cpu_voxels.indices = voxels.indices.cpu()
        plot(args.out, cpu_voxels, dec["positions"][:n].cpu(), loc.cpu(), w.cpu(), index.level_spatial_shapes.cpu())
        print(f"wrote {args.out} ({time.perf_counter() - t:.2f} s)")
    return {"levels": levels, "encoded": encoded, "bev": bev, "scores": scores, "decoder": dec, "timings": timings}


if __name__ == "__main__":
    main()
