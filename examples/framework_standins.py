"""Stand-ins with the exact interfaces of OpenPCDet's ``VoxelBackBone8x`` and mmdet3d's
``SparseEncoder`` (our own code, written from their documented contracts), for running and testing
:mod:`sparse_msda.integrations` where neither framework is installed.

* :class:`VoxelBackBone8xStandIn`: built as ``(model_cfg, input_channels, grid_size, **kwargs)``;
  ``sparse_shape = grid_size[::-1] + [1, 0, 0]`` (grid in x, y, z; spconv shape in z, y, x with
  one extra z cell); ``conv_input`` (SubMConv 16, key ``subm1``), stages ``conv1`` (16, stride 1),
  ``conv2`` (32), ``conv3`` (64), ``conv4`` (64, padding (0, 1, 1)) -- each stage after the first
  a stride-2 ``SparseConv3d`` (keys ``spconv2..4``) then SubMConvs (keys ``subm2..4``), 1 / 3 / 3 / 3
  conv-BN-ReLU blocks -- and ``conv_out`` = ``SparseConv3d(64, 128, (3, 1, 1), stride (2, 1, 1),
  padding last_pad)`` (key ``spconv_down2``); ``backbone_channels``, ``num_point_features = 128``;
  ``forward(batch_dict)`` reads ``voxel_features``, ``voxel_coords``, ``batch_size`` and writes
  ``encoded_spconv_tensor``, ``encoded_spconv_tensor_stride`` (8), ``multi_scale_3d_features`` and
  ``multi_scale_3d_strides``.
* :class:`SparseEncoderStandIn`: keyword-built (``in_channels``, ``sparse_shape``, ``order``,
  ``norm_cfg``, ``base_channels``, ``output_channels``, ``encoder_channels``,
  ``encoder_paddings``, ``block_type``, ``return_middle_feats``); ``conv_input``,
  ``encoder_layers`` (``encoder_layer1..``: the first block of every stage but the first a
  stride-2 ``SparseConv3d``), ``conv_out``; ``forward(voxel_features, coors, batch_size)`` returns
  the dense BEV ``[B, C * D, H, W]`` (and the stage outputs with ``return_middle_feats``). Only the
  default ``order`` / ``block_type='conv_module'`` / BN1d norm are implemented.
"""

from __future__ import annotations

import numpy as np
from torch import nn

import sparse_msda  # noqa: F401  (applies adapters.patch_spconv(): CPU sparse-conv fixes)
import spconv.pytorch as spconv

__all__ = ["SparseEncoderStandIn", "VoxelBackBone8xStandIn"]


def _conv_bn_relu(c_in, c_out, kernel, key, stride=1, padding=1, subm=True, eps=1e-3, momentum=0.01):
    if subm:
        conv = spconv.SubMConv3d(c_in, c_out, kernel, padding=padding, bias=False, indice_key=key)
    else:
        conv = spconv.SparseConv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False, indice_key=key)
    return spconv.SparseSequential(conv, nn.BatchNorm1d(c_out, eps=eps, momentum=momentum), nn.ReLU())


def _stage(c_in, c_out, n_blocks, index, first_padding=1, downsample=True):
    """One stage: [stride-2 SparseConv3d (key spconv<i>)] + SubMConv3d blocks (key subm<i>)."""
    blocks = []
    for j in range(n_blocks):
        if j == 0 and downsample:
            blocks.append(_conv_bn_relu(c_in, c_out, 3, f"spconv{index}", stride=2, padding=first_padding, subm=False))
        else:
            blocks.append(_conv_bn_relu(c_in if j == 0 else c_out, c_out, 3, f"subm{index}"))
    return spconv.SparseSequential(*blocks)


class VoxelBackBone8xStandIn(nn.Module):
    """OpenPCDet ``VoxelBackBone8x`` interface (see the module docstring)."""

    def __init__(self, model_cfg, input_channels, grid_size, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.sparse_shape = np.asarray(grid_size)[::-1] + [1, 0, 0]
        self.conv_input = _conv_bn_relu(input_channels, 16, 3, "subm1")
        self.conv1 = _stage(16, 16, 1, 1, downsample=False)
        self.conv2 = _stage(16, 32, 3, 2)
        self.conv3 = _stage(32, 64, 3, 3)
        self.conv4 = _stage(64, 64, 3, 4, first_padding=(0, 1, 1))
        last_pad = model_cfg.get("last_pad", 0)
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=last_pad, bias=False,
                                indice_key="spconv_down2"),
            nn.BatchNorm1d(128, eps=1e-3, momentum=0.01),
            nn.ReLU(),
        )
        self.num_point_features = 128
        self.backbone_channels = {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 64}

    def forward(self, batch_dict):
        x = spconv.SparseConvTensor(batch_dict["voxel_features"], batch_dict["voxel_coords"].int(),
                                    self.sparse_shape, batch_dict["batch_size"])
        x = self.conv_input(x)
        feats = {}
        for name in ("conv1", "conv2", "conv3", "conv4"):
            x = getattr(self, name)(x)
            feats["x_" + name] = x
        batch_dict["encoded_spconv_tensor"] = self.conv_out(x)
        batch_dict["encoded_spconv_tensor_stride"] = 8
        batch_dict["multi_scale_3d_features"] = feats
        batch_dict["multi_scale_3d_strides"] = {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8}
        return batch_dict


class SparseEncoderStandIn(nn.Module):
    """mmdet3d ``SparseEncoder`` interface (see the module docstring)."""

    def __init__(self, in_channels, sparse_shape, order=("conv", "norm", "act"),
                 norm_cfg=dict(type="BN1d", eps=1e-3, momentum=0.01), base_channels=16, output_channels=128,
                 encoder_channels=((16,), (32, 32, 32), (64, 64, 64), (64, 64, 64)),
                 encoder_paddings=((1,), (1, 1, 1), (1, 1, 1), ((0, 1, 1), 1, 1)),
                 block_type="conv_module", return_middle_feats=False):
        super().__init__()
        if tuple(order) != ("conv", "norm", "act") or block_type != "conv_module" or norm_cfg.get("type") != "BN1d":
            raise NotImplementedError("the stand-in implements order=(conv, norm, act), conv_module blocks, BN1d")
        eps, momentum = norm_cfg.get("eps", 1e-5), norm_cfg.get("momentum", 0.1)
        self.sparse_shape, self.in_channels = sparse_shape, in_channels
        self.base_channels, self.output_channels = base_channels, output_channels
        self.encoder_channels, self.encoder_paddings = encoder_channels, encoder_paddings
        self.return_middle_feats = return_middle_feats
        self.conv_input = _conv_bn_relu(in_channels, base_channels, 3, "subm1", eps=eps, momentum=momentum)
        self.encoder_layers = spconv.SparseSequential()
        c_in = base_channels
        for i, widths in enumerate(encoder_channels):
            blocks = []
            for j, c_out in enumerate(widths):
                pad = tuple(encoder_paddings[i])[j]
                if i > 0 and j == 0:
                    blocks.append(_conv_bn_relu(c_in, c_out, 3, f"spconv{i + 1}", stride=2, padding=pad, subm=False,
                                                eps=eps, momentum=momentum))
                else:
                    blocks.append(_conv_bn_relu(c_in, c_out, 3, f"subm{i + 1}", padding=pad, eps=eps, momentum=momentum))
                c_in = c_out
            self.encoder_layers.add_module(f"encoder_layer{i + 1}", spconv.SparseSequential(*blocks))
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(c_in, output_channels, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                                indice_key="spconv_down2"),
            nn.BatchNorm1d(output_channels, eps=eps, momentum=momentum),
            nn.ReLU(),
        )

    def forward(self, voxel_features, coors, batch_size):
        x = self.conv_input(spconv.SparseConvTensor(voxel_features, coors.int(), self.sparse_shape, batch_size))
        stages = []
        for layer in self.encoder_layers:
            x = layer(x)
            stages.append(x)
        dense = self.conv_out(stages[-1]).dense()
        n, c, d, h, w = dense.shape
        bev = dense.view(n, c * d, h, w)
        return (bev, stages) if self.return_middle_feats else bev
