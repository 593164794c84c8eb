"""Rotary position encoding (RoPE) over (full-scale spatial position, level index).

A query or key of the multi-level neighborhood attention sits at a *position vector*
``u = (p_0, ..., p_{D-1}, level)`` of ``D + 1`` coordinates: its spatial position in the
frame of the largest level ("full scale", spconv axis order (y, x) / (z, y, x)) and the
index of its level (a float). Each head's ``head_dim`` channels form ``head_dim // 2``
rotation pairs; pair ``j`` of head ``h`` is rotated by the angle

    theta[h, j] = sum_k freqs[h, j, k] * u[k]

Channel pairing is "split half": pair ``j`` is ``(x[j], x[j + head_dim // 2])``, rotated as
``(x1 cos - x2 sin, x1 sin + x2 cos)``. Because rotations compose,
``<R(u_q) q, R(u_k) k> = <q, R(u_k - u_q) k>``: attention scores depend on relative
positions only, and on nothing else about the positions.

Frequency groups (``freq_group_pattern``): the rotation pairs are split into groups, and a
pair's frequency vector is non-zero only on its group's coordinates.

The pattern names and group orders are those of sparse-transformer-layers /
nd-rotary-encodings (``get_multilevel_freq_group_pattern``):

* ``"single"``: one group; every pair rotates with a mixed linear combination of all
  spatial coordinates and the level (RoPE-Mixed style).
* ``"partition"``: two groups, the spatial axes (mixed) and the level.
* ``"closure"``: three groups, the spatial axes, the level, and all of them.
* ``"axial"`` (ours, not in the reference): ``D + 1`` groups, one per spatial axis and one
  for the level. This pattern was called ``"partition"`` here before; a checkpoint saved
  with it does not load into a ``"partition"`` model (``ValueError``, see
  :func:`check_freqs_in_groups`).
* ``"spatial_level"``: an alias of ``"partition"`` (its former name here).

With ``enforce_freq_groups_equal`` the number of pairs (``head_dim // 2``) must divide
equally among the groups; otherwise the first groups get one pair more, and trailing groups
may get none (as in the reference).

Initialisation (:func:`init_rope_frequencies`): the ``j``-th of the ``m`` pairs of a group gets
magnitude ``spatial_base_theta ** (-j / m)`` on its spatial coordinates and
``level_base_theta ** (-j / m)`` on the level, like the classic 1D RoPE spectrum
``theta ** (-2j / head_dim)``. In a group with several spatial axes the spatial part is that
magnitude times a random unit direction (per head and pair; per pair only with
``share_heads``), so different pairs see different spatial directions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from adapters import broadcast_shapes

from .. import tuning

__all__ = [
    "FREQ_GROUP_PATTERNS",
    "apply_rope",
    "apply_rope_to_projection",
    "check_freqs_in_groups",
    "init_rope_frequencies",
    "rope_angles",
    "rope_cos_sin",
    "rope_freq_groups",
    "rope_group_sizes",
    "rotate_pairs",
    "rotate_pairs_back",
]

FREQ_GROUP_PATTERNS = ("single", "partition", "closure", "axial", "spatial_level")


def pattern_name(freq_group_pattern) -> str:
    """The pattern's name: a string, or an ``Enum`` member with a string ``value`` (such as the
    reference's ``FreqGroupPattern.PARTITION``)."""
    value = getattr(freq_group_pattern, "value", freq_group_pattern)
    if not isinstance(value, str):
        raise ValueError(
            f"rope_freq_group_pattern must be one of {FREQ_GROUP_PATTERNS}, got {freq_group_pattern=}"
        )
    return value


def rope_freq_groups(freq_group_pattern: str, position_dim: int) -> list[tuple[int, ...]]:
    """Coordinates (``0..D-1`` spatial, ``D`` level) of each frequency group of a pattern,
    in the reference's group order.

    Raises:
        ValueError: unknown pattern.
    """
    name = pattern_name(freq_group_pattern)
    n = position_dim + 1
    spatial, level = tuple(range(position_dim)), (position_dim,)
    if name == "single":
        return [tuple(range(n))]
    if name in ("partition", "spatial_level"):
        return [spatial, level]
    if name == "closure":
        return [spatial, level, tuple(range(n))]
    if name == "axial":
        return [(k,) for k in range(n)]
    raise ValueError(
        f"rope_freq_group_pattern must be one of {FREQ_GROUP_PATTERNS}, got {freq_group_pattern=}"
    )


def rope_group_sizes(n_pairs: int, n_groups: int, enforce_equal: bool) -> list[int]:
    """Number of rotation pairs of each group.

    As in the reference, the first ``n_pairs % n_groups`` groups get one pair more; without
    ``enforce_equal`` a trailing group may get no pair at all (then its coordinates do not
    rotate anything).

    Raises:
        ValueError: ``enforce_equal`` and ``n_pairs`` not divisible by ``n_groups``.
    """
    if enforce_equal and n_pairs % n_groups != 0:
        raise ValueError(
            f"head_dim // 2 = {n_pairs} rotation pairs do not split equally into {n_groups} RoPE frequency "
            f"groups (rope_enforce_freq_groups_equal=True); choose head_dim with head_dim // 2 divisible by "
            f"{n_groups} or another rope_freq_group_pattern"
        )
    base, extra = divmod(n_pairs, n_groups)
    return [base + (1 if g < extra else 0) for g in range(n_groups)]


def init_rope_frequencies(
    n_heads: int,
    head_dim: int,
    position_dim: int,
    spatial_base_theta: float = 100.0,
    level_base_theta: float = 10.0,
    share_heads: bool = False,
    freq_group_pattern: str = "single",
    enforce_freq_groups_equal: bool = True,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Initial frequencies and the group mask.

    Returns:
        ``(freqs, mask)``: float32 ``[H', head_dim // 2, position_dim + 1]`` with ``H' = 1`` if
        ``share_heads`` else ``n_heads``, and a float mask of the same shape that is 1 on each
        pair's group coordinates, 0 elsewhere (``freqs`` is already zero off the mask).

    Raises:
        ValueError: odd ``head_dim``, non-positive thetas, bad pattern, unequal groups.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim (embed_dim // n_heads), got {head_dim=}")
    for name, theta in (("rope_spatial_base_theta", spatial_base_theta), ("rope_level_base_theta", level_base_theta)):
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0 or not math.isfinite(theta):
            raise ValueError(f"{name} must be a positive finite number, got {name}={theta!r}")
    groups = rope_freq_groups(freq_group_pattern, position_dim)
    n_pairs = head_dim // 2
    sizes = rope_group_sizes(n_pairs, len(groups), enforce_freq_groups_equal)
    n_h = 1 if share_heads else n_heads
    freqs = torch.zeros(n_h, n_pairs, position_dim + 1, dtype=torch.float64)
    mask = torch.zeros_like(freqs)
    start = 0
    for coords, m in zip(groups, sizes):
        j = torch.arange(m, dtype=torch.float64)
        spatial = [k for k in coords if k < position_dim]
        pairs = slice(start, start + m)
        if spatial:
            mag = spatial_base_theta ** (-j / m)  # [m]
            if len(spatial) > 1:
                direction = torch.randn(n_h, m, len(spatial), dtype=torch.float64, generator=generator)
                direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            else:
                direction = torch.ones(n_h, m, 1, dtype=torch.float64)
            freqs[:, pairs, spatial] = mag[None, :, None] * direction
        if position_dim in coords:
            freqs[:, pairs, position_dim] = (level_base_theta ** (-j / m))[None, :]
        mask[:, pairs, list(coords)] = 1.0
        start += m
    return freqs.float(), mask.float()


def check_freqs_in_groups(freqs: Tensor, mask: Tensor, freq_group_pattern: str) -> None:
    """Raise if ``freqs`` (e.g. from a checkpoint) is non-zero outside the frequency groups of
    ``mask``: it was trained with another pattern, and masking it would silently change the
    model (e.g. a checkpoint of this package's former ``"partition"``, now ``"axial"``).

    Raises:
        ValueError: a non-zero frequency outside ``mask``.
    """
    if freqs.shape != mask.shape:
        return  # the shape check of load_state_dict reports it
    outside = (freqs.detach() != 0) & (mask == 0)
    if bool(outside.any()):
        h, j, k = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"RoPE frequencies are non-zero outside the groups of rope_freq_group_pattern={freq_group_pattern!r} "
            f"(first at head {h}, pair {j}, coordinate {k}): they were saved with another pattern. Note that this "
            "package's former 'partition' (one group per axis) is now called 'axial'; 'partition' now means "
            "(spatial | level) as in sparse-transformer-layers"
        )


def rope_angles(positions: Tensor, freqs: Tensor) -> Tensor:
    """Rotation angles ``[..., H', n_pairs]`` of position vectors ``[..., D + 1]``.

    Computed in float64 (positions of thousands of cells times frequencies near 1 would lose
    ~1e-4 rad in float32), so relative-position invariance holds to float32 round-off.
    """
    return torch.einsum("...k,hjk->...hj", positions.to(torch.float64), freqs.to(torch.float64))


def rope_cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` of float64 ``angles`` in ``dtype``.

    Below float64 the angles are first reduced to ``[0, 2 pi)`` in float64, then the
    trigonometry runs in ``dtype`` (float32 ``cos``/``sin`` of a reduced angle are as accurate
    as a float64 result rounded to float32, and several times faster). Differentiable.
    """
    if dtype == torch.float64:
        return torch.cos(angles), torch.sin(angles)
    reduced = torch.remainder(angles, 2.0 * math.pi).to(dtype)  # [0, 2 pi); gradient 1
    return torch.cos(reduced), torch.sin(reduced)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate split-half pairs of ``x [..., H, head_dim]`` by angles given as ``cos``/``sin``
    ``[..., H or 1, head_dim // 2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    shape = broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1]))
    y = torch.empty(shape, dtype=torch.result_type(x, cos), device=x.device)
    y1, y2 = y[..., :half], y[..., half:]
    torch.mul(x1, cos, out=y1)
    y1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x1, sin, out=y2)
    y2.addcmul_(x2, cos)
    return y


def rotate_pairs_back(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``rotate_pairs(x, cos, -sin)`` without materialising ``-sin``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    shape = broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1]))
    y = torch.empty(shape, dtype=torch.result_type(x, cos), device=x.device)
    y1, y2 = y[..., :half], y[..., half:]
    torch.mul(x1, cos, out=y1)
    y1.addcmul_(x2, sin)
    torch.mul(x2, cos, out=y2)
    y2.addcmul_(x1, sin, value=-1.0)
    return y


def _rope_kernel(x: Tensor, positions: Tensor, freqs: Tensor):
    """The C++ rotary-encoding kernels (``csrc/rope_cpu.cpp``) if they serve these tensors (CPU,
    float32/float64 ``x``, not under ``torch.compile``), else None (the PyTorch path)."""
    if (
        x.device.type != "cpu"
        or positions.device.type != "cpu"
        or freqs.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or torch.compiler.is_compiling()
    ):
        return None
    from .cpu_kernels import rope_kernels

    return rope_kernels()


def _kernel_rope_forward(ext, x: Tensor, positions: Tensor, freqs: Tensor, in_place: bool) -> Tensor:
    """``ext.rope_forward`` of ``x [N, H, d]`` (float64 positions and frequencies, as the kernel
    takes them); ``in_place`` rotates ``x`` itself."""
    return ext.rope_forward(x, positions.to(torch.float64).contiguous(), freqs.to(torch.float64).contiguous(), in_place)


def _kernel_rope_backward(ext, gy: Tensor, y: Tensor, positions: Tensor, freqs: Tensor, needs, grad_in_place: bool):
    """``ext.rope_backward`` for the output ``y [N, H, d]`` and its gradient ``gy`` (same shape,
    contiguous, ``y``'s dtype): ``(dx, dpositions, dfreqs)`` (None where not in ``needs``), the
    last two in their inputs' dtypes; ``grad_in_place`` writes ``dx`` over ``gy``."""
    dx, dpos, dfreqs = ext.rope_backward(
        gy, y, positions.to(torch.float64).contiguous(), freqs.to(torch.float64).contiguous(), *needs, grad_in_place
    )
    return dx, None if dpos is None else dpos.to(positions.dtype), None if dfreqs is None else dfreqs.to(freqs.dtype)


class _RopeFunction(torch.autograd.Function):
    """``rotate_pairs(x, cos(theta), sin(theta))`` with ``theta = rope_angles(positions, freqs)``
    for ``x [N, H, d]`` and ``positions [N, D + 1]``, with a closed-form backward that recomputes
    ``cos``/``sin`` (saves ``positions``, ``freqs`` and the output only)::

        dx = R(-theta) dy,   dtheta_j = y1_j dy2_j - y2_j dy1_j,
        dfreqs[h, j, k] = sum dtheta[..., h, j] u[..., k],   du[..., k] = sum dtheta[..., h, j] freqs[h, j, k].

    On CPU (float32/float64) both run in the C++ kernel ``csrc/rope_cpu.cpp`` (one pass over the
    rows: angles and their reduction in float64, cos/sin in ``x``'s dtype, the frequencies'
    gradient summed in float64 per block of rows); elsewhere, or with ``SPARSE_MSDA_CPU_KERNELS=0``,
    in PyTorch in chunks of :data:`sparse_msda.tuning.ROPE_CHUNK_ROWS` rows (angles float64,
    reduced to ``[0, 2 pi)``, :func:`rope_cos_sin`).
    """

    @staticmethod
    def forward(ctx, x, positions, freqs):
        ext = _rope_kernel(x, positions, freqs)
        ctx.ext = ext
        if ext is not None:
            y = _kernel_rope_forward(ext, x.contiguous(), positions, freqs, False)
            ctx.save_for_backward(positions, freqs, y)
            return y
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        half = x.shape[-1] // 2
        for r0 in range(0, x.shape[0], tuning.ROPE_CHUNK_ROWS):
            r1 = min(r0 + tuning.ROPE_CHUNK_ROWS, x.shape[0])
            cos, sin = rope_cos_sin(rope_angles(positions[r0:r1], freqs), x.dtype)
            x1, x2, y1, y2 = x[r0:r1, :, :half], x[r0:r1, :, half:], y[r0:r1, :, :half], y[r0:r1, :, half:]
            torch.mul(x1, cos, out=y1)
            y1.addcmul_(x2, sin, value=-1.0)
            torch.mul(x1, sin, out=y2)
            y2.addcmul_(x2, cos)
        ctx.save_for_backward(positions, freqs, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        positions, freqs, y = ctx.saved_tensors
        need_x, need_pos, need_freqs = ctx.needs_input_grad
        if ctx.ext is not None:
            return _kernel_rope_backward(ctx.ext, gy.to(y.dtype).contiguous(), y, positions, freqs, ctx.needs_input_grad, False)
        dx, dpos, dfreqs = _rope_backward_pytorch(gy, positions, freqs, y, need_x, need_pos, need_freqs)
        return (
            dx,
            None if dpos is None else dpos.to(positions.dtype),
            None if dfreqs is None else dfreqs.to(freqs.dtype),
        )


class _RopeInplaceFunction(torch.autograd.Function):
    """:class:`_RopeFunction` on the C++ kernel for a fresh ``x [N, H * d]`` that nothing else
    uses (a projection's output inside a block), rotated in place: no ``[N, H * d]`` output is
    allocated in the forward (``mark_dirty``), and with ``grad_in_place`` the backward writes
    ``dx`` over the incoming gradient (each row's angle gradient is taken from it first) instead
    of a new tensor. Only for outputs whose gradient reaches this Function alone (as the blocks'
    rotated ``q`` and ``k``, consumed by the attention only)."""

    @staticmethod
    def forward(ctx, x, positions, freqs, n_heads, ext, grad_in_place):
        shape3 = (x.shape[0], n_heads, x.shape[1] // n_heads)
        ctx.ext, ctx.shape3, ctx.grad_in_place = ext, shape3, grad_in_place
        _kernel_rope_forward(ext, x.view(shape3), positions, freqs, True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions, freqs, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        positions, freqs, y = ctx.saved_tensors
        g = gy.to(y.dtype).contiguous()
        dx, dpos, dfreqs = _kernel_rope_backward(
            ctx.ext, g.view(ctx.shape3), y.view(ctx.shape3), positions, freqs, ctx.needs_input_grad[:3], ctx.grad_in_place
        )
        return None if dx is None else dx.view(y.shape), dpos, dfreqs, None, None, None


def apply_rope_to_projection(x: Tensor, positions: Tensor, freqs: Tensor, n_heads: int) -> Tensor:
    """:func:`apply_rope` of ``x [N, n_heads * head_dim]`` (viewed as ``[N, n_heads, head_dim]``)
    for a projection's fresh output that nothing else uses: on the C++ kernel it is rotated in
    place (:class:`_RopeInplaceFunction`), elsewhere as :func:`apply_rope` does. Returns
    ``[N, n_heads, head_dim]`` (a view of ``x`` on the kernel)."""
    shape3 = (x.shape[0], n_heads, x.shape[-1] // n_heads)
    ext = _rope_kernel(x, positions, freqs) if x.ndim == 2 and x.is_contiguous() and x._base is None else None
    if ext is None or positions.shape != (x.shape[0], freqs.shape[-1]):
        return apply_rope(x.view(shape3), positions, freqs)
    return _RopeInplaceFunction.apply(x, positions, freqs, n_heads, ext, tuning.ROPE_GRAD_IN_PLACE).view(shape3)


def _rope_backward_pytorch(gy, positions, freqs, y, need_x, need_pos, need_freqs):
    """:class:`_RopeFunction`'s backward in PyTorch, chunk by chunk: ``(dx, dpositions,
    dfreqs)`` (None where not needed; the last two float64)."""
    n, half = y.shape[0], y.shape[-1] // 2
    dx = torch.empty_like(y) if need_x else None
    dpos = torch.empty(positions.shape, dtype=torch.float64, device=y.device) if need_pos else None
    dfreqs = torch.zeros(freqs.shape, dtype=torch.float64, device=y.device) if need_freqs else None
    f64 = freqs.to(torch.float64)
    for r0 in range(0, n, tuning.ROPE_CHUNK_ROWS):
        r1 = min(r0 + tuning.ROPE_CHUNK_ROWS, n)
        g = gy[r0:r1]
        if need_x:
            cos, sin = rope_cos_sin(rope_angles(positions[r0:r1], freqs), y.dtype)
            dx[r0:r1] = rotate_pairs_back(g, cos, sin)
        if need_pos or need_freqs:
            yc = y[r0:r1]
            dth = yc[..., :half] * g[..., half:] - yc[..., half:] * g[..., :half]  # [n, H, d/2]
            if freqs.shape[0] == 1 and dth.shape[-2] != 1:
                dth = dth.sum(-2, keepdim=True)
            dth = dth.to(torch.float64)
            if need_pos:
                dpos[r0:r1] = torch.einsum("nhj,hjk->nk", dth, f64)
            if need_freqs:
                dfreqs += torch.einsum("nhj,nk->hjk", dth, positions[r0:r1].to(torch.float64))
    return dx, dpos, dfreqs


def apply_rope(x: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """Rotate ``x [..., H, head_dim]`` at position vectors ``positions [..., D + 1]`` (leading
    dims broadcast).

    ``freqs`` is ``[H or 1, head_dim // 2, D + 1]``. Differentiable w.r.t. ``x``,
    ``positions`` and ``freqs`` (custom backward: :class:`_RopeFunction`, on rows).
    """
    if x.ndim == 3 and positions.ndim == 2 and positions.shape[0] == x.shape[0]:
        return _RopeFunction.apply(x, positions, freqs)
    lead = broadcast_shapes(x.shape[:-2], positions.shape[:-1])
    xs = x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    us = positions.expand(*lead, positions.shape[-1]).reshape(-1, positions.shape[-1])
    return _RopeFunction.apply(xs, us, freqs).view(*lead, *x.shape[-2:])
