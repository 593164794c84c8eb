"""Deformable-DETR-style encoder over the multi-scale sparse maps of an spconv backbone.

Every voxel of every level is a query. One encoder layer is

1. a :class:`SparseMSDeformableAttentionBlock` (each voxel samples ``n_points`` points per
   level around its own centre),
2. a :class:`SparseNeighborhoodAttentionBlock` (each voxel attends to every non-empty voxel in
   a small neighborhood around its centre on every level),
3. a :class:`FeedForwardBlock` (position-wise MLP),

each with its own residual connection and LayerNorm. The attention keys/values of a block are
the voxels' *current* features (the output of the previous block), i.e. self-attention over the
whole sparse multi-scale map, never densified.

The encoder maps a list of spconv ``SparseConvTensor`` (one per level, as returned by a
``VoxelBackBone8x`` / ``SparseEncoder``-shaped backbone) to a list of ``SparseConvTensor`` with the
same indices, spatial shapes and batch size and new features, so the next spconv layer (e.g. the
``SparseConv3d`` into a BEV head) takes them as they are.

Conventions (those of the whole package):

* Axis order of coordinates and positions is spconv's: (y, x) in 2D, (z, y, x) in 3D.
* The query position of a voxel with integer coordinates ``c`` is its cell centre ``c + 0.5``
  in the frame of its own level (``query_level_indices`` = the voxel's level); a position ``p``
  at level ``q`` maps to level ``l`` as ``p / shape_q * shape_l``.
* Queries are grouped by batch item (``query_batch_offsets``); the coordinate index's rows are
  level-major (``torch.cat`` of the levels' features). :class:`VoxelQueries` holds the stable
  permutation between the two orders, computed once per forward.

The :class:`adapters.SparseCoordinateIndex` of the map is built once per encoder forward (or
passed in prebuilt) and shared by all blocks of all layers: only features change between layers.
So are what depends on coordinates and positions only: the deformable sampling's corner table
(cached on the index) and the neighborhood attention's plan (:meth:`VoxelQueries.neighborhood_plan`,
built by the first layer, passed as ``plan=`` to the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
from spconv.pytorch import SparseConvTensor
from torch import Tensor, nn

from adapters import SparseCoordinateIndex, multilevel_features
from adapters.conversion import check_spconv_levels

from ..backends import check_backend_name
from ..functional.neighborhood import full_scale_positions
from ..functional.neighborhood_plan import NeighborhoodPlan
from ..functional.precision import position_dtype
from ..inputs import QueryBatch, check_dropout, check_embed_heads, check_position_dim, check_query
from .deformable_attention import SparseMSDeformableAttentionBlock
from .neighborhood_attention import SparseNeighborhoodAttentionBlock, _ActiveQueries

__all__ = ["FeedForwardBlock", "SparseMSDAEncoder", "SparseMSDAEncoderLayer", "VoxelQueries"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


class FeedForwardBlock(nn.Module):
    """Position-wise feed-forward block with residual connection and LayerNorm.

    ``norm_first=True`` (pre-norm): ``x + dropout(W2 dropout(act(W1 LN(x))))``;
    ``norm_first=False`` (post-norm, as in Deformable DETR): ``LN(x + dropout(W2 dropout(act(W1 x))))``.

    Args:
        embed_dim: channels ``C`` of the input and output.
        dim_feedforward: hidden width (default ``4 * embed_dim``).
        dropout: dropout probability after the activation and after the output projection.
        activation: ``"relu"`` or ``"gelu"``.
        bias: whether the two linear layers have biases.
        norm_first: pre-norm (True) or post-norm (False).

    Shape:
        ``x``: ``[..., C]`` -> ``[..., C]``.
    """

    def __init__(
        self,
        embed_dim: int,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        bias: bool = True,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        dim_feedforward = 4 * embed_dim if dim_feedforward is None else dim_feedforward
        _check_positive_int("dim_feedforward", dim_feedforward)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation=}")
        check_dropout(dropout)
        self.embed_dim, self.dim_feedforward = embed_dim, dim_feedforward
        self.activation_name, self.norm_first = activation, norm_first
        self.linear1 = nn.Linear(embed_dim, dim_feedforward, bias=bias)
        self.activation = _ACTIVATIONS[activation]()
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, embed_dim, bias=bias)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def _mlp(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            return x + self._mlp(self.norm(x))
        return self.norm(x + self._mlp(x))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, dim_feedforward={self.dim_feedforward}, "
            f"activation={self.activation_name!r}, norm_first={self.norm_first}"
        )


@dataclass
class VoxelQueries:
    """Every voxel of a multi-level sparse map as an attention query.

    Built once per encoder forward from the ``SparseConvTensor`` levels; all tensors below are in
    *query order*: rows grouped by batch item (a stable sort of the index rows by batch index, so
    within a batch item rows keep their level-major index order).

    Attributes:
        levels: the input levels (their indices, spatial shapes and batch size are reused).
        index: the map's :class:`SparseCoordinateIndex` (row ``r`` = row ``r`` of
            ``torch.cat([lvl.features for lvl in levels])``).
        order: int64 ``[N]``, query ``q`` is index row ``order[q]``; ``None`` when the index rows
            are already grouped by batch (e.g. batch size 1), then both orders coincide.
        inverse: int64 ``[N]``, index row ``r`` is query ``inverse[r]`` (``None`` with ``order``).
        positions: float ``[N, D]`` voxel cell centres ``coords + 0.5`` in their own level's frame.
        level_indices: int64 ``[N]`` level of each query.
        batch_offsets: int64 ``[batch_size + 1]``; queries of item ``b`` are rows
            ``batch_offsets[b]:batch_offsets[b + 1]``.

    The neighborhood plans of these queries are built on first use and cached here
    (:meth:`neighborhood_plan`), so all layers of one forward share them; so is the attention
    blocks' checked input (:meth:`query_batch`): the levels are validated once per forward
    (:meth:`from_levels`), and the blocks inside the encoder skip their own validation.
    """

    levels: list
    index: SparseCoordinateIndex
    order: Optional[Tensor]
    inverse: Optional[Tensor]
    positions: Tensor
    level_indices: Tensor
    batch_offsets: Tensor
    _plans: dict = field(default_factory=dict, repr=False)
    _batch: Optional[QueryBatch] = field(default=None, repr=False)
    _full_positions: Optional[Tensor] = field(default=None, repr=False)

    @classmethod
    def from_levels(
        cls, levels: Sequence[SparseConvTensor], coordinate_index: Optional[SparseCoordinateIndex] = None
    ) -> "VoxelQueries":
        """Queries of ``levels``; ``coordinate_index`` (prebuilt for these levels) is checked and reused.

        Raises:
            TypeError / ValueError: not a list of compatible ``SparseConvTensor``, or an index that
                was not built from these levels (see :func:`adapters.multilevel_features`).
        """
        levels, batch_size, _ = check_spconv_levels(levels)
        if coordinate_index is None:
            index = SparseCoordinateIndex.from_spconv(levels)
        else:
            if not isinstance(coordinate_index, SparseCoordinateIndex):
                raise TypeError(
                    f"coordinate_index must be a SparseCoordinateIndex or None, got {type(coordinate_index).__name__}"
                )
            _, index = multilevel_features(levels, None, coordinate_index, concatenate=False)  # validates, O(N)
        batch = index.batch_indices
        if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
            order = torch.argsort(batch, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
        else:
            order = inverse = None
        dtype = levels[0].features.dtype
        positions = index.spatial_indices.to(position_dtype(dtype)) + 0.5  # float16/bfloat16 maps: float32 positions
        level_indices = index.level_indices
        if order is not None:
            positions, level_indices, batch = positions[order], level_indices[order], batch[order]
        counts = torch.bincount(batch, minlength=batch_size)
        offsets = torch.zeros(batch_size + 1, dtype=torch.int64, device=batch.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(list(levels), index, order, inverse, positions, level_indices, offsets)

    def neighborhood_plan(self, block: SparseNeighborhoodAttentionBlock, positions: Tensor) -> NeighborhoodPlan:
        """The neighborhood plan of every voxel query for ``block`` called with query positions
        ``positions`` (the same tensor values for every layer; no background, no mask), built
        once per (neighborhood sizes, chunk size) and then shared by every block with the same
        settings (the block checks that the plan fits its call)."""
        key = (tuple(block.neighborhood_sizes), block.chunk_size)
        if key not in self._plans:  # the block's own planning, on the inputs checked by from_levels
            qb = self._query_batch(positions.device)
            aq = _ActiveQueries(qb, None, None, positions, qb.batch_indices, qb.query_level_indices, qb.query_level_shapes)
            self._plans[key] = block._plan(aq, False)
        return self._plans[key]

    def full_scale_positions(self) -> Tensor:
        """``[N, D]`` query positions at full scale (the neighborhood blocks' frame), computed once."""
        if self._full_positions is None:
            self._full_positions = full_scale_positions(self.positions, self.level_indices, self.index.level_spatial_shapes)
        return self._full_positions

    def query_batch(self, x: Tensor) -> QueryBatch:
        """The attention blocks' checked inputs (:class:`~sparse_msda.inputs.QueryBatch`, what
        :func:`~sparse_msda.inputs.prepare_inputs` returns) for these queries with features ``x``
        (``[N, C]``, query order) as the map: what depends on coordinates only (level shapes, batch
        and level of each query) is built on first use, without the data-dependent checks that
        :meth:`from_levels` already did; only the features are new per call."""
        return replace(self._query_batch(x.device), features=self.queries_to_rows(x))

    def _query_batch(self, device) -> QueryBatch:
        if self._batch is None:
            shapes = self.index.level_spatial_shapes.to(device)
            counts = self.batch_offsets.diff()
            batch = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts.to(device))
            levels = self.level_indices.to(device)
            self._batch = QueryBatch(
                features=None, index=self.index, level_spatial_shapes=shapes, batch_indices=batch,
                query_level_indices=levels, query_level_shapes=shapes[levels].to(self.positions.dtype),
            )
        return self._batch

    @property
    def n_queries(self) -> int:
        return self.index.n_voxels

    def rows_to_queries(self, rows: Tensor) -> Tensor:
        """``[N, ...]`` tensor in index row order -> query order."""
        return rows if self.order is None else rows[self.order]

    def queries_to_rows(self, queries: Tensor) -> Tensor:
        """``[N, ...]`` tensor in query order -> index row order."""
        return queries if self.inverse is None else queries[self.inverse]

    def input_features(self) -> Tensor:
        """The levels' features, ``[N, C]`` in query order."""
        return self.rows_to_queries(torch.cat([lvl.features for lvl in self.levels]))

    def to_levels(self, queries: Tensor) -> list[SparseConvTensor]:
        """``[N, C']`` query-order features -> one ``SparseConvTensor`` per level (same indices/shapes)."""
        rows = self.queries_to_rows(queries)
        sizes = [lvl.features.shape[0] for lvl in self.levels]
        return [lvl.replace_feature(f) for lvl, f in zip(self.levels, torch.split(rows, sizes))]


class SparseMSDAEncoderLayer(nn.Module):
    """One encoder layer: deformable attention + neighborhood attention + feed-forward.

    Args:
        embed_dim: channels ``C`` of every level (project backbone channels to it first,
            e.g. with a ``SubMConv3d(c, embed_dim, 1)`` per level).
        n_heads: attention heads (must divide ``embed_dim``).
        n_levels: number of levels of the map.
        n_points: deformable sampling points per head and level.
        neighborhood_sizes: odd neighborhood edge length per level (cells of that level) of the
            neighborhood attention; default ``3`` on every level (``3**D`` keys per level).
        position_dim: 2 or 3 (spatial dims of the levels).
        dim_feedforward: hidden width of the feed-forward block (default ``4 * embed_dim``).
        dropout: dropout of the three blocks.
        activation: feed-forward activation, ``"relu"`` or ``"gelu"``.
        norm_first: pre-norm (default) or post-norm blocks.
        bias: biases of the attention blocks' projections.
        backend: implementation of both attentions: ``"reference"``, ``"cpu"``, ``"triton"`` or
            None (automatic, or ``$SPARSE_MSDA_BACKEND``; :func:`sparse_msda.backends.choose_backend`).

    ``forward(levels, coordinate_index=None, level_embedding=None)`` runs the layer on a list of
    ``SparseConvTensor``; :class:`SparseMSDAEncoder` calls :meth:`forward_queries` instead so the
    index and query order are computed once for all layers.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int,
        n_points: int = 4,
        neighborhood_sizes: Optional[Sequence[int]] = None,
        position_dim: int = 3,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm_first: bool = True,
        bias: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_embed_heads(embed_dim, n_heads)
        self.backend = check_backend_name(backend)
        check_position_dim(position_dim)
        _check_positive_int("n_levels", n_levels)
        _check_positive_int("n_points", n_points)
        if neighborhood_sizes is None:
            neighborhood_sizes = [3] * n_levels
        neighborhood_sizes = list(neighborhood_sizes)
        if len(neighborhood_sizes) != n_levels:
            raise ValueError(
                f"neighborhood_sizes must hold one size per level (n_levels={n_levels}), got {neighborhood_sizes=}"
            )
        self.embed_dim, self.n_heads, self.n_levels = embed_dim, n_heads, n_levels
        self.n_points, self.position_dim, self.norm_first = n_points, position_dim, norm_first
        self.neighborhood_sizes = neighborhood_sizes
        self.deformable = SparseMSDeformableAttentionBlock(
            embed_dim, n_heads, n_levels, n_points, dropout=dropout, bias=bias,
            norm_first=norm_first, position_dim=position_dim, backend=backend,
        )
        self.neighborhood = SparseNeighborhoodAttentionBlock(
            embed_dim, n_heads, n_levels=n_levels, neighborhood_sizes=neighborhood_sizes,
            position_dim=position_dim, dropout=dropout, bias=bias, norm_first=norm_first, backend=backend,
        )
        self.feedforward = FeedForwardBlock(
            embed_dim, dim_feedforward, dropout=dropout, activation=activation, norm_first=norm_first
        )

    def _attend(self, block: nn.Module, x: Tensor, queries: VoxelQueries, query_pos: Optional[Tensor]) -> Tensor:
        """One attention block, keys/values = the current features ``x`` of every voxel.

        The block's checked-input path: the inputs were validated once for the whole forward
        (:meth:`VoxelQueries.from_levels`, :func:`_check_levels`, the dtype in
        :meth:`forward_queries`), so no data-dependent check runs again here."""
        q = x if query_pos is None else x + query_pos
        qb = queries.query_batch(x)
        if isinstance(block, SparseNeighborhoodAttentionBlock):
            # full-scale positions (as the reference); the plan is the same for all layers
            positions = queries.full_scale_positions()
            plan = queries.neighborhood_plan(block, positions)
            aq = _ActiveQueries(qb, None, q, positions, qb.batch_indices, qb.query_level_indices, qb.query_level_shapes)
            if plan is None:  # not shared: the block's own plan
                plan = block._plan(aq, False)
            out = block._forward_checked(q, aq, plan, None)
        else:
            out = block._forward_checked(qb, q, queries.positions, None)
        # With a query embedding the residual stream stays free of it (Deformable DETR's
        # ``src + attn(with_pos_embed(src, pos), value=src)``): add only the block's update.
        return out if query_pos is None else x + (out - q)

    def forward_queries(self, x: Tensor, queries: VoxelQueries, query_pos: Optional[Tensor] = None) -> Tensor:
        """Run the layer on query-order features.

        Args:
            x: ``[N, C]`` features of every voxel in ``queries``' query order.
            queries: the map's :class:`VoxelQueries` (index + query order, built once).
            query_pos: optional ``[N, C]`` embedding added to the attention queries only
                (requires ``norm_first=True``, see :class:`SparseMSDAEncoder`).

        Returns:
            ``[N, C]`` new features, query order.

        Raises:
            TypeError / ValueError: ``x`` of another dtype than the layer's parameters or of the
                wrong shape (metadata only: the map was checked when ``queries`` was built).
        """
        check_query(x, self.embed_dim, self.deformable.q_in_proj.weight.dtype)
        if x.shape[0] != queries.n_queries:
            raise ValueError(f"x must have one row per query, [{queries.n_queries}, {self.embed_dim}], got x.shape={tuple(x.shape)}")
        x = self._attend(self.deformable, x, queries, query_pos)
        x = self._attend(self.neighborhood, x, queries, query_pos)
        return self.feedforward(x)

    def forward(
        self,
        levels: Sequence[SparseConvTensor],
        coordinate_index: Optional[SparseCoordinateIndex] = None,
        level_embedding: Optional[Tensor] = None,
    ) -> list[SparseConvTensor]:
        """Encode one list of levels (see :class:`SparseMSDAEncoder` for arguments and shapes)."""
        _check_level_widths(levels, self.embed_dim)
        queries = VoxelQueries.from_levels(levels, coordinate_index)
        _check_levels(queries, self.embed_dim, self.n_levels, self.position_dim)
        query_pos = None
        if level_embedding is not None:
            if level_embedding.shape != (self.n_levels, self.embed_dim):
                raise ValueError(
                    f"level_embedding must have shape [{self.n_levels}, {self.embed_dim}], "
                    f"got level_embedding.shape={tuple(level_embedding.shape)}"
                )
            query_pos = level_embedding[queries.level_indices]
        return queries.to_levels(self.forward_queries(queries.input_features(), queries, query_pos))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, n_levels={self.n_levels}, "
            f"n_points={self.n_points}, neighborhood_sizes={self.neighborhood_sizes}, "
            f"position_dim={self.position_dim}, norm_first={self.norm_first}, backend={self.backend!r}"
        )


def _check_level_widths(levels, embed_dim: int) -> None:
    """Levels of a backbone keep their stage widths: say that a projection to embed_dim is missing."""
    if not isinstance(levels, (list, tuple)) or not all(
        isinstance(lvl, SparseConvTensor) and lvl.features.ndim == 2 for lvl in levels
    ):
        return  # VoxelQueries.from_levels reports malformed level lists
    widths = [int(lvl.features.shape[1]) for lvl in levels]
    if any(w != embed_dim for w in widths):
        raise ValueError(
            f"levels must all have embed_dim={embed_dim} channels, got channel counts {widths}: project every "
            f"level to embed_dim first, e.g. with sparse_msda.LevelProjection(in_channels={widths}, "
            f"embed_dim={embed_dim})"
        )


def _check_levels(queries: VoxelQueries, embed_dim: int, n_levels: int, position_dim: int) -> None:
    shapes = queries.index.level_spatial_shapes
    if shapes.shape != (n_levels, position_dim):
        raise ValueError(
            f"levels must be {n_levels} SparseConvTensor of {position_dim} spatial dims, got "
            f"{shapes.shape[0]} levels with spatial shapes {shapes.tolist()}"
        )
    features = queries.levels[0].features
    if features.shape[-1] != embed_dim:
        raise ValueError(f"levels must have embed_dim={embed_dim} channels, got {features.shape[-1]}")
    if not features.is_floating_point():
        raise TypeError(f"levels' features must be floating point, got {features.dtype}")


class SparseMSDAEncoder(nn.Module):
    """Stack of :class:`SparseMSDAEncoderLayer` over the multi-scale maps of an spconv backbone.

    ``encoder(levels) -> levels'``: ``levels`` is a list of ``n_levels`` ``SparseConvTensor``
    (common batch size, ``embed_dim`` channels, ``position_dim`` spatial dims, e.g. the 4 stages
    ``[41,1600,1408], [21,800,704], [11,400,352], [5,200,176]`` of ``VoxelBackBone8x`` after a
    per-level 1x1 projection); ``levels'`` has the same indices, spatial shapes and batch size
    (built with ``SparseConvTensor.replace_feature``) and the encoded features, so any following
    spconv layer accepts it.

    Every voxel of every level is a query at its cell centre (``coords + 0.5``, in its own level's
    frame, spconv axis order). The :class:`adapters.SparseCoordinateIndex` of the map, the
    batch grouping of the queries, the deformable corner table and the neighborhood plan are
    computed once per forward and shared by all layers (pass ``coordinate_index=`` to reuse an
    index built elsewhere, e.g. by a decoder).

    Level embedding (``level_embedding=True``, default): a learnable ``[n_levels, embed_dim]``
    table, as Deformable DETR's ``level_embed``. Each voxel's entry is added to the *attention
    queries* of every layer (not to the keys/values and not to the residual stream: the stream gets
    ``block(x + e) - (x + e)``, which for pre-norm blocks is exactly DETR's
    ``x + attn(with_pos_embed(x, e), value=x)``). It requires ``norm_first=True``.
    The positional information itself comes from the blocks (sampling offsets relative to the
    query position, rotary encodings in the neighborhood attention).

    Args:
        embed_dim, n_heads, n_levels, n_points, neighborhood_sizes, position_dim,
        dim_feedforward, dropout, activation, norm_first, bias, backend: see :class:`SparseMSDAEncoderLayer`.
        n_layers: number of layers.
        level_embedding: learnable level embedding added to the attention queries.
        final_norm: LayerNorm on the output (default: True for pre-norm stacks, whose residual
            stream is otherwise unnormalised; False for post-norm).
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int,
        n_layers: int,
        n_points: int = 4,
        neighborhood_sizes: Optional[Sequence[int]] = None,
        position_dim: int = 3,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm_first: bool = True,
        bias: bool = False,
        level_embedding: bool = True,
        final_norm: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_positive_int("n_layers", n_layers)
        self.backend = check_backend_name(backend)
        if level_embedding and not norm_first:
            raise ValueError(
                "level_embedding=True needs norm_first=True (the embedding is kept out of the residual "
                f"stream, which post-norm blocks do not expose), got {norm_first=}; pass level_embedding=False"
            )
        self.layers = nn.ModuleList(
            SparseMSDAEncoderLayer(
                embed_dim, n_heads, n_levels, n_points=n_points, neighborhood_sizes=neighborhood_sizes,
                position_dim=position_dim, dim_feedforward=dim_feedforward, dropout=dropout,
                activation=activation, norm_first=norm_first, bias=bias, backend=backend,
            )
            for _ in range(n_layers)
        )
        self.embed_dim, self.n_heads, self.n_levels, self.n_layers = embed_dim, n_heads, n_levels, n_layers
        self.position_dim = position_dim
        self.level_embed = nn.Parameter(torch.empty(n_levels, embed_dim)) if level_embedding else None
        final_norm = norm_first if final_norm is None else final_norm
        self.norm = nn.LayerNorm(embed_dim) if final_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Level embedding ~ N(0, 1) as in Deformable DETR; the layers keep their own init."""
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self,
        levels: Sequence[SparseConvTensor],
        coordinate_index: Optional[SparseCoordinateIndex] = None,
    ) -> list[SparseConvTensor]:
        """Encode the multi-scale map.

        Args:
            levels: ``n_levels`` ``SparseConvTensor`` with features ``[N_l, embed_dim]``,
                indices ``[N_l, 1 + position_dim]`` (batch, then spconv-order coords).
            coordinate_index: optional prebuilt index of exactly these levels (validated, O(N)).

        Returns:
            ``n_levels`` ``SparseConvTensor``: same indices / spatial shapes / batch size, new
            features ``[N_l, embed_dim]`` (differentiable w.r.t. the inputs and parameters).

        Raises:
            TypeError / ValueError: wrong level list, channel count, level count or dims, or an
                index not built from these levels.
        """
        _check_level_widths(levels, self.embed_dim)
        queries = VoxelQueries.from_levels(levels, coordinate_index)
        _check_levels(queries, self.embed_dim, self.n_levels, self.position_dim)
        x = queries.input_features()
        query_pos = None if self.level_embed is None else self.level_embed.to(x.dtype)[queries.level_indices]
        for layer in self.layers:
            x = layer.forward_queries(x, queries, query_pos)
        if self.norm is not None:
            x = self.norm(x)
        return queries.to_levels(x)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, n_levels={self.n_levels}, "
            f"n_layers={self.n_layers}, position_dim={self.position_dim}, "
            f"level_embedding={self.level_embed is not None}, final_norm={self.norm is not None}, "
            f"backend={self.backend!r}"
        )
