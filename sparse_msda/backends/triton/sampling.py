"""The deformable sampling (``weighted_gather``) on the Triton kernels of :mod:`.sampling_kernels`.

Same contract as the reference backend: ``weighted_gather(table, positions, weights, sampling)``
computes what :class:`sparse_msda.functional.sampling._SparseSample` computes, with gradients for
the table (background rows included), the positions and the weights. The base-cell ids come from
the sampling plan or from one hash query per sample through the coordinate index (as in the other
backends); the kernels then read the index's corner-row table on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import triton

from ...functional.sampling import _base_cell_ids, _Sampling
from . import sampling_kernels as K

__all__ = ["weighted_gather"]

#: most samples per program (fewer for wide rows: a program holds ``[samples, 2**D, channels]``)
BLOCK_S = 32
#: bound on ``samples * 2**D * channels`` per program
BLOCK_ELEMENTS = 4096
#: widest value row the kernels take in one block (the backward needs whole rows)
MAX_CHANNELS = 1024


def _index_args(t: Tensor | None, device) -> tuple[Tensor, int, int]:
    """An int64 ``[S | 1, J | 1]`` index view as (tensor, stride over samples, stride over points);
    a broadcast axis gets stride 0. None (no head index) is head 0."""
    if t is None:
        return torch.zeros(1, dtype=torch.int64, device=device), 0, 0
    return t, (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _launch_args(table: Tensor, positions: Tensor, sampling: _Sampling):
    device = table.device
    (b, sb_s, sb_j), (l, sl_s, sl_j), (h, sh_s, sh_j) = (
        _index_args(sampling.batch, device), _index_args(sampling.level, device), _index_args(sampling.head, device),
    )
    shapes = sampling.index.level_spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    bg = -1 if sampling.background_offset is None else sampling.background_offset
    return (b, l, h, shapes), (sampling.n_heads, sampling.index.n_levels, bg, sb_s, sb_j, sl_s, sl_j, sh_s, sh_j)


def _block_s(dim: int, block_c: int) -> int:
    return max(2, min(BLOCK_S, triton.next_power_of_2(BLOCK_ELEMENTS // (2**dim * block_c) + 1) // 2))


def _constexprs(table: Tensor, positions: Tensor, sampling: _Sampling) -> dict:
    dim = positions.shape[-1]
    return dict(
        DIM=dim, N_CORNERS=2**dim, HAS_BG=sampling.background_offset is not None,
        POS_F64=positions.dtype == torch.float64, COMPUTE_F64=table.dtype == torch.float64,
    )


class TritonSample(torch.autograd.Function):
    """``out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * table[row(s, j, k)]`` (see
    :class:`sparse_msda.functional.sampling._SparseSample`) on the Triton kernels. Saves the
    inputs and the int32 ``[S, J]`` base-cell ids."""

    @staticmethod
    def forward(ctx, table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling):
        n_samples, n_per, dim = positions.shape
        table, positions, weights = table.contiguous(), positions.contiguous(), weights.contiguous()
        ids = _base_cell_ids(sampling, positions.detach()).contiguous()
        ctab = sampling.corner_table().to(table.device).contiguous()
        out = table.new_empty(n_samples, table.shape[1])
        if n_samples and n_per:
            tensors, ints = _launch_args(table, positions, sampling)
            block_c = min(triton.next_power_of_2(table.shape[1]), 128)
            block_s = _block_s(dim, block_c)
            grid = (triton.cdiv(n_samples, block_s), triton.cdiv(table.shape[1], block_c))
            K.sample_forward_kernel[grid](
                table, positions, weights, ids, ctab, *tensors, out, n_samples, n_per, table.shape[1], *ints,
                BLOCK_S=block_s, BLOCK_C=block_c, **_constexprs(table, positions, sampling),
            )
        elif n_samples:
            out.zero_()
        ctx.sampling = sampling
        ctx.save_for_backward(table, positions, weights, ids, ctab)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        table, positions, weights, ids, ctab = ctx.saved_tensors
        sampling = ctx.sampling
        need_table, need_pos, need_w = ctx.needs_input_grad[:3]
        n_samples, n_per, dim = positions.shape
        acc = torch.float64 if table.dtype == torch.float64 else torch.float32
        g_table = torch.zeros(table.shape, dtype=acc, device=table.device) if need_table else None
        g_pos = torch.zeros_like(positions) if need_pos else None
        g_w = torch.zeros_like(weights) if need_w else None
        if n_samples and n_per and (need_table or need_pos or need_w):
            tensors, ints = _launch_args(table, positions, sampling)
            dummy = table.new_empty(1)
            block_c = triton.next_power_of_2(table.shape[1])  # whole rows: the dot products need them
            block_s = _block_s(dim, block_c)
            K.sample_backward_kernel[(triton.cdiv(n_samples, block_s),)](
                table, positions, weights, ids, ctab, *tensors, grad_out.contiguous(),
                g_table if need_table else dummy, g_pos if need_pos else dummy, g_w if need_w else dummy,
                n_samples, n_per, table.shape[1], *ints,
                NEED_TABLE=bool(need_table), NEED_POS=bool(need_pos), NEED_W=bool(need_w),
                BLOCK_S=block_s, BLOCK_C=block_c, **_constexprs(table, positions, sampling),
            )
        if g_table is not None:
            g_table = g_table.to(table.dtype)
        return g_table, g_pos, g_w, None


def weighted_gather(table: Tensor, positions: Tensor, weights: Tensor, sampling: _Sampling) -> Tensor:
    """The backend operation: ``[S, C]`` attention-weighted bilinear/trilinear samples of
    ``table`` (validated by :func:`sparse_msda.functional.sampling.sparse_weighted_gather`)."""
    return TritonSample.apply(table, positions, weights, sampling)
