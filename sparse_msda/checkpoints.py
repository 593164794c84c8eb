"""Load checkpoints of sparse-transformer-layers (the public reference implementation) into
sparse-msda modules.

``load_reference_state_dict(model, state_dict)`` converts every sub-module of ``model`` that
has a reference counterpart and loads the result (``strict`` as in ``load_state_dict``):

================================================  ==============================================
reference module (its ``state_dict`` keys)        ours, what the conversion does
================================================  ==============================================
``SparseMSDeformableAttention``                   same class name and keys. ``sampling_offsets``
(``value_proj``, ``sampling_offsets``,            rows: reference ``[P, L, H, 2]`` with ``(y, x)``
``attention_weights``, ``output_proj``)           -> ours ``[H, L, P, 2]`` with ``(x, y)``
                                                  (Deformable DETR's layout); ``attention_weights``
                                                  rows ``[P, L, H]`` -> ``[H, L, P]``.
``SparseMSDeformableAttentionBlock``              same keys (``norm``, ``q_in_proj``,
                                                  ``msdeform_attn.*``, ``out_proj``); the inner
                                                  attention converted as above.
``SparseNeighborhoodAttentionBlock``              ``q_in_proj`` -> ``q_proj``,
(``q_in_proj``, ``subset_attn.kv_proj``,          ``subset_attn.kv_proj`` -> ``kv_proj``,
``pos_encoding.*``, theta buffers)                ``pos_encoding.freqs.g`` -> ``rope.freqs``;
                                                  query/key rows re-paired (below); the theta
                                                  buffers are dropped (ours are attributes).
``MultilevelSelfAttentionBlockWithRoPE``          same keys except ``pos_encoding.freqs.g`` ->
(``qkv``, ``pos_encoding.*``, ...)                ``pos_encoding.freqs``; q/k rows re-paired.
================================================  ==============================================

RoPE pairing: the reference rotates interleaved channel pairs ``(2j, 2j + 1)`` of a head, we
rotate split-half pairs ``(j, j + head_dim // 2)``. Both rotate pair ``j`` by the same angle, so
permuting the query and key projection rows of every head (``2j -> j``, ``2j + 1 -> j + half``)
gives identical attention scores, hence identical outputs; values are untouched. The frequency
group pattern of ``model`` must be the checkpoint's (``ValueError`` otherwise).

Checkpoints of Deformable DETR's ``MSDeformAttn`` and mmcv's ``MultiScaleDeformableAttention``
need no conversion: they load into :class:`~sparse_msda.SparseMSDeformableAttention` as they are.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .modules.deformable_attention import SparseMSDeformableAttention
from .modules.neighborhood_attention import MultilevelRotaryEncoding, RotaryAttentionBlock
from .modules.token_self_attention import MultilevelSelfAttentionBlockWithRoPE

__all__ = ["convert_reference_state_dict", "load_reference_state_dict", "split_half_row_order"]


def split_half_row_order(n_heads: int, head_dim: int) -> Tensor:
    """Row ``i`` of our query/key projection is row ``order[i]`` of the reference's:
    within each head, channels ``0, 2, 4, ..`` then ``1, 3, 5, ..``."""
    per_head = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def _rope_freqs(sd: Mapping[str, Tensor], prefix: str, rope: MultilevelRotaryEncoding) -> Tensor:
    """Our ``[H', head_dim // 2, D + 1]`` frequencies from the reference's ``RoPEEncodingND``
    entries ``freqs.g`` ``[n_coords_g, H', m_g]``, ``freq_group_pattern``, ``encoding_ranges``."""
    try:
        pattern = sd[prefix + "freq_group_pattern"].bool().cpu()
        ranges = sd[prefix + "encoding_ranges"].long().cpu()
    except KeyError as err:
        raise ValueError(f"reference checkpoint lacks {err.args[0]!r} (a RoPEEncodingND buffer)") from None
    groups = [tuple(int(k) for k in row.nonzero().flatten()) for row in pattern]
    ours = [tuple(int(k) for k in rope.freq_mask[0, j].nonzero().flatten()) for j in range(rope.freq_mask.shape[1])]
    theirs = [None] * rope.freq_mask.shape[1]
    for (s, e), coords in zip(ranges.tolist(), groups):
        for j in range(s, e):
            if j < len(theirs):
                theirs[j] = coords
    if theirs != ours:
        raise ValueError(
            f"the checkpoint's RoPE frequency groups (per pair: {theirs}) differ from the model's "
            f"(rope_freq_group_pattern={rope.freq_group_pattern!r}: {ours}); build the model with the checkpoint's "
            "rope_freq_group_pattern / rope_enforce_freq_groups_equal"
        )
    freqs = torch.zeros(rope.freqs.shape, dtype=rope.freqs.dtype)
    for g, ((s, e), coords) in enumerate(zip(ranges.tolist(), groups)):
        fg = sd[prefix + f"freqs.{g}"]  # [n_coords_g, H', m_g]
        if fg.shape != (len(coords), freqs.shape[0], e - s):
            raise ValueError(
                f"{prefix}freqs.{g} has shape {tuple(fg.shape)}, expected {(len(coords), freqs.shape[0], e - s)} "
                "(n_heads / rope_share_heads / head_dim of the model differ from the checkpoint's)"
            )
        for i, k in enumerate(coords):
            freqs[:, s:e, k] = fg[i].to(freqs.dtype)
    return freqs


def _take(sd: dict, key: str) -> Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise ValueError(f"reference checkpoint lacks {key!r}") from None


def _pop_rope(sd: dict, prefix: str) -> None:
    for k in [k for k in sd if k.startswith(prefix)]:
        del sd[k]


def _convert_deformable(sd: dict, p: str, m: SparseMSDeformableAttention, out: dict) -> None:
    h, l, pts, d = m.n_heads, m.n_levels, m.n_points, m.position_dim
    w, b = _take(sd, p + "sampling_offsets.weight"), _take(sd, p + "sampling_offsets.bias")
    # reference rows [P, L, H, D] with (y, x) -> ours [H, L, P, D] with (x, y)
    out[p + "sampling_offsets.weight"] = w.view(pts, l, h, d, -1).permute(2, 1, 0, 3, 4).flip(3).reshape(h * l * pts * d, -1)
    out[p + "sampling_offsets.bias"] = b.view(pts, l, h, d).permute(2, 1, 0, 3).flip(3).reshape(-1)
    w, b = _take(sd, p + "attention_weights.weight"), _take(sd, p + "attention_weights.bias")
    out[p + "attention_weights.weight"] = w.view(pts, l, h, -1).permute(2, 1, 0, 3).reshape(h * l * pts, -1)
    out[p + "attention_weights.bias"] = b.view(pts, l, h).permute(2, 1, 0).reshape(-1)
    for name in ("value_proj", "output_proj"):
        for t in ("weight", "bias"):
            if p + f"{name}.{t}" in sd:
                out[p + f"{name}.{t}"] = sd.pop(p + f"{name}.{t}")


def _convert_neighborhood(sd: dict, p: str, m: RotaryAttentionBlock, out: dict) -> None:
    order = split_half_row_order(m.n_heads, m.head_dim)
    e = m.embed_dim
    out[p + "q_proj.weight"] = _take(sd, p + "q_in_proj.weight")[order]
    if p + "q_in_proj.bias" in sd:
        out[p + "q_proj.bias"] = sd.pop(p + "q_in_proj.bias")[order]
    kv_order = torch.cat((order, torch.arange(e, 2 * e)))
    out[p + "kv_proj.weight"] = _take(sd, p + "subset_attn.kv_proj.weight")[kv_order]
    if p + "subset_attn.kv_proj.bias" in sd:
        out[p + "kv_proj.bias"] = sd.pop(p + "subset_attn.kv_proj.bias")[kv_order]
    out[p + "rope.freqs"] = _rope_freqs(sd, p + "pos_encoding.", m.rope)
    _pop_rope(sd, p + "pos_encoding.")
    for k in ("rope_spatial_base_theta", "rope_level_base_theta"):
        sd.pop(p + k, None)


def _convert_token_block(sd: dict, p: str, m: MultilevelSelfAttentionBlockWithRoPE, out: dict) -> None:
    order = split_half_row_order(m.n_heads, m.head_dim)
    e = m.embed_dim
    qkv_order = torch.cat((order, order + e, torch.arange(2 * e, 3 * e)))
    out[p + "qkv.weight"] = _take(sd, p + "qkv.weight")[qkv_order]
    if p + "qkv.bias" in sd:
        out[p + "qkv.bias"] = sd.pop(p + "qkv.bias")[qkv_order]
    out[p + "pos_encoding.freqs"] = _rope_freqs(sd, p + "pos_encoding.", m.pos_encoding)
    _pop_rope(sd, p + "pos_encoding.")


_CONVERTERS = (
    (SparseMSDeformableAttention, _convert_deformable),
    (RotaryAttentionBlock, _convert_neighborhood),
    (MultilevelSelfAttentionBlockWithRoPE, _convert_token_block),
)


def convert_reference_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict:
    """A sparse-transformer-layers ``state_dict`` converted for ``model`` (ours, same
    hyper-parameters as the checkpoint's model). Keys of other sub-modules pass unchanged.

    Raises:
        ValueError: a key the conversion needs is missing, or the RoPE frequency groups or
            shapes of the model differ from the checkpoint's.
    """
    sd = dict(state_dict)
    out: dict = {}
    for name, module in model.named_modules():
        for cls, fn in _CONVERTERS:
            if isinstance(module, cls):
                fn(sd, f"{name}." if name else "", module, out)
                break
    out.update(sd)
    return out


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``model.load_state_dict(convert_reference_state_dict(state_dict, model), strict)``."""
    return model.load_state_dict(convert_reference_state_dict(state_dict, model), strict=strict)
