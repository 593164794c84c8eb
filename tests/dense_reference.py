"""Independent dense references for the deformable-attention tests.

Written after Deformable DETR (``models/ops/functions/ms_deform_attn_func.py::
ms_deform_attn_core_pytorch`` and ``models/ops/modules/ms_deform_attn.py::MSDeformAttn``),
generalised to 3D by sampling 5D inputs with ``F.grid_sample``. Nothing here uses the
package's sampling code or the coordinate index's lookup: maps are densified by plain
indexing of the voxel coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def densify_levels(features, batch_indices, level_indices, spatial_indices, level_shapes, batch_size, background=None):
    """Dense per-level maps ``[B, C, *shape_l]`` from voxel rows; absent sites are zero or ``background[b, l]``."""
    c = features.shape[-1]
    out = []
    for lvl, shape in enumerate(level_shapes.tolist()):
        if background is None:
            dense = features.new_zeros(batch_size, *shape, c)
        else:
            dense = background[:, lvl].reshape(batch_size, *([1] * len(shape)), c).expand(batch_size, *shape, c).clone()
        sel = level_indices == lvl
        coords = spatial_indices[sel]
        dense = dense.index_put((batch_indices[sel], *coords.T), features[sel])
        out.append(dense.movedim(-1, 1))
    return out


def ms_deform_attn_core_dense(value_list, sampling_locations, attention_weights):
    """Deformable DETR's ``ms_deform_attn_core_pytorch`` on per-level dense maps, 2D or 3D.

    Args:
        value_list: per level ``[B, n_heads * head_dim, *shape_l]`` (head-major channels).
        sampling_locations: ``[B, Q, n_heads, n_levels, n_points, D]`` normalised to [0, 1],
            last dim in (x, y[, z]) order.
        attention_weights: ``[B, Q, n_heads, n_levels, n_points]``.

    Returns:
        ``[B, Q, n_heads * head_dim]``.
    """
    b, q, h, n_levels, n_points, d = sampling_locations.shape
    c = value_list[0].shape[1]
    dh = c // h
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, value in enumerate(value_list):
        v = value.reshape(b * h, dh, *value.shape[2:])
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * h, q, n_points, d)
        if d == 3:
            g = g[:, :, :, None, :]  # [B*H, Q, P, 1, 3]
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled.append(s.reshape(b * h, dh, q, n_points))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, Dh, Q, L*P]
    w = attention_weights.transpose(1, 2).reshape(b * h, 1, q, n_levels * n_points)
    out = (sampled * w).sum(-1).view(b, h * dh, q)
    return out.transpose(1, 2).contiguous()


class DenseMSDeformAttn(nn.Module):
    """Deformable DETR's ``MSDeformAttn`` (names, layout, init), with an optional 3D variant."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, position_dim=2):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.position_dim = d_model, n_levels, n_heads, n_points, position_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * position_dim)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        if self.position_dim == 2:
            with torch.no_grad():
                self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query, reference_points, value_list_input, input_spatial_shapes):
        """Deformable DETR's forward, with per-level dense inputs instead of a flattened one.

        Args:
            query: ``[B, Lq, C]``.
            reference_points: ``[B, Lq, n_levels, D]`` normalised, (x, y[, z]) order.
            value_list_input: per level dense INPUT features ``[B, C, *shape_l]``
                (Deformable DETR's ``input_flatten`` split by level).
            input_spatial_shapes: ``[n_levels, D]`` in (H, W) / (Z, H, W) order.
        """
        value_list = [self.value_proj(v.movedim(1, -1)).movedim(-1, 1) for v in value_list_input]
        return self.forward_projected(query, reference_points, value_list, input_spatial_shapes)

    def forward_projected(self, query, reference_points, value_list, input_spatial_shapes):
        """As :meth:`forward` but on already projected dense value maps ``[B, C, *shape_l]``."""
        n, lq, _ = query.shape
        h, l, p, d = self.n_heads, self.n_levels, self.n_points, self.position_dim
        sampling_offsets = self.sampling_offsets(query).view(n, lq, h, l, p, d)
        attention_weights = self.attention_weights(query).view(n, lq, h, l * p)
        attention_weights = F.softmax(attention_weights, -1).view(n, lq, h, l, p)
        offset_normalizer = input_spatial_shapes.flip(-1).to(query.dtype)  # (W, H[, Z])
        sampling_locations = reference_points[:, :, None, :, None, :] + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        output = ms_deform_attn_core_dense(value_list, sampling_locations, attention_weights)
        return self.output_proj(output)
