"""Backend layer of sparse-msda: spconv <-> COO conversion and hashed coordinate lookup.

Attention code finds voxels only through :class:`SparseCoordinateIndex` (spconv's
``HashTable``). Importing this package applies the narrow fix for spconv's CPU-wheel
sparse-conv backward (see :mod:`adapters.spconv_compat`).
"""

from .conversion import coo_stack_to_spconv, multilevel_features, spconv_to_coo_stack
from .coordinate_index import SparseCoordinateIndex
from .spconv_compat import hash_insert, hash_query, patch_spconv_cpu_stream
from .validation import as_level_spatial_shapes

patch_spconv_cpu_stream()

__all__ = [
    "SparseCoordinateIndex",
    "as_level_spatial_shapes",
    "coo_stack_to_spconv",
    "hash_insert",
    "hash_query",
    "multilevel_features",
    "patch_spconv_cpu_stream",
    "spconv_to_coo_stack",
]
