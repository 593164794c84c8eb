"""mmdetection3d drop-in: ``SparseEncoder`` with sparse MSDA between its last stage and ``conv_out``.

mmdet3d's ``SparseEncoder.forward`` runs ``conv_out`` (and densifies) itself.
:class:`SparseMSDASparseEncoder` builds a ``SparseEncoder`` (or any class with its layout) from
the same keyword arguments, adopts its submodules under their own names (``conv_input``,
``encoder_layers``, ``conv_out``: checkpoints of the plain encoder load, the new weights live
under ``msda.``) and runs

    conv_input -> encoder_layers[0..] -> BackboneLevelEncoder (chosen stages) -> conv_out -> dense BEV

Importing this module registers the class in mmdet3d's ``MODELS`` registry when mmdet3d is
importable (mmdet3d >= 1.0; ``MIDDLE_ENCODERS`` for 0.x), so a config only needs::

    custom_imports = dict(imports=["sparse_msda.integrations.mmdet3d"], allow_failed_imports=False)
    model = dict(
        middle_encoder=dict(
            type="SparseMSDASparseEncoder",
            in_channels=4, sparse_shape=[41, 1600, 1408], order=("conv", "norm", "act"),
            msda=dict(attention_levels=[1, 2, 3], embed_dim=64, n_heads=8, n_layers=1)))

Without mmdet3d it still imports; pass ``base_encoder=<class>`` then.
"""

from __future__ import annotations

from typing import Optional, Union

from spconv.pytorch import SparseConvTensor
from torch import nn

from .level_encoder import BackboneLevelEncoder

__all__ = ["REGISTERED", "SparseMSDASparseEncoder"]


def _mmdet3d_registry():
    """mmdet3d's registry of middle encoders, or ``None`` when mmdet3d is not importable."""
    try:
        from mmdet3d.registry import MODELS  # mmdet3d >= 1.0

        return MODELS
    except ImportError:
        pass
    try:
        from mmdet3d.models.builder import MIDDLE_ENCODERS  # mmdet3d 0.x

        return MIDDLE_ENCODERS
    except ImportError:
        return None


class SparseMSDASparseEncoder(nn.Module):
    """mmdet3d's ``SparseEncoder`` with sparse MSDA on chosen stages, before ``conv_out``.

    Args:
        msda: :class:`~sparse_msda.integrations.BackboneLevelEncoder` arguments: ``attention_levels``
            (stage indices into ``encoder_layers``, default all), ``embed_dim``, ``n_heads``,
            ``n_layers``, ``n_points``, ``neighborhood_sizes``, ``dim_feedforward``, ``dropout``,
            ``residual``.
        base_encoder: the base class, or its name in mmdet3d's registry (default ``"SparseEncoder"``).
        **kwargs: the base's own arguments (``in_channels``, ``sparse_shape``, ``order``,
            ``norm_cfg``, ``base_channels``, ``output_channels``, ``encoder_channels``,
            ``encoder_paddings``, ``block_type``, ``return_middle_feats``).

    ``forward(voxel_features [N, C], coors [N, 4] (batch, z, y, x), batch_size)`` returns what
    ``SparseEncoder`` returns: the dense BEV map ``[B, C_out * D, H, W]``, and with
    ``return_middle_feats=True`` also the list of stage outputs (attended stages encoded).
    """

    def __init__(self, msda: Optional[dict] = None, base_encoder: Union[str, type] = "SparseEncoder", **kwargs) -> None:
        super().__init__()
        if isinstance(base_encoder, str):
            registry = _mmdet3d_registry()
            if registry is None:
                raise ImportError(
                    f"base_encoder={base_encoder!r} is looked up in mmdet3d's registry, but mmdet3d is not "
                    "importable; install mmdet3d or pass base_encoder=<encoder class>"
                )
            cls = registry.get(base_encoder)
            if cls is None:
                raise ValueError(f"base_encoder={base_encoder!r} is not registered in mmdet3d")
            base_encoder = cls
        base = base_encoder(**kwargs)
        missing = [m for m in ("conv_input", "encoder_layers", "conv_out") if not isinstance(getattr(base, m, None), nn.Module)]
        missing += [a for a in ("sparse_shape", "encoder_channels") if not hasattr(base, a)]
        if missing:
            raise TypeError(
                "base_encoder must have SparseEncoder's layout (conv_input, encoder_layers, conv_out, sparse_shape, "
                f"encoder_channels); {type(base).__name__} lacks {missing}"
            )
        self.base_name = type(base).__name__
        for name, child in base.named_children():
            self.add_module(name, child)
        self.sparse_shape = base.sparse_shape
        self.return_middle_feats = bool(getattr(base, "return_middle_feats", False))
        self.level_channels = [int(tuple(stage)[-1]) for stage in base.encoder_channels]
        if len(self.level_channels) != len(self.encoder_layers):
            raise TypeError(
                f"base_encoder has {len(self.encoder_layers)} encoder_layers but {len(self.level_channels)} "
                "encoder_channels entries"
            )
        msda = dict(msda or {})
        if "position_dim" in msda:
            raise ValueError("msda must not set position_dim: SparseEncoder's maps are 3D")
        self.msda = BackboneLevelEncoder(self.level_channels, position_dim=3, **msda)

    def forward(self, voxel_features, coors, batch_size: int):
        """``SparseEncoder.forward`` with the attention before ``conv_out`` (see the class docstring)."""
        if coors.ndim != 2 or coors.shape != (voxel_features.shape[0], 4):
            raise ValueError(
                f"coors must have shape [{voxel_features.shape[0]}, 4] (batch, z, y, x) like voxel_features "
                f"{tuple(voxel_features.shape)}, got {tuple(coors.shape)}"
            )
        x = self.conv_input(SparseConvTensor(voxel_features, coors.int(), self.sparse_shape, batch_size))
        stages = []
        for layer in self.encoder_layers:
            x = layer(x)
            stages.append(x)
        stages = self.msda(stages)
        dense = self.conv_out(stages[-1]).dense()
        n, c, d, h, w = dense.shape
        spatial_features = dense.view(n, c * d, h, w)
        return (spatial_features, stages) if self.return_middle_feats else spatial_features

    def extra_repr(self) -> str:
        return f"base={self.base_name}, level_channels={self.level_channels}"


def _register() -> bool:
    registry = _mmdet3d_registry()
    if registry is None:
        return False
    if registry.get("SparseMSDASparseEncoder") is None:
        registry.register_module(module=SparseMSDASparseEncoder)
    return True


#: Whether importing this module registered :class:`SparseMSDASparseEncoder` with mmdet3d.
REGISTERED = _register()
