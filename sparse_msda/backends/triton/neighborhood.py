"""The neighborhood attention (``neighborhood_attention``) on the Triton kernels of
:mod:`.neighborhood_kernels`.

Same contract as the reference backend (``NeighborhoodAttentionFunction``): rotated queries
``q [Q, H, d]``, rotated voxel keys and values ``[n_keys, H, d]``, unrotated background keys and
values ``[B, L, H, d]`` and the RoPE frequencies, the plan and the score scale; output
``[Q, H, d]`` (zero rows for queries without keys), differentiable w.r.t. all of them (the
frequencies through the background scores). The background enters the kernels as two tensors
built here by ordinary autograd ops: the background keys rotated at every window-slot offset
(:func:`~sparse_msda.functional.neighborhood.background_tables`, ``[B, K, H, d]``) and the
queries rotated back by their window centre at every level (``[Q, L, H, d]``: memory ``L`` times
that of ``q``), so autograd carries the gradients from the kernels' ``d ql`` / ``d tables`` to
``q``, the background keys and the frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import triton

from ...functional.neighborhood import NeighborhoodPlan, _centre_positions, background_tables
from ...functional.rope import rope_angles, rope_cos_sin, rotate_pairs
from . import neighborhood_kernels as K

__all__ = ["neighborhood_attention"]

#: key entries / window slots per block
BLOCK_K = 32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan_tensors(plan: NeighborhoodPlan, device) -> dict:
    """The plan's tile lists and window tables as contiguous int64 tensors on ``device`` (cached
    on the plan: a plan is shared by every layer of an encoder forward)."""
    cache = plan.__dict__.setdefault("_triton_tensors", {})
    key = str(device)
    if key not in cache:
        t = plan.tiles
        dim = plan.level_spatial_shapes.shape[1]
        sizes = torch.tensor(plan.neighborhood_sizes, dtype=torch.int64)
        slot_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes**dim, 0)])
        c = lambda x: x.to(device=device, dtype=torch.int64).contiguous()  # noqa: E731
        key_cell = t.key_cell  # per entry (the plan holds it per key row)
        key_cell = key_cell if key_cell.shape[0] else torch.zeros(1, dim, dtype=torch.int64)
        one = lambda x: x if x.shape[0] else torch.zeros(1, dtype=torch.int64)  # noqa: E731  (no empty pointers)
        cache[key] = dict(
            qorder=c(one(t.query_order)), qstart=c(t.query_start), qcount=c(t.query_count), tbatch=c(t.batch),
            kstart=c(t.key_start), kcount=c(t.key_count), krow=c(one(t.key_row)), klev=c(one(t.key_level)),
            kcell=c(key_cell), centres=c(plan.centres), radius=c((sizes - 1) // 2), size=c(sizes),
            shapes=c(plan.level_spatial_shapes), slot_start=c(slot_start), slot_off=c(plan.slot_offset),
        )
    return cache[key]


def _block_q(plan: NeighborhoodPlan) -> int:
    return max(16, triton.next_power_of_2(plan.tile_queries))


def _occupied(plan: NeighborhoodPlan, pt: dict, device) -> Tensor:
    """int8 ``[Q, K]``: 1 where window slot ``k`` of query ``q`` holds a voxel (cached on the plan)."""
    cache = plan.__dict__.setdefault("_triton_occupied", {})
    key = str(device)
    if key not in cache:
        n_slots = plan.slot_level.shape[0]
        occ = torch.zeros(max(plan.n_queries, 1), n_slots, dtype=torch.int8, device=device)
        n_tiles = plan.tiles.n_tiles
        if n_tiles:
            K.mark_occupied_kernel[(n_tiles,)](
                pt["qorder"], pt["qstart"], pt["qcount"], pt["kstart"], pt["kcount"], pt["krow"], pt["klev"], pt["kcell"],
                pt["centres"], pt["radius"], pt["size"], pt["slot_start"], occ, n_slots,
                N_LEVELS=plan.n_levels, DIM=plan.level_spatial_shapes.shape[1], BLOCK_Q=_block_q(plan), BLOCK_K=BLOCK_K,
            )
        cache[key] = occ
    return cache[key]


def _kernel_args(plan: NeighborhoodPlan, pt: dict) -> list:
    return [
        pt["qorder"], pt["qstart"], pt["qcount"], pt["tbatch"], pt["kstart"], pt["kcount"], pt["krow"], pt["klev"],
        pt["kcell"], pt["centres"], pt["radius"], pt["shapes"], pt["slot_start"], pt["slot_off"],
    ]


def _constexprs(plan: NeighborhoodPlan, q: Tensor, with_bg: bool) -> dict:
    head_dim = q.shape[2]
    return dict(
        H=q.shape[1], HEAD_DIM=head_dim, N_LEVELS=plan.n_levels, DIM=plan.level_spatial_shapes.shape[1],
        HAS_BG=with_bg, F64=q.dtype == torch.float64, BLOCK_Q=_block_q(plan), BLOCK_K=BLOCK_K,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )


def _nonempty(t: Tensor) -> Tensor:
    """A kernel argument with at least one row (masked loads never read it; no null pointers)."""
    return t if t.shape[0] else t.new_zeros(1, *t.shape[1:])


class TritonNeighborhoodAttention(torch.autograd.Function):
    """Inputs ``q [Q, H, d]``, ``k, v [n_keys, H, d]``; with background ``ql [Q, L, H, d]``
    (queries rotated back by their window centres), ``tables [B, K, H, d]`` (background keys
    rotated at the slot offsets) and ``bg_v [B, L, H, d]``, else None. Saves the inputs, the
    output in float32 (float64 for float64 inputs) and the ``[Q, H]`` log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, ql, tables, bg_v, plan: NeighborhoodPlan, scale: float):
        with_bg = ql is not None
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        device = q.device
        pt = _plan_tensors(plan, device)
        n_q, n_heads, _ = q.shape
        acc = _compute_dtype(q.dtype)
        # the output in the compute dtype: the backward's delta = <g, out> needs it unrounded
        out = torch.zeros(q.shape, dtype=acc, device=device)
        lse = torch.zeros(n_q, n_heads, dtype=acc, device=device)
        if with_bg:
            ql, tables, bg_v = ql.contiguous(), tables.contiguous(), bg_v.contiguous()
            occ = _occupied(plan, pt, device)
        else:
            ql = tables = bg_v = occ = q.new_zeros(1)
        n_tiles = plan.tiles.n_tiles
        if n_tiles and n_q:
            K.attention_forward_kernel[(n_tiles, n_heads)](
                q, _nonempty(k), _nonempty(v), ql, tables, bg_v, occ, out, lse, *_kernel_args(plan, pt),
                scale, plan.slot_level.shape[0], **_constexprs(plan, q, with_bg),
            )
        ctx.plan, ctx.scale, ctx.with_bg = plan, scale, with_bg
        ctx.save_for_backward(q, k, v, ql, tables, bg_v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, ql, tables, bg_v, out, lse = ctx.saved_tensors
        plan, with_bg = ctx.plan, ctx.with_bg
        device = q.device
        pt = _plan_tensors(plan, device)
        acc = _compute_dtype(q.dtype)
        g = grad_out.contiguous()
        delta = (g.to(acc) * out).sum(-1).contiguous()  # [Q, H]
        dq = torch.zeros(q.shape, dtype=acc, device=device)
        dk = torch.zeros(_nonempty(k).shape, dtype=acc, device=device)
        dv = torch.zeros(_nonempty(v).shape, dtype=acc, device=device)
        if with_bg:
            occ = _occupied(plan, pt, device)
            dql = torch.zeros(ql.shape, dtype=acc, device=device)
            dtab = torch.zeros(tables.shape, dtype=acc, device=device)
            dbv = torch.zeros(bg_v.shape, dtype=acc, device=device)
        else:
            occ = dql = dtab = dbv = q.new_zeros(1, dtype=acc)
        n_tiles = plan.tiles.n_tiles
        if n_tiles and q.shape[0]:
            K.attention_backward_kernel[(n_tiles, q.shape[1])](
                q, _nonempty(k), _nonempty(v), ql, tables, bg_v, occ, g, lse, delta, dq, dk, dv, dql, dtab, dbv,
                *_kernel_args(plan, pt), ctx.scale, plan.slot_level.shape[0], **_constexprs(plan, q, with_bg),
            )
        dk, dv = dk[: k.shape[0]].to(k.dtype), dv[: v.shape[0]].to(v.dtype)
        if not with_bg:
            return dq.to(q.dtype), dk, dv, None, None, None, None, None
        return dq.to(q.dtype), dk, dv, dql.to(ql.dtype), dtab.to(tables.dtype), dbv.to(bg_v.dtype), None, None


def _rotated_back_queries(q: Tensor, plan: NeighborhoodPlan, freqs: Tensor, dtype: torch.dtype) -> Tensor:
    """``[Q, L, H, d]``: each query rotated back by its window centre at every level,
    ``R(-u_centre) q`` (autograd ops: differentiable w.r.t. ``q`` and ``freqs``)."""
    u_c = _centre_positions(plan.centres, plan)  # [Q, L, D + 1] float64
    cos, sin = rope_cos_sin(rope_angles(u_c, freqs), dtype)  # [Q, L, H', d/2]
    return rotate_pairs(q.to(dtype)[:, None], cos, -sin)


def neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale) -> Tensor:
    """The backend operation (arguments validated by
    :func:`sparse_msda.functional.neighborhood.sparse_neighborhood_attention`); computes in
    float32 for float16/bfloat16 inputs and returns ``q``'s dtype."""
    if not plan.with_background:
        return TritonNeighborhoodAttention.apply(q, k, v, None, None, None, plan, scale)
    dtype = _compute_dtype(q.dtype)
    # a half-precision q enters both paths in float32: its two gradients are summed before rounding
    q_c = q.to(dtype)
    tables = background_tables(background_k.to(dtype), rope_freqs, plan)[0]  # [B, K, H, d]
    ql = _rotated_back_queries(q_c, plan, rope_freqs, dtype)
    return TritonNeighborhoodAttention.apply(q_c, k, v, ql, tables, background_v, plan, scale).to(q.dtype)
