"""LayerNorm followed by a linear layer, keeping only the LayerNorm's input for the backward.

``linear(layer_norm(x))`` through plain autograd keeps the normalised ``[N, C]`` tensor alive
until the backward reaches the linear layer (its weight gradient needs it). In the attention
blocks that is one more activation of the size of the input, held across the whole attention
backward (where the peak is). :func:`layer_norm_linear` saves ``x`` (which the caller keeps
anyway), the ``[N, 1]`` mean and reciprocal standard deviation, and recomputes the normalised
tensor in its backward (one elementwise pass).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import tuning

__all__ = ["layer_norm_linear"]


class _LayerNormLinear(torch.autograd.Function):
    """``F.linear(F.layer_norm(x, [C], nw, nb, eps), w, b)`` for ``x [N, C]``; saves ``x``,
    the LayerNorm's ``[N, 1]`` statistics and the parameters, not the normalised tensor.

    Above :data:`sparse_msda.tuning.NORM_LINEAR_CHUNK_ROWS` rows both passes run chunk by chunk:
    the normalised chunk (and in the backward its gradient) is a small buffer the allocator reuses,
    not an ``[N, C]`` tensor per pass (a fresh one of 244 MB costs ~0.1 s of page faults on the 3D
    scan encoder); the output and ``dx`` are written chunk by chunk into one tensor each, the
    weight's gradient accumulated per chunk."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        n, c = x.shape
        rows = tuning.NORM_LINEAR_CHUNK_ROWS
        ctx.eps = eps
        if n <= rows:
            h, mean, rstd = torch.native_layer_norm(x, [c], norm_weight, norm_bias, eps)
            out = F.linear(h, weight, bias)
        else:
            out = x.new_empty(n, weight.shape[0])
            wt, mean, rstd = weight.t(), None, None
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                h, m, r = torch.native_layer_norm(x[r0:r1], [c], norm_weight, norm_bias, eps)
                if mean is None:
                    mean, rstd = m.new_empty(n, *m.shape[1:]), r.new_empty(n, *r.shape[1:])
                mean[r0:r1], rstd[r0:r1] = m, r
                if bias is None:
                    torch.mm(h, wt, out=out[r0:r1])
                else:
                    torch.addmm(bias, h, wt, out=out[r0:r1])
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        need_x, need_nw, need_nb, _, need_w, need_b = ctx.needs_input_grad
        grad_w = grad_b = grad_x = grad_nw = grad_nb = None
        n, c = x.shape
        rows = tuning.NORM_LINEAR_CHUNK_ROWS
        if need_b:
            grad_b = grad_out.sum(0)
        if n <= rows:
            if need_w:
                h = torch.native_layer_norm(x, [c], norm_weight, norm_bias, ctx.eps)[0]
                grad_w = grad_out.t().mm(h)
                del h
            if need_x or need_nw or need_nb:
                grad_h = grad_out.mm(weight)
                grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                    grad_h, x, [c], mean, rstd, norm_weight, norm_bias, [need_x, need_nw, need_nb]
                )
            return grad_x, grad_nw, grad_nb, None, grad_w, grad_b
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            xc, go = x[r0:r1], grad_out[r0:r1]
            if need_w:
                h = torch.native_layer_norm(xc, [c], norm_weight, norm_bias, ctx.eps)[0]
                grad_w.addmm_(go.t(), h)
                del h
            if need_x or need_nw or need_nb:
                gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(
                    go.mm(weight), xc, [c], mean[r0:r1], rstd[r0:r1], norm_weight, norm_bias, [need_x, need_nw, need_nb]
                )
                if need_x:
                    grad_x[r0:r1] = gx
                if need_nw:
                    grad_nw = gnw if grad_nw is None else grad_nw.add_(gnw)
                if need_nb:
                    grad_nb = gnb if grad_nb is None else grad_nb.add_(gnb)
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b


def layer_norm_linear(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    weight: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``F.linear(F.layer_norm(x, [C], norm_weight, norm_bias, eps), weight, bias)``.

    Args:
        x: ``[..., C]``.
        norm_weight, norm_bias: ``[C]`` LayerNorm affine parameters (or None).
        eps: LayerNorm epsilon.
        weight: ``[C_out, C]``; bias: ``[C_out]`` or None.

    Returns:
        ``[..., C_out]``. Same values and gradients as the two modules in sequence; the
        backward recomputes the normalised input instead of keeping it. Under ``torch.autocast``
        it is the two ops themselves (LayerNorm in float32, the linear layer in autocast's
        dtype), which keep the normalised tensor.
    """
    if torch.is_autocast_enabled(x.device.type):  # autocast's own dtype rules for the two ops
        return F.linear(F.layer_norm(x, [x.shape[-1]], norm_weight, norm_bias, eps), weight, bias)
    lead = x.shape[:-1]
    out = _LayerNormLinear.apply(x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, eps, weight, bias)
    return out if x.ndim == 2 else out.view(*lead, weight.shape[0])  # 2-D: the Function's own output, not a view
