"""The mixed-precision policy of the attention operations (float16, bfloat16, ``torch.autocast``).

* The two differentiable operations (the sampling gather and the neighborhood attention)
  compute in float32 when their inputs are float16 / bfloat16: the inputs are cast up on
  entry (:func:`upcast`), the output is cast back to the input dtype, and autograd casts
  every gradient back to the dtype of its own input (a bfloat16 parameter gets a bfloat16
  gradient). So scores, softmax sums, log-sum-exps and gather sums accumulate in float32, and
  the float32 C++ CPU kernels serve float16 / bfloat16 inputs too. float32 / float64 inputs
  are untouched.
* Inside the operations autocast is off (:func:`autocast_off`): the float32 compute is not
  cast down again by an enclosing ``torch.autocast`` (CPU or CUDA alike), and the layers around
  them (linear projections, LayerNorm) follow autocast as usual.
* Positions (cell coordinates) never go below float32 (:func:`position_dtype`): a float16
  coordinate has a step of 1 cell above 1024 and a bfloat16 one above 128.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "autocast_off", "compute_dtype", "position_dtype", "upcast"]

#: dtypes the operations compute in float32
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def position_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype positions are kept in next to values of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (a no-op where autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def upcast(*tensors: Optional[Tensor]) -> tuple:
    """Each float16 / bfloat16 tensor as float32 (differentiable cast); others (and None) unchanged."""
    return tuple(t.float() if t is not None and t.dtype in LOW_PRECISION else t for t in tensors)
