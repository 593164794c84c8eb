"""Multi-level sparse neighborhood attention: the functional entry point.

The parts live by concern: windows (which cells a query attends to) in
:mod:`sparse_msda.functional.windows`; tiled pair plans and their packing in
:mod:`sparse_msda.functional.neighborhood_plan`; the attention Functions in the backends
(:mod:`sparse_msda.backends`); this module holds the RoPE position vectors and
:func:`sparse_neighborhood_attention`, and re-exports the public names of the other two.

Conventions (axis order, cell centres, full scale) and the window definition are stated once, in
:mod:`sparse_msda.functional.windows`.

Kernels and memory: keys and values are projected and rotated once per voxel. Queries are
grouped into tiles (same batch item and same window centre at the coarsest level, at most
``tile_queries``); a tile's keys are the voxels present in the union of its queries' windows,
looked up once per tile through the coordinate index (:func:`build_neighborhood_plan`).

The attention itself runs in a backend (:func:`sparse_msda.backends.choose_backend`, or the
``backend=`` argument of :func:`sparse_neighborhood_attention`):

* ``cpu`` (:func:`sparse_msda.backends.cpu.attention_forward`, the ``sparse_msda::neighborhood_attention`` op,
  ``csrc/neighborhood_attention_cpu.cpp``; CPU float32/float64): per tile and head, blocked
  products score the tile's queries against its keys and aggregate the values; each query's
  softmax runs over its own window keys and background slots only. Background slots (absent
  in-bounds window cells, only with a background embedding) are scored against the background
  key rotated at the slot's offset (:func:`background_tables`) with the query rotated back by
  its window centre, inside the kernel. Saved: ``q, k, v``, the background tables, the output
  and a ``[Q, H]`` log-sum-exp; the backward recomputes everything else.
* ``reference`` (:class:`sparse_msda.backends.reference.NeighborhoodAttentionFunction`; any
  device and dtype): tiles are padded and batched into chunks, scores by batched matmuls
  ``[H, T, G, d] x [H, T, d, U]`` masked to each query's own windows, values by batched matmuls,
  background slots per level by matmuls of the back-rotated queries against the offset tables;
  the backward recomputes scores chunk by chunk from the saved log-sum-exp.
* ``triton`` (``sparse_msda.backends.triton``): CUDA.

float16 / bfloat16 q/k/v compute in float32 (cast in, output cast back, gradients in their
inputs' dtypes: :mod:`sparse_msda.functional.precision`), so on CPU they take the kernel too;
the PyTorch path always max-shifts its softmax below float32 (``exp`` overflows float16 above ~11).

Neither keeps a ``[pairs, embed_dim]`` tensor: beyond the inputs and outputs, memory is the
plan's integer indices plus buffers bounded by a tile (kernel) or a chunk (PyTorch path).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import tuning
from ..backends import check_backend_name, choose_backend
from .neighborhood_plan import (
    NeighborhoodPlan,
    NeighborhoodTiles,
    PlanChunk,
    _centre_positions,
    _offset_positions,
    _pack_chunks,
    background_tables,
    build_neighborhood_plan,
    default_chunk_size,
)
from .precision import LOW_PRECISION, autocast_off, upcast
from .windows import (
    CENTRE_LIMIT,
    check_finite_positions,
    check_neighborhood_sizes,
    get_multilevel_neighborhoods,
    window_centres,
    window_offsets,
)

__all__ = [
    "CENTRE_LIMIT",
    "NeighborhoodTiles",
    "NeighborhoodPlan",
    "PlanChunk",
    "background_tables",
    "build_neighborhood_plan",
    "check_finite_positions",
    "check_neighborhood_sizes",
    "default_chunk_size",
    "full_scale_positions",
    "get_multilevel_neighborhoods",
    "NORMALISED_POSITION_LIMIT",
    "query_rope_positions",
    "sparse_neighborhood_attention",
    "voxel_rope_positions",
    "window_centres",
    "window_offsets",
]


def __getattr__(name: str):
    """Names that moved: ``NeighborhoodAttentionFunction`` to :mod:`sparse_msda.backends.reference`
    (the C++ kernel's Function became the ``sparse_msda::neighborhood_attention`` op,
    :mod:`sparse_msda.backends.ops`), ``SAVED_PROBABILITIES_BYTES`` to :mod:`sparse_msda.tuning` (read there)."""
    if name == "NeighborhoodAttentionFunction":
        from ..backends.reference import NeighborhoodAttentionFunction

        return NeighborhoodAttentionFunction
    if name == "SAVED_PROBABILITIES_BYTES":
        return tuning.SAVED_PROBABILITIES_BYTES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# RoPE positions
# ---------------------------------------------------------------------------------------------
#: normalised positions (``p / shape``) are clamped to +-2**24 map extents for the rotary encoding
#: and the deformable reference points: beyond it a float32 position carries no sub-map
#: information, and the clamp keeps ``p / shape_q * shape_l`` finite (a 3e38 position at a coarse
#: level would overflow float32 at a finer one and turn a query outside the map into NaN)
NORMALISED_POSITION_LIMIT = float(2**24)


def query_rope_positions(positions: Tensor, position_shapes: Tensor, levels: Tensor, full_shape: Tensor) -> Tensor:
    """Position vectors ``[Q, D + 1]`` (full-scale position, level) of queries (differentiable;
    normalised positions clamped to :data:`NORMALISED_POSITION_LIMIT`)."""
    full = full_shape.to(device=positions.device, dtype=positions.dtype)
    lim = NORMALISED_POSITION_LIMIT
    p = (positions / position_shapes.to(positions.dtype)).clamp(-lim, lim) * full
    return torch.cat([p, levels.to(positions.dtype)[:, None]], dim=1)


def full_scale_positions(positions: Tensor, level_indices: Tensor, level_spatial_shapes: Tensor) -> Tensor:
    """Positions ``[Q, D]`` given in the frame of each query's level mapped to full scale (the
    largest level): ``p / shape[level] * full_shape``. The neighborhood attention takes full-scale
    positions (as sparse-transformer-layers' ``get_multilevel_neighborhoods``)."""
    shapes = level_spatial_shapes.to(device=positions.device, dtype=positions.dtype)
    full = shapes[int(torch.argmax(level_spatial_shapes.prod(-1)))]
    return positions / shapes[level_indices.to(positions.device)] * full


def voxel_rope_positions(
    spatial_indices: Tensor, level_indices: Tensor, level_spatial_shapes: Tensor, full_shape: Tensor
) -> Tensor:
    """Float64 position vectors ``[N, D + 1]`` of cells: centre ``c + 0.5`` mapped to full scale, level."""
    shape = level_spatial_shapes[level_indices].to(torch.float64)
    p = (spatial_indices.to(torch.float64) + 0.5) / shape * full_shape.to(torch.float64)
    return torch.cat([p, level_indices.to(torch.float64)[:, None]], dim=1)


# ---------------------------------------------------------------------------------------------
# attention kernel
# ---------------------------------------------------------------------------------------------
def sparse_neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: NeighborhoodPlan,
    background_k: Optional[Tensor] = None,
    background_v: Optional[Tensor] = None,
    rope_freqs: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-head attention of each query over the keys of its plan (one softmax per query).

    Args:
        q: ``[Q, H, d]`` queries, already rotated at the queries' positions.
        k: ``[n_keys, H, d]`` keys of the plan's voxels (rows as in ``plan.voxel_rows``),
            already rotated at the voxels' positions (:func:`voxel_rope_positions`).
        v: ``[n_keys, H, d]`` values.
        plan: from :func:`build_neighborhood_plan` (its chunk size bounds the buffers).
        background_k, background_v: ``[B, L, H, d]`` projected (unrotated) background
            key/value of each batch item and level; required iff ``plan.with_background``.
            A background key acts rotated at the absent cell's own position.
        rope_freqs: ``[H or 1, d / 2, D + 1]`` frequencies; required with background.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or None (automatic, or
            ``$SPARSE_MSDA_BACKEND``): :func:`sparse_msda.backends.choose_backend`.

    Returns:
        ``[Q, H, d]``, zero rows for queries without keys.

    Raises:
        ValueError: shapes that do not match each other or the plan, background arguments
            given without a background plan (or missing with one), a ``backend`` that is
            unknown, unavailable or does not support the tensors.
    """
    check_backend_name(backend)
    if plan.with_background != (background_k is not None) or (background_k is None) != (background_v is None):
        raise ValueError("background_k/background_v must be given exactly when the plan was built with_background")
    if plan.with_background and rope_freqs is None:
        raise ValueError("rope_freqs is required to rotate background keys")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[1:] != q.shape[1:] or v.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k, v must be [rows, H, d] with the same H and d, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if plan.with_background:  # the kernels index them by the tiles' batch items and levels
        used = int(plan.query_batch.max()) + 1 if plan.n_queries else 0
        for name, t in (("background_k", background_k), ("background_v", background_v)):
            if t.ndim != 4 or t.shape[0] < used or tuple(t.shape[1:]) != (plan.n_levels, *q.shape[1:]):
                raise ValueError(
                    f"{name} must have shape [batch, n_levels, H, d] = [>= {used}, {plan.n_levels}, {q.shape[1]}, {q.shape[2]}] "
                    f"(a row for every batch item the plan's queries use), got {name}.shape={tuple(t.shape)}"
                )
    if q.shape[0] != plan.n_queries or k.shape[0] != plan.n_keys or v.shape[0] != plan.n_keys:
        raise ValueError(
            f"q/k/v rows ({q.shape[0]}, {k.shape[0]}, {v.shape[0]}) do not match the plan "
            f"(n_queries={plan.n_queries}, n_keys={plan.n_keys})"
        )
    scale = q.shape[-1] ** -0.5
    with autocast_off(q.device.type):  # float32 compute for float16 / bfloat16 (precision.py)
        if q.dtype in LOW_PRECISION:
            args = upcast(q, k, v, background_k, background_v, rope_freqs)
            return _attention(*args[:3], plan, *args[3:], scale, backend).to(q.dtype)
        return _attention(q, k, v, plan, background_k, background_v, rope_freqs, scale, backend)


def _attention(q, k, v, plan, background_k, background_v, rope_freqs, scale, backend) -> Tensor:
    """The attention of the backend :func:`~sparse_msda.backends.choose_backend` picks."""
    tensors = (q, k, v) + ((background_k, background_v) if plan.with_background else ())
    module = choose_backend("neighborhood_attention", *tensors, backend=backend)
    return module.neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale)
