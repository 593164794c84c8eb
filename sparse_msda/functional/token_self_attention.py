"""Token self-attention over a batch-concatenated multi-level sequence (the operation of
sparse-transformer-layers' ``MultilevelSelfAttentionBlockWithRoPE``).

Every token (a voxel of any level, or any other token with a position and a level) attends to
every token of its own batch item. Tokens of item ``b`` are rows
``batch_offsets[b]:batch_offsets[b + 1]`` of the concatenated sequence.

Conventions (those of the reference, :func:`multilevel_token_positions`):

* ``spatial_positions [N, D]`` are in the frame of each token's own level; a floating-point
  position is used as given, an integer one is a cell index and sits at its centre ``i + 0.5``.
* RoPE position vector ``u = (p * max_shape / shape_level, level)`` with ``max_shape`` the
  per-axis maximum of ``level_spatial_shapes`` over the levels (the reference's
  ``prep_multilevel_positions``; for pyramids whose finest level is largest on every axis this
  is the finest level's frame).
* ``attn_mask``: bool, ``True`` = masked out (the reference's convention, the opposite of
  :func:`torch.nn.functional.scaled_dot_product_attention`'s), of shape ``[B, S, S]``,
  ``[B * H, S, S]`` or ``[B, H, S, S]`` with ``S`` the longest item's length (the padded
  length of the reference). A query row that is masked out entirely gets a zero attention
  output (the reference's ``nan_to_num``).

Memory: each item is one ``scaled_dot_product_attention`` call on ``[1, H, n_b, d]``; without
``attn_mask`` that is the flash kernel on CPU (no ``[n_b, n_b]`` matrix kept for the backward)
and the memory-efficient/flash kernels on CUDA. The reference pads all items to ``S`` instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multilevel_token_positions", "token_self_attention"]


def multilevel_token_positions(
    spatial_positions: Tensor, batch_indices: Tensor, level_indices: Tensor, level_spatial_shapes: Tensor
) -> Tensor:
    """RoPE position vectors ``[N, D + 1]`` (float) of tokens: the spatial position rescaled to
    the per-axis maximum shape over the levels, then the level index.

    Args:
        spatial_positions: ``[N, D]`` in each token's own level frame; integer = cell index
            (placed at the cell centre ``i + 0.5``).
        batch_indices: int ``[N]`` (used with batch-dependent shapes ``[B, L, D]``).
        level_indices: int ``[N]``.
        level_spatial_shapes: ``[L, D]`` or ``[B, L, D]``.
    """
    pos = spatial_positions if spatial_positions.is_floating_point() else spatial_positions.to(torch.float64) + 0.5
    shapes = level_spatial_shapes.to(device=pos.device)
    lvl = level_indices.long()
    if shapes.ndim == 2:
        max_shape = shapes.max(0).values
        own = shapes[lvl]
    else:
        b = batch_indices.long()
        max_shape = shapes.max(1).values[b]
        own = shapes[b, lvl]
    scaled = pos * (max_shape.to(pos.dtype) / own.to(pos.dtype))
    return torch.cat((scaled, lvl.to(pos.dtype).unsqueeze(-1)), dim=-1)


def token_self_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    batch_offsets: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Multi-head self-attention within each batch item of a concatenated sequence.

    Args:
        q, k, v: ``[N, H, head_dim]`` (already rotated).
        batch_offsets: int ``[B + 1]``, non-decreasing, ``batch_offsets[-1] == N``.
        attn_mask: optional bool ``[B, S, S]``, ``[B * H, S, S]`` or ``[B, H, S, S]``,
            ``True`` = masked out; ``S`` = the longest item (validated by the caller).
        dropout_p: dropout on the attention weights.

    Returns:
        ``[N, H, head_dim]``; rows of a query masked out entirely are zero.
    """
    n, n_heads, _ = q.shape
    n_items = batch_offsets.shape[0] - 1
    offsets = [int(o) for o in batch_offsets.tolist()]
    pieces = []
    for b in range(n_items):
        s, e = offsets[b], offsets[b + 1]
        if e == s:
            continue
        qb, kb, vb = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, n_b, d]
        keep = None
        if attn_mask is not None:
            if attn_mask.ndim == 4:  # [B, H, S, S]
                m = attn_mask[b, :, : e - s, : e - s]
            elif attn_mask.shape[0] == n_items:  # [B, S, S], shared by the heads (checked first, as the reference)
                m = attn_mask[b : b + 1, : e - s, : e - s]
            else:  # [B * H, S, S], head-minor (the reference's view(B, H, S, S))
                m = attn_mask[b * n_heads : (b + 1) * n_heads, : e - s, : e - s]
            keep = m.logical_not().unsqueeze(0)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep, dropout_p=dropout_p)
        ob = ob.squeeze(0).transpose(0, 1)  # [n_b, H, d]
        if keep is not None:
            ob = torch.nan_to_num(ob, 0.0)
        pieces.append(ob)
    if not pieces:
        return q.new_zeros(q.shape)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
