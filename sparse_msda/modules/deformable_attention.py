"""Sparse multi-scale deformable attention modules (Deformable DETR's ``MSDeformAttn`` on sparse maps).

Parameters, names, layouts and initialisation are those of Deformable DETR's
``MSDeformAttn`` (and mmcv's ``MultiScaleDeformableAttention``): ``value_proj``,
``sampling_offsets`` (output viewed ``[n_heads, n_levels, n_points, position_dim]``, offsets
in level cells, last dim in the REVERSED axis order ``(x, y[, z])`` as in Deformable DETR),
``attention_weights`` (softmax over ``n_levels * n_points`` per head) and ``output_proj``.
A pretrained ``MSDeformAttn`` state_dict loads unchanged.

Conventions:

* ``query_spatial_positions`` are float ``[n_queries, position_dim]`` in the frame of the
  query's own level (``query_level_indices``; default: the level with the largest area or
  volume), axis order ``(y, x)`` / ``(z, y, x)``. Cell ``i`` covers ``[i, i + 1)``, centre
  ``i + 0.5``. A position ``p`` at level ``q`` maps to level ``l`` as ``p / shape_q * shape_l``.
* Sampling location of point ``(h, l, k)`` in the cells of level ``l``:
  ``p / shape_q * shape_l + offset[h, l, k]`` (offset flipped to ``(y, x)``). This equals
  Deformable DETR's ``ref + offset / (W_l, H_l)`` in normalised coordinates with
  ``ref = p / shape_q`` (in ``(x, y)``), scaled by the level shape.
* Sampling is exactly ``F.grid_sample(align_corners=False, padding_mode='zeros')`` on the
  projected value map: corners outside a level are zero; corners inside but absent are
  zero, or ``value_proj(background_embedding[b, l])`` when given (an absent site behaves as
  if it held that input feature vector).
* ``query_batch_offsets`` ``[batch_size + 1]``: queries of item ``b`` are rows
  ``offsets[b]:offsets[b + 1]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters import SparseCoordinateIndex

from ..backends import check_backend_name
from ..functional.deformable import plan_deformable_sampling, sparse_deformable_attention
from ..functional.deformable_fused import fusable, fused_deformable_attention
from ..functional.neighborhood import NORMALISED_POSITION_LIMIT
from ..functional.precision import position_dtype
from ..inputs import QueryBatch, check_dropout, check_embed_heads, check_position_dim, check_query, prepare_inputs

__all__ = ["SparseMSDeformableAttention", "SparseMSDeformableAttentionBlock", "sampling_direction_init"]


def sampling_direction_init(n_heads: int, position_dim: int) -> Tensor:
    """Per-head initial sampling directions ``[n_heads, position_dim]``, last dim ``(x, y[, z])``.

    2D: Deformable DETR's ``(cos, sin)`` of ``2 pi h / n_heads``, scaled so the largest
    component is 1 (points on the square). 3D analogue: ``n_heads`` directions spread evenly
    on the sphere by the Fibonacci (golden-angle) spiral, ``z`` from ``1 - 1/n`` to
    ``-1 + 1/n``, then scaled so the largest component is 1 (points on the cube surface).
    """
    if position_dim == 2:
        thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    else:
        i = torch.arange(n_heads, dtype=torch.float64) + 0.5
        z = 1.0 - 2.0 * i / n_heads
        r = torch.sqrt((1.0 - z * z).clamp_min(0.0))
        phi = i * math.pi * (3.0 - math.sqrt(5.0))
        grid = torch.stack([r * phi.cos(), r * phi.sin(), z], -1).to(torch.float32)
    return grid / grid.abs().max(-1, keepdim=True)[0]


class SparseMSDeformableAttention(nn.Module):
    """Multi-scale deformable attention over sparse multi-level maps (2D or 3D).

    Each query predicts ``n_points`` sampling offsets per head and level around its
    reference position, samples the projected value maps bilinearly (trilinearly in 3D)
    at those points through the hashed coordinate index, and sums them with softmax
    attention weights. Numerically identical to Deformable DETR's ``MSDeformAttn`` on the
    densified map.

    Args:
        embed_dim: feature dim ``C`` of queries and maps (``d_model``).
        n_heads: attention heads; must divide ``embed_dim``.
        n_levels: levels of the map.
        n_points: sampling points per head and level.
        position_dim: 2 or 3.
        backend: implementation of the attention: ``"reference"``, ``"cpu"``, ``"triton"`` or
            None (automatic, or ``$SPARSE_MSDA_BACKEND``; :func:`sparse_msda.backends.choose_backend`).

    Shapes (forward):
        query ``[Q, C]``; query_spatial_positions float ``[Q, D]``; query_batch_offsets
        ``[B + 1]``; stacked_feature_maps COO ``[B, *spatial, L, C]`` or a list of L
        ``SparseConvTensor``; level_spatial_shapes ``[L, D]`` (None allowed for spconv);
        query_level_indices ``[Q]``; background_embedding ``[B, L, C]``. Output ``[Q, C]``.

    Decoders: when the queries' corners number fewer than :attr:`plan_below` times the map's
    voxels, the samples are hashed before the values exist and ``value_proj`` runs only on the
    voxels they touch (same result, less time and memory than projecting the whole map).
    """

    #: plan the sampling first (see the class docstring) below this many corners per voxel
    plan_below: float = 64.0

    def __init__(
        self, embed_dim: int, n_heads: int, n_levels: int = 4, n_points: int = 4, position_dim: int = 2,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_embed_heads(embed_dim, n_heads)
        self.backend = check_backend_name(backend)
        check_position_dim(position_dim)
        for name, v in (("n_levels", n_levels), ("n_points", n_points)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        self.embed_dim = embed_dim
        self.n_heads = n_heads
        self.n_levels = n_levels
        self.n_points = n_points
        self.position_dim = position_dim
        self.head_dim = embed_dim // n_heads
        self.sampling_offsets = nn.Linear(embed_dim, n_heads * n_levels * n_points * position_dim)
        self.attention_weights = nn.Linear(embed_dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's ``MSDeformAttn._reset_parameters`` (3D: see :func:`sampling_direction_init`)."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        grid = sampling_direction_init(self.n_heads, self.position_dim)
        grid = grid.view(self.n_heads, 1, 1, self.position_dim).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        query_spatial_positions: Tensor,
        query_batch_offsets: Tensor,
        stacked_feature_maps,
        level_spatial_shapes=None,
        query_level_indices: Optional[Tensor] = None,
        background_embedding: Optional[Tensor] = None,
        coordinate_index: Optional[SparseCoordinateIndex] = None,
    ) -> Tensor:
        """Attend from ``query`` ``[Q, C]`` to the sparse multi-level map; returns ``[Q, C]``.

        See the class and module docstrings for shapes and coordinate conventions.
        ``coordinate_index`` is an optional prebuilt index of the map (reused across layers).

        Raises:
            TypeError / ValueError: bad inputs (see :func:`sparse_msda.inputs.prepare_inputs`).
        """
        qb = self.prepare(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            query_level_indices, background_embedding, coordinate_index,
        )
        return self._attend(qb, query, query_spatial_positions, background_embedding)

    def prepare(
        self, query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes=None,
        query_level_indices=None, background_embedding=None, coordinate_index=None,
    ) -> QueryBatch:
        """The checked, normalised inputs of :meth:`forward` (:func:`~sparse_msda.inputs.prepare_inputs`
        with this module's sizes and dtype); the block calls it before its LayerNorm runs."""
        return prepare_inputs(
            query,
            query_spatial_positions,
            query_batch_offsets,
            stacked_feature_maps,
            level_spatial_shapes,
            embed_dim=self.embed_dim,
            n_levels=self.n_levels,
            position_dim=self.position_dim,
            query_level_indices=query_level_indices,
            background_embedding=background_embedding,
            index=coordinate_index,
            dtype=self.value_proj.weight.dtype,
            concatenate_levels=False,  # the fused path takes the levels' blocks; the others concatenate in _attend
        )

    def _attend(self, qb: QueryBatch, query: Tensor, query_spatial_positions: Tensor, background_embedding) -> Tensor:
        """The attention on inputs checked by :meth:`prepare`."""
        n_q = query.shape[0]
        h, l, p, d = self.n_heads, self.n_levels, self.n_points, self.position_dim
        background_value = None
        if background_embedding is not None:
            background_value = self.value_proj(background_embedding.to(query.dtype)).view(-1, l, h, self.head_dim)
        query_spatial_positions = query_spatial_positions.to(position_dtype(query_spatial_positions.dtype))
        shapes = qb.level_spatial_shapes.to(query_spatial_positions.dtype)  # [L, D]
        lim = NORMALISED_POSITION_LIMIT  # a huge position stays outside the map without overflowing
        ref = (query_spatial_positions / qb.query_level_shapes).clamp(-lim, lim)  # [Q, D], normalised
        # sampling_offsets' output is (x, y[, z]) (MSDeformAttn's layout); flipping its (small) weight
        # instead of its [Q, H, L, P, D] output gives (y, x) / (z, y, x) directly (no flipped copy);
        # the reference points are added out of place (in place on the view would make autograd
        # copy the gradient back in backward)
        weight = self.sampling_offsets.weight.view(h, l, p, d, -1).flip(3).reshape(h * l * p * d, -1)
        bias = self.sampling_offsets.bias.view(h, l, p, d).flip(3).reshape(-1)
        plan = None
        first_features = qb.features if qb.features is not None else qb.feature_parts[0]
        if n_q * h * l * p * 2**d >= self.plan_below * qb.index.n_voxels and fusable(
            self.backend, query, ref, first_features, self.value_proj.weight
        ):  # an encoder on the C++ kernels: values, offsets, softmax and sampling fused, per chunk of queries
            out = fused_deformable_attention(
                query, weight, bias, self.attention_weights.weight, self.attention_weights.bias, ref,
                qb.features if qb.feature_parts is None else qb.feature_parts,
                self.value_proj.weight, self.value_proj.bias,
                None if background_value is None else background_value.reshape(-1, self.head_dim),
                qb.index, qb.batch_indices, h, l, p, backend=self.backend,
                grad_in_place=isinstance(self.output_proj, nn.Linear),  # out's gradient comes from it alone
            )
            return self.output_proj(out)
        features = qb.all_features()
        attn = self.attention_weights(query).view(n_q, h, l * p).softmax(-1).view(n_q, h, l, p)
        offsets = F.linear(query, weight, bias).view(n_q, h, l, p, d).to(ref.dtype)
        if torch.is_grad_enabled() and (offsets.requires_grad or ref.requires_grad):
            locations = torch.addcmul(offsets, ref[:, None, None, None, :], shapes[None, None, :, None, :])
        else:  # inference: in place, one [Q, H, L, P, D] tensor
            locations = offsets.addcmul_(ref[:, None, None, None, :], shapes[None, None, :, None, :])
        if n_q * h * l * p * 2**d < self.plan_below * qb.index.n_voxels:
            # few samples (a decoder): hash them first, project only the voxels they touch
            plan = plan_deformable_sampling(qb.index, qb.batch_indices, locations)
            if plan.voxel_rows is not None:
                features = features.index_select(0, plan.voxel_rows.to(features.device))
        value = self.value_proj(features).view(-1, h, self.head_dim)
        out = sparse_deformable_attention(
            value, qb.index, qb.batch_indices, locations, attn, background_value, plan, backend=self.backend
        )
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, n_levels={self.n_levels}, "
            f"n_points={self.n_points}, position_dim={self.position_dim}, backend={self.backend!r}"
        )


class SparseMSDeformableAttentionBlock(nn.Module):
    """Transformer block around :class:`SparseMSDeformableAttention`.

    ``x = query``; pre-norm (``norm_first=True``): ``x = x + dropout(out_proj(attn(in_proj(norm(x)))))``;
    post-norm: ``x = norm(x + dropout(out_proj(attn(in_proj(x)))))``.

    Args:
        embed_dim, n_heads, n_levels, n_points, position_dim: as for the attention.
        dropout: dropout after the output projection.
        bias: bias of the query input and output projections.
        norm_first: pre-norm (True) or post-norm (False).
        backend: implementation of the sampling (see :class:`SparseMSDeformableAttention`).
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int,
        n_points: int,
        dropout: float = 0.0,
        bias: bool = False,
        norm_first: bool = True,
        position_dim: int = 2,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        self.embed_dim = embed_dim
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(embed_dim)
        self.q_in_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.msdeform_attn = SparseMSDeformableAttention(embed_dim, n_heads, n_levels, n_points, position_dim, backend)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every submodule's parameters."""
        self.norm.reset_parameters()
        self.q_in_proj.reset_parameters()
        self.msdeform_attn.reset_parameters()
        self.out_proj.reset_parameters()

    @property
    def out_proj_drop(self) -> nn.Dropout:
        """The reference's name of :attr:`dropout` (read-only alias)."""
        return self.dropout

    def forward(
        self,
        query: Tensor,
        query_spatial_positions: Tensor,
        query_batch_offsets: Tensor,
        stacked_feature_maps,
        level_spatial_shapes=None,
        background_embedding: Optional[Tensor] = None,
        query_level_indices: Optional[Tensor] = None,
        coordinate_index: Optional[SparseCoordinateIndex] = None,
    ) -> Tensor:
        """``[Q, C]`` -> ``[Q, C]``; arguments as for :class:`SparseMSDeformableAttention`. Every
        input is checked before the LayerNorm runs."""
        check_query(query, self.msdeform_attn.embed_dim, self.q_in_proj.weight.dtype)
        qb = self.msdeform_attn.prepare(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            query_level_indices, background_embedding, coordinate_index,
        )
        return self._forward_checked(qb, query, query_spatial_positions, background_embedding)

    def _forward_checked(self, qb: QueryBatch, query: Tensor, query_spatial_positions: Tensor, background_embedding) -> Tensor:
        """The block on inputs checked by :meth:`SparseMSDeformableAttention.prepare` (the encoder
        calls it directly with the inputs it checked once per forward)."""
        residual = query
        x = self.norm(query) if self.norm_first else query
        x = self.q_in_proj(x)
        x = self.msdeform_attn._attend(qb, x, query_spatial_positions, background_embedding)
        x = self.dropout(self.out_proj(x))
        x = x + residual
        if not self.norm_first:
            x = self.norm(x)
        return x

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.msdeform_attn.backend!r}"
