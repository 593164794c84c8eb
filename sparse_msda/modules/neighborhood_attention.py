"""Multi-level sparse neighborhood attention block with rotary position encoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters import SparseCoordinateIndex

from ..backends import check_backend_name
from ..functional.neighborhood import query_rope_positions, sparse_neighborhood_attention, voxel_rope_positions
from ..functional.neighborhood_plan import NeighborhoodPlan, build_neighborhood_plan, default_chunk_size
from ..functional.norm_linear import layer_norm_linear
from ..functional.precision import position_dtype
from ..functional.rope import apply_rope, apply_rope_to_projection, check_freqs_in_groups, init_rope_frequencies, pattern_name
from ..functional.windows import check_neighborhood_sizes, window_centres
from ..inputs import QueryBatch, check_dropout, check_embed_heads, check_position_dim, largest_level, prepare_inputs

__all__ = ["MultilevelRotaryEncoding", "RotaryAttentionBlock", "SparseNeighborhoodAttentionBlock"]


class MultilevelRotaryEncoding(nn.Module):
    """Learnable RoPE frequencies over (full-scale spatial position, level index).

    See :mod:`sparse_msda.functional.rope` for the rotation, the frequency-group patterns and
    the initialisation. The frequencies are an ``nn.Parameter`` ``[H', head_dim // 2, D + 1]``
    (``H' = 1`` with ``share_heads``), learnable, initialised from the base thetas; the entries
    outside each pair's frequency group are held at zero by a fixed mask.
    """

    def __init__(
        self,
        n_heads: int,
        head_dim: int,
        position_dim: int,
        spatial_base_theta: float = 100.0,
        level_base_theta: float = 10.0,
        share_heads: bool = False,
        freq_group_pattern: str = "single",
        enforce_freq_groups_equal: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(share_heads, bool):
            raise TypeError(f"rope_share_heads must be a bool, got {share_heads=}")
        if not isinstance(enforce_freq_groups_equal, bool):
            raise TypeError(f"rope_enforce_freq_groups_equal must be a bool, got {enforce_freq_groups_equal=}")
        self.n_heads, self.head_dim, self.position_dim = n_heads, head_dim, position_dim
        self.spatial_base_theta, self.level_base_theta = spatial_base_theta, level_base_theta
        self.share_heads, self.freq_group_pattern = share_heads, pattern_name(freq_group_pattern)
        self.enforce_freq_groups_equal = enforce_freq_groups_equal
        freqs, mask = self._init()  # validates
        self.freqs = nn.Parameter(freqs)
        self.register_buffer("freq_mask", mask, persistent=False)

    def _init(self, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        return init_rope_frequencies(
            self.n_heads, self.head_dim, self.position_dim, self.spatial_base_theta, self.level_base_theta,
            self.share_heads, self.freq_group_pattern, self.enforce_freq_groups_equal, generator,
        )

    def reset_parameters(self) -> None:
        freqs, mask = self._init()
        with torch.no_grad():
            self.freqs.copy_(freqs)
        self.freq_mask.copy_(mask)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        freqs = state_dict.get(prefix + "freqs")
        if isinstance(freqs, Tensor):
            check_freqs_in_groups(freqs, self.freq_mask.to(freqs.device), self.freq_group_pattern)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def frequencies(self) -> Tensor:
        """Effective frequencies ``[H', head_dim // 2, D + 1]`` (zero off each pair's group)."""
        return self.freqs * self.freq_mask

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x [..., H, head_dim]`` at position vectors ``[..., D + 1]``."""
        return apply_rope(x, positions, self.frequencies())

    def rotate_projection(self, x: Tensor, positions: Tensor) -> Tensor:
        """``forward(x.view(N, H, head_dim), positions)`` for a projection's fresh output ``x [N,
        H * head_dim]`` that feeds one op alone (its gradient reaches the rotation only): rotated
        in place on the C++ kernel (:func:`~sparse_msda.functional.rope.apply_rope_to_projection`:
        no new ``[N, H * head_dim]`` tensor in the forward or the backward)."""
        return apply_rope_to_projection(x, positions, self.frequencies(), self.n_heads)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, head_dim={self.head_dim}, position_dim={self.position_dim}, "
            f"spatial_base_theta={self.spatial_base_theta}, level_base_theta={self.level_base_theta}, "
            f"share_heads={self.share_heads}, freq_group_pattern={self.freq_group_pattern!r}"
        )


@dataclass
class _ActiveQueries:
    """The queries a block computes (``query_mask`` False), from :meth:`RotaryAttentionBlock._prepare_queries`."""

    inputs: QueryBatch  # the checked inputs of all queries (features, index, ...)
    active: Optional[Tensor]  # rows computed, None = all
    x: Tensor  # [n, embed_dim]
    positions: Tensor  # [n, D] in each query's frame
    batch: Tensor  # [n]
    levels: Tensor  # [n] level of each query's frame
    position_shapes: Tensor  # [n, D] shape of that frame


class RotaryAttentionBlock(nn.Module):
    """What the neighborhood and the global self-attention blocks share: validated
    hyper-parameters, the parameters (``norm``, ``q_proj``, ``kv_proj``, ``out_proj``, ``rope``,
    so that either block's ``state_dict`` loads into the other) and their initialisation, the
    ``query_mask`` selection, rotated queries, key positions and the residual / norm finish.
    Subclasses call :meth:`reset_parameters` at the end of their ``__init__``.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int,
        position_dim: int,
        dropout: float,
        bias: bool,
        norm_first: bool,
        rope_spatial_base_theta: float,
        rope_level_base_theta: float,
        rope_share_heads: bool,
        rope_freq_group_pattern: str,
        rope_enforce_freq_groups_equal: bool,
    ) -> None:
        super().__init__()
        check_embed_heads(embed_dim, n_heads)
        check_position_dim(position_dim)
        if not isinstance(n_levels, int) or isinstance(n_levels, bool) or n_levels <= 0:
            raise ValueError(f"n_levels must be a positive int, got {n_levels=}")
        check_dropout(dropout)
        self.embed_dim, self.n_heads, self.n_levels, self.position_dim = embed_dim, n_heads, n_levels, position_dim
        self.head_dim = embed_dim // n_heads
        self.norm_first, self.bias = norm_first, bias
        self.norm = nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.rope = MultilevelRotaryEncoding(
            n_heads, self.head_dim, position_dim, rope_spatial_base_theta, rope_level_base_theta,
            rope_share_heads, rope_freq_group_pattern, rope_enforce_freq_groups_equal,
        )

    # read-only aliases under sparse-transformer-layers' attribute names (state_dict keys stay
    # ours: convert reference checkpoints with sparse_msda.checkpoints.load_reference_state_dict)
    @property
    def q_in_proj(self) -> nn.Linear:
        return self.q_proj

    @property
    def pos_encoding(self) -> MultilevelRotaryEncoding:
        return self.rope

    @property
    def out_proj_drop(self) -> nn.Dropout:
        return self.dropout

    @property
    def attn_drop_rate(self) -> float:
        return self.dropout.p

    @property
    def rope_share_heads(self) -> bool:
        return self.rope.share_heads

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, zero biases, unit LayerNorm, RoPE frequencies from the thetas."""
        self.norm.reset_parameters()
        for lin in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.rope.reset_parameters()

    def _prepare_queries(
        self, query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
        query_level_indices, query_mask, coordinate_index, background_embedding=None,
    ) -> _ActiveQueries:
        """The checked inputs (:func:`~sparse_msda.inputs.prepare_inputs`) and, of the queries to
        compute (``query_mask`` False), their rows, features, positions, batch items, levels and
        frame shapes."""
        qb = prepare_inputs(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            embed_dim=self.embed_dim, n_levels=self.n_levels, position_dim=self.position_dim,
            query_level_indices=query_level_indices, background_embedding=background_embedding,
            index=coordinate_index, dtype=self.q_proj.weight.dtype,
        )
        active = self._active_rows(query_mask, query)
        return _ActiveQueries(
            inputs=qb,
            active=active,
            x=self._select(query, active),
            positions=self._select(query_spatial_positions.to(position_dtype(query_spatial_positions.dtype)), active),
            batch=self._select(qb.batch_indices, active),
            levels=self._select(qb.query_level_indices, active),
            position_shapes=self._select(qb.query_level_shapes, active),
        )

    @staticmethod
    def _active_rows(query_mask: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
        """Rows of the queries to compute (``query_mask`` False), or None for all."""
        if query_mask is None:
            return None
        n_q = query.shape[0]
        if not isinstance(query_mask, Tensor) or query_mask.dtype != torch.bool:
            raise TypeError(f"query_mask must be a bool tensor, got {getattr(query_mask, 'dtype', type(query_mask).__name__)}")
        if query_mask.shape != (n_q,):
            raise ValueError(f"query_mask must have shape [{n_q}], got query_mask.shape={tuple(query_mask.shape)}")
        return (~query_mask.to(query.device)).nonzero().squeeze(1)

    @staticmethod
    def _select(t: Tensor, active: Optional[Tensor]) -> Tensor:
        """The rows ``active`` of a per-query tensor (all rows for None)."""
        return t if active is None else t.index_select(0, active)

    def _rotated_queries(
        self, x: Tensor, pos: Tensor, pos_shapes: Tensor, levels: Tensor, full_shape: Tensor, in_place: bool = False
    ) -> Tensor:
        """``[n, H, head_dim]`` queries: (pre-)norm, ``q_proj``, RoPE at their (full-scale position, level).
        ``in_place``: the projection is rotated in place (:meth:`MultilevelRotaryEncoding.rotate_projection`;
        only when the queries feed one op alone, as the neighborhood attention)."""
        if self.norm_first:  # LayerNorm + q_proj; the normalised x is recomputed in the backward, not kept
            norm, proj = self.norm, self.q_proj
            q = layer_norm_linear(x, norm.weight, norm.bias, norm.eps, proj.weight, proj.bias)
        else:
            q = self.q_proj(x)
        u = query_rope_positions(pos, pos_shapes, levels, full_shape)
        if in_place:
            return self.rope.rotate_projection(q, u)
        return self.rope(q.view(x.shape[0], self.n_heads, self.head_dim), u)

    def _rotated_keys_values(
        self, features: Tensor, index: SparseCoordinateIndex, rows: Optional[Tensor], like: Tensor, in_place: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Keys (rotated at their voxel's full-scale position and level) and values ``[n, H,
        head_dim]`` of the index's voxels ``rows`` (None: all), projected once per voxel; on
        ``like``'s device and dtype. k and v come from the two halves of ``kv_proj``
        (separate contiguous outputs, no strided split)."""
        feats = features if rows is None else features.index_select(0, rows.to(features.device))
        feats = feats.to(device=like.device, dtype=like.dtype)
        w_kv, b_kv, e = self.kv_proj.weight, self.kv_proj.bias, self.embed_dim
        k = F.linear(feats, w_kv[:e], None if b_kv is None else b_kv[:e])
        v = F.linear(feats, w_kv[e:], None if b_kv is None else b_kv[e:]).view(-1, self.n_heads, self.head_dim)
        shapes = index.level_spatial_shapes
        vox_l = index.level_indices if rows is None else index.level_indices[rows.to(index.level_indices.device)]
        vox_c = index.spatial_indices if rows is None else index.spatial_indices[rows.to(index.spatial_indices.device)]
        u = voxel_rope_positions(vox_c, vox_l, shapes, shapes[largest_level(shapes)]).to(like.device)
        if in_place:  # the keys feed the attention alone
            return self.rope.rotate_projection(k, u), v
        return self.rope(k.view(-1, self.n_heads, self.head_dim), u), v

    def _finish(self, query: Tensor, x: Tensor, attn: Tensor, has_key: Tensor, active: Optional[Tensor]) -> Tensor:
        """Output projection, zero branch for queries without keys, dropout, residual, (post-)norm,
        and the masked queries put back unchanged."""
        branch = self.out_proj(attn.reshape(x.shape[0], self.embed_dim))
        if not bool(has_key.all()):
            branch = torch.where(has_key[:, None], branch, torch.zeros((), dtype=branch.dtype, device=branch.device))
        branch = self.dropout(branch)
        # the residual added into the branch (a fresh tensor no backward saves: out_proj / where /
        # dropout keep their inputs or masks only) instead of a new [n, embed_dim] tensor
        y = branch.add_(x) if branch is not x and branch.dtype == x.dtype and branch._base is None else x + branch
        if not self.norm_first:
            y = self.norm(y)
        return y if active is None else query.index_copy(0, active, y)


class SparseNeighborhoodAttentionBlock(RotaryAttentionBlock):
    """Multi-level sparse neighborhood attention (pre/post-norm block with residual).

    Each query attends, at every level ``l``, to the voxels present in the
    ``neighborhood_sizes[l] ** position_dim`` window centred on the cell containing its
    full-scale position mapped to level ``l`` (``floor(p / full_shape * shape_l)``), with one
    softmax over the union of its windows. Multi-head scaled dot-product attention; queries and
    keys are rotated (RoPE, :class:`MultilevelRotaryEncoding`) at their (full-scale position,
    level) so scores depend on relative positions only. Full scale = the largest level's frame;
    a key voxel sits at its cell centre ``c + 0.5`` mapped to full scale and its level index; a
    query at its full-scale position and its level index (``query_level_indices``, default the
    largest level). As in sparse-transformer-layers, query positions are full-scale even when
    ``query_level_indices`` is given (it enters RoPE only).

    Block: ``x + dropout(out_proj(attn(norm(x))))`` if ``norm_first``, else
    ``norm(x + dropout(out_proj(attn(x))))``. Keys and values are projected from the feature
    maps as given (not normalised), once per voxel, and keys are rotated once per voxel.

    Background: with ``background_embedding`` ``[batch, n_levels, embed_dim]`` (input feature
    space) every in-bounds absent window cell behaves exactly like a voxel holding that
    feature (its key rotated at the absent cell's own position); without it, absent cells
    are masked out. Cells outside a level's grid are always masked out. A query with no key
    at all gets an attention branch of exactly zero (output ``x`` with ``norm_first``,
    ``norm(x)`` otherwise). ``query_mask[i] = True``: output row ``i`` is input row ``i``
    exactly (the query is not computed).

    Memory: the attention (the ``cpu`` backend's fused kernel
    :func:`~sparse_msda.backends.cpu.attention_forward` (the ``sparse_msda::neighborhood_attention`` op), or the ``reference`` backend's
    :class:`~sparse_msda.backends.reference.NeighborhoodAttentionFunction`) saves per-voxel
    keys/values, the output, a ``[queries, heads]`` log-sum-exp and the plan's integer indices
    only (tiled attention; no ``[queries, keys, embed_dim]`` tensor) and recomputes the scores
    in the backward.
    Dropout acts on the attention branch only (not on attention weights).

    Plan reuse: the plan (which voxels each query attends to) depends on the map's coordinates,
    the query positions, batch and frames, the neighborhood sizes and background on/off only,
    not on features or weights. A stack of blocks over the same queries builds it once with
    :meth:`build_plan` and passes ``plan=`` to every block (:class:`SparseMSDAEncoder` does so);
    a plan that does not fit the call (other positions' window cells, batch, sizes, background
    or coordinate index) raises ``ValueError``.

    Args:
        embed_dim: feature size of queries and maps; divisible by ``n_heads``.
        n_heads: attention heads (``head_dim = embed_dim // n_heads`` must be even).
        n_levels: levels of the maps.
        neighborhood_sizes: one odd window size per level (level order of the maps).
        position_dim: 2 (y, x) or 3 (z, y, x).
        dropout: dropout on the attention branch (after the output projection).
        bias: bias of the q/k/v and output projections.
        norm_first: pre-norm (True) or post-norm.
        rope_spatial_base_theta, rope_level_base_theta: RoPE frequency bases.
        rope_share_heads: one set of frequencies for all heads.
        rope_freq_group_pattern: ``"single"``, ``"partition"`` (spatial | level), ``"closure"``, ``"axial"`` or ``"spatial_level"``
            (:mod:`sparse_msda.functional.rope`).
        rope_enforce_freq_groups_equal: error if ``head_dim // 2`` does not split equally.
        backend: implementation of the attention: ``"reference"``, ``"cpu"``, ``"triton"`` or
            None (automatic, or ``$SPARSE_MSDA_BACKEND``; :func:`sparse_msda.backends.choose_backend`).

    Raises:
        ValueError: bad sizes/levels/position_dim/heads/RoPE options. TypeError: non-int sizes.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        n_levels: int = 4,
        neighborhood_sizes: Sequence[int] = (3, 5, 7, 9),
        position_dim: int = 2,
        dropout: float = 0.0,
        bias: bool = False,
        norm_first: bool = True,
        rope_spatial_base_theta: float = 100.0,
        rope_level_base_theta: float = 10.0,
        rope_share_heads: bool = False,
        rope_freq_group_pattern: str = "single",
        rope_enforce_freq_groups_equal: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            embed_dim, n_heads, n_levels, position_dim, dropout, bias, norm_first, rope_spatial_base_theta,
            rope_level_base_theta, rope_share_heads, rope_freq_group_pattern, rope_enforce_freq_groups_equal,
        )
        self.backend = check_backend_name(backend)
        self.neighborhood_sizes = check_neighborhood_sizes(neighborhood_sizes, n_levels)
        self.chunk_size = default_chunk_size(n_heads)
        self.reset_parameters()

    def forward(
        self,
        query: Tensor,
        query_spatial_positions: Tensor,
        query_batch_offsets: Tensor,
        stacked_feature_maps,
        level_spatial_shapes,
        background_embedding: Optional[Tensor] = None,
        query_level_indices: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
        coordinate_index: Optional[SparseCoordinateIndex] = None,
        plan: Optional[NeighborhoodPlan] = None,
    ) -> Tensor:
        """Attend from each query to the voxels of its multi-level windows.

        Args:
            query: ``[n_queries, embed_dim]``.
            query_spatial_positions: float ``[n_queries, position_dim]`` at FULL SCALE (the
                frame of the largest level) for every query, with or without
                ``query_level_indices`` (as the reference's ``get_multilevel_neighborhoods``;
                map own-level positions with
                :func:`~sparse_msda.functional.neighborhood.full_scale_positions`); spconv axis order.
            query_batch_offsets: int ``[batch_size + 1]``.
            stacked_feature_maps: COO stack ``[batch, *spatial, n_levels, embed_dim]`` or a list
                of ``SparseConvTensor`` (one per level).
            level_spatial_shapes: ``[n_levels, position_dim]`` (may be None for spconv levels).
            background_embedding: optional ``[batch, n_levels, embed_dim]`` feature of absent cells.
            query_level_indices: optional int ``[n_queries]`` level of each query; enters the
                query's RoPE position vector only (default: the largest level).
            query_mask: optional bool ``[n_queries]``; True rows are returned unchanged.
            coordinate_index: optional prebuilt index of the map (reused across layers).
            plan: optional plan from :meth:`build_plan` for the same queries, map and mask
                (reused across blocks; its index is used when ``coordinate_index`` is None).

        Returns:
            ``[n_queries, embed_dim]``.

        Raises:
            ValueError: bad inputs, or a ``plan`` built for other queries, sizes, background
                setting or coordinate index.
        """
        if plan is not None:
            if not isinstance(plan, NeighborhoodPlan):
                raise TypeError(f"plan must be a NeighborhoodPlan from build_plan() or None, got {type(plan).__name__}")
            if coordinate_index is None:
                coordinate_index = plan.index
            elif coordinate_index is not plan.index:
                raise ValueError("plan was built with another coordinate_index than the one passed")
        aq = self._prepare_queries(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            query_level_indices, query_mask, coordinate_index, background_embedding,
        )
        with_bg = background_embedding is not None
        if plan is None:
            plan = self._plan(aq, with_bg)
        else:
            self._check_plan(plan, aq, with_bg)
        return self._forward_checked(query, aq, plan, background_embedding)

    def _forward_checked(
        self, query: Tensor, aq: _ActiveQueries, plan: NeighborhoodPlan, background_embedding: Optional[Tensor]
    ) -> Tensor:
        """The block on inputs checked by :meth:`_prepare_queries` and a plan that fits them (the
        encoder calls it directly with the inputs it checked once per forward)."""
        qb, active, x, pos, levels = aq.inputs, aq.active, aq.x, aq.positions, aq.levels
        pos_shapes = self._position_frames(aq)
        with_bg = background_embedding is not None
        freqs = self.rope.frequencies()
        H, d = self.n_heads, self.head_dim
        q = self._rotated_queries(x, pos, pos_shapes, levels, plan.full_shape, in_place=True)
        k, v = self._rotated_keys_values(qb.features, qb.index, plan.voxel_rows, query, in_place=True)
        bg_k = bg_v = None
        if with_bg:
            bkv = self.kv_proj(background_embedding.to(query.dtype)).view(-1, self.n_levels, 2, H, d)  # any strides
            bg_k, bg_v = bkv[:, :, 0], bkv[:, :, 1]

        attn = sparse_neighborhood_attention(q, k, v, plan, bg_k, bg_v, freqs if with_bg else None, backend=self.backend)
        return self._finish(query, x, attn, plan.has_keys(), active)

    @staticmethod
    def _position_frames(aq: _ActiveQueries) -> Tensor:
        """``[n, D]`` frame shape of each query position: positions are full-scale whatever
        ``query_level_indices`` says (the level enters RoPE only), as in sparse-transformer-layers."""
        shapes = aq.inputs.level_spatial_shapes
        full = shapes[largest_level(shapes)].to(aq.positions.dtype)
        return full.expand(aq.positions.shape[0], -1)

    def _plan(self, aq: _ActiveQueries, with_bg: bool) -> NeighborhoodPlan:
        return build_neighborhood_plan(
            aq.inputs.index, aq.batch, aq.positions, self._position_frames(aq), self.neighborhood_sizes, with_bg,
            chunk_size=self.chunk_size,
        )

    def build_plan(
        self,
        query_spatial_positions: Tensor,
        query_batch_offsets: Tensor,
        stacked_feature_maps,
        level_spatial_shapes=None,
        background: bool = False,
        query_level_indices: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
        coordinate_index: Optional[SparseCoordinateIndex] = None,
    ) -> NeighborhoodPlan:
        """The plan :meth:`forward` would build for these queries, to pass as ``plan=`` to
        every block of a stack that attends from the same queries over the same map (the
        features and weights may differ; the neighborhood sizes, ``background`` (whether
        ``background_embedding`` is given) and ``query_mask`` must be the same).

        Arguments as for :meth:`forward` (``background`` instead of ``background_embedding``);
        the plan keeps the coordinate index it was built with (``plan.index``).
        """
        if not isinstance(background, bool):
            raise TypeError(f"background must be a bool, got {background=}")
        pos = query_spatial_positions
        dtype = self.q_proj.weight.dtype  # the plan does not depend on the query's values
        n_q = pos.shape[0] if isinstance(pos, Tensor) and pos.ndim else 0
        query = torch.zeros((), dtype=dtype, device=getattr(pos, "device", None)).expand(n_q, self.embed_dim)
        aq = self._prepare_queries(
            query, query_spatial_positions, query_batch_offsets, stacked_feature_maps, level_spatial_shapes,
            query_level_indices, query_mask, coordinate_index,
        )
        return self._plan(aq, background)

    def _check_plan(self, plan: NeighborhoodPlan, aq: _ActiveQueries, with_bg: bool) -> None:
        """ValueError unless ``plan`` is the plan of these (active) queries."""
        index = aq.inputs.index
        problems = []
        if plan.index is not index:
            problems.append("another coordinate index")
        if plan.neighborhood_sizes != self.neighborhood_sizes:
            problems.append(f"neighborhood_sizes={plan.neighborhood_sizes} (block: {self.neighborhood_sizes})")
        if plan.with_background != with_bg:
            problems.append(f"background={plan.with_background} (call: {with_bg})")
        if plan.n_queries != aq.x.shape[0]:
            problems.append(f"{plan.n_queries} queries (call: {aq.x.shape[0]})")
        elif not (
            torch.equal(plan.query_batch, aq.batch.to(plan.query_batch))
            and torch.equal(plan.centres, window_centres(aq.positions, self._position_frames(aq), plan.level_spatial_shapes))
        ):
            problems.append("other query batch items or window centres")
        if problems:
            raise ValueError(f"plan does not fit this call: it was built for {', '.join(problems)}; build it with build_plan() from the same inputs")

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, n_levels={self.n_levels}, "
            f"neighborhood_sizes={self.neighborhood_sizes}, position_dim={self.position_dim}, "
            f"bias={self.bias}, norm_first={self.norm_first}, backend={self.backend!r}"
        )
