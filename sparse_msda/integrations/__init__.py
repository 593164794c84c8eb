"""Drop-ins for detection frameworks' sparse backbones (importable without either framework).

* :mod:`sparse_msda.integrations.openpcdet` -- :class:`SparseMSDABackBone8x`, an OpenPCDet
  ``BACKBONE_3D`` (``batch_dict`` API) that runs a ``VoxelBackBone8x``-style backbone with the
  encoder between its last stage and ``conv_out``; :func:`register_openpcdet` adds it to
  OpenPCDet's table.
* :mod:`sparse_msda.integrations.mmdet3d` -- :class:`SparseMSDASparseEncoder`, the same around
  mmdet3d's ``SparseEncoder``; registered in mmdet3d's ``MODELS`` when mmdet3d is importable.
* :class:`BackboneLevelEncoder` -- what both share: chosen levels projected to ``embed_dim``,
  encoded, projected back to their widths, put back in place (``indice_dict`` passed through).
"""

from .level_encoder import BackboneLevelEncoder
from .mmdet3d import SparseMSDASparseEncoder
from .openpcdet import SparseMSDABackBone8x, register_openpcdet

__all__ = ["BackboneLevelEncoder", "SparseMSDABackBone8x", "SparseMSDASparseEncoder", "register_openpcdet"]
