"""The deformable attention's sampling head fused on the C++ sampling kernel (the ``cpu`` backend).

What :func:`sparse_msda.functional.deformable_fused.fused_deformable_attention` computes (the
functional entry: it chooses the backend through :func:`sparse_msda.backends.choose_backend` and
calls :func:`deformable_attention` here), for ``Q`` queries ``x [Q, C]``, ``H`` heads, ``L``
levels, ``P`` points, position dim ``D``::

    table     = linear(features, value_weight, value_bias)   # rows r * H + h, then the background rows
    offsets   = linear(x, offset_weight, offset_bias)        # [Q, H, L, P, D], axis order (y, x) / (z, y, x)
    logits    = linear(x, attn_weight, attn_bias)            # [Q, H, L * P]
    locations = ref[q] * shape_l + offsets                   # level cells (ref: normalised reference point)
    out[q, h] = sum_{l, p} softmax(logits[q, h])[l, p] * interp(table_h at level l, locations)

One :class:`_FusedDeformable` (autograd Function) does it one chunk of queries at a time (about
:data:`~sparse_msda.tuning.CHUNK_CORNERS` samples per chunk): the chunk's offsets and logits, its
base cells (one fused pass in the kernel, the same ``fma`` as the kernel's locations) and their
hash ids (``adapters.SparseCoordinateIndex.base_cell_ids``), then the sampling kernel
(``csrc/sparse_sample_cpu.cpp``), which forms each location from the offset and the reference
point and takes each row's softmax itself. No ``[Q, H, L, P, D]`` location tensor, no softmax
output and no weight gradient are stored; the backward returns the offsets' and the logits'
gradients directly (the softmax's backward runs in the kernel) and forms the gradients of ``x``
and of the two linear layers chunk by chunk.

Memory: kept for the backward are the inputs, the ``[Q * H, L * P]`` int32 base-cell ids and, when
each fits in :data:`~sparse_msda.tuning.DEFORMABLE_KEEP_BYTES`, the value table and the offsets
and logits; larger problems (e.g. a 3D encoder with 10^5 queries) recompute them in the backward
(the table by one matrix product, offsets and logits per chunk by two small ones) instead of
keeping ``N * C + Q * H * L * P * (D + 1)`` floats alive from the forward to the backward
(policy and per-layer costs: :data:`~sparse_msda.tuning.DEFORMABLE_KEEP_BYTES`). The backward
reuses storage instead of taking fresh pages (each fresh ``[10^5, 256]`` float32 tensor is ~30k
page faults, tens of ms): the features' gradients are written into the recomputed table once the
kernel is done with it, and the query's gradient over the incoming gradient, chunk by chunk after
the chunk's kernel call has read it, when that gradient is the Function's own (``grad_in_place``:
the module's output goes to its output projection alone; or a contiguous copy made here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters import SparseCoordinateIndex

from .. import tuning
from ..functional.cpu_kernels import sampling_kernels
from ..functional.determinism import kernel_threads

__all__ = ["ABSENT", "deformable_attention"]

#: an absent optional tensor argument of the C++ sampling kernels (also passed by backends.cpu)
ABSENT = torch.empty(0)


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
    grad_in_place: bool = False  # the backward may write the query's gradient over the incoming one


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


def _value_table(parts, w_v: Tensor, b_v: Optional[Tensor], bg: Optional[Tensor], head_dim: int) -> Tensor:
    """``[N * H (+ background rows), Dh]``: the projected values of the feature row blocks
    ``parts`` (in order; rows ``r * H + h``), written block by block into one table (no
    concatenated ``[N, C_in]`` copy of the features), then the background rows; one zero row when
    both are empty (no corner holds a value)."""
    n, c = sum(p.shape[0] for p in parts), w_v.shape[0]
    n_bg = 0 if bg is None else bg.shape[0] * bg.shape[1] // head_dim
    table = w_v.new_empty(max(1, n * c // head_dim + n_bg), head_dim)
    value = table[: n * c // head_dim].view(n, c)
    r = 0
    for p in parts:
        if b_v is not None:
            torch.addmm(b_v, p, w_v.t(), out=value[r : r + p.shape[0]])
        else:
            torch.mm(p, w_v.t(), out=value[r : r + p.shape[0]])
        r += p.shape[0]
    if n_bg:
        table[n * c // head_dim :] = bg.reshape(-1, head_dim)
    elif n == 0:
        table.zero_()
    return table


class _FusedDeformable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_off, b_off, w_att, b_att, ref, w_v, b_v, bg, spec: _Spec, *features):
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
            ids_c = ids[q0 * h : q1 * h]
            spec.index.base_cell_ids(batch[:, :1], ch.level, base, out=ids_c)  # int32 ids written in place
            ext.sample_forward(  # writes the chunk's rows of out in place
                table, off, logit, ids_c, ch.corners, batch, level, head, ch.shapes, h, spec.background_offset,
                threads, ref_c, h, True, out[q0 * h : q1 * h],
            )
        ctx.save_for_backward(
            x, w_off, b_off, w_att, b_att, ref, w_v, b_v, bg, ids, off_all, logit_all,
            table if spec.keep_table else None, *features,
        )
        ctx.spec = spec
        return out.view(n_q, h * table.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        x, w_off, b_off, w_att, b_att, ref, w_v, b_v, bg, ids, off_all, logit_all, table, *features = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w_off, need_b_off, need_w_att, need_b_att, need_ref = ctx.needs_input_grad[:6]
        need_w_v, need_b_v, need_bg = ctx.needs_input_grad[6:9]
        need_parts = ctx.needs_input_grad[10:]
        need_features = any(need_parts)
        need_table = need_features or need_w_v or need_b_v or need_bg
        need_pos = need_x or need_w_off or need_b_off or need_ref
        need_w = need_x or need_w_att or need_b_att
        ext = sampling_kernels(auto=False)
        h = spec.n_heads
        recomputed = table is None
        if recomputed:  # recompute the value projection instead of keeping it since the forward
            table = _value_table(features, w_v, b_v, bg, spec.head_dim)
        dh = table.shape[1]
        ch = _Chunks(spec, x, w_off, b_off, w_att, b_att, ref, off_all, logit_all)
        g = grad_out.contiguous().view(-1, dh)
        g_table = torch.zeros_like(table) if need_table else None
        g_x = None
        if need_x:
            # x's gradient over the incoming one (when the caller allows it, or g is our own
            # contiguous copy): the kernel call of chunk q0:q1 reads its rows of g before the
            # chunk's rows of g_x, the same memory, are written; no fresh [Q, C] pages
            own = spec.grad_in_place or g.data_ptr() != grad_out.data_ptr()
            if own and g.dtype == x.dtype and g.numel() == x.numel() and not g.requires_grad:
                g_x = g.view(x.shape)
            else:
                g_x = torch.empty_like(x)
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
                copies, ref[q0:q1], h, True, g_table if need_table else ABSENT,
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
        n, c_in = sum(p.shape[0] for p in features), w_v.shape[1]
        # a table recomputed here is dead now: the features' gradients go into its storage (no
        # fresh [N, C_in] pages; the blocks' gradients then share that one storage)
        spare = table.view(-1)[: n * c_in] if recomputed and n * c_in <= table.numel() else None
        del table
        g_parts = [None] * len(features)
        g_w_v = g_b_v = g_bg = None
        if need_table:  # through the value projection: rows r * H + h of voxel r are its [C] row
            n_value = n * w_v.shape[0] // dh
            g_value = g_table[:n_value].view(n, w_v.shape[0])
            r = 0
            for i, p in enumerate(features):  # per feature block: no [N, C_in] concatenation
                g_block = g_value[r : r + p.shape[0]]
                if need_parts[i] and spare is not None:
                    g_parts[i] = torch.mm(g_block, w_v, out=spare[r * c_in : (r + p.shape[0]) * c_in].view(-1, c_in))
                elif need_parts[i]:
                    g_parts[i] = g_block @ w_v
                if need_w_v:
                    g_w_v = g_block.t() @ p if g_w_v is None else g_w_v.addmm_(g_block.t(), p)
                r += p.shape[0]
            if need_w_v and g_w_v is None:
                g_w_v = torch.zeros_like(w_v)
            if need_b_v:
                g_b_v = g_value.sum(0)
            if need_bg:
                g_bg = g_table[n_value : n_value + bg.shape[0]].to(bg.dtype)
        return (g_x, g_w_off, g_b_off, g_w_att, g_b_att, g_ref, g_w_v, g_b_v, g_bg, None, *g_parts)


def deformable_attention(
    x: Tensor,
    offset_weight: Tensor,
    offset_bias: Optional[Tensor],
    attn_weight: Tensor,
    attn_bias: Optional[Tensor],
    reference_points: Tensor,
    features,
    value_weight: Tensor,
    value_bias: Optional[Tensor],
    background_table: Optional[Tensor],
    index: SparseCoordinateIndex,
    batch_indices: Tensor,
    n_heads: int,
    n_levels: int,
    n_points: int,
    grad_in_place: bool = False,
) -> Tensor:
    """The ``cpu`` backend's fused deformable attention (arguments, shapes and result as
    :func:`sparse_msda.functional.deformable_fused.fused_deformable_attention`, which chooses the
    backend and calls this): one :class:`_FusedDeformable` over chunks of queries; the value
    table and the offsets/logits are kept for the backward while each fits in
    :data:`~sparse_msda.tuning.DEFORMABLE_KEEP_BYTES`, else recomputed there. ``features`` may be
    one ``[N, C_in]`` tensor or a sequence of row blocks of it (e.g. one per spconv level): the
    blocks are projected into one table and get their own gradients, so no concatenated copy of
    the features is made or kept for the backward. ``grad_in_place``: the output's gradient
    reaches this Function alone (nobody else reads it), so the backward may write the query's
    gradient over it (see the module docstring)."""
    parts = [features] if isinstance(features, Tensor) else list(features)
    n_q, h, j, d = x.shape[0], n_heads, n_levels * n_points, index.position_dim
    head_dim = value_weight.shape[0] // n_heads
    n_value = sum(p.shape[0] for p in parts) * n_heads
    per_query = h * j * (d + 1) * x.element_size()
    table_bytes = (n_value + (0 if background_table is None else background_table.shape[0])) * head_dim * x.element_size()
    spec = _Spec(
        index, batch_indices.to(torch.int64), h, n_levels, n_points,
        -1 if background_table is None else n_value,
        max(1, tuning.CHUNK_CORNERS // max(1, h * j)), n_q * per_query <= tuning.DEFORMABLE_KEEP_BYTES,
        table_bytes <= tuning.DEFORMABLE_KEEP_BYTES, head_dim, grad_in_place,
    )
    return _FusedDeformable.apply(
        x.contiguous(), offset_weight.contiguous(), offset_bias, attn_weight.contiguous(), attn_bias,
        reference_points.contiguous(), value_weight.contiguous(), value_bias,
        None if background_table is None else background_table.contiguous(), spec, *(p.contiguous() for p in parts),
    )
