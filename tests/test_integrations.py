"""Tests of the framework drop-ins (issue 15): sparse_msda.integrations on stand-ins with OpenPCDet's
``VoxelBackBone8x`` batch_dict contract and mmdet3d's ``SparseEncoder`` contract
(examples/framework_standins.py, our own code), the level projections, and their error messages."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import spconv.pytorch as spconv
from sparse_msda import LevelBackProjection, LevelProjection, SparseMSDAEncoder
from sparse_msda.integrations import BackboneLevelEncoder, SparseMSDABackBone8x, SparseMSDASparseEncoder, register_openpcdet
from sparse_msda.integrations import mmdet3d as mmdet3d_integration
from sparse_msda.integrations.openpcdet import MSDA_CONFIG_KEYS
from sparse_msda.lidar import random_sparse_levels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from framework_standins import SparseEncoderStandIn, VoxelBackBone8xStandIn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GRID = np.array([24, 20, 24])  # OpenPCDet grid_size (x, y, z): spconv shape [25, 20, 24], conv_out z = 1
SPARSE_SHAPE = [25, 20, 24]
MSDA_CFG = {"ATTENTION_LEVELS": ["x_conv2", "x_conv3", "x_conv4"], "EMBED_DIM": 16, "NUM_HEADS": 2,
            "NUM_LAYERS": 1, "NUM_POINTS": 2}


def _voxels(n_per_item=150, batch_size=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch_size):
        flat = torch.randperm(int(np.prod(SPARSE_SHAPE)), generator=gen)[:n_per_item]
        z, y, x = flat // (SPARSE_SHAPE[1] * SPARSE_SHAPE[2]), (flat // SPARSE_SHAPE[2]) % SPARSE_SHAPE[1], flat % SPARSE_SHAPE[2]
        rows.append(torch.stack([torch.full_like(z, b), z, y, x], 1))
    coords = torch.cat(rows).int()
    return torch.randn(coords.shape[0], 4, generator=gen), coords


def _batch_dict(features, coords):
    return {"voxel_features": features, "voxel_coords": coords, "batch_size": 2}


def _pair(seed=0, msda=MSDA_CFG):
    """The plain stand-in backbone and ours with the same backbone weights (loaded by state_dict)."""
    torch.manual_seed(seed)
    plain = VoxelBackBone8xStandIn({}, 4, GRID)
    ours = SparseMSDABackBone8x({"MSDA": dict(msda)}, 4, GRID, base_backbone=VoxelBackBone8xStandIn)
    result = ours.load_state_dict(plain.state_dict(), strict=False)
    return plain.eval(), ours.eval(), result


@pytest.fixture(scope="module")
def openpcdet_run():
    plain, ours, load = _pair()
    features, coords = _voxels()
    ref = plain(_batch_dict(features, coords))
    out = ours(_batch_dict(features, coords))
    return plain, ours, load, ref, out


def test_openpcdet_checkpoint_of_the_plain_backbone_loads(openpcdet_run):
    _, ours, load, _, _ = openpcdet_run
    assert load.unexpected_keys == []
    assert load.missing_keys and all(k.startswith("msda.") for k in load.missing_keys)
    assert ours.num_point_features == 128 and ours.backbone_channels == {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 64}
    assert ours.msda.attention_levels == [1, 2, 3]


def test_openpcdet_batch_dict_contract(openpcdet_run):
    _, _, _, ref, out = openpcdet_run
    assert out["encoded_spconv_tensor_stride"] == ref["encoded_spconv_tensor_stride"] == 8
    assert out["multi_scale_3d_strides"] == ref["multi_scale_3d_strides"]
    feats, ref_feats = out["multi_scale_3d_features"], ref["multi_scale_3d_features"]
    assert list(feats) == list(ref_feats) == ["x_conv1", "x_conv2", "x_conv3", "x_conv4"]
    # the level without attention is the backbone's own; the attended ones keep everything but features
    assert torch.equal(feats["x_conv1"].features, ref_feats["x_conv1"].features)
    for name in ("x_conv2", "x_conv3", "x_conv4"):
        a, b = feats[name], ref_feats[name]
        assert torch.equal(a.indices, b.indices) and a.batch_size == b.batch_size == 2
        assert list(a.spatial_shape) == list(b.spatial_shape)
        assert a.features.shape == b.features.shape and a.indices.shape[0] > 0
        assert not torch.allclose(a.features, b.features)
    # conv_out accepted the encoded x_conv4: the same sites as the plain backbone, new features
    enc, enc_ref = out["encoded_spconv_tensor"], ref["encoded_spconv_tensor"]
    assert torch.equal(enc.indices, enc_ref.indices) and list(enc.spatial_shape) == list(enc_ref.spatial_shape)
    assert enc.features.shape == (enc_ref.features.shape[0], 128) and enc.indices.shape[0] > 0
    assert not torch.allclose(enc.features, enc_ref.features)


def test_openpcdet_indice_pairs_pass_through(openpcdet_run):
    """Later sparse convs reuse the backbone's indice pairs, e.g. an inverse conv back to x_conv3's sites."""
    _, _, _, _, out = openpcdet_run
    x3, x4 = out["multi_scale_3d_features"]["x_conv3"], out["multi_scale_3d_features"]["x_conv4"]
    assert {"subm1", "spconv2", "subm2", "spconv3", "subm3", "spconv4", "subm4"} <= set(x4.indice_dict)
    up = spconv.SparseInverseConv3d(64, 8, 3, indice_key="spconv4", bias=False)
    y = up(x4)
    assert torch.equal(y.indices, x3.indices) and list(y.spatial_shape) == list(x3.spatial_shape)


def test_openpcdet_gradients_reach_the_first_conv():
    _, ours, _ = _pair(seed=1)
    ours.train()
    features, coords = _voxels(seed=1)
    out = ours(_batch_dict(features, coords))
    loss = out["encoded_spconv_tensor"].dense().square().mean()
    loss = loss + sum(x.features.square().mean() for x in out["multi_scale_3d_features"].values())
    loss.backward()
    first = ours.conv_input[0].weight
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    zero_at_init = {n for n, _ in ours.msda.named_parameters() if ".deformable.norm." in n or ".deformable.q_in_proj." in n}
    for name, p in ours.msda.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name not in zero_at_init:
            assert p.grad.abs().sum() > 0, name


def test_deformable_norm_and_input_projection_get_zero_gradient_only_at_init():
    """Deformable-DETR init zeroes the weights of sampling_offsets and attention_weights, so the
    query path (norm -> q_in_proj -> those two layers) has exactly zero gradient on the first step
    (the values, biases and output projection still learn); once those weights move, it does not."""
    levels = random_sparse_levels([[6, 8, 8], [3, 4, 4]], occupancy=0.3, batch_size=1, channels=8, seed=0)
    torch.manual_seed(0)
    encoder = SparseMSDAEncoder(8, 2, n_levels=2, n_layers=1, n_points=2)
    block = encoder.layers[0].deformable
    sum(x.features.square().sum() for x in encoder(levels)).backward()
    for p in (block.norm.weight, block.norm.bias, block.q_in_proj.weight):
        assert torch.count_nonzero(p.grad) == 0
    assert block.msdeform_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert block.msdeform_attn.value_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # what the first optimizer step does
        block.msdeform_attn.sampling_offsets.weight.add_(0.01 * torch.randn_like(block.msdeform_attn.sampling_offsets.weight))
    encoder.zero_grad()
    sum(x.features.square().sum() for x in encoder(levels)).backward()
    assert block.norm.weight.grad.abs().sum() > 0 and block.q_in_proj.weight.grad.abs().sum() > 0


def test_openpcdet_config_errors():
    with pytest.raises(ValueError, match=r"MSDA config keys must be among .*got unknown \['EMBED'\]"):
        SparseMSDABackBone8x({"MSDA": {"EMBED": 16}}, 4, GRID, base_backbone=VoxelBackBone8xStandIn)
    with pytest.raises(ValueError, match=r"ATTENTION_LEVELS must be names among \['x_conv1'.*got \['conv4'\]"):
        SparseMSDABackBone8x({"MSDA": {"ATTENTION_LEVELS": ["conv4"]}}, 4, GRID, base_backbone=VoxelBackBone8xStandIn)

    class NoConvOut(VoxelBackBone8xStandIn):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self.conv_out

    with pytest.raises(TypeError, match=r"NoConvOut lacks \['conv_out'\]"):
        SparseMSDABackBone8x({}, 4, GRID, base_backbone=NoConvOut)
    _, ours, _ = _pair()
    with pytest.raises(ValueError, match=r"missing \['batch_size'\]"):
        ours({"voxel_features": torch.zeros(1, 4), "voxel_coords": torch.zeros(1, 4, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"voxel_coords'\] must have shape \[2, 4\]"):
        ours(_batch_dict(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.int32)))


def test_openpcdet_registration_and_lookup_by_name(monkeypatch):
    """register_openpcdet adds the class to the table OpenPCDet builds BACKBONE_3D from, and
    BASE_BACKBONE is looked up in it (a stand-in ``pcdet.models.backbones_3d`` module here)."""
    table = {"VoxelBackBone8x": VoxelBackBone8xStandIn}
    fake = types.ModuleType("pcdet.models.backbones_3d")
    fake.__all__ = table
    for name in ("pcdet", "pcdet.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "pcdet.models.backbones_3d", fake)
    monkeypatch.setattr(sys.modules["pcdet.models"], "backbones_3d", fake, raising=False)
    register_openpcdet()
    assert table["SparseMSDABackBone8x"] is SparseMSDABackBone8x
    # OpenPCDet's build: __all__[NAME](model_cfg=..., input_channels=..., grid_size=..., voxel_size=..., ...)
    cfg = {"NAME": "SparseMSDABackBone8x", "MSDA": {"EMBED_DIM": 16, "NUM_HEADS": 2}}
    model = table[cfg["NAME"]](model_cfg=cfg, input_channels=4, grid_size=GRID, voxel_size=[0.05, 0.05, 0.1],
                               point_cloud_range=[0, -40, -3, 70.4, 40, 1])
    assert model.base_name == "VoxelBackBone8xStandIn" and model.msda.attention_levels == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"BASE_BACKBONE must name one of .*got BASE_BACKBONE='PointNet'"):
        SparseMSDABackBone8x({"BASE_BACKBONE": "PointNet"}, 4, GRID)


def test_openpcdet_without_openpcdet_names_the_fix():
    try:
        import pcdet.models.backbones_3d  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("OpenPCDet is installed here: the lookup succeeds")
    with pytest.raises(ImportError, match="pass base_backbone=<backbone class>"):
        SparseMSDABackBone8x({}, 4, GRID)
    with pytest.raises(ImportError, match="register_openpcdet needs OpenPCDet"):
        register_openpcdet()


def _parse_yaml_fragment(text):
    """The subset of YAML the shipped fragment uses: nested ``KEY: value`` blocks, flow lists, scalars."""
    def scalar(v):
        if v in ("True", "False"):
            return v == "True"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    root, stack = {}, [(-1, None)]
    stack[0] = (-1, root)
    for line in text.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        value = value.strip()
        if not value:
            parent[key] = {}
            stack.append((indent, parent[key]))
        elif value.startswith("["):
            parent[key] = [scalar(v.strip()) for v in value.strip("[]").split(",")]
        else:
            parent[key] = scalar(value)
    return root


def test_openpcdet_yaml_fragment_builds_the_backbone():
    text = (ROOT / "sparse_msda" / "integrations" / "openpcdet_kitti.yaml").read_text()
    cfg = _parse_yaml_fragment(text)["MODEL"]["BACKBONE_3D"]
    assert cfg["NAME"] == "SparseMSDABackBone8x" and cfg["BASE_BACKBONE"] == "VoxelBackBone8x"
    assert set(cfg["MSDA"]) <= set(MSDA_CONFIG_KEYS)
    model = SparseMSDABackBone8x(cfg, 4, np.array([1408, 1600, 40]), base_backbone=VoxelBackBone8xStandIn)
    assert model.msda.attention_levels == [1, 2, 3] and model.msda.encoder.embed_dim == cfg["MSDA"]["EMBED_DIM"]
    assert list(model.sparse_shape) == [41, 1600, 1408]
    # and the README shows the same fragment (indented inside a list item there)
    readme = (ROOT / "README.md").read_text()
    block = "\n".join("   " + l for l in text.splitlines() if l and not l.startswith("#"))
    assert block in readme


# --- mmdetection3d ------------------------------------------------------------------------------
def _mmdet3d_pair(return_middle_feats=True, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(in_channels=4, sparse_shape=SPARSE_SHAPE, return_middle_feats=return_middle_feats)
    plain = SparseEncoderStandIn(**kwargs)
    ours = SparseMSDASparseEncoder(msda=dict(attention_levels=[2, 3], embed_dim=16, n_heads=2, n_points=2),
                                   base_encoder=SparseEncoderStandIn, **kwargs)
    load = ours.load_state_dict(plain.state_dict(), strict=False)
    assert load.unexpected_keys == [] and load.missing_keys and all(k.startswith("msda.") for k in load.missing_keys)
    return plain.eval(), ours.eval()


def test_mmdet3d_sparse_encoder_contract():
    plain, ours = _mmdet3d_pair()
    features, coords = _voxels()
    bev_ref, stages_ref = plain(features, coords, 2)
    bev, stages = ours(features, coords, 2)
    assert bev.shape == bev_ref.shape and bev.shape[:2] == (2, 128 * 1)
    assert not torch.allclose(bev, bev_ref)
    assert len(stages) == len(stages_ref) == 4
    for i, (a, b) in enumerate(zip(stages, stages_ref)):
        assert torch.equal(a.indices, b.indices) and list(a.spatial_shape) == list(b.spatial_shape)
        assert a.features.shape == b.features.shape and a.batch_size == 2
        assert torch.equal(a.features, b.features) == (i < 2)  # stages 0, 1 untouched; 2, 3 encoded
    up = spconv.SparseInverseConv3d(64, 8, 3, indice_key="spconv4", bias=False)
    assert torch.equal(up(stages[3]).indices, stages[2].indices)
    _, ours_plain_return = _mmdet3d_pair(return_middle_feats=False)
    assert ours_plain_return(features, coords, 2).shape == bev_ref.shape


def test_mmdet3d_gradients_reach_the_first_conv():
    _, ours = _mmdet3d_pair(return_middle_feats=False, seed=2)
    ours.train()
    features, coords = _voxels(seed=2)
    ours(features, coords, 2).square().mean().backward()
    first = ours.conv_input[0].weight
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    assert ours.msda.encoder.layers[0].feedforward.linear1.weight.grad.abs().sum() > 0


def test_mmdet3d_registration_with_a_stand_in_registry(monkeypatch):
    class Registry:
        def __init__(self):
            self.modules = {"SparseEncoder": SparseEncoderStandIn}

        def get(self, name):
            return self.modules.get(name)

        def register_module(self, name=None, force=False, module=None):
            self.modules[name or module.__name__] = module
            return module

    models = Registry()
    fake = types.ModuleType("mmdet3d.registry")
    fake.MODELS = models
    monkeypatch.setitem(sys.modules, "mmdet3d", types.ModuleType("mmdet3d"))
    monkeypatch.setitem(sys.modules, "mmdet3d.registry", fake)
    assert mmdet3d_integration._register() is True
    assert models.get("SparseMSDASparseEncoder") is SparseMSDASparseEncoder
    assert mmdet3d_integration._register() is True  # idempotent
    built = models.get("SparseMSDASparseEncoder")(in_channels=4, sparse_shape=SPARSE_SHAPE, msda=dict(embed_dim=16, n_heads=2))
    assert built.base_name == "SparseEncoderStandIn" and built.msda.attention_levels == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="base_encoder='Nope' is not registered"):
        SparseMSDASparseEncoder(base_encoder="Nope", in_channels=4, sparse_shape=SPARSE_SHAPE)


def test_mmdet3d_without_mmdet3d_names_the_fix():
    if mmdet3d_integration._mmdet3d_registry() is not None:
        pytest.skip("mmdet3d is installed here: the lookup succeeds")
    assert mmdet3d_integration.REGISTERED is False
    with pytest.raises(ImportError, match="pass base_encoder=<encoder class>"):
        SparseMSDASparseEncoder(in_channels=4, sparse_shape=SPARSE_SHAPE)


# --- level projections and the errors that name the fix -----------------------------------------
def test_level_projections_keep_the_tensors_and_name_the_fix():
    levels = random_sparse_levels([[6, 8, 8], [3, 4, 4]], occupancy=0.3, batch_size=2, channels=8, seed=1)
    levels[1] = levels[1].replace_feature(torch.cat([levels[1].features, levels[1].features], 1))  # 16 channels
    proj, back = LevelProjection([8, 16], 12), LevelBackProjection(12, [8, 16])
    up = proj(levels)
    for before, after in zip(levels, up):
        assert after.indices is before.indices and after.indice_dict is before.indice_dict
        assert after.features.shape == (before.features.shape[0], 12)
    torch.testing.assert_close(up[1].features, levels[1].features @ proj.proj[1].weight.T + proj.proj[1].bias)
    assert [x.features.shape[1] for x in back(up)] == [8, 16]
    with pytest.raises(ValueError, match=r"levels\[1\]\.features must have shape \[N, 32\] \(in_channels=\[8, 32\]\)"):
        LevelProjection([8, 32], 12)(levels)
    with pytest.raises(ValueError, match=r"levels must hold 2 SparseConvTensor"):
        LevelProjection([8, 16], 12)(levels[:1])
    with pytest.raises(ValueError, match=r"levels\[0\]\.features must have shape \[N, 12\] \(embed_dim=12\).*encoder's output"):
        back(levels)
    with pytest.raises(ValueError, match=r"in_channels must hold positive ints"):
        LevelProjection([8, 0], 12)
    # the encoder says that a projection is what is missing
    encoder = SparseMSDAEncoder(12, 2, n_levels=2, n_layers=1, n_points=2)
    with pytest.raises(ValueError, match=re.escape("sparse_msda.LevelProjection(in_channels=[8, 16], embed_dim=12)")):
        encoder(levels)
    with pytest.raises(ValueError, match=re.escape("LevelProjection(in_channels=[8, 16], embed_dim=12)")):
        encoder.layers[0](levels)
    assert [x.features.shape[1] for x in encoder(up)] == [12, 12]


def test_backbone_level_encoder_arguments():
    with pytest.raises(ValueError, match=r"attention_levels must be distinct ascending level indices in \[0, 4\)"):
        BackboneLevelEncoder([16, 32, 64, 64], attention_levels=[3, 1], embed_dim=16, n_heads=2)
    with pytest.raises(ValueError, match=r"attention_levels must be .*got attention_levels=\[4\]"):
        BackboneLevelEncoder([16, 32, 64, 64], attention_levels=[4], embed_dim=16, n_heads=2)
    enc = BackboneLevelEncoder([8, 8], embed_dim=8, n_heads=2, n_points=2, residual=False)
    levels = random_sparse_levels([[6, 8, 8], [3, 4, 4]], occupancy=0.3, batch_size=1, channels=8, seed=2)
    with pytest.raises(ValueError, match=r"levels must hold all 2 backbone levels \(level_channels=\[8, 8\]\), got 1"):
        enc(levels[:1])
    out = enc(levels)
    # without the residual, the level is the back-projection of the encoder's output alone
    expected = enc.back_projection(enc.encoder(enc.projection(levels)))
    for a, b in zip(out, expected):
        torch.testing.assert_close(a.features, b.features)


def test_openpcdet_example_runs(capsys):
    """examples/openpcdet_backbone.py on a subset of the shipped scan, forward + backward."""
    import openpcdet_backbone

    openpcdet_backbone.main(["--max-points", "3000", "--levels", "x_conv3,x_conv4", "--embed-dim", "16",
                             "--heads", "2", "--points", "2", "--repeats", "1", "--backward"])
    out = capsys.readouterr().out
    assert "batch 2 = twice" in out and "x_conv4: spatial shape [5, 200, 176]" in out
    assert "encoded_spconv_tensor: [2, 200, 176]" in out and "backbone + sparse MSDA" in out
