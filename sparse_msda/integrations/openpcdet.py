"""OpenPCDet drop-in: a ``VoxelBackBone8x``-style 3D backbone with sparse MSDA before ``conv_out``.

OpenPCDet's ``VoxelBackBone8x.forward`` runs ``conv_out`` itself, so the encoder cannot go
between the last stage and ``conv_out`` from outside. :class:`SparseMSDABackBone8x` builds the
configured OpenPCDet backbone (``BASE_BACKBONE``, default ``VoxelBackBone8x``), adopts its
submodules under their own names (``conv_input``, ``conv1`` .. ``conv4``, ``conv_out``: a
checkpoint of the plain backbone loads into it, the encoder's weights are the only new keys, under
``msda.``) and runs

    conv_input -> conv1 .. conv4 -> BackboneLevelEncoder (chosen levels) -> conv_out

Registration (OpenPCDet looks ``BACKBONE_3D.NAME`` up in ``pcdet.models.backbones_3d.__all__``)::

    import pcdet.models.backbones_3d as backbones_3d
    from sparse_msda.integrations.openpcdet import SparseMSDABackBone8x
    backbones_3d.__all__["SparseMSDABackBone8x"] = SparseMSDABackBone8x

(:func:`register_openpcdet` does exactly this), then in the model config (see
``sparse_msda/integrations/openpcdet_kitti.yaml``)::

    BACKBONE_3D:
        NAME: SparseMSDABackBone8x
        BASE_BACKBONE: VoxelBackBone8x
        MSDA: {ATTENTION_LEVELS: [x_conv2, x_conv3, x_conv4], EMBED_DIM: 64, NUM_HEADS: 8, NUM_LAYERS: 1}

``batch_dict`` contract (OpenPCDet's): in ``voxel_features [N, C]``, ``voxel_coords [N, 4]``
(batch, z, y, x), ``batch_size``; out ``encoded_spconv_tensor`` (``conv_out``'s output),
``encoded_spconv_tensor_stride``, ``multi_scale_3d_features`` (``{"x_conv1": ..., ...}``, the
attended levels replaced by their encoded versions, widths unchanged) and
``multi_scale_3d_strides``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from spconv.pytorch import SparseConvTensor
from torch import nn

from .level_encoder import BackboneLevelEncoder

__all__ = ["MSDA_CONFIG_KEYS", "SparseMSDABackBone8x", "register_openpcdet"]

#: ``MODEL.BACKBONE_3D.MSDA`` keys -> :class:`BackboneLevelEncoder` arguments.
MSDA_CONFIG_KEYS = {
    "ATTENTION_LEVELS": "attention_levels",
    "EMBED_DIM": "embed_dim",
    "NUM_HEADS": "n_heads",
    "NUM_LAYERS": "n_layers",
    "NUM_POINTS": "n_points",
    "NEIGHBORHOOD_SIZES": "neighborhood_sizes",
    "DIM_FEEDFORWARD": "dim_feedforward",
    "DROPOUT": "dropout",
    "RESIDUAL": "residual",
}

_REQUIRED_MODULES = ("conv_input", "conv_out")


def _openpcdet_backbones() -> Optional[Mapping[str, type]]:
    try:
        import pcdet.models.backbones_3d as backbones_3d
    except ImportError:
        return None
    return backbones_3d.__all__


def register_openpcdet(name: str = "SparseMSDABackBone8x") -> None:
    """Add :class:`SparseMSDABackBone8x` to OpenPCDet's 3D backbone table under ``name``.

    Raises:
        ImportError: OpenPCDet (``pcdet``) is not importable.
    """
    table = _openpcdet_backbones()
    if table is None:
        raise ImportError("register_openpcdet needs OpenPCDet: `import pcdet.models.backbones_3d` failed")
    table[name] = SparseMSDABackBone8x


def _cfg_get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else default


class SparseMSDABackBone8x(nn.Module):
    """An OpenPCDet ``VoxelBackBone8x``-style backbone with sparse MSDA between its last stage and ``conv_out``.

    Built like every OpenPCDet module: ``SparseMSDABackBone8x(model_cfg, input_channels, grid_size,
    **kwargs)``; the base backbone is built with the same arguments.

    Args:
        model_cfg: the ``BACKBONE_3D`` config (an ``EasyDict`` or a plain dict). Keys read here:
            ``BASE_BACKBONE`` (name in ``pcdet.models.backbones_3d.__all__``, default
            ``"VoxelBackBone8x"``) and ``MSDA`` (a dict of :data:`MSDA_CONFIG_KEYS`;
            ``ATTENTION_LEVELS`` are level names such as ``x_conv3``, default all levels); every
            other key is the base backbone's (e.g. ``last_pad``).
        input_channels: voxel feature channels (from the VFE).
        grid_size: voxel grid size in (x, y, z) order, as OpenPCDet passes it (numpy array).
        base_backbone: the base class itself (overrides ``BASE_BACKBONE``; how to use a backbone
            that is not in OpenPCDet's table, or to run without OpenPCDet installed).
        **kwargs: passed to the base backbone (``voxel_size``, ``point_cloud_range``, ...).

    The base must have ``conv_input``, one module per entry ``x_<name>`` of its
    ``backbone_channels`` (``conv1`` .. ``conv4``), ``conv_out``, ``sparse_shape`` and
    ``num_point_features``, i.e. ``VoxelBackBone8x`` / ``VoxelResBackBone8x``'s layout.
    """

    def __init__(self, model_cfg, input_channels: int, grid_size, base_backbone: Optional[type] = None, **kwargs) -> None:
        super().__init__()
        if base_backbone is None:
            name = _cfg_get(model_cfg, "BASE_BACKBONE", "VoxelBackBone8x")
            table = _openpcdet_backbones()
            if table is None:
                raise ImportError(
                    f"BASE_BACKBONE={name!r} is looked up in OpenPCDet, which is not importable; "
                    "install OpenPCDet or pass base_backbone=<backbone class>"
                )
            if name not in table:
                raise ValueError(f"BASE_BACKBONE must name one of {sorted(table)}, got BASE_BACKBONE={name!r}")
            base_backbone = table[name]
        base = base_backbone(model_cfg=model_cfg, input_channels=input_channels, grid_size=grid_size, **kwargs)
        channels = getattr(base, "backbone_channels", None)
        missing = [m for m in _REQUIRED_MODULES if not isinstance(getattr(base, m, None), nn.Module)]
        if not isinstance(channels, Mapping) or not channels:
            missing.append("backbone_channels")
        else:
            missing += [n[2:] for n in channels if not (n.startswith("x_") and isinstance(getattr(base, n[2:], None), nn.Module))]
        missing += [a for a in ("sparse_shape", "num_point_features") if not hasattr(base, a)]
        if missing:
            raise TypeError(
                f"base_backbone must have VoxelBackBone8x's layout (conv_input, conv1.., conv_out, backbone_channels "
                f"{{'x_conv1': C1, ...}}, sparse_shape, num_point_features); {type(base).__name__} lacks {missing}"
            )
        self.model_cfg = model_cfg
        self.base_name = type(base).__name__
        for child_name, child in base.named_children():  # same parameter names as the plain backbone
            self.add_module(child_name, child)
        self.sparse_shape = base.sparse_shape
        self.num_point_features = base.num_point_features
        self.backbone_channels = dict(channels)
        self.level_names = list(channels)

        msda_cfg = dict(_cfg_get(model_cfg, "MSDA", None) or {})
        unknown = sorted(set(msda_cfg) - set(MSDA_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"MSDA config keys must be among {sorted(MSDA_CONFIG_KEYS)}, got unknown {unknown}")
        encoder_kwargs = {MSDA_CONFIG_KEYS[k]: v for k, v in msda_cfg.items()}
        names = encoder_kwargs.pop("attention_levels", None)
        if names is not None:
            names = list(names)
            bad = [n for n in names if n not in self.level_names]
            if bad or not names:
                raise ValueError(f"MSDA.ATTENTION_LEVELS must be names among {self.level_names}, got {names}")
            encoder_kwargs["attention_levels"] = sorted(self.level_names.index(n) for n in names)
        self.msda = BackboneLevelEncoder(
            [self.backbone_channels[n] for n in self.level_names], position_dim=3, **encoder_kwargs
        )

    def forward(self, batch_dict: dict) -> dict:
        """Run the backbone with attention on OpenPCDet's ``batch_dict`` (updated in place and returned).

        Args:
            batch_dict: ``voxel_features`` float ``[N, input_channels]``, ``voxel_coords`` int
                ``[N, 4]`` (batch, z, y, x), ``batch_size`` int.

        Returns:
            ``batch_dict`` plus ``encoded_spconv_tensor`` (``conv_out``'s output),
            ``encoded_spconv_tensor_stride``, ``multi_scale_3d_features`` (``{level name:
            SparseConvTensor}``, attended levels encoded in place) and ``multi_scale_3d_strides``.
        """
        missing = [k for k in ("voxel_features", "voxel_coords", "batch_size") if k not in batch_dict]
        if missing:
            raise ValueError(f"batch_dict must hold voxel_features, voxel_coords and batch_size; missing {missing}")
        features, coords = batch_dict["voxel_features"], batch_dict["voxel_coords"]
        if coords.ndim != 2 or coords.shape != (features.shape[0], 4):
            raise ValueError(
                f"batch_dict['voxel_coords'] must have shape [{features.shape[0]}, 4] (batch, z, y, x) like "
                f"voxel_features {tuple(features.shape)}, got {tuple(coords.shape)}"
            )
        x = SparseConvTensor(features, coords.int(), self.sparse_shape, batch_dict["batch_size"])
        x = self.conv_input(x)
        levels = []
        for name in self.level_names:
            x = getattr(self, name[2:])(x)
            levels.append(x)
        levels = self.msda(levels)
        out = self.conv_out(levels[-1])
        full_x = int(self.sparse_shape[-1])
        batch_dict.update({
            "encoded_spconv_tensor": out,
            "encoded_spconv_tensor_stride": full_x // int(out.spatial_shape[-1]),
            "multi_scale_3d_features": dict(zip(self.level_names, levels)),
            "multi_scale_3d_strides": {n: full_x // int(lvl.spatial_shape[-1]) for n, lvl in zip(self.level_names, levels)},
        })
        return batch_dict

    def extra_repr(self) -> str:
        return f"base={self.base_name}, levels={self.level_names}"
