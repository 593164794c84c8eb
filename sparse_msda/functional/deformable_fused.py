"""The deformable attention's sampling head in one fused pass (functional entry over the backends).

What :class:`~sparse_msda.modules.SparseMSDeformableAttention` computes between its input and its
output projection, for ``Q`` queries ``x [Q, C]``, ``H`` heads, ``L`` levels, ``P`` points,
position dim ``D``::

    table     = linear(features, value_weight, value_bias)   # rows r * H + h, then the background rows
    offsets   = linear(x, offset_weight, offset_bias)        # [Q, H, L, P, D], axis order (y, x) / (z, y, x)
    logits    = linear(x, attn_weight, attn_bias)            # [Q, H, L * P]
    locations = ref[q] * shape_l + offsets                   # level cells (ref: normalised reference point)
    out[q, h] = sum_{l, p} softmax(logits[q, h])[l, p] * interp(table_h at level l, locations)

:func:`fused_deformable_attention` gives exactly what the unfused path gives (the linear layers,
``torch.addcmul``, ``softmax`` and :func:`~sparse_msda.functional.deformable.sparse_deformable_attention`),
up to floating-point rounding, from a backend that implements the whole head in one pass
(a ``deformable_attention`` function of the backend module, chosen like the two operations by
:func:`sparse_msda.backends.choose_backend`). Today that is the ``cpu`` backend
(:mod:`sparse_msda.backends.cpu_deformable`: per chunk of queries on the C++ sampling kernel,
no ``[Q, H, L, P, D]`` tensor stored). :func:`fusable` says when a call can take it: the chosen
backend has one, the tensors are CPU tensors of one dtype, float32 or float64, and no
``torch.compile`` tracing is under way. Everything else (other backends and dtypes, a
precomputed :class:`~sparse_msda.functional.sampling.SamplingPlan`, ``torch.compile`` tracing,
which wants the ``sparse_msda::weighted_gather`` custom op) takes the unfused path.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from adapters import SparseCoordinateIndex

__all__ = ["fusable", "fused_deformable_attention"]


def _fused_backend(backend: Optional[str], tensors) -> Optional[ModuleType]:
    """The chosen backend module if it implements the fused head (``deformable_attention``), else None."""
    from ..backends import choose_backend  # lazy: the backends import functional

    module = choose_backend("weighted_gather", *tensors, backend=backend)
    return module if callable(getattr(module, "deformable_attention", None)) else None


def fusable(backend: Optional[str], *tensors: Tensor) -> bool:
    """Whether :func:`fused_deformable_attention` serves these tensors: the automatic backend
    choice (or ``backend``) implements the fused head (today: the C++ ``cpu`` backend), all
    floating tensors are CPU tensors of one dtype (float32 or float64), and no ``torch.compile``
    tracing is under way."""
    if torch.compiler.is_compiling():
        return False
    floats = [t for t in tensors if t is not None]
    if not floats or any(t.device.type != "cpu" or t.dtype != floats[0].dtype for t in floats):
        return False
    if floats[0].dtype not in (torch.float32, torch.float64):
        return False
    try:
        return _fused_backend(backend, floats) is not None
    except (TypeError, ValueError):
        return False


def fused_deformable_attention(
    x: Tensor,
    offset_weight: Tensor,
    offset_bias: Optional[Tensor],
    attn_weight: Tensor,
    attn_bias: Optional[Tensor],
    reference_points: Tensor,
    features: Union[Tensor, Sequence[Tensor]],
    value_weight: Tensor,
    value_bias: Optional[Tensor],
    background_table: Optional[Tensor],
    index: SparseCoordinateIndex,
    batch_indices: Tensor,
    n_heads: int,
    n_levels: int,
    n_points: int,
    backend: Optional[str] = None,
    grad_in_place: bool = False,
) -> Tensor:
    """The deformable attention's value projection, offsets, softmax and sampling from the query.

    Args:
        x: ``[Q, C]`` the query after its input projection.
        offset_weight, offset_bias: ``[H * L * P * D, C]``, ``[H * L * P * D]``: the sampling
            offsets' linear layer with its output in the positions' axis order ``(y, x)`` /
            ``(z, y, x)`` (the module flips Deformable DETR's ``(x, y[, z])`` weight rows).
        attn_weight, attn_bias: ``[H * L * P, C]``, ``[H * L * P]``: the attention logits.
        reference_points: ``[Q, D]`` normalised (position / the query level's shape); a sample's
            location at level ``l`` is ``reference_points * shape_l + offset`` in level cells.
        features: ``[N, C_in]`` voxel features in ``index`` row order, or a sequence of row
            blocks of them in order (e.g. the levels of a spconv map: each gets its own gradient
            and no concatenated copy is made or kept for the backward); value_weight,
            value_bias: ``[H * Dh, C_in]``, ``[H * Dh]``, the value projection (row ``r * H + h``
            of the value table is head ``h`` of voxel ``r``, as
            :func:`~sparse_msda.functional.sampling.sparse_weighted_gather`).
        background_table: ``[batch * L * H, Dh]`` projected background values, row
            ``(b * L + l) * H + h``, or None.
        index: the map's coordinate index; batch_indices: int64 ``[Q]`` (checked by the caller).
        backend: a backend name, or None for the automatic choice
            (:func:`~sparse_msda.backends.choose_backend`); it must implement the fused head.
        grad_in_place: the output's gradient reaches this call alone (e.g. the output goes
            straight into a linear layer, whose backward makes a fresh gradient), so the
            backward may overwrite it (the ``cpu`` backend writes ``x``'s gradient there).
            False (default): the incoming gradient is never modified.

    Returns:
        ``[Q, H * Dh]``; differentiable w.r.t. every tensor argument but the index and batch.

    Raises:
        ValueError: the chosen backend does not implement the fused head (or, from
            ``choose_backend``, is unknown, unavailable or does not take the tensors).

    Internal entry of the module (arguments are checked by its ``prepare``); see :func:`fusable`.
    """
    parts = [features] if isinstance(features, Tensor) else list(features)
    tensors = [x, offset_weight, attn_weight, reference_points, value_weight, *parts]
    module = _fused_backend(backend, tensors)
    if module is None:
        from ..backends import choose_backend

        name = choose_backend("weighted_gather", *tensors, backend=backend).__name__.rsplit(".", 1)[1]
        raise ValueError(f"backend={backend!r} chose the {name} backend, which has no fused deformable attention (fusable() is False)")
    return module.deformable_attention(
        x, offset_weight, offset_bias, attn_weight, attn_bias, reference_points, features, value_weight, value_bias,
        background_table, index, batch_indices, n_heads, n_levels, n_points, grad_in_place,
    )
