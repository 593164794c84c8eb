"""Tests of the examples (issue 5): the LiDAR pipeline on a cropped real frame, the decoder's
sampling-location helper, the toy training (alone and 2-process DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_msda
import sparse_msda.functional.deformable
from sparse_msda import SparseCoordinateIndex
from sparse_msda.lidar import load_kitti_bin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FRAME = EXAMPLES / "data" / "os1_128_1795.bin"
sys.path.insert(0, str(EXAMPLES))

import backbone  # noqa: E402
import lidar_encoder  # noqa: E402
import train_toy  # noqa: E402

LEVEL_SHAPES = [[41, 1600, 1408], [21, 800, 704], [11, 400, 352], [5, 200, 176]]
CROP, MAX_POINTS = 10.0, 1200


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def voxels():
    points = backbone.crop_points(load_kitti_bin(FRAME), CROP, MAX_POINTS, seed=0)
    return backbone.voxelize_frames([points])


def small_net(seed=0, n_layers=1):
    torch.manual_seed(seed)
    return backbone.LidarEncoderNet(embed_dim=16, n_heads=2, n_layers=n_layers, n_points=2, channels=(8, 16, 16, 16),
                                    bev_channels=8)


def test_pipeline_on_cropped_frame(voxels, monkeypatch):
    net = small_net(n_layers=2)
    builds = []
    original = SparseCoordinateIndex.__init__
    monkeypatch.setattr(SparseCoordinateIndex, "__init__", lambda self, *a, **k: (builds.append(1), original(self, *a, **k))[1])
    out = net(voxels)
    assert len(builds) == 1  # one index for the whole forward: 2 layers x 2 attention blocks reuse it
    assert [list(l.spatial_shape) for l in out["levels"]] == LEVEL_SHAPES
    for before, after in zip(out["levels"], out["encoded"]):
        assert torch.equal(before.indices, after.indices)
        assert list(before.spatial_shape) == list(after.spatial_shape) and before.batch_size == after.batch_size
        assert after.features.shape == (before.features.shape[0], 16) and torch.isfinite(after.features).all()
        assert before.features.shape[0] > 0
    assert list(out["bev"].spatial_shape) == [2, 200, 176]
    assert out["scores"].shape == (1, 1, 200, 176) and torch.isfinite(out["scores"]).all()
    dense = out["bev"].dense()  # spconv's own densification as the reference of the height compression
    b, c, d, h, w = dense.shape
    torch.testing.assert_close(out["scores"], net.head.score(net.head.shared(dense.reshape(b, c * d, h, w))))

    loss = out["scores"].square().mean() + sum(l.features.square().mean() for l in out["encoded"])
    loss.backward()
    first = net.backbone.conv1[0][0].weight  # SubMConv3d on the raw voxels
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    enc_grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in enc_grads)


def test_sampling_locations_reproduce_the_block_output(voxels):
    """The example's sampling-location helper + an independent sample-and-sum equals the block."""
    torch.manual_seed(0)
    dec = lidar_encoder.DecoderStep(16, 2, n_points=2, n_queries=50).double()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net = small_net()
    with torch.no_grad():
        backbone_levels = net.projection(net.backbone(voxels))
    levels = [l.replace_feature(torch.randn(l.features.shape[0], 16, dtype=torch.float64)) for l in backbone_levels]
    index = SparseCoordinateIndex.from_spconv(levels)
    shapes = index.level_spatial_shapes
    n = 50
    gen = torch.Generator().manual_seed(1)
    centre = torch.cat([l.indices[:, 1:] for l in levels[:1]]).double().mean(0)
    positions = centre + 40 * (torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5) * torch.tensor([0.2, 1, 1])
    query = dec.query_embed(torch.arange(n)).double()
    offsets = torch.tensor([0, n])
    block = dec.cross_attn
    out = block(query, positions, offsets, levels, shapes, coordinate_index=index)

    loc, w = lidar_encoder.deformable_sampling_locations(block, query, positions, shapes)
    attn = block.msdeform_attn
    h, n_l, n_p, hd = attn.n_heads, 4, attn.n_points, 16 // attn.n_heads
    value_levels = [l.replace_feature(attn.value_proj(l.features)) for l in levels]
    lvl = torch.arange(n_l)[None, None, :, None].expand(n, h, n_l, n_p)
    sampled = sparse_msda.functional.deformable.sparse_bilinear_sample(value_levels, loc, torch.zeros((), dtype=torch.long),
                                                                 shapes, lvl)  # [Q, H, L, P, C]
    per_head = torch.stack([sampled[:, i, ..., i * hd:(i + 1) * hd] for i in range(h)], 1)  # [Q, H, L, P, hd]
    attended = (per_head * w[..., None]).sum((2, 3)).reshape(n, 16)
    ref = query + block.out_proj(attn.output_proj(attended))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_example_main(tmp_path, capsys):
    """The README command on a cropped frame; the PNG is checked when matplotlib (``examples``
    extra) is installed, otherwise the run goes without a plot (``--out ''``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    else:
        png = tmp_path / "bev.png"
    res = lidar_encoder.main([str(FRAME), "--crop", str(CROP), "--max-points", "800", "--embed-dim", "16",
                              "--heads", "2", "--points", "2", "--out", str(png or ""), "--threads", "1"])
    if png is not None:
        assert png.exists() and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "indices preserved: True" in printed and "timings (s)" in printed
    n_cells = torch.unique(res["bev"].indices[:, 2:].long() @ torch.tensor([176, 1])).numel()
    assert res["decoder"]["positions"].shape == (min(900, n_cells), 3)
    assert res["decoder"]["output"].shape == (min(900, n_cells), 16)
    assert torch.isfinite(res["decoder"]["output"]).all()
    for a, b in zip(res["levels"], res["encoded"]):
        assert torch.equal(a.indices, b.indices)
    assert set(res["timings"]) >= {"voxelize", "backbone", "index", "encoder", "bev_head", "decoder"}


def test_toy_training_loss_decreases():
    res = train_toy.main(["--steps", "6", "--max-points", "600", "--seed", "0", "--quiet", "--threads", "1"])
    losses = res["losses"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0]


def test_ddp_two_processes_keep_identical_weights(tmp_path):
    prefix = tmp_path / "sd"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "train_toy.py"), "--steps", "2", "--max-points", "600", "--threads", "1",
           "--save", str(prefix), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    sd0 = torch.load(f"{prefix}.rank0.pt")
    sd1 = torch.load(f"{prefix}.rank1.pt")
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    torch.manual_seed(0)
    initial = train_toy.ToySegmentationNet().state_dict()
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], sd0[k])]
    assert len(changed) > len(initial) // 2  # the step moved the weights (same on both ranks)
