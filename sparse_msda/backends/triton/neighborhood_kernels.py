"""Triton kernels of the multi-level neighborhood attention: flash-style forward and backward
over the plan's tiles (:class:`sparse_msda.functional.neighborhood.NeighborhoodTiles`).

One program per (tile, head). The tile's queries (at most ``BLOCK_Q``) are loaded once; its key
entries are visited in blocks of ``BLOCK_K``: a query sees an entry iff the entry's cell lies in
the query's own window at the entry's level (``|cell - centre[q, level]| <= radius[level]`` per
axis). Scores, an online softmax (running maximum and sum) and the value sum are accumulated in
float32 (float64 for float64 inputs) whatever the input dtype. With a background, each level's
window slots follow in blocks of ``BLOCK_K``: a slot is a background key iff its cell is inside
the level's grid and holds no voxel (``occupied [Q, K]``, marked from the tiles by
:func:`mark_occupied_kernel`); it is scored with the query rotated back by its window centre
(``ql [Q, L, H, d]``, computed outside by autograd ops) against the background key rotated at the
slot's offset (``tables [B, K, H, d]``), and adds the level's background value. The forward saves
the ``[Q, H]`` log-sum-exp; the backward recomputes the probabilities from it and adds key, value,
table and background-value gradients with ``tl.atomic_add`` (tiles share keys); query rows belong
to one tile, so their gradients are plain stores.

Products use ``tl.dot`` (IEEE float32, no TF32) or, for float64, a broadcast multiply-and-sum
(``F64`` constexpr), so the kernels also compile where ``tl.dot`` has no float64 path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, F64: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in float32 (IEEE) or float64."""
    if F64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tile_queries(qorder_ptr, qstart_ptr, qcount_ptr, tile, BLOCK_Q: tl.constexpr):
    qi = tl.arange(0, BLOCK_Q)
    q0 = tl.load(qstart_ptr + tile)
    qn = tl.load(qcount_ptr + tile)
    q_mask = qi < qn
    qid = tl.load(qorder_ptr + q0 + qi, mask=q_mask, other=0)
    return qid, q_mask


@triton.jit
def _visible(kcell_ptr, klev, e, e_mask, centres_ptr, radius_ptr, qid, q_mask,
             N_LEVELS: tl.constexpr, DIM: tl.constexpr):
    """``[BQ, BK]``: query ``q`` sees entry ``e`` (its cell lies in q's window at e's level)."""
    r = tl.load(radius_ptr + klev, mask=e_mask, other=0)
    vis = q_mask[:, None] & e_mask[None, :]
    for d in tl.static_range(DIM):
        cell = tl.load(kcell_ptr + e * DIM + d, mask=e_mask, other=0)
        cen = tl.load(centres_ptr + (qid[:, None] * N_LEVELS + klev[None, :]) * DIM + d, mask=vis, other=0)
        vis = vis & (tl.abs(cell[None, :] - cen) <= r[None, :])
    return vis


@triton.jit
def _slot_cells(slot_off_ptr, shapes_ptr, centres_ptr, qid, q_mask, sl, s_mask, level,
                N_LEVELS: tl.constexpr, DIM: tl.constexpr):
    """``[BQ, BS]``: slot ``sl`` of ``level`` lies inside the level's grid for query ``q``."""
    inb = q_mask[:, None] & s_mask[None, :]
    for d in tl.static_range(DIM):
        off = tl.load(slot_off_ptr + sl * DIM + d, mask=s_mask, other=0)
        cen = tl.load(centres_ptr + (qid * N_LEVELS + level) * DIM + d, mask=q_mask, other=0)
        n = tl.load(shapes_ptr + level * DIM + d)
        cell = cen[:, None] + off[None, :]
        inb = inb & (cell >= 0) & (cell < n)
    return inb


@triton.jit
def mark_occupied_kernel(
    qorder_ptr, qstart_ptr, qcount_ptr, kstart_ptr, kcount_ptr, krow_ptr, klev_ptr, kcell_ptr,
    centres_ptr, radius_ptr, size_ptr, slot_start_ptr, occ_ptr, N_SLOTS,
    N_LEVELS: tl.constexpr, DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``occupied[q, slot] = 1`` for every window slot of query ``q`` that holds a voxel (one
    program per tile; the tile's key entries are exactly the voxels of its queries' windows)."""
    tile = tl.program_id(0)
    qid, q_mask = _tile_queries(qorder_ptr, qstart_ptr, qcount_ptr, tile, BLOCK_Q)
    k0 = tl.load(kstart_ptr + tile)
    kn = tl.load(kcount_ptr + tile)
    for e0 in range(0, kn, BLOCK_K):
        ei = e0 + tl.arange(0, BLOCK_K)
        e_mask = ei < kn
        e = k0 + ei
        klev = tl.load(klev_ptr + e, mask=e_mask, other=0)
        r = tl.load(radius_ptr + klev, mask=e_mask, other=0)
        size = tl.load(size_ptr + klev, mask=e_mask, other=1)
        vis = q_mask[:, None] & e_mask[None, :]
        slot = tl.zeros((BLOCK_Q, BLOCK_K), tl.int64)
        for d in tl.static_range(DIM):
            cell = tl.load(kcell_ptr + e * DIM + d, mask=e_mask, other=0)
            cen = tl.load(centres_ptr + (qid[:, None] * N_LEVELS + klev[None, :]) * DIM + d, mask=vis, other=0)
            rel = cell[None, :] - cen + r[None, :]
            vis = vis & (rel >= 0) & (rel <= 2 * r[None, :])
            slot = slot * size[None, :] + rel
        slot = slot + tl.load(slot_start_ptr + klev, mask=e_mask, other=0)[None, :]
        ones = tl.full((BLOCK_Q, BLOCK_K), 1, tl.int8)
        tl.store(occ_ptr + qid[:, None] * N_SLOTS + slot, ones, mask=vis)


@triton.jit
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, ql_ptr, tab_ptr, bgv_ptr, occ_ptr, out_ptr, lse_ptr,
    qorder_ptr, qstart_ptr, qcount_ptr, tbatch_ptr, kstart_ptr, kcount_ptr, krow_ptr, klev_ptr, kcell_ptr,
    centres_ptr, radius_ptr, shapes_ptr, slot_start_ptr, slot_off_ptr,
    scale, N_SLOTS,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, N_LEVELS: tl.constexpr, DIM: tl.constexpr, HAS_BG: tl.constexpr,
    F64: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    qid, q_mask = _tile_queries(qorder_ptr, qstart_ptr, qcount_ptr, tile, BLOCK_Q)
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < HEAD_DIM
    if F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    qv = tl.load(q_ptr + (qid[:, None] * H + h) * HEAD_DIM + dd[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0)
    qv = qv.to(acc_t) * scale
    m_i = tl.full((BLOCK_Q,), float("-inf"), acc_t)
    l_i = tl.zeros((BLOCK_Q,), acc_t)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), acc_t)
    k0 = tl.load(kstart_ptr + tile)
    kn = tl.load(kcount_ptr + tile)
    for e0 in range(0, kn, BLOCK_K):
        ei = e0 + tl.arange(0, BLOCK_K)
        e_mask = ei < kn
        e = k0 + ei
        klev = tl.load(klev_ptr + e, mask=e_mask, other=0)
        krow = tl.load(krow_ptr + e, mask=e_mask, other=0)
        vis = _visible(kcell_ptr, klev, e, e_mask, centres_ptr, radius_ptr, qid, q_mask, N_LEVELS, DIM)
        kd_mask = e_mask[:, None] & d_mask[None, :]
        kv = tl.load(k_ptr + (krow[:, None] * H + h) * HEAD_DIM + dd[None, :], mask=kd_mask, other=0.0).to(acc_t)
        vv = tl.load(v_ptr + (krow[:, None] * H + h) * HEAD_DIM + dd[None, :], mask=kd_mask, other=0.0).to(acc_t)
        s = tl.where(vis, _mm(qv, tl.trans(kv), F64), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p, vv, F64)
        m_i = m_new
    if HAS_BG:
        b = tl.load(tbatch_ptr + tile)
        for level in tl.static_range(N_LEVELS):
            s_lo = tl.load(slot_start_ptr + level)
            s_hi = tl.load(slot_start_ptr + level + 1)
            qd_mask = q_mask[:, None] & d_mask[None, :]
            qlv = tl.load(ql_ptr + ((qid[:, None] * N_LEVELS + level) * H + h) * HEAD_DIM + dd[None, :], mask=qd_mask, other=0.0)
            qlv = qlv.to(acc_t) * scale
            bv = tl.load(bgv_ptr + ((b * N_LEVELS + level) * H + h) * HEAD_DIM + dd, mask=d_mask, other=0.0).to(acc_t)
            for s0 in range(s_lo, s_hi, BLOCK_K):
                sl = s0 + tl.arange(0, BLOCK_K)
                s_mask = sl < s_hi
                ok = _slot_cells(slot_off_ptr, shapes_ptr, centres_ptr, qid, q_mask, sl, s_mask, level, N_LEVELS, DIM)
                occ = tl.load(occ_ptr + qid[:, None] * N_SLOTS + sl[None, :], mask=ok, other=1)
                ok = ok & (occ == 0)
                tv = tl.load(tab_ptr + ((b * N_SLOTS + sl[:, None]) * H + h) * HEAD_DIM + dd[None, :],
                             mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(acc_t)
                s = tl.where(ok, _mm(qlv, tl.trans(tv), F64), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                ps = tl.sum(p, axis=1)
                l_i = l_i * alpha + ps
                acc = acc * alpha[:, None] + ps[:, None] * bv[None, :]
                m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
    tl.store(out_ptr + (qid[:, None] * H + h) * HEAD_DIM + dd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + qid * H + h, lse.to(lse_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, ql_ptr, tab_ptr, bgv_ptr, occ_ptr, gout_ptr, lse_ptr, delta_ptr,
    dq_ptr, dk_ptr, dv_ptr, dql_ptr, dtab_ptr, dbgv_ptr,
    qorder_ptr, qstart_ptr, qcount_ptr, tbatch_ptr, kstart_ptr, kcount_ptr, krow_ptr, klev_ptr, kcell_ptr,
    centres_ptr, radius_ptr, shapes_ptr, slot_start_ptr, slot_off_ptr,
    scale, N_SLOTS,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, N_LEVELS: tl.constexpr, DIM: tl.constexpr, HAS_BG: tl.constexpr,
    F64: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recomputes ``p = exp(s - lse)``; ``ds = p (<g, v> - delta)`` with ``delta = <g, out>``.
    Gradients w.r.t. ``q``/``ql`` are stored (one tile per query), those of ``k``, ``v``,
    ``tables`` and the background values added atomically (float32/float64 buffers)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    qid, q_mask = _tile_queries(qorder_ptr, qstart_ptr, qcount_ptr, tile, BLOCK_Q)
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < HEAD_DIM
    qd_mask = q_mask[:, None] & d_mask[None, :]
    if F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    qv = tl.load(q_ptr + (qid[:, None] * H + h) * HEAD_DIM + dd[None, :], mask=qd_mask, other=0.0).to(acc_t) * scale
    g = tl.load(gout_ptr + (qid[:, None] * H + h) * HEAD_DIM + dd[None, :], mask=qd_mask, other=0.0).to(acc_t)
    lse = tl.load(lse_ptr + qid * H + h, mask=q_mask, other=0.0).to(acc_t)
    delta = tl.load(delta_ptr + qid * H + h, mask=q_mask, other=0.0).to(acc_t)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), acc_t)
    k0 = tl.load(kstart_ptr + tile)
    kn = tl.load(kcount_ptr + tile)
    for e0 in range(0, kn, BLOCK_K):
        ei = e0 + tl.arange(0, BLOCK_K)
        e_mask = ei < kn
        e = k0 + ei
        klev = tl.load(klev_ptr + e, mask=e_mask, other=0)
        krow = tl.load(krow_ptr + e, mask=e_mask, other=0)
        vis = _visible(kcell_ptr, klev, e, e_mask, centres_ptr, radius_ptr, qid, q_mask, N_LEVELS, DIM)
        kd_mask = e_mask[:, None] & d_mask[None, :]
        kptrs = (krow[:, None] * H + h) * HEAD_DIM + dd[None, :]
        kv = tl.load(k_ptr + kptrs, mask=kd_mask, other=0.0).to(acc_t)
        vv = tl.load(v_ptr + kptrs, mask=kd_mask, other=0.0).to(acc_t)
        s = tl.where(vis, _mm(qv, tl.trans(kv), F64), float("-inf"))
        p = tl.exp(s - lse[:, None])  # 0 where not visible
        dp = _mm(g, tl.trans(vv), F64)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, kv, F64)
        tl.atomic_add(dk_ptr + kptrs, _mm(tl.trans(ds), qv, F64), mask=kd_mask)
        tl.atomic_add(dv_ptr + kptrs, _mm(tl.trans(p), g, F64), mask=kd_mask)
    tl.store(dq_ptr + (qid[:, None] * H + h) * HEAD_DIM + dd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)
    if HAS_BG:
        b = tl.load(tbatch_ptr + tile)
        for level in tl.static_range(N_LEVELS):
            s_lo = tl.load(slot_start_ptr + level)
            s_hi = tl.load(slot_start_ptr + level + 1)
            qlptrs = ((qid[:, None] * N_LEVELS + level) * H + h) * HEAD_DIM + dd[None, :]
            qlv = tl.load(ql_ptr + qlptrs, mask=qd_mask, other=0.0).to(acc_t) * scale
            bvptrs = ((b * N_LEVELS + level) * H + h) * HEAD_DIM + dd
            bv = tl.load(bgv_ptr + bvptrs, mask=d_mask, other=0.0).to(acc_t)
            gv = tl.sum(g * bv[None, :], axis=1)  # <g, bg_v>: the same for every slot of the level
            dql = tl.zeros((BLOCK_Q, BLOCK_D), acc_t)
            psum = tl.zeros((BLOCK_Q,), acc_t)
            for s0 in range(s_lo, s_hi, BLOCK_K):
                sl = s0 + tl.arange(0, BLOCK_K)
                s_mask = sl < s_hi
                ok = _slot_cells(slot_off_ptr, shapes_ptr, centres_ptr, qid, q_mask, sl, s_mask, level, N_LEVELS, DIM)
                occ = tl.load(occ_ptr + qid[:, None] * N_SLOTS + sl[None, :], mask=ok, other=1)
                ok = ok & (occ == 0)
                tptrs = ((b * N_SLOTS + sl[:, None]) * H + h) * HEAD_DIM + dd[None, :]
                td_mask = s_mask[:, None] & d_mask[None, :]
                tv = tl.load(tab_ptr + tptrs, mask=td_mask, other=0.0).to(acc_t)
                s = tl.where(ok, _mm(qlv, tl.trans(tv), F64), float("-inf"))
                p = tl.exp(s - lse[:, None])
                psum += tl.sum(p, axis=1)
                ds = p * (gv - delta)[:, None]
                dql += _mm(ds, tv, F64)
                tl.atomic_add(dtab_ptr + tptrs, _mm(tl.trans(ds), qlv, F64), mask=td_mask)
            tl.store(dql_ptr + qlptrs, (dql * scale).to(dql_ptr.dtype.element_ty), mask=qd_mask)
            tl.atomic_add(dbgv_ptr + bvptrs, tl.sum(psum[:, None] * g, axis=0), mask=d_mask)
