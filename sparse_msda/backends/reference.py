"""The pure-PyTorch backend: the readable specification of both operations.

Runs on any device and floating dtype (it serves CUDA tensors where no faster backend applies,
and every dtype the C++ kernels do not take). The other backends are tested against it, and it
is tested against independent references: dense ``F.grid_sample(align_corners=False)`` /
Deformable DETR for the sampling (``tests/test_deformable.py``), a naive per-query loop for
the neighborhood attention (``tests/test_neighborhood.py``), and ``gradcheck`` in float64.

* ``weighted_gather``: :func:`gather_forward` / :func:`gather_backward` (the
  ``sparse_msda::weighted_gather`` op, :mod:`sparse_msda.backends.ops`): chunks of about
  :data:`~sparse_msda.tuning.CHUNK_CORNERS` corners; per chunk the interpolation and the
  weighted sum over samples are one fixed-bag ``F.embedding_bag(..., per_sample_weights=...)``;
  the backward recomputes corner rows and weights chunk by chunk from the saved int32 base-cell
  ids. ``[samples, corners, head_dim]`` never exists beyond one chunk.
* ``neighborhood_attention``: :class:`NeighborhoodAttentionFunction`: the plan's tiles padded
  and packed into chunks, batched matmuls for scores and values masked to each query's own
  windows, a flash-style recomputing backward from a saved log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import tuning
from ..functional.neighborhood_plan import (
    NeighborhoodPlan,
    PlanChunk,
    _centre_positions,
    _offset_positions,
    background_tables,
)
from ..functional.determinism import one_thread_when_deterministic
from ..functional.rope import rope_cos_sin, rotate_pairs, rotate_pairs_back
from ..functional.sampling import _base_cell_ids, _base_cells, _Sampling
from . import ops

__all__ = [
    "NeighborhoodAttentionFunction",
    "gather_backward",
    "gather_forward",
    "available",
    "neighborhood_attention",
    "supports",
    "weighted_gather",
]

#: what :func:`supports` accepts, in words
SUPPORTS = "any device, any floating dtype"


def available() -> bool:
    """Always True: PyTorch ops only."""
    return True


def supports(op: str, *tensors: Tensor) -> bool:
    """True for every device and floating dtype."""
    return True


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _split(positions: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Base cells (int64, :func:`_base_cells`), fractional offsets (``dtype``) of positions
    ``[..., D]`` and the bool ``[...]`` mask of non-finite samples (any coordinate NaN or
    infinite; their offsets are set to 0 so that no NaN weight reaches a table row)."""
    shifted = positions - 0.5
    floor = torch.floor(shifted)
    bad = ~torch.isfinite(positions).all(-1)
    frac = (shifted - floor).to(dtype).masked_fill_(bad[..., None], 0.0)
    return _base_cells(positions), frac, bad


def _outer(u: Tensor) -> Tensor:
    """``[..., D, 2]`` per-axis factors -> ``[..., 2**D]`` corner weights (first axis most significant)."""
    dim = u.shape[-2]
    w = u[..., 0, :]
    for d in range(1, dim):
        w = (w[..., :, None] * u[..., d, None, :]).flatten(-2)
    return w


def _corners(ctx: _Sampling, ids: Tensor, base: Tensor, frac: Tensor, sl: slice):
    """Table rows ``[c, J, K]``, corner weights ``[c, J, K]``, per-axis factors ``[c, J, D, 2]``,
    the per-axis validity ``(lo, hi)`` of the corners (None without background) and the
    present-corner mask (None with background: absent in-grid corners hold the background)."""
    c, n_per, dim = base.shape
    cr = ctx.corner_rows(ids)  # [c, J, K], -1 absent
    found = cr >= 0
    head = ctx.rows_of(ctx.head, sl)
    if head is not None and ctx.n_heads > 1:
        cr = cr * ctx.n_heads + head.to(cr.dtype)[..., None]
    u = torch.stack([1.0 - frac, frac], -1)  # [c, J, D, 2]
    if ctx.background_offset is None:
        rows = cr.masked_fill(~found, 0)  # weight 0 below: any valid row will do
        return rows, _outer(u) * found, u, None, found
    batch, level = ctx.rows_of(ctx.batch, sl), ctx.rows_of(ctx.level, sl)
    fill = (batch * ctx.n_levels + level) * ctx.n_heads + ctx.background_offset
    if head is not None:
        fill = fill + head
    rows = torch.where(found, cr, fill.to(cr.dtype)[..., None])
    shape = ctx.level_spatial_shapes.to(base.device)[level.expand(c, n_per)]  # [c, J, D]
    valid = torch.stack([(base >= 0) & (base < shape), (base >= -1) & (base < shape - 1)], -1)  # [c, J, D, 2]
    u = u * valid
    return rows, _outer(u), u, valid, None


@one_thread_when_deterministic  # thread-count invariant results (functional/determinism.py)
def gather_forward(table: Tensor, positions: Tensor, weights: Tensor, ids: Tensor, ctx: _Sampling) -> Tensor:
    """``out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * table[row(s, j, k)]`` in PyTorch ops
    (the ``reference`` implementation of the ``sparse_msda::weighted_gather`` op).

    Per chunk of about :data:`~sparse_msda.tuning.CHUNK_CORNERS` corners, the corner rows of the
    samples' base-cell ``ids`` (int32 ``[S, J]``, hashed before the op) and their weights, and the
    interpolation and weighted sum as one fixed-bag ``embedding_bag``.
    """
    n_samples, n_per, dim = positions.shape
    out = table.new_empty(n_samples, table.shape[1])
    with torch.no_grad():
        for sl in ctx.steps(n_samples, n_per, dim):
            c = sl.stop - sl.start
            base, frac, bad = _split(positions[sl], table.dtype)
            rows, wc, _, _, _ = _corners(ctx, ids[sl], base, frac, sl)
            psw = (wc * weights[sl, :, None]).view(c, -1)
            out[sl] = F.embedding_bag(rows.view(c, -1), table, per_sample_weights=psw, mode="sum")
            if bool(bad.any()):  # as F.grid_sample: a non-finite location gives NaN
                out[sl][bad.any(-1)] = float("nan")
    return out


@one_thread_when_deterministic
def gather_backward(grad_out: Tensor, table: Tensor, positions: Tensor, weights: Tensor, ids: Tensor, ctx: _Sampling, needs) -> tuple:
    """Gradients of ``(table, positions, weights)`` (None where ``needs`` is False).

    Recomputes each chunk's rows and weights from the ids and positions; per corner it forms the
    value/gradient dot product (a gather into a reused buffer and a batched matmul) for the
    gradients of ``a`` and of the positions (analytically through the per-axis factors), and adds
    the weighted output gradient into the table gradient (entries sorted by row, one
    ``embedding_bag`` per chunk, :func:`_scatter_table_rows`).
    """
    n_samples, n_per, dim = positions.shape
    head_dim = table.shape[1]
    need_table, need_pos, need_w = needs[:3]
    g_table = torch.zeros_like(table) if need_table else None
    g_pos = torch.zeros_like(positions) if need_pos else None
    g_w = torch.zeros_like(weights) if need_w else None
    k = 2**dim
    buf = None
    for sl in ctx.steps(n_samples, n_per, dim):
        c = sl.stop - sl.start
        base, frac, bad = _split(positions[sl], table.dtype)
        rows, wc, u, valid, found = _corners(ctx, ids[sl], base, frac, sl)
        if not bool(bad.any()):
            bad = None
        a = weights[sl]
        g = grad_out[sl]
        n = c * n_per * k
        if buf is None:
            buf = table.new_empty(min(n_samples * n_per * k, max(n, ctx.chunk_corners)), head_dim)
        flat = rows.reshape(-1)
        if need_pos or need_w:
            gathered = torch.index_select(table, 0, flat, out=buf[:n]).view(c, n_per * k, head_dim)
            dots = torch.bmm(gathered, g[:, :, None]).view(c, n_per, k)
            if need_w:
                g_w[sl] = (dots * wc).sum(-1)
                if bad is not None:  # the sample's value is NaN (F.grid_sample)
                    g_w[sl] = g_w[sl].masked_fill(bad, float("nan"))
            if need_pos:
                gc = dots * a[..., None]  # dL / d corner weight
                if found is not None:
                    gc = gc * found
                g_pos[sl] = _factor_grads(gc, u, valid).to(positions.dtype)
                if bad is not None:
                    g_pos[sl] = g_pos[sl].masked_fill(bad[..., None], float("nan"))
        if need_table:  # a non-finite sample has weight 0 on every corner: it touches no row
            wa = wc * a[..., None]
            if found is not None:  # absent corners read row 0 with weight 0: keep a NaN weight off it
                wa = wa.masked_fill(~found, 0.0)
            if bad is not None:
                wa = wa.masked_fill(bad[..., None], 0.0)
            _scatter_table_rows(g_table, flat, wa.view(-1), g, n_per * k)
    return g_table, g_pos, g_w


def _scatter_table_rows(g_table: Tensor, rows: Tensor, weights: Tensor, grad: Tensor, bag: int) -> None:
    """``g_table[rows[m]] += weights[m] * grad[m // bag]`` (the transposed weighted gather).

    Entries are sorted by row and each distinct row's weighted sum is one ``embedding_bag``
    over the chunk's output gradient, so the scatter writes each row once per chunk and no
    ``[entries, head_dim]`` product is formed.
    """
    sorted_rows, perm = torch.sort(rows)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    sums = F.embedding_bag(
        torch.div(perm, bag, rounding_mode="floor"), grad, offsets,
        per_sample_weights=weights.index_select(0, perm), mode="sum",
    )
    g_table.index_add_(0, uniq, sums)


def _factor_grads(gc: Tensor, u: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``d L / d frac`` ``[c, J, D]`` from ``d L / d corner weight`` ``[c, J, 2**D]``.

    Corner weight ``k`` is ``prod_d u[d, bit_d(k)]`` with ``u[d] = (1 - f_d, f_d)`` (times
    the corners' validity with a background), so ``dL/du[d, e]`` sums ``gc`` over the
    other axes weighted by their factors, and ``dL/df_d = dL/du[d, 1] - dL/du[d, 0]``
    (each masked by validity).
    """
    dim = u.shape[-2]
    lead = gc.shape[:-1]
    nl = len(lead)
    g = gc.view(*lead, *([2] * dim))
    out = []
    for d in range(dim):
        t = g
        for e in range(dim):
            if e != d:
                shape = [*lead] + [1] * dim
                shape[nl + e] = 2
                t = t * u[..., e, :].reshape(shape)
        du = t.sum([nl + e for e in range(dim) if e != d]) if dim > 1 else t  # [..., 2]
        if valid is None:
            out.append(du[..., 1] - du[..., 0])
        else:
            out.append(du[..., 1] * valid[..., d, 1] - du[..., 0] * valid[..., d, 0])
    return torch.stack(out, -1)


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------
def _rotation_angle_grad(y: Tensor, gy: Tensor) -> Tensor:
    """``dL/dtheta`` of ``y = R(theta) x`` given ``dL/dy`` (split-half pairs): ``y1 g2 - y2 g1``,
    ``[..., H, d/2]``."""
    half = y.shape[-1] // 2
    return y[..., :half] * gy[..., half:] - y[..., half:] * gy[..., :half]


def _gather_heads(x: Tensor, rows: Tensor, blocks: int, scale: Optional[float] = None) -> Tensor:
    """Rows of ``x [N, H, d]`` as a contiguous head-major block ``[H, blocks, len(rows) / blocks, d]``
    (optionally times ``scale``); chunk-sized temporaries only."""
    n_heads, head_dim = x.shape[1], x.shape[2]
    picked = x.index_select(0, rows).transpose(0, 1)  # [H, n, d] view
    out = torch.empty(n_heads, rows.shape[0], head_dim, dtype=x.dtype, device=x.device)
    if scale is None:
        out.copy_(picked)
    else:
        torch.mul(picked, scale, out=out)
    return out.view(n_heads, blocks, -1, head_dim)


def _scatter_query_rows(dest: Tensor, c: PlanChunk, block: Tensor, scale: Optional[float] = None) -> None:
    """``dest[query] = block`` for the chunk's real queries; ``block`` is ``[H, T, G, d]``,
    ``dest`` is ``[Q, H, d]``."""
    n_heads, head_dim = block.shape[0], block.shape[-1]
    rows = block.view(n_heads, -1, head_dim).index_select(1, c.query_pos).transpose(0, 1)  # [n, H, d] view
    if scale is not None:
        rows = rows * scale
    dest.index_copy_(0, c.query_rows, rows.contiguous())


def _key_major(x: Tensor) -> Tensor:
    """``[H, T, U, d]`` -> contiguous ``[T * U, H, d]`` (``index_add_`` is several times faster
    from a contiguous source)."""
    return x.permute(1, 2, 0, 3).contiguous().view(-1, x.shape[0], x.shape[3])


class NeighborhoodAttentionFunction(torch.autograd.Function):
    """Softmax attention of each query over its window keys, with a recomputing backward.

    Inputs: rotated queries ``q [Q, H, d]``, rotated voxel keys ``k [n_keys, H, d]``, values
    ``v [n_keys, H, d]``, unrotated background keys/values ``bg_k, bg_v [B, L, H, d]`` (or
    None), the RoPE frequencies ``freqs [H', d/2, D+1]`` (background keys only), the plan and
    the score scale. Output ``[Q, H, d]`` (zero for queries without keys).

    Per chunk of tiles (:class:`PlanChunk`): the tiles' queries and keys are gathered
    head-major into ``[H, T, G, d]`` / ``[H, T, U, d]`` blocks, scores by one batched matmul,
    masked to each query's windows, then one batched matmul with the values. Background
    slots: per level the queries are rotated back by their window centre, ``R(-u_centre) q``,
    and scored by one matmul against the background key rotated at each slot offset
    (:func:`~sparse_msda.functional.neighborhood_plan.background_tables`); they join the same softmax and aggregate the background
    value of their level. The backward recomputes the scores chunk by chunk
    (flash-attention style, from a saved ``[H, Q]`` log-sum-exp), scatters key/value
    gradients with ``index_add_`` and has closed-form RoPE gradients for the background path
    (frequencies included). Saved: ``q, k, v, bg_k, bg_v, freqs``, the output, the
    log-sum-exp and the plan's integer indices and masks; no ``[pairs, embed_dim]`` tensor is
    kept, and the per-chunk buffers are bounded by the plan's chunk size.
    """

    @staticmethod
    @one_thread_when_deterministic  # thread-count invariant results (functional/determinism.py)
    def forward(ctx, q, k, v, bg_k, bg_v, freqs, plan: NeighborhoodPlan, scale: float):
        n_q, n_heads, head_dim = q.shape
        with_bg = bg_k is not None
        neg_inf = float("-inf")
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        kk, vv = k, v
        if k.shape[0] == 0:  # no voxel key anywhere: gather from a masked-out zero row
            kk, vv = k.new_zeros(1, n_heads, head_dim), v.new_zeros(1, n_heads, head_dim)
        out = q.new_zeros(n_q, n_heads, head_dim)
        lse_h = q.new_zeros(n_heads, n_q)
        if with_bg:
            tables = background_tables(bg_k, freqs, plan)[0].permute(0, 2, 3, 1).contiguous()  # [B, H, d, K]
        kept = plan.n_padded_pairs * n_heads
        if with_bg:  # background weights [H, n, K] and centre cos/sin [L, H', n, d/2] x 2 per chunk
            kept += n_q * (n_heads * plan.slot_level.shape[0] + plan.n_levels * (freqs.shape[0] + n_heads) * head_dim)
        keep = kept * q.element_size() <= tuning.SAVED_PROBABILITIES_BYTES
        # the unshifted softmax is only safe in float32 / float64: exp overflows float16 above ~11
        low_precision = q.dtype not in (torch.float32, torch.float64)
        saved = [] if keep else None  # per chunk: (unnormalised weights [H, T, G, U], 1 / sum [H, T, G])
        # |score| <= scale |q_h| |k_h| (rotations keep norms): where a chunk's bound is small the
        # softmax needs no max shift (exp cannot overflow or underflow), saving two passes
        q_norm = torch.linalg.vector_norm(q, dim=-1) * scale  # [Q, H]
        k_norm = torch.linalg.vector_norm(kk, dim=-1)  # [N, H]
        if with_bg:
            bg_norm = torch.linalg.vector_norm(bg_k, dim=-1).amax(1)  # [B, H]
        for c in plan.chunks:
            T, G, U = c.shape
            n = T * G
            qn = q_norm.index_select(0, c.query_gather).amax(0)  # [H]
            kn = k_norm.index_select(0, c.key_gather).amax(0)
            if with_bg:
                kn = torch.maximum(kn, bg_norm[c.batch])
            shift = low_precision or float((qn * kn).max()) > tuning.SOFTMAX_NO_SHIFT_BOUND
            qp = _gather_heads(q, c.query_gather, T, scale)  # [H, T, G, d]
            kp = _gather_heads(kk, c.key_gather, T)  # [H, T, U, d]
            s = torch.matmul(qp, kp.transpose(-1, -2)).masked_fill_(c.masked, neg_inf)  # [H, T, G, U]
            del kp
            m = s.amax(-1) if shift else q.new_zeros(n_heads, T, G)  # [H, T, G]
            if with_bg:  # background slots of the real (not padding) queries: rows c.query_pos
                pos = c.query_pos
                s_bg = []  # scores per level, exp-ed later in place
                u_c = _centre_positions(plan.centres.index_select(0, c.query_rows), plan)  # [r, L, D+1]
                cos_c, sin_c = rope_cos_sin(torch.einsum("nlk,hjk->lhnj", u_c, freqs.to(torch.float64)), q.dtype)
                qf = qp.view(n_heads, n, head_dim).index_select(1, pos)  # [H, r, d]
                ql_all = rotate_pairs_back(qf, cos_c, sin_c)  # R(-u_centre) q at every level, [L, H, r, d]
                m_bg = None
                for level, (k0, k1) in enumerate(plan.slot_ranges):
                    sl = torch.matmul(ql_all[level], tables[c.batch, :, :, k0:k1]).masked_fill_(c.bg_masked[:, :, k0:k1], neg_inf)
                    s_bg.append(sl)  # [H, r, K_l]
                    if shift:
                        m_bg = sl.amax(-1) if m_bg is None else torch.maximum(m_bg, sl.amax(-1))
                if shift:
                    m_flat = m.view(n_heads, n)
                    m_flat.index_copy_(1, pos, torch.maximum(m_flat.index_select(1, pos), m_bg))
            if shift:
                m = torch.where(m > neg_inf, m, zero)
                s.sub_(m[..., None])
            s.exp_()
            z = s.sum(-1)  # [H, T, G]
            o = torch.matmul(s, _gather_heads(vv, c.key_gather, T))  # [H, T, G, d]
            if with_bg:
                mr = m.view(n_heads, n).index_select(1, pos)[..., None]  # [H, r, 1]
                z_bg, o_bg, a_sums = 0.0, 0.0, []
                for level, sl in enumerate(s_bg):
                    a_l = (sl.sub_(mr) if shift else sl).exp_().sum(-1)  # [H, r]
                    a_sums.append(a_l)
                    z_bg = z_bg + a_l
                    o_bg = o_bg + a_l[..., None] * bg_v[c.batch, level][:, None, :]
                z.view(n_heads, n).index_add_(1, pos, z_bg)
                o.view(n_heads, n, head_dim).index_add_(1, pos, o_bg)
            has = z > 0
            z_inv = torch.where(has, 1.0 / z, zero)
            o *= z_inv[..., None]
            if saved is not None:
                saved.append((s, z_inv) + ((s_bg, cos_c, sin_c, ql_all, a_sums) if with_bg else ()))
            _scatter_query_rows(out, c, o)
            lse_h.index_copy_(1, c.query_rows, torch.where(has, m + torch.log(z), zero).view(n_heads, n).index_select(1, c.query_pos))
        ctx.save_for_backward(q, k, v, bg_k, bg_v, freqs, out, lse_h)
        ctx.plan, ctx.scale, ctx.weights = plan, scale, saved
        return out

    @staticmethod
    @once_differentiable
    @one_thread_when_deterministic
    def backward(ctx, grad_out):
        q, k, v, bg_k, bg_v, freqs, out, lse_h = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        need_q, need_k, need_v, need_bk, need_bv, need_f = ctx.needs_input_grad[:6]
        with_bg = bg_k is not None
        n_q, n_heads, head_dim = q.shape
        neg_inf = float("-inf")
        g = grad_out.contiguous()
        delta_h = torch.einsum("qhd,qhd->hq", g, out).contiguous()  # [H, Q] = sum over keys of a <g, v>
        if k.shape[0] == 0:
            k, v = k.new_zeros(1, n_heads, head_dim), v.new_zeros(1, n_heads, head_dim)
        dq = q.new_zeros(n_q, n_heads, head_dim)
        dk = k.new_zeros(plan.n_keys + 1, n_heads, head_dim)
        dv = v.new_zeros(plan.n_keys + 1, n_heads, head_dim)
        if with_bg:
            tables, cos_o, sin_o = background_tables(bg_k, freqs, plan)  # [B, K, H, d]
            tables_t = tables.permute(0, 2, 3, 1).contiguous()  # [B, H, d, K]
            dtables = torch.zeros_like(tables_t) if (need_bk or need_f) else None
            dbv = torch.zeros_like(bg_v) if need_bv else None
            freqs64 = freqs.to(torch.float64)
            dfreqs = torch.zeros_like(freqs64) if need_f else None
        weights = ctx.weights
        for i, c in enumerate(plan.chunks):
            T, G, U = c.shape
            n = T * G
            qi = c.query_gather
            qp = _gather_heads(q, qi, T, scale)
            gp = _gather_heads(g, qi, T)
            kp = _gather_heads(k, c.key_gather, T)
            vp = _gather_heads(v, c.key_gather, T)
            lp = lse_h.index_select(1, qi).view(n_heads, T, G, 1)
            dp = delta_h.index_select(1, qi).view(n_heads, T, G, 1)
            if weights is not None:  # kept by the forward: a = w / z, folded into the small factors
                a, z_inv = weights[i][0], weights[i][1][..., None]  # [H, T, G, U], [H, T, G, 1]
                g_a, dp_a = gp * z_inv, dp * z_inv
            else:  # recomputed
                a = torch.matmul(qp, kp.transpose(-1, -2)).masked_fill_(c.masked, neg_inf).sub_(lp).exp_()  # [H, T, G, U]
                g_a, dp_a = gp, dp
            ds = torch.matmul(g_a, vp.transpose(-1, -2)).sub_(dp_a).mul_(a)  # [H, T, G, U]
            del vp
            keys = c.key.view(-1)
            if need_v:
                dv.index_add_(0, keys, _key_major(torch.matmul(a.transpose(-1, -2), g_a)))
            del a, g_a
            if need_k:
                dk.index_add_(0, keys, _key_major(torch.matmul(ds.transpose(-1, -2), qp)))
            dq_c = torch.matmul(ds, kp).view(n_heads, n, head_dim)  # w.r.t. the scaled query
            del ds, kp
            if with_bg:  # rows of the real queries, as in the forward
                b, pos = c.batch, c.query_pos
                qf = qp.view(n_heads, n, head_dim).index_select(1, pos)
                gf = gp.view(n_heads, n, head_dim).index_select(1, pos)
                lf = lp.view(n_heads, n).index_select(1, pos)[..., None]
                df = dp.view(n_heads, n).index_select(1, pos)[..., None]
                u_c = _centre_positions(plan.centres.index_select(0, c.query_rows), plan)  # [r, L, D+1]
                if weights is not None:
                    s_bg, cos_c, sin_c, ql_all, a_sums = weights[i][2:]
                    z_inv = weights[i][1].view(n_heads, n).index_select(1, pos)[..., None]
                else:
                    cos_c, sin_c = rope_cos_sin(torch.einsum("nlk,hjk->lhnj", u_c, freqs64), q.dtype)
                    ql_all = rotate_pairs_back(qf, cos_c, sin_c)  # [L, H, r, d]
                dql_all = torch.empty_like(ql_all) if (need_q or need_f) else None
                for level, (k0, k1) in enumerate(plan.slot_ranges):
                    ql = ql_all[level]
                    tab = tables_t[b, :, :, k0:k1]  # [H, d, K_l]
                    gv = (gf * bg_v[b, level][:, None, :]).sum(-1, keepdim=True)  # <g, bg_v>, [H, n, 1]
                    if weights is not None:  # a = w / z, folded into the small factors
                        w = s_bg[level]
                        if need_bv:
                            dbv[b, level] += torch.einsum("hn,hnd->hd", a_sums[level] * z_inv[..., 0], gf)
                        ds = w * ((gv - df) * z_inv)  # [H, n, K_l]
                    else:
                        a = torch.matmul(ql, tab).masked_fill_(c.bg_masked[:, :, k0:k1], neg_inf).sub_(lf).exp_()
                        if need_bv:
                            dbv[b, level] += torch.einsum("hn,hnd->hd", a.sum(-1), gf)
                        ds = a.mul_(gv - df)  # [H, n, K_l]
                    if dtables is not None:
                        dtables[b, :, :, k0:k1] += torch.matmul(ql.transpose(-1, -2), ds)
                    if dql_all is not None:
                        torch.matmul(ds, tab.transpose(-1, -2), out=dql_all[level])  # [H, r, d]
                    del ds
                if need_q:  # all levels rotated back at once
                    dq_c.index_add_(1, pos, rotate_pairs(dql_all, cos_c, sin_c).sum(0))
                if need_f:  # ql = R(-theta) q: dtheta = -(ql1 dql2 - ql2 dql1); one reduction
                    dth = _rotation_angle_grad(ql_all, dql_all)  # [L, H, r, d/2]
                    if freqs.shape[0] != n_heads:
                        dth = dth.sum(1, keepdim=True)
                    u_l = u_c.to(q.dtype).transpose(0, 1)  # [L, r, D+1]
                    dfreqs -= torch.einsum("lhnj,lnk->hjk", dth, u_l).to(torch.float64)
            if need_q:
                _scatter_query_rows(dq, c, dq_c, scale)
        dq = dq if need_q else None
        dk = dk[: plan.n_keys] if need_k else None
        dv = dv[: plan.n_keys] if need_v else None
        dbk = None
        if with_bg and (need_bk or need_f):
            dtab = dtables.permute(0, 3, 1, 2)  # [B, K, H, d]
            if need_bk:  # tables[b, k] = R(u_offset(k)) bg_k[b, level(k)]
                back = rotate_pairs(dtab, cos_o, -sin_o)  # [B, K, H, d]
                dbk = torch.zeros_like(bg_k).index_add_(1, plan.slot_level, back)
            if need_f:
                dth = _rotation_angle_grad(tables, dtab).sum(0)  # [K, H, d/2]
                if freqs.shape[0] != n_heads:
                    dth = dth.sum(1, keepdim=True)
                dfreqs += torch.einsum("khj,kc->hjc", dth.to(torch.float64), _offset_positions(plan))
        if with_bg:
            dfreqs = dfreqs.to(freqs.dtype) if need_f else None
            return dq, dk, dv, dbk, dbv, dfreqs, None, None
        return dq, dk, dv, None, None, None, None, None


def weighted_gather(table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling) -> Tensor:
    """``out[s] = sum_j weights[s, j] * interp(table, positions[s, j])`` (see
    :func:`sparse_msda.functional.sampling.sparse_weighted_gather`), in PyTorch ops: the samples'
    base cells hashed here, then the ``sparse_msda::weighted_gather`` op (:func:`gather_forward`)."""
    with torch.no_grad():
        ids = _base_cell_ids(sampling, positions.detach())
    return ops.weighted_gather(table, positions, weights, ids, *sampling.op_args(), "reference")


def neighborhood_attention(q, k, v, plan, background_k, background_v, rope_freqs, scale) -> Tensor:
    """``[Q, H, d]`` softmax attention of each query over its plan's keys (see
    :func:`sparse_msda.functional.neighborhood.sparse_neighborhood_attention`), in PyTorch ops."""
    return NeighborhoodAttentionFunction.apply(q, k, v, background_k, background_v, rope_freqs, plan, scale)
