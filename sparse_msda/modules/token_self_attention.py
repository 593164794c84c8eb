"""Multi-level token self-attention block with RoPE: sparse-transformer-layers'
``MultilevelSelfAttentionBlockWithRoPE`` (same name, signature, attributes and conventions)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional.rope import pattern_name
from ..functional.token_self_attention import multilevel_token_positions, token_self_attention
from ..inputs import check_dropout, check_embed_heads
from .neighborhood_attention import MultilevelRotaryEncoding

__all__ = ["MultilevelSelfAttentionBlockWithRoPE"]


def _check_int_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim != ndim:
        raise ValueError(f"Expected {name} to be {ndim}D, got {name}.shape={tuple(t.shape)}")


class MultilevelSelfAttentionBlockWithRoPE(nn.Module):
    """Self-attention among the tokens of each batch item, over all levels, with RoPE over
    (position, level): pre/post-norm block with residual.

    Same constructor, ``forward`` and attribute names as sparse-transformer-layers' block of
    this name: ``norm``, ``qkv`` (fused ``Linear(embed_dim, 3 * embed_dim)``, rows q | k | v),
    ``pos_encoding`` (RoPE), ``attn_drop_rate`` (dropout on the attention weights),
    ``out_proj``, ``out_proj_drop``, and the buffers ``rope_spatial_base_theta`` /
    ``rope_level_base_theta``. The RoPE parameters differ in layout (``pos_encoding.freqs`` is
    one ``[H', head_dim // 2, D + 1]`` tensor, channels paired split-half): load a reference
    checkpoint with :func:`sparse_msda.checkpoints.load_reference_state_dict`.

    Block: ``x + out_proj_drop(out_proj(attn(norm(x))))`` (``norm_first``) else
    ``norm(x + out_proj_drop(out_proj(attn(x))))``; ``q, k, v = qkv(h).chunk(3, -1)``; ``q``
    and ``k`` rotated at the token position vectors of
    :func:`~sparse_msda.functional.token_self_attention.multilevel_token_positions`.

    Args:
        embed_dim: token feature size; divisible by ``n_heads``, even ``head_dim``.
        n_heads: attention heads.
        position_dim: spatial dims of the positions (1, 2 or 3; any positive int works).
        dropout: dropout on the attention weights and after the output projection.
        bias: bias of ``qkv`` and ``out_proj``.
        norm_first: pre-norm (True) or post-norm.
        rope_spatial_base_theta, rope_level_base_theta: RoPE frequency bases.
        rope_share_heads: one set of frequencies for all heads.
        rope_freq_group_pattern: ``"single"``, ``"partition"`` (spatial | level), ``"closure"``
            (spatial | level | all), or ours ``"axial"``; a string or an ``Enum`` with that value.
        rope_enforce_freq_groups_equal: error if ``head_dim // 2`` does not split equally.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        position_dim: int = 2,
        dropout: float = 0.0,
        bias: bool = False,
        norm_first: bool = True,
        rope_spatial_base_theta: float = 100.0,
        rope_level_base_theta: float = 10.0,
        rope_share_heads: bool = False,
        rope_freq_group_pattern="single",
        rope_enforce_freq_groups_equal: bool = True,
    ) -> None:
        super().__init__()
        check_embed_heads(embed_dim, n_heads)
        if not isinstance(position_dim, int) or isinstance(position_dim, bool) or position_dim <= 0:
            raise ValueError(f"position_dim must be a positive int, got {position_dim=}")
        check_dropout(dropout)
        self.embed_dim, self.n_heads, self.position_dim = embed_dim, n_heads, position_dim
        self.head_dim = embed_dim // n_heads
        self.norm_first, self.bias = norm_first, bias
        self.rope_share_heads = rope_share_heads
        self.rope_freq_group_pattern = pattern_name(rope_freq_group_pattern)
        self.norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.pos_encoding = MultilevelRotaryEncoding(
            n_heads, self.head_dim, position_dim, rope_spatial_base_theta, rope_level_base_theta,
            rope_share_heads, self.rope_freq_group_pattern, rope_enforce_freq_groups_equal,
        )
        self.attn_drop_rate = float(dropout)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj_drop = nn.Dropout(dropout)
        self.register_buffer("rope_spatial_base_theta", torch.tensor(rope_spatial_base_theta))
        self.register_buffer("rope_level_base_theta", torch.tensor(rope_level_base_theta))

    def reset_parameters(self) -> None:
        """PyTorch's default ``LayerNorm``/``Linear`` initialisation (as the reference) and RoPE
        frequencies from the thetas."""
        self.norm.reset_parameters()
        self.qkv.reset_parameters()
        self.pos_encoding.reset_parameters()
        self.out_proj.reset_parameters()

    def forward(
        self,
        x: Tensor,
        spatial_positions: Tensor,
        level_indices: Tensor,
        level_spatial_shapes: Tensor,
        batch_offsets: Tensor,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Self-attention of each token to the tokens of its batch item.

        Args:
            x: ``[N, embed_dim]``, all batch items concatenated.
            spatial_positions: ``[N, position_dim]`` in each token's own level frame (not
                normalised); integer = cell index (centre ``i + 0.5``).
            level_indices: int ``[N]``.
            level_spatial_shapes: ``[n_levels, position_dim]`` (or ``[B, n_levels, position_dim]``).
            batch_offsets: int ``[B + 1]``: item ``b`` is rows ``batch_offsets[b]:batch_offsets[b+1]``.
            attn_mask: optional bool ``[B, S, S]``, ``[B * n_heads, S, S]`` or
                ``[B, n_heads, S, S]``, ``S`` = longest item; ``True`` (any non-zero) = masked
                out, as in the reference (not an additive float mask).

        Returns:
            ``[N, embed_dim]``.

        Raises:
            ValueError: shape mismatches (as the reference), bad offsets, levels or mask.
            TypeError: non-integer indices/offsets, non-bool mask.
        """
        n = self._check_inputs(x, spatial_positions, level_indices, level_spatial_shapes, batch_offsets, attn_mask)
        if attn_mask is not None:
            attn_mask = attn_mask.to(device=x.device, dtype=torch.bool)  # as the reference: non-zero = masked out
        residual = x
        h = self.norm(x) if self.norm_first else x
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, self.n_heads, self.head_dim) for t in (q, k, v))
        batch_offsets = batch_offsets.to(x.device)
        counts = batch_offsets.diff()
        batch_indices = torch.repeat_interleave(torch.arange(counts.shape[0], device=x.device), counts)
        positions = multilevel_token_positions(spatial_positions, batch_indices, level_indices, level_spatial_shapes)
        positions = positions.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        q = self.pos_encoding(q, positions)
        k = self.pos_encoding(k, positions)
        attn = token_self_attention(
            q, k, v, batch_offsets, attn_mask, self.attn_drop_rate if self.training else 0.0
        )
        out = self.out_proj_drop(self.out_proj(attn.reshape(n, self.embed_dim)))
        out = out + residual
        return out if self.norm_first else self.norm(out)

    def _check_inputs(self, x, spatial_positions, level_indices, level_spatial_shapes, batch_offsets, attn_mask) -> int:
        for name, t in (("x", x), ("spatial_positions", spatial_positions)):
            if not isinstance(t, Tensor) or t.ndim != 2:
                raise ValueError(f"Expected {name} to be 2D, got {name}.shape={tuple(getattr(t, 'shape', ()))}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype=}")
        if x.dtype != self.qkv.weight.dtype:  # the package's one dtype policy (README, "Bad input")
            raise TypeError(
                f"x must have the module's dtype {self.qkv.weight.dtype}, got x.dtype={x.dtype} (cast x, or the module with .to(dtype))"
            )
        finite = torch.isfinite(spatial_positions).all(-1)  # (integer positions, as the reference accepts, are)
        if not bool(finite.all()):  # every token attends to every other: one NaN key would reach them all
            bad = int((~finite).nonzero()[0, 0])
            raise ValueError(f"spatial_positions must be finite, got token {bad} at {spatial_positions[bad].tolist()}")
        _check_int_tensor("level_indices", level_indices, 1)
        _check_int_tensor("batch_offsets", batch_offsets, 1)
        if not isinstance(level_spatial_shapes, Tensor) or level_spatial_shapes.ndim not in (2, 3):
            raise ValueError(
                "Expected level_spatial_shapes of shape [n_levels, position_dim] or [batch, n_levels, position_dim], "
                f"got {getattr(level_spatial_shapes, 'shape', type(level_spatial_shapes).__name__)}"
            )
        if level_spatial_shapes.is_floating_point() and not bool((level_spatial_shapes == level_spatial_shapes.round()).all()):
            raise TypeError(f"level_spatial_shapes must hold integral values, got {level_spatial_shapes.tolist()}")
        n = x.shape[0]
        if n != spatial_positions.shape[0] or n != level_indices.shape[0]:
            raise ValueError(
                "Mismatched sequence lengths: x, spatial_positions, and level_indices must have same first dimension, "
                f"got shapes {n}, {spatial_positions.shape[0]}, and {level_indices.shape[0]}"
            )
        if spatial_positions.shape[1] != level_spatial_shapes.shape[-1]:
            raise ValueError(
                "Mismatched position dimensions: spatial_positions and level_spatial_shapes must have same last "
                f"dimension, got {spatial_positions.shape[1]} and {level_spatial_shapes.shape[-1]}"
            )
        if spatial_positions.shape[1] != self.position_dim:
            raise ValueError(
                f"Expected position_dim={self.position_dim}, but spatial_positions has shape {tuple(spatial_positions.shape)}"
            )
        if x.shape[1] != self.embed_dim:
            raise ValueError(f"Expected x of shape [N, {self.embed_dim}], got x.shape={tuple(x.shape)}")
        bo = batch_offsets.tolist()
        if len(bo) < 2 or bo[0] != 0 or bo[-1] != n or any(b > a for a, b in zip(bo[1:], bo[:-1])):
            raise ValueError(f"batch_offsets must be non-decreasing from 0 to len(x)={n}, got {batch_offsets=}")
        n_levels = level_spatial_shapes.shape[-2]
        if n and (int(level_indices.min()) < 0 or int(level_indices.max()) >= n_levels):
            raise ValueError(
                f"level_indices must lie in [0, {n_levels}), got range [{int(level_indices.min())}, {int(level_indices.max())}]"
            )
        if level_spatial_shapes.ndim == 3 and level_spatial_shapes.shape[0] != len(bo) - 1:
            raise ValueError(
                f"batch-dependent level_spatial_shapes must have {len(bo) - 1} rows, got {tuple(level_spatial_shapes.shape)}"
            )
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"attn_mask must be a tensor (True/non-zero = masked out), got {type(attn_mask).__name__}")
            bsz = len(bo) - 1
            s = max((b - a for a, b in zip(bo[:-1], bo[1:])), default=0)
            allowed = [(bsz, s, s), (bsz * self.n_heads, s, s), (bsz, self.n_heads, s, s)]
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(f"attn_mask must have one of the shapes {allowed} (S = longest item), got {tuple(attn_mask.shape)}")
        return n

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_heads={self.n_heads}, position_dim={self.position_dim}, "
            f"attn_drop_rate={self.attn_drop_rate}, bias={self.bias}, norm_first={self.norm_first}"
        )
