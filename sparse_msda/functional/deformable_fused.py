"""The deformable attention's sampling head in one pass over chunks of queries (C++ CPU kernels).

What :class:`~sparse_msda.modules.SparseMSDeformableAttention` computes between its value
projection and its output projection, for ``Q`` queries ``x [Q, C]``, ``H`` heads, ``L`` levels,
``P`` points, position dim ``D``::

    offsets   = linear(x, offset_weight, offset_bias)     # [Q, H, L, P, D], axis order (y, x) / (z, y, x)
    logits    = linear(x, attn_weight, attn_bias)         # [Q, H, L * P]
    locations = ref[q] * shape_l + offsets                # level cells (ref: normalised reference point)
    out[q, h] = sum_{l, p} softmax(logits[q, h])[l, p] * interp(table_h at level l, locations)

:func:`fused_deformable_attention` gives exactly what the unfused path gives (the linear layers,
``torch.addcmul``, ``softmax`` and :func:`~sparse_msda.functional.deformable.sparse_deformable_attention`),
up to floating-point rounding, but one chunk of queries at a time (about
:data:`~sparse_msda.tuning.CHUNK_CORNERS` samples per chunk): the chunk's offsets and logits, its
base cells (one fused pass in the kernel, the same ``fma`` as the kernel's locations) and their
hash ids (``adapters.SparseCoordinateIndex.base_cell_ids``), then the sampling kernel, which forms
each location from the offset and the reference point and takes each row's softmax itself. No
``[Q, H, L, P, D]`` location tensor, no softmax output and no weight gradient are stored; the
backward returns the offsets' and the logits' gradients directly (the softmax's backward runs in
the kernel) and forms the gradients of ``x`` and of the two linear layers chunk by chunk.

The value projection runs inside too (``table = linear(features, value_weight, value_bias)``,
then the background rows), so that the table need not stay alive between forward and backward.

Memory: kept for the backward are the inputs, the ``[Q * H, L * P]`` int32 base-cell ids and, when
each fits in :data:`~sparse_msda.tuning.DEFORMABLE_KEEP_BYTES`, the value table and the offsets
and logits; larger problems (e.g. a 3D encoder with 10^5 queries) recompute them in the backward
(the table by one matrix product, offsets and logits per chunk by two small ones) instead of
keeping ``N * C + Q * H * L * P * (D + 1)`` floats alive from the forward to the backward.

Runs on the ``cpu`` backend only (CPU tensors of one dtype, float32 or float64, kernels built and
chosen); :func:`fusable` says when. Everything else (other backends and dtypes, a precomputed
:class:`~sparse_msda.functional.sampling.SamplingPlan`, ``torch.compile`` tracing, which wants the
``sparse_msda::weighted_gather`` custom op) takes the unfused path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters import SparseCoordinateIndex

from .. import tuning
from .cpu_kernels import sampling_kernels
from .determinism import kernel_threads

__all__ = ["fusable", "fused_deformable_attention"]

def fusable(backend: Optional[str], *tensors: Tensor) -> bool:
    """Whether :func:`fused_deformable_attention` serves these tensors: the automatic backend
    choice (or ``backend``) is the C++ ``cpu`` backend, all floating tensors are CPU tensors of
    one dtype (float32 or float64), and no ``torch.compile`` tracing is under way."""
    from ..backends import choose_backend, cpu

    if torch.compiler.is_compiling():
        return False
    floats = [t for t in tensors if t is not None]
    if not floats or any(t.device.type != "cpu" or t.dtype != floats[0].dtype for t in floats):
        return False
    if floats[0].dtype not in (torch.float32, torch.float64):
        return False
    try:
        return choose_backend("weighted_gather", *floats, backend=backend) is cpu
    except (TypeError, ValueError):
        return False


@dataclass
class _Spec:
    """What the Function needs besides its differentiable inputs."""

    index: SparseCoordinateIndex
    batch: Tensor  # int64 [Q]
    n_heads: int
    n_levels: int
    n_points: int
    background_offset: int  # first background row of the table, -1: none
    chunk: int  # queries per chunk
    keep: bool  # keep the offsets and logits for the backward (else recompute per chunk)
    keep_table: bool  # keep the projected value table for the backward (else recompute it)
    head_dim: int


class _Chunks:
    """The per-chunk index tensors and activations of one call (forward and backward)."""

    def __init__(self, spec: _Spec, x, w_off, b_off, w_att, b_att, ref, off_all=None, logit_all=None):
        self.spec, self.x, self.ref = spec, x, ref
        self.w = (w_off, b_off, w_att, b_att)
        self.off_all, self.logit_all = off_all, logit_all
        h, l, p = spec.n_heads, spec.n_levels, spec.n_points
        self.j = l * p
        self.dim = spec.index.position_dim
        self.level = torch.arange(l).repeat_interleave(p)[None, :]  # [1, J]
        self.head = torch.arange(h).repeat(min(spec.chunk, x.shape[0]))[:, None]  # [chunk * H, 1]
        self.shapes = spec.index.level_spatial_shapes.to("cpu", torch.int64).contiguous()
        self.corners = spec.index.corner_row_table()

    def ranges(self):
        n = self.x.shape[0]
        for q0 in range(0, n, self.spec.chunk):
            yield q0, min(n, q0 + self.spec.chunk)

    def acts(self, q0: int, q1: int) -> tuple[Tensor, Tensor]:
        """Offsets ``[c * H, J, D]`` and logits ``[c * H, J]`` of queries ``q0:q1``."""
        h = self.spec.n_heads
        if self.off_all is not None:
            off, logit = self.off_all[q0:q1], self.logit_all[q0:q1]
        else:
            w_off, b_off, w_att, b_att = self.w
            off, logit = F.linear(self.x[q0:q1], w_off, b_off), F.linear(self.x[q0:q1], w_att, b_att)
        c = q1 - q0
        return off.reshape(c * h, self.j, self.dim), logit.reshape(c * h, self.j)

    def layout(self, q0: int, q1: int) -> tuple:
        """(batch, level, head) ``[c * H, J]`` broadcast views of the chunk's samples."""
        s = (q1 - q0) * self.spec.n_heads
        batch = self.spec.batch[q0:q1].repeat_interleave(self.spec.n_heads)[:, None]
        return batch.expand(s, self.j), self.level.expand(s, self.j), self.head[:s].expand(s, self.j)


def _value_table(features: Tensor, w_v: Tensor, b_v: Optional[Tensor], bg: Optional[Tensor], head_dim: int) -> Tensor:
    """``[N * H (+ background rows), Dh]``: the projected values (rows ``r * H + h``), then the
    background rows; one zero row when both are empty (no corner holds a value)."""
    table = F.linear(features, w_v, b_v).view(-1, head_dim)
    if bg is not None:
        table = torch.cat([table, bg.to(table.dtype)])
    if table.shape[0] == 0:
        table = table.new_zeros(1, head_dim)
    return table


class _FusedDeformable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_off, b_off, w_att, b_att, ref, features, w_v, b_v, bg, spec: _Spec):
        ext = sampling_kernels(auto=False)
        h = spec.n_heads
        table = _value_table(features, w_v, b_v, bg, spec.head_dim)
        off_all = logit_all = None
        if spec.keep:
            off_all, logit_all = F.linear(x, w_off, b_off), F.linear(x, w_att, b_att)
        ch = _Chunks(spec, x, w_off, b_off, w_att, b_att, ref, off_all, logit_all)
        n_q, threads = x.shape[0], torch.get_num_threads()
        ids = torch.empty(n_q * h, ch.j, dtype=torch.int32)
        out = table.new_empty(n_q * h, table.shape[1])
        for q0, q1 in ch.ranges():
            off, logit = ch.acts(q0, q1)
            batch, level, head = ch.layout(q0, q1)
            ref_c = ref[q0:q1]
            base = ext.sample_base_cells(off, level, ch.shapes, ref_c, h, threads)
            ids_c = spec.index.base_cell_ids(batch[:, :1], ch.level, base).to(torch.int32)
            ids[q0 * h : q1 * h] = ids_c
            out[q0 * h : q1 * h] = ext.sample_forward(
                table, off, logit, ids_c, ch.corners, batch, level, head, ch.shapes, h, spec.background_offset,
                threads, ref_c, h, True,
            )
        ctx.save_for_backward(
            x, w_off, b_off, w_att, b_att, ref, features, w_v, b_v, bg, ids, off_all, logit_all,
            table if spec.keep_table else None,
        )
        ctx.spec = spec
        return out.view(n_q, h * table.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        x, w_off, b_off, w_att, b_att, ref, features, w_v, b_v, bg, ids, off_all, logit_all, table = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w_off, need_b_off, need_w_att, need_b_att, need_ref = ctx.needs_input_grad[:6]
        need_features, need_w_v, need_b_v, need_bg = ctx.needs_input_grad[6:10]
        need_table = need_features or need_w_v or need_b_v or need_bg
        need_pos = need_x or need_w_off or need_b_off or need_ref
        need_w = need_x or need_w_att or need_b_att
        from ..backends import cpu  # ABSENT: the kernels' absent-tensor argument (lazy: backends import functional)

        ext = sampling_kernels(auto=False)
        h = spec.n_heads
        if table is None:  # recompute the value projection instead of keeping it since the forward
            table = _value_table(features, w_v, b_v, bg, spec.head_dim)
        dh = table.shape[1]
        ch = _Chunks(spec, x, w_off, b_off, w_att, b_att, ref, off_all, logit_all)
        g = grad_out.contiguous().view(-1, dh)
        g_table = torch.zeros_like(table) if need_table else None
        g_x = torch.empty_like(x) if need_x else None
        g_w_off = torch.zeros_like(w_off) if need_w_off else None
        g_b_off = torch.zeros_like(b_off) if need_b_off else None
        g_w_att = torch.zeros_like(w_att) if need_w_att else None
        g_b_att = torch.zeros_like(b_att) if need_b_att else None
        g_ref = torch.empty_like(ref) if need_ref else None
        threads = kernel_threads(h, bool(need_table))  # thread-count invariant if deterministic
        copies = max(0, tuning.TABLE_COPY_BYTES // max(1, table.numel() * table.element_size()))
        shapes_f = ch.shapes.to(ref.dtype)
        for q0, q1 in ch.ranges():
            off, logit = ch.acts(q0, q1)
            batch, level, head = ch.layout(q0, q1)
            _, g_off, g_logit = ext.sample_backward(
                table, off, logit, ids[q0 * h : q1 * h], ch.corners, batch, level, head, ch.shapes, h,
                spec.background_offset, g[q0 * h : q1 * h], bool(need_table), bool(need_pos), bool(need_w), threads,
                copies, ref[q0:q1], h, True, g_table if need_table else cpu.ABSENT,
            )
            c, xc = q1 - q0, x[q0:q1]
            if need_pos:
                g_off = g_off.view(c, -1)
            if need_w:
                g_logit = g_logit.view(c, -1)
            if need_x:
                torch.mm(g_off, w_off, out=g_x[q0:q1])
                g_x[q0:q1].addmm_(g_logit, w_att)
            if need_w_off:
                g_w_off.addmm_(g_off.t(), xc)
            if need_b_off:
                g_b_off += g_off.sum(0)
            if need_w_att:
                g_w_att.addmm_(g_logit.t(), xc)
            if need_b_att:
                g_b_att += g_logit.sum(0)
            if need_ref:  # d location / d ref = the level's shape
                g5 = g_off.view(c, h, spec.n_levels, spec.n_points, -1)
                g_ref[q0:q1] = (g5 * shapes_f[None, None, :, None, :]).sum((1, 2, 3))
        del table
        g_features = g_w_v = g_b_v = g_bg = None
        if need_table:  # through the value projection: rows r * H + h of voxel r are its [C] row
            n_value = features.shape[0] * w_v.shape[0] // dh
            g_value = g_table[:n_value].view(features.shape[0], w_v.shape[0])
            if need_features:
                g_features = g_value @ w_v
            if need_w_v:
                g_w_v = g_value.t() @ features
            if need_b_v:
                g_b_v = g_value.sum(0)
            if need_bg:
                g_bg = g_table[n_value : n_value + bg.shape[0]].to(bg.dtype)
        return g_x, g_w_off, g_b_off, g_w_att, g_b_att, g_ref, g_features, g_w_v, g_b_v, g_bg, None


def fused_deformable_attention(
    x: Tensor,
    offset_weight: Tensor,
    offset_bias: Optional[Tensor],
    attn_weight: Tensor,
    attn_bias: Optional[Tensor],
    reference_points: Tensor,
    features: Tensor,
    value_weight: Tensor,
    value_bias: Optional[Tensor],
    background_table: Optional[Tensor],
    index: SparseCoordinateIndex,
    batch_indices: Tensor,
    n_heads: int,
    n_levels: int,
    n_points: int,
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
        features: ``[N, C_in]`` voxel features in ``index`` row order; value_weight,
            value_bias: ``[H * Dh, C_in]``, ``[H * Dh]``, the value projection (row ``r * H + h``
            of the value table is head ``h`` of voxel ``r``, as
            :func:`~sparse_msda.functional.sampling.sparse_weighted_gather`).
        background_table: ``[batch * L * H, Dh]`` projected background values, row
            ``(b * L + l) * H + h``, or None.
        index: the map's coordinate index; batch_indices: int64 ``[Q]`` (checked by the caller).

    Returns:
        ``[Q, H * Dh]``; differentiable w.r.t. every tensor argument but the index and batch.

    Internal entry of the module (arguments are checked by its ``prepare``); see :func:`fusable`.
    The value table is kept for the backward when it fits in
    :data:`~sparse_msda.tuning.DEFORMABLE_KEEP_BYTES`, else recomputed there (one matrix product).
    """
    from ..backends import cpu  # the cpu backend's entry (what a backend spy sees); it calls _fused below

    return cpu.deformable_attention(
        x, offset_weight, offset_bias, attn_weight, attn_bias, reference_points, features, value_weight, value_bias,
        background_table, index, batch_indices, n_heads, n_levels, n_points,
    )


def _fused(x, offset_weight, offset_bias, attn_weight, attn_bias, reference_points, features, value_weight,
           value_bias, background_table, index, batch_indices, n_heads, n_levels, n_points) -> Tensor:
    """:func:`fused_deformable_attention` (called by ``backends.cpu.deformable_attention``)."""
    n_q, h, j, d = x.shape[0], n_heads, n_levels * n_points, index.position_dim
    head_dim = value_weight.shape[0] // n_heads
    n_value = features.shape[0] * n_heads
    per_query = h * j * (d + 1) * x.element_size()
    table_bytes = (n_value + (0 if background_table is None else background_table.shape[0])) * head_dim * x.element_size()
    spec = _Spec(
        index, batch_indices.to(torch.int64), h, n_levels, n_points,
        -1 if background_table is None else n_value,
        max(1, tuning.CHUNK_CORNERS // max(1, h * j)), n_q * per_query <= tuning.DEFORMABLE_KEEP_BYTES,
        table_bytes <= tuning.DEFORMABLE_KEEP_BYTES, head_dim,
    )
    return _FusedDeformable.apply(
        x.contiguous(), offset_weight.contiguous(), offset_bias, attn_weight.contiguous(), attn_bias,
        reference_points.contiguous(), features.contiguous(), value_weight.contiguous(), value_bias,
        None if background_table is None else background_table.contiguous(), spec,
    )
