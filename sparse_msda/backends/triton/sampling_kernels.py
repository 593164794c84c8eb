"""Triton kernels of the deformable sampling (bilinear / trilinear weighted gather) and its backward.

Semantics: those of :class:`sparse_msda.functional.sampling._SparseSample` (``F.grid_sample(
align_corners=False, padding_mode='zeros')`` on the implicitly densified map), see
:mod:`sparse_msda.functional.sampling`. The kernels read the index's corner-row table
``[T, 2**D]`` (``-1`` = absent corner) through each sample's base-cell id, as mmcv's
``ms_deform_attn`` reads its dense value map: one program per block of ``BLOCK_S`` samples
(each sample is one (query, head) output row), all ``J`` points and ``2**D`` corners of a sample
in that program. The table gradient is scattered with ``tl.atomic_add`` into a float32 (float64
for float64 tables) buffer: the summation order of one table row is not fixed, so the table
gradient is not bitwise deterministic (a deterministic variant is not provided).

Importing this module decorates the kernels with ``triton.jit``: with ``TRITON_INTERPRET=1`` set
before that, they run on CPU tensors through Triton's interpreter (how the tests check them).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: base cells are clamped to [-2, 2**40] (as sparse_msda.functional.sampling.BASE_CELL_LIMIT)
_BASE_LIMIT = tl.constexpr(1099511627776.0)


@triton.jit
def _axis(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, d: tl.constexpr, DIM: tl.constexpr, HAS_BG: tl.constexpr,
          POS_F64: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """Axis ``d`` of each sample's ``2**D`` corners: factors ``F [BS, KC]`` (``1 - f`` or ``f``,
    times the corner's in-grid validity on this axis with a background), their derivatives
    ``dF/df`` and the ``[BS]`` non-finite mask of the coordinate. The fractional part of a
    non-finite coordinate is 0 and its base cell -2 (outside), as in the reference."""
    p = tl.load(pos_ptr + off * DIM + d, mask=s_mask, other=0.5)
    if POS_F64:
        p = p.to(tl.float64)
    else:
        p = p.to(tl.float32)
    shifted = p - 0.5
    fl = tl.floor(shifted)
    bad = (p != p) | (tl.abs(p) == float("inf"))
    frac = tl.where(bad, 0.0, shifted - fl)
    if COMPUTE_F64:
        frac = frac.to(tl.float64)
    else:
        frac = frac.to(tl.float32)
    bit = ((kk >> (DIM - 1 - d)) & 1)[None, :] == 1  # [1, KC]: corner k is at base + 1 on this axis
    one = tl.full(frac.shape, 1.0, frac.dtype)
    if HAS_BG:
        base = tl.where(fl != fl, -2.0, fl)
        base = tl.minimum(tl.maximum(base, -2.0), _BASE_LIMIT).to(tl.int64)
        n = tl.load(shapes_ptr + lvl * DIM + d, mask=s_mask, other=0)
        ok_lo = tl.where((base >= 0) & (base < n), one, 0.0)
        ok_hi = tl.where((base >= -1) & (base < n - 1), one, 0.0)
    else:  # the corner table already says which corners exist (outside the grid: absent)
        ok_lo = one
        ok_hi = one
    fac = tl.where(bit, (frac * ok_hi)[:, None], ((1.0 - frac) * ok_lo)[:, None])
    dfac = tl.where(bit, ok_hi[:, None], -ok_lo[:, None])
    return fac, dfac, bad


@triton.jit
def _geometry(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, DIM: tl.constexpr, HAS_BG: tl.constexpr,
              POS_F64: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """Corner weights ``w [BS, KC]``, their derivatives w.r.t. each fractional coordinate
    ``dw0, dw1, dw2`` (``dw2`` zero in 2D) and the ``[BS]`` mask of non-finite samples."""
    f0, d0, bad0 = _axis(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, 0, DIM, HAS_BG, POS_F64, COMPUTE_F64)
    f1, d1, bad1 = _axis(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, 1, DIM, HAS_BG, POS_F64, COMPUTE_F64)
    if DIM == 3:
        f2, d2, bad2 = _axis(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, 2, DIM, HAS_BG, POS_F64, COMPUTE_F64)
    else:
        f2 = tl.full(f0.shape, 1.0, f0.dtype)
        d2 = tl.zeros(f0.shape, f0.dtype)
        bad2 = bad0 != bad0
    w = f0 * f1 * f2
    return w, d0 * f1 * f2, f0 * d1 * f2, f0 * f1 * d2, bad0 | bad1 | bad2


@triton.jit
def _rows(ctab_ptr, ids, kk, b, lvl, h, s_mask, N_HEADS, N_LEVELS, BG_OFFSET, N_CORNERS: tl.constexpr, HAS_BG: tl.constexpr):
    """Table rows ``[BS, KC]`` (int64) of the corners and the mask of corners that hold a row
    (present voxels; with a background, every corner: absent ones read the background row)."""
    cr = tl.load(ctab_ptr + ids[:, None] * N_CORNERS + kk[None, :], mask=s_mask[:, None], other=-1).to(tl.int64)
    found = cr >= 0
    if HAS_BG:
        fill = (b * N_LEVELS + lvl) * N_HEADS + h + BG_OFFSET
        row = tl.where(found, cr * N_HEADS + h[:, None], fill[:, None])
        present = s_mask[:, None] & (kk[None, :] >= 0)
    else:
        row = tl.where(found, cr * N_HEADS + h[:, None], 0)
        present = s_mask[:, None] & found
    return row, present


@triton.jit
def sample_forward_kernel(
    table_ptr, pos_ptr, w_ptr, ids_ptr, ctab_ptr, batch_ptr, level_ptr, head_ptr, shapes_ptr, out_ptr,
    S, J, C, N_HEADS, N_LEVELS, BG_OFFSET,
    sb_s, sb_j, sl_s, sl_j, sh_s, sh_j,
    DIM: tl.constexpr, N_CORNERS: tl.constexpr, HAS_BG: tl.constexpr, POS_F64: tl.constexpr,
    COMPUTE_F64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[s] = sum_j w[s, j] sum_k c_k table[row(s, j, k)]``; NaN rows for non-finite samples."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s64 = s.to(tl.int64)
    kk = tl.arange(0, N_CORNERS)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    if COMPUTE_F64:
        acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float64)
    else:
        acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    any_bad = s < 0
    for j in range(0, J):
        off = s64 * J + j
        lvl = tl.load(level_ptr + s64 * sl_s + j * sl_j, mask=s_mask, other=0)
        w, _, _, _, bad = _geometry(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, DIM, HAS_BG, POS_F64, COMPUTE_F64)
        any_bad = any_bad | bad
        ids = tl.load(ids_ptr + off, mask=s_mask, other=0).to(tl.int64)
        b = tl.load(batch_ptr + s64 * sb_s + j * sb_j, mask=s_mask, other=0)
        h = tl.load(head_ptr + s64 * sh_s + j * sh_j, mask=s_mask, other=0)
        row, present = _rows(ctab_ptr, ids, kk, b, lvl, h, s_mask, N_HEADS, N_LEVELS, BG_OFFSET, N_CORNERS, HAS_BG)
        a = tl.load(w_ptr + off, mask=s_mask, other=0.0).to(acc.dtype)
        wa = tl.where(present, w * a[:, None], 0.0)  # [BS, KC]
        m = present & (wa != 0.0)
        vals = tl.load(table_ptr + row[:, :, None] * C + ch[None, None, :], mask=m[:, :, None] & c_mask[None, None, :], other=0.0)
        acc += tl.sum(wa[:, :, None] * vals.to(acc.dtype), axis=1)
    acc = tl.where(any_bad[:, None], float("nan"), acc)
    tl.store(out_ptr + s64[:, None] * C + ch[None, :], acc.to(out_ptr.dtype.element_ty), mask=s_mask[:, None] & c_mask[None, :])


@triton.jit
def sample_backward_kernel(
    table_ptr, pos_ptr, w_ptr, ids_ptr, ctab_ptr, batch_ptr, level_ptr, head_ptr, shapes_ptr, gout_ptr,
    gtable_ptr, gpos_ptr, gw_ptr,
    S, J, C, N_HEADS, N_LEVELS, BG_OFFSET,
    sb_s, sb_j, sl_s, sl_j, sh_s, sh_j,
    DIM: tl.constexpr, N_CORNERS: tl.constexpr, HAS_BG: tl.constexpr, POS_F64: tl.constexpr,
    COMPUTE_F64: tl.constexpr, NEED_TABLE: tl.constexpr, NEED_POS: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradients of the table (atomics into a float32/float64 buffer), positions and weights;
    ``BLOCK_C`` covers all ``C`` channels (the per-corner dot products need the whole row)."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s64 = s.to(tl.int64)
    kk = tl.arange(0, N_CORNERS)
    ch = tl.arange(0, BLOCK_C)
    c_mask = ch < C
    g = tl.load(gout_ptr + s64[:, None] * C + ch[None, :], mask=s_mask[:, None] & c_mask[None, :], other=0.0)
    if COMPUTE_F64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
    for j in range(0, J):
        off = s64 * J + j
        lvl = tl.load(level_ptr + s64 * sl_s + j * sl_j, mask=s_mask, other=0)
        w, dw0, dw1, dw2, bad = _geometry(pos_ptr, off, shapes_ptr, lvl, s_mask, kk, DIM, HAS_BG, POS_F64, COMPUTE_F64)
        ids = tl.load(ids_ptr + off, mask=s_mask, other=0).to(tl.int64)
        b = tl.load(batch_ptr + s64 * sb_s + j * sb_j, mask=s_mask, other=0)
        h = tl.load(head_ptr + s64 * sh_s + j * sh_j, mask=s_mask, other=0)
        row, present = _rows(ctab_ptr, ids, kk, b, lvl, h, s_mask, N_HEADS, N_LEVELS, BG_OFFSET, N_CORNERS, HAS_BG)
        a = tl.load(w_ptr + off, mask=s_mask, other=0.0).to(g.dtype)
        w = tl.where(present, w, 0.0)
        ptrs = row[:, :, None] * C + ch[None, None, :]
        if NEED_POS or NEED_W:
            vals = tl.load(table_ptr + ptrs, mask=present[:, :, None] & c_mask[None, None, :], other=0.0)
            dot = tl.sum(vals.to(g.dtype) * g[:, None, :], axis=2)  # [BS, KC]: <table[row], g>
            if NEED_W:
                gw = tl.where(bad, float("nan"), tl.sum(w * dot, axis=1))
                tl.store(gw_ptr + off, gw.to(gw_ptr.dtype.element_ty), mask=s_mask)
            if NEED_POS:
                gc = tl.where(present, dot * a[:, None], 0.0)
                gp0 = tl.where(bad, float("nan"), tl.sum(gc * dw0, axis=1))
                tl.store(gpos_ptr + off * DIM, gp0.to(gpos_ptr.dtype.element_ty), mask=s_mask)
                gp1 = tl.where(bad, float("nan"), tl.sum(gc * dw1, axis=1))
                tl.store(gpos_ptr + off * DIM + 1, gp1.to(gpos_ptr.dtype.element_ty), mask=s_mask)
                if DIM == 3:
                    gp2 = tl.where(bad, float("nan"), tl.sum(gc * dw2, axis=1))
                    tl.store(gpos_ptr + off * DIM + 2, gp2.to(gpos_ptr.dtype.element_ty), mask=s_mask)
        if NEED_TABLE:  # a non-finite sample touches no row
            wa = w * a[:, None]
            m = present & (wa != 0.0) & (~bad)[:, None]
            tl.atomic_add(gtable_ptr + ptrs, wa[:, :, None] * g[:, None, :], mask=m[:, :, None] & c_mask[None, None, :])
