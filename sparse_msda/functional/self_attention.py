"""Multi-level sparse self-attention: every query attends to every voxel of its batch item.

The global-window counterpart of :mod:`sparse_msda.functional.neighborhood` (same conventions,
same RoPE): useful on the coarsest levels, where an item holds few voxels, and as a reference
for the neighborhood attention (with windows that cover the whole map the two agree).

Conventions (shared with the neighborhood and the deformable attention):

* Axis order of positions and coordinates is spconv's: (y, x) in 2D, (z, y, x) in 3D.
* Cell ``i`` of a level covers ``[i, i + 1)``; its centre is ``i + 0.5``. A position ``p`` in
  the frame of level ``q`` maps to level ``l`` as ``p / shape_q * shape_l``.
* "Full scale" is the frame of the largest level (largest area/volume, first on ties). RoPE
  rotates queries at (full-scale position, own level index) and key voxels at (full-scale
  cell centre, level index) (:func:`~sparse_msda.functional.neighborhood.query_rope_positions`,
  :func:`~sparse_msda.functional.neighborhood.voxel_rope_positions`), so scores depend on
  relative positions only.

Kernel and memory (:func:`multilevel_self_attention`): queries and keys are grouped by batch
item (contiguous segments) and each item is one call of
:func:`torch.nn.functional.scaled_dot_product_attention` on ``[1, H, Q_b, d] x [1, H, N_b, d]``.
On CPU (float32/float64/bfloat16) that dispatches to the flash-attention kernel, which works
on blocks of keys and saves only its inputs, its output and a ``[1, H, Q_b]`` log-sum-exp for
the backward: no ``[Q_b, N_b]`` score matrix is kept (time is ``O(Q_b * N_b * embed)``,
memory ``O((Q_b + N_b) * embed)``). On CUDA the memory-efficient / flash kernels give the same.

Background embedding: not supported (see :func:`check_no_background`). With a global window
every in-bounds absent cell of every level would be a key: the whole dense grid. Because each
absent cell's key is rotated at its own position, the absent cells do not collapse into a
per-level closed form; the sum over them costs ``O(Q * prod(shape_l))`` per level, i.e. a
densification of the map, which this library never does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "check_no_background",
    "group_rows_by_batch",
    "multilevel_self_attention",
    "segment_offsets",
]


def check_no_background(background_embedding) -> None:
    """Reject a background embedding for the global-window self-attention.

    Raises:
        ValueError: ``background_embedding`` is not None.
    """
    if background_embedding is not None:
        raise ValueError(
            "background_embedding is not supported by the multilevel self-attention: with a global "
            "window every in-bounds absent cell of every level would be a key, i.e. the whole dense "
            "grid (prod(level_spatial_shapes[l]) keys per level and item); each absent cell's key is "
            "rotated (RoPE) at its own position, so they do not reduce to a cheap per-level closed "
            "form. Pass background_embedding=None (absent cells are masked out), or use "
            "SparseNeighborhoodAttentionBlock, whose bounded windows support a background; got "
            f"background_embedding of shape {tuple(getattr(background_embedding, 'shape', ()))}"
        )


def segment_offsets(sorted_batch: Tensor, batch_size: int) -> Tensor:
    """CSR offsets ``[batch_size + 1]`` (int64, CPU) of a batch-index vector sorted ascending."""
    counts = torch.bincount(sorted_batch.to(torch.int64), minlength=batch_size)[:batch_size]
    out = torch.zeros(batch_size + 1, dtype=torch.int64)
    out[1:] = counts.cpu().cumsum(0)
    return out


def group_rows_by_batch(
    batch_indices: Tensor, batch_size: int, keep_items: Optional[Tensor] = None
) -> tuple[Optional[Tensor], Tensor]:
    """Rows grouped by batch item (stable), optionally only those of some items.

    Args:
        batch_indices: int ``[N]`` batch item of each row (e.g. the index's voxel rows).
        batch_size: number of items.
        keep_items: optional bool ``[batch_size]``: keep only rows of these items.

    Returns:
        ``(rows, offsets)``: int64 ``rows [N']`` (None when it would be ``arange(N)``, i.e. the
        rows are already grouped and all kept) and CSR ``offsets [batch_size + 1]`` into
        ``rows``; items not kept get an empty segment.
    """
    b = batch_indices.to(torch.int64)
    n = b.shape[0]
    keep = None if keep_items is None else keep_items.to(device=b.device, dtype=torch.bool)
    is_sorted = n < 2 or bool((b[1:] >= b[:-1]).all())
    if is_sorted and (keep is None or bool(keep.all())):
        return None, segment_offsets(b, batch_size)
    if is_sorted:
        rows = keep[b].nonzero().squeeze(1)
    else:  # counting sort: one pass per item (batch sizes are small), stable by construction
        items = range(batch_size) if keep is None else keep.nonzero().squeeze(1).tolist()
        rows = torch.cat([(b == i).nonzero().squeeze(1) for i in items] or [b.new_zeros(0)])
    return rows, segment_offsets(b.index_select(0, rows), batch_size)


def multilevel_self_attention(
    q: Tensor, k: Tensor, v: Tensor, query_offsets: Tensor, key_offsets: Tensor
) -> tuple[Tensor, Tensor]:
    """Multi-head scaled dot-product attention of each query over all keys of its batch item.

    Args:
        q: ``[Q, H, d]`` queries (already rotated), grouped by item.
        k: ``[N, H, d]`` keys (already rotated), grouped by item.
        v: ``[N, H, d]`` values, grouped like ``k``.
        query_offsets: int ``[B + 1]``: queries of item ``b`` are rows
            ``query_offsets[b]:query_offsets[b + 1]`` of ``q``.
        key_offsets: int ``[B + 1]``: keys of item ``b`` are rows
            ``key_offsets[b]:key_offsets[b + 1]`` of ``k`` and ``v``.

    Returns:
        ``(out, has_key)``: ``[Q, H, d]`` softmax(q k^T / sqrt(d)) v per item and head, and bool
        ``[Q]``, False for queries whose item has no key (their rows are exactly zero).

    Differentiable w.r.t. ``q, k, v`` through :func:`torch.nn.functional.scaled_dot_product_attention`
    (no ``[Q_b, N_b]`` matrix saved for the backward on the flash / memory-efficient paths).
    """
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"expected q [Q, H, d] and k, v [N, H, d] with the same H, d; got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    qo = query_offsets.to("cpu", torch.int64).tolist()
    ko = key_offsets.to("cpu", torch.int64).tolist()
    rising = lambda o: o[0] == 0 and all(a <= b for a, b in zip(o, o[1:]))  # noqa: E731
    if len(qo) != len(ko) or not qo or qo[-1] != q.shape[0] or ko[-1] != k.shape[0] or not rising(qo) or not rising(ko):
        raise ValueError(
            f"query_offsets/key_offsets must be [B + 1], rising from 0 to Q={q.shape[0]} / N={k.shape[0]}, "
            f"got query_offsets={qo}, key_offsets={ko}"
        )
    pieces = []
    has_key = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    for b in range(len(qo) - 1):
        q0, q1, k0, k1 = qo[b], qo[b + 1], ko[b], ko[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no key in this item: attention branch is zero
            pieces.append(q.new_zeros(q1 - q0, q.shape[1], q.shape[2]))
            continue
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        )  # [1, H, Q_b, d]
        pieces.append(o[0].transpose(0, 1))
        has_key[q0:q1] = True
    if not pieces:
        return q.new_zeros(q.shape), has_key
    return torch.cat(pieces, 0), has_key
