"""Backend layer of sparse-msda: spconv <-> COO conversion and hashed coordinate lookup.

Attention code finds voxels only through :class:`SparseCoordinateIndex` (spconv's
``HashTable``). Importing this package applies the narrow fixes for spconv's CPU code:
sparse-conv backward on a CPU-only torch, and the data race in the CPU sparse-conv
scatter-add (see :mod:`adapters.spconv_compat`); :func:`patch_spconv` applies them explicitly
(idempotent), ``python -m adapters.check_spconv`` says whether the installed spconv needs them.
"""

from .conversion import coo_stack_to_spconv, multilevel_features, spconv_to_coo_stack
from .coordinate_index import SparseCoordinateIndex, corner_offsets
from .spconv_compat import (
    hash_insert,
    hash_query,
    patch_spconv,
    patch_spconv_cpu_scatter_add,
    patch_spconv_cpu_stream,
    spconv_unpatched,
)
from .validation import as_level_spatial_shapes, broadcast_shapes

patch_spconv()

__all__ = [
    "SparseCoordinateIndex",
    "as_level_spatial_shapes",
    "broadcast_shapes",
    "coo_stack_to_spconv",
    "corner_offsets",
    "hash_insert",
    "hash_query",
    "multilevel_features",
    "patch_spconv",
    "patch_spconv_cpu_scatter_add",
    "patch_spconv_cpu_stream",
    "spconv_to_coo_stack",
    "spconv_unpatched",
]
