"""Argument checks shared by the adapters' public functions."""

from __future__ import annotations

import math
import operator
from typing import Sequence, Union

import torch

__all__ = [
    "as_level_spatial_shapes", "broadcast_shapes", "check_index_range", "check_integer_tensor", "check_tensor",
    "check_voxel_bounds", "in_bounds",
]

ShapeLike = Union[torch.Tensor, Sequence[Sequence[int]]]


def broadcast_shapes(*shapes) -> torch.Size:
    """The broadcast of ``shapes`` (as ``torch.broadcast_shapes``, whose first call imports
    sympy through ``torch._refs``: about half a second). Raises RuntimeError if they do not
    broadcast."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        for i, n in enumerate(s, start=ndim - len(s)):
            if n != 1:
                if out[i] not in (1, n):
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = n
    return torch.Size(out)


def check_tensor(name: str, value, *, sparse: bool | None = None) -> torch.Tensor:
    """Raise TypeError unless ``value`` is a tensor (and of the given layout)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if sparse is True and value.layout != torch.sparse_coo:
        raise TypeError(f"{name} must be a sparse COO tensor (torch.sparse_coo), got layout {value.layout}")
    if sparse is False and value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def check_integer_tensor(name: str, value) -> torch.Tensor:
    check_tensor(name, value, sparse=False)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {name}.dtype={value.dtype}")
    return value


def check_index_range(name: str, value: torch.Tensor, n: int) -> None:
    """Raise ValueError unless every entry of the integer tensor ``value`` lies in ``[0, n)``;
    the message names the argument, the valid range and the first offending value (in the
    tensor's flattened order). One min/max pass (the broadcast views the attention passes are
    small)."""
    if value.numel() == 0:
        return
    if int(value.min()) >= 0 and int(value.max()) < n:
        return
    flat = value.reshape(-1)
    bad = int(((flat < 0) | (flat >= n)).nonzero()[0, 0])
    raise ValueError(
        f"{name} must lie in [0, {n}), got {name}[{bad}]={int(flat[bad])} (flattened position {bad}; "
        f"range of {name}: [{int(value.min())}, {int(value.max())}])"
    )


def _as_int_entry(x, name: str, spec) -> int:
    """An integral shape entry as int: ints (not bools) and integral-valued floats; anything else
    (12.7, True, "8") raises TypeError rather than being truncated."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got a bool in {spec!r}")
    try:
        return operator.index(x)
    except TypeError:
        pass
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        return int(x)
    raise TypeError(f"{name} must hold integral values (a shape is a count of cells), got {x!r} in {spec!r}")


def as_level_spatial_shapes(
    level_spatial_shapes: ShapeLike, device: torch.device | None = None, name: str = "level_spatial_shapes"
) -> torch.Tensor:
    """Validate and convert per-level spatial shapes to an int64 ``[n_levels, ndim]`` tensor.

    Accepts a tensor or a nested sequence of ints, e.g. ``[[41, 1600, 1408], [21, 800, 704]]``.
    Spatial axes are in spconv order: (y, x) in 2D, (z, y, x) in 3D.
    """
    if isinstance(level_spatial_shapes, torch.Tensor):
        shapes = check_integer_tensor(name, level_spatial_shapes).to(device=device, dtype=torch.int64)
    else:
        try:
            rows = [[_as_int_entry(x, name, level_spatial_shapes) for x in s] for s in level_spatial_shapes]
            shapes = torch.as_tensor(rows, dtype=torch.int64, device=device)
        except TypeError as err:
            if "integral values" in str(err) or "a bool" in str(err):
                raise
            raise TypeError(
                f"{name} must be an integer tensor or a sequence of per-level int sequences, got {level_spatial_shapes!r}"
            ) from err
        except (ValueError, RuntimeError) as err:  # ragged rows, values beyond int64
            raise TypeError(
                f"{name} must be an integer tensor or a sequence of per-level int sequences, got {level_spatial_shapes!r}"
            ) from err
    if shapes.ndim != 2 or shapes.shape[0] == 0 or shapes.shape[1] not in (2, 3):
        raise ValueError(
            f"{name} must have shape [n_levels, position_dim] with n_levels >= 1 and position_dim 2 or 3, "
            f"got {name}.shape={tuple(shapes.shape)}"
        )
    if bool((shapes <= 0).any()):
        raise ValueError(f"{name} must be positive, got {shapes.tolist()}")
    return shapes


def in_bounds(
    batch_indices: torch.Tensor,
    level_indices: torch.Tensor,
    spatial_indices: torch.Tensor,
    level_spatial_shapes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Bool mask of voxels whose batch, level and coordinates lie inside the map."""
    n_levels = level_spatial_shapes.shape[0]
    level_ok = (level_indices >= 0) & (level_indices < n_levels)
    shape = level_spatial_shapes[level_indices.clamp(0, n_levels - 1)]
    coords_ok = ((spatial_indices >= 0) & (spatial_indices < shape)).all(-1)
    return (batch_indices >= 0) & (batch_indices < batch_size) & level_ok & coords_ok


def check_voxel_bounds(
    name: str,
    batch_indices: torch.Tensor,
    level_indices: torch.Tensor,
    spatial_indices: torch.Tensor,
    level_spatial_shapes: torch.Tensor,
    batch_size: int,
) -> None:
    """Raise ValueError naming the first voxel outside the batch, levels or its level's shape."""
    if spatial_indices.shape[0] == 0:
        return
    ok = in_bounds(batch_indices, level_indices, spatial_indices, level_spatial_shapes, batch_size)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        level = int(level_indices[bad])
        level_shape = level_spatial_shapes[level].tolist() if 0 <= level < level_spatial_shapes.shape[0] else None
        raise ValueError(
            f"{name}: voxel {bad} (batch={int(batch_indices[bad])}, level={level}, "
            f"coords={spatial_indices[bad].tolist()}) is outside the map: expected batch in [0, {batch_size}), "
            f"level in [0, {level_spatial_shapes.shape[0]}) and coords within that level's spatial shape {level_shape}"
        )
