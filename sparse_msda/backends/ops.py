"""The operations' tensor-level cores as ``torch.library`` custom ops (``sparse_msda::...``).

A custom op is opaque to ``torch.compile``: Dynamo records one call in the graph (its fake
implementation gives the output shapes), AOTAutograd differentiates it through the registered
backward op, so a model compiles without graph breaks inside the attention. Only tensors, numbers,
strings and lists of them cross an op boundary: the Python context objects (the sampling context,
the neighborhood plan, the coordinate index) stay outside. What they hold enters as tensors (the
samples' base-cell ids, the corner table, batch/level/head index tensors, the level shapes; the
plan's tile tensors and the window-centre rotations), and the hash lookups through spconv run
before the op, in the backend's wrapper.

* ``sparse_msda::weighted_gather(table, positions, weights, ids, corner_table, batch, level, head,
  level_shapes, n_heads, background_offset, chunk_corners, backend) -> [S, Dh]`` and its
  ``weighted_gather_backward``: the ``reference`` and ``cpu`` backends implement them
  (``gather_forward`` / ``gather_backward`` of :mod:`~sparse_msda.backends.reference` and
  :mod:`~sparse_msda.backends.cpu`).
* ``sparse_msda::neighborhood_attention(q, k, v, freqs, tables, bg_v, rotation, tiles, scale,
  backend) -> (out [Q, H, d], lse [Q, H], window counts [2, Q])`` and its
  ``neighborhood_attention_backward``: the ``cpu`` backend (``attention_forward`` /
  ``attention_backward``). The reference backend's neighborhood attention is still an
  ``autograd.Function`` over the plan's packed chunks (a variable number of chunk tensors and a
  forward that may keep attention weights for the backward): under ``torch.compile`` it runs
  eagerly, with a graph break around it.

``backend`` names the implementation (the module whose functions compute the op); a CUDA kernel
can sit under the same op names (``register_kernel("cuda")`` or a backend name of its own).
The backward ops are not differentiable themselves (as the ``once_differentiable`` Functions
they replace).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend_module

__all__ = ["neighborhood_attention", "weighted_gather"]


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _sampling(corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners):
    from ..functional.sampling import _Sampling

    return _Sampling.from_tensors(corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners)


@torch.library.custom_op("sparse_msda::weighted_gather", mutates_args=())
def weighted_gather(
    table: Tensor,
    positions: Tensor,
    weights: Tensor,
    ids: Tensor,
    corner_table: Tensor,
    batch: Tensor,
    level: Tensor,
    head: Optional[Tensor],
    level_shapes: Tensor,
    n_heads: int,
    background_offset: int,
    chunk_corners: int,
    backend: str,
) -> Tensor:
    """``out[s] = sum_j weights[s, j] * interp(table, positions[s, j])`` with the samples'
    base-cell ids already hashed (``ids`` int32 ``[S, J]`` into ``corner_table``)."""
    ctx = _sampling(corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners)
    return backend_module(backend).gather_forward(table, positions, weights, ids, ctx)


@weighted_gather.register_fake
def _(table, positions, weights, ids, corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners, backend):
    return table.new_empty(positions.shape[0], table.shape[1])


@torch.library.custom_op("sparse_msda::weighted_gather_backward", mutates_args=())
def weighted_gather_backward(
    grad_out: Tensor,
    table: Tensor,
    positions: Tensor,
    weights: Tensor,
    ids: Tensor,
    corner_table: Tensor,
    batch: Tensor,
    level: Tensor,
    head: Optional[Tensor],
    level_shapes: Tensor,
    n_heads: int,
    background_offset: int,
    chunk_corners: int,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``(table, positions, weights)``; an empty tensor where ``needs`` is False."""
    ctx = _sampling(corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners)
    grads = backend_module(backend).gather_backward(grad_out.contiguous(), table, positions, weights, ids, ctx, needs)
    return tuple(_or_empty(g if n else None, t) for g, n, t in zip(grads, needs, (table, positions, weights)))


@weighted_gather_backward.register_fake
def _(grad_out, table, positions, weights, ids, corner_table, batch, level, head, level_shapes, n_heads, background_offset, chunk_corners, backend, needs):
    return tuple(t.new_empty(t.shape) if n else t.new_empty(0) for t, n in zip((table, positions, weights), needs))


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.args = inputs[9:]


def _gather_backward(ctx, grad_out):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = (None, None, None)
    if any(needs):
        grads = weighted_gather_backward(grad_out, *ctx.saved_tensors, *ctx.args, needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 10


weighted_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_msda::neighborhood_attention", mutates_args=())
def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    freqs: Optional[Tensor],
    tables: Optional[Tensor],
    bg_v: Optional[Tensor],
    rotation: list[Tensor],
    tiles: list[Tensor],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax attention of each query over its tile's window keys: ``(out [Q, H, d], lse [Q, H],
    counts int64 [2, Q])`` (``counts``: voxel keys and background slots of each query).

    ``freqs`` (the RoPE frequencies, background only) enters for its gradient: the window-centre
    rotations it defines come precomputed in ``rotation`` (``[cos, sin, rows, full]``, empty without
    background); ``tables`` are the background keys rotated at the slot offsets; ``tiles`` the
    plan's 16 tile tensors (:meth:`~sparse_msda.functional.neighborhood_plan.NeighborhoodPlan.kernel_tiles`: the tiles and their windows).
    """
    out, lse, counts = backend_module(backend).attention_forward(q, k, v, tables, bg_v, rotation, tiles, scale)
    return out, lse, counts


@neighborhood_attention.register_fake
def _(q, k, v, freqs, tables, bg_v, rotation, tiles, scale, backend):
    n_q, n_heads = q.shape[0], q.shape[1]
    return q.new_empty(q.shape), q.new_empty(n_q, n_heads), q.new_empty(2, n_q, dtype=torch.int64)


@torch.library.custom_op("sparse_msda::neighborhood_attention_backward", mutates_args=())
def neighborhood_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    freqs: Optional[Tensor],
    tables: Optional[Tensor],
    bg_v: Optional[Tensor],
    rotation: list[Tensor],
    tiles: list[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(q, k, v, freqs, tables, bg_v)`` (``freqs``' in float64, through the
    window-centre rotations only); an empty tensor where ``needs`` is False or without background."""
    grads = backend_module(backend).attention_backward(grad_out.contiguous(), q, k, v, tables, bg_v, rotation, tiles, out, lse, scale, needs)
    return tuple(_or_empty(g if n else None, q) for g, n in zip(grads, needs))


@neighborhood_attention_backward.register_fake
def _(grad_out, q, k, v, freqs, tables, bg_v, rotation, tiles, out, lse, scale, backend, needs):
    def like(t, n, dtype=None):
        return t.new_empty(t.shape, dtype=dtype) if (n and t is not None) else q.new_empty(0)

    return (like(q, needs[0]), like(k, needs[1]), like(v, needs[2]), like(freqs, needs[3], torch.float64),
            like(tables, needs[4]), like(bg_v, needs[5]))


def _attention_setup(ctx, inputs, output):
    q, k, v, freqs, tables, bg_v, rotation, tiles, scale, backend = inputs
    out, lse, counts = output
    ctx.mark_non_differentiable(lse, counts)
    ctx.save_for_backward(q, k, v, freqs, tables, bg_v, out, lse, *rotation, *tiles)
    ctx.n_rotation, ctx.scale, ctx.backend = len(rotation), scale, backend
    ctx.freqs_dtype = None if freqs is None else freqs.dtype


def _attention_backward(ctx, grad_out, grad_lse, grad_counts):
    q, k, v, freqs, tables, bg_v, out, lse, *rest = ctx.saved_tensors
    rotation, tiles = rest[: ctx.n_rotation], rest[ctx.n_rotation :]
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = [None] * 6
    if any(needs):
        grads = list(neighborhood_attention_backward(
            grad_out, q, k, v, freqs, tables, bg_v, rotation, tiles, out, lse, ctx.scale, ctx.backend, needs
        ))
        if needs[3]:
            grads[3] = grads[3].to(ctx.freqs_dtype)
    grads = [g if n else None for g, n in zip(grads, needs)]
    return (*grads, [None] * len(rotation), [None] * len(tiles), None, None)


neighborhood_attention.register_autograd(_attention_backward, setup_context=_attention_setup)
