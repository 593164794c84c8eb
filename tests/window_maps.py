"""Random multi-level maps and query batches shared by the neighborhood and self-attention tests."""

from __future__ import annotations

import itertools

import torch


def make_map(shapes, batch_size, occupancy, embed_dim, dtype=torch.float64, seed=0, region=None, empty_items=()):
    """Random multi-level map: (coo stack, voxel list [(b, level, cell tuple)], features [N, E]).

    ``region``: optional (lo, hi) full-scale bounds the voxel centres must lie in (per axis);
    ``empty_items``: batch items left without any voxel.
    """
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes)
    full = shapes_t[int(torch.argmax(shapes_t.prod(-1)))]
    dim = len(shapes[0])
    voxels = []
    for b in range(batch_size):
        for level, shape in enumerate(shapes):
            cells = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, dim)
            keep = torch.rand(cells.shape[0], generator=g) < occupancy
            if region is not None:
                centre = (cells + 0.5) / torch.tensor(shape) * full
                keep &= ((centre >= region[0]) & (centre < region[1])).all(-1)
            if b in empty_items:
                continue
            voxels.extend((b, level, tuple(c)) for c in cells[keep].tolist())
    feats = torch.randn(len(voxels), embed_dim, generator=g, dtype=dtype)
    idx = torch.tensor([[b, *c, lv] for b, lv, c in voxels], dtype=torch.int64).T.reshape(dim + 2, -1)
    stacked = torch.sparse_coo_tensor(idx, feats, (batch_size, *full.tolist(), len(shapes), embed_dim))
    return stacked, voxels, feats


def random_queries(counts, frame_shape, dtype=torch.float64, seed=1, lo=None, hi=None):
    g = torch.Generator().manual_seed(seed)
    frame = torch.tensor(frame_shape, dtype=dtype)
    lo = torch.zeros_like(frame) if lo is None else torch.as_tensor(lo, dtype=dtype)
    hi = frame if hi is None else torch.as_tensor(hi, dtype=dtype)
    pos = lo + torch.rand(sum(counts), len(frame_shape), generator=g, dtype=dtype) * (hi - lo)
    return pos, torch.tensor([0, *itertools.accumulate(counts)])
