"""Compatibility with sparse-transformer-layers (the seed API, issue 12).

Written from the seed documents and the reference's documented behaviour: RoPE frequency-group
patterns and rules, the token self-attention block ``MultilevelSelfAttentionBlockWithRoPE``
(against a naive loop), full-scale neighborhood positions, the checkpoint converter, and the
conventions of ``multilevel_sparse_bilinear_grid_sample`` / ``sparse_split_heads``.

The ``reference_*`` tests run the reference's own code when it is importable (set
``SPARSE_MSDA_REFERENCE_PATH`` to a colon-separated list of directories holding
``sparse_transformer_layers``, ``nd_rotary_encodings`` and ``pytorch_sparse_utils``); it is no
dependency, and the tests skip without it.
"""

from __future__ import annotations

import enum
import importlib
import itertools
import math
import os
import sys

import pytest
import torch

import sparse_msda
from sparse_msda import (
    MultilevelSelfAttentionBlockWithRoPE,
    SparseMSDeformableAttention,
    SparseMSDeformableAttentionBlock,
    SparseNeighborhoodAttentionBlock,
)
from sparse_msda import sparse_split_heads as sparse_split_heads_
from sparse_msda.checkpoints import convert_reference_state_dict, load_reference_state_dict, split_half_row_order
from sparse_msda.functional.rope import init_rope_frequencies, rope_freq_groups, rope_group_sizes
from sparse_msda.modules.neighborhood_attention import MultilevelRotaryEncoding

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------
# RoPE patterns and rules
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_pattern_names_are_the_references(dim):
    sp, lv, all_ = tuple(range(dim)), (dim,), tuple(range(dim + 1))
    assert rope_freq_groups("single", dim) == [all_]
    assert rope_freq_groups("partition", dim) == [sp, lv]  # the reference's partition: spatial | level
    assert rope_freq_groups("closure", dim) == [sp, lv, all_]
    assert rope_freq_groups("axial", dim) == [(k,) for k in range(dim + 1)]  # ours, formerly "partition"
    assert rope_freq_groups("spatial_level", dim) == [sp, lv]  # alias


def test_pattern_given_as_enum_member():
    class FreqGroupPattern(enum.Enum):  # as nd_rotary_encodings.FreqGroupPattern
        SINGLE = "single"
        PARTITION = "partition"
        CLOSURE = "closure"

    block = MultilevelSelfAttentionBlockWithRoPE(24, 2, rope_freq_group_pattern=FreqGroupPattern.CLOSURE)
    assert block.pos_encoding.freq_group_pattern == "closure"
    nb = SparseNeighborhoodAttentionBlock(48, 2, rope_freq_group_pattern=FreqGroupPattern.PARTITION)
    assert nb.rope.freq_group_pattern == "partition"


def test_group_sizes_follow_the_reference_rule():
    # remainder to the first groups; without enforcement trailing groups may be empty
    assert rope_group_sizes(7, 3, False) == [3, 2, 2]
    assert rope_group_sizes(2, 3, False) == [1, 1, 0]
    with pytest.raises(ValueError, match="split equally"):
        rope_group_sizes(7, 3, True)
    # head_dim 4 -> 2 pairs for 3 closure groups: accepted without enforcement (level|all get 1|0)
    freqs, mask = init_rope_frequencies(2, 4, 2, freq_group_pattern="closure", enforce_freq_groups_equal=False)
    assert mask[0].tolist() == [[1, 1, 0], [0, 0, 1]]
    block = MultilevelSelfAttentionBlockWithRoPE(8, 2, rope_freq_group_pattern="closure", rope_enforce_freq_groups_equal=False)
    x = torch.randn(5, 8)
    out = block(x, torch.rand(5, 2) * 4, torch.zeros(5, dtype=torch.long), torch.tensor([[4, 4]]), torch.tensor([0, 5]))
    assert out.shape == (5, 8) and torch.isfinite(out).all()


def test_position_dim_1():
    rope = MultilevelRotaryEncoding(2, 8, 1)
    assert rope.freqs.shape == (2, 4, 2)
    block = MultilevelSelfAttentionBlockWithRoPE(16, 2, position_dim=1)
    out = block(torch.randn(6, 16), torch.rand(6, 1) * 10, torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([[10], [5]]), torch.tensor([0, 6]))
    assert out.shape == (6, 16)


def test_old_partition_checkpoint_does_not_load_silently():
    """A checkpoint of our former "partition" (one group per axis, now "axial") must not load
    into a "partition" (spatial | level) model, where the mask would silently change the model."""
    old = SparseNeighborhoodAttentionBlock(48, 2, rope_freq_group_pattern="axial")
    new = SparseNeighborhoodAttentionBlock(48, 2, rope_freq_group_pattern="partition")
    with pytest.raises(ValueError, match="axial"):
        new.load_state_dict(old.state_dict())
    SparseNeighborhoodAttentionBlock(48, 2, rope_freq_group_pattern="axial").load_state_dict(old.state_dict())


# ------------------------------------------------------------------------------------------
# token self-attention block
# ------------------------------------------------------------------------------------------
def naive_token_block(block, x, pos, lvl, shapes, offsets, attn_mask=None):
    """Loop over items and queries; dense softmax; RoPE by complex multiplication of split-half
    pairs at (position * max_shape / own_shape, level)."""
    E, H = block.embed_dim, block.n_heads
    d = E // H
    x = x.double()
    h = torch.nn.functional.layer_norm(x, (E,), block.norm.weight.double(), block.norm.bias.double()) if block.norm_first else x
    W = block.qkv.weight.double()
    qkv = h @ W.T + (block.qkv.bias.double() if block.qkv.bias is not None else 0)
    q, k, v = (t.reshape(-1, H, d) for t in qkv.chunk(3, -1))
    shapes = shapes.double()
    p = (pos.double() if pos.is_floating_point() else pos.double() + 0.5) * shapes.max(0).values / shapes[lvl]
    u = torch.cat([p, lvl.double()[:, None]], 1)
    freqs = block.pos_encoding.frequencies().double()
    theta = torch.einsum("nk,hjk->nhj", u, freqs)

    def rot(t):
        z = torch.complex(t[..., : d // 2], t[..., d // 2 :]) * torch.exp(1j * theta)
        return torch.cat([z.real, z.imag], -1)

    q, k = rot(q), rot(k)
    out = torch.zeros_like(q)
    for b in range(len(offsets) - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        for i in range(s, e):
            for hh in range(H):
                scores = (k[s:e, hh] @ q[i, hh]) / math.sqrt(d)
                if attn_mask is not None:
                    if attn_mask.ndim == 4:
                        m = attn_mask[b, hh, i - s, : e - s]
                    elif attn_mask.shape[0] == len(offsets) - 1:
                        m = attn_mask[b, i - s, : e - s]
                    else:
                        m = attn_mask[b * H + hh, i - s, : e - s]
                    if bool(m.all()):
                        continue  # fully masked row: zero
                    scores = scores.masked_fill(m, -math.inf)
                out[i, hh] = torch.softmax(scores, 0) @ v[s:e, hh]
    y = block.out_proj(out.reshape(-1, E).to(block.out_proj.weight.dtype)).double() + x
    if not block.norm_first:
        y = torch.nn.functional.layer_norm(y, (E,), block.norm.weight.double(), block.norm.bias.double())
    return y


def _tokens(dim, n_items=(7, 0, 5), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # power-of-two level ratios: the reference computes shape ratios in float32 (exact here)
    shapes = torch.tensor([[40, 36, 32][:dim], [20, 18, 16][:dim], [10, 9, 8][:dim]])
    n = sum(n_items)
    lvl = torch.randint(0, 3, (n,), generator=g)
    pos = torch.rand(n, dim, generator=g, dtype=dtype) * shapes[lvl].to(dtype)
    offsets = torch.tensor([0, *torch.tensor(n_items).cumsum(0).tolist()])
    return pos, lvl, shapes, offsets


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("variant", ["prenorm", "postnorm_bias_closure_shared"])
def test_token_block_matches_naive_loop(dim, variant):
    kw = dict(position_dim=dim)
    if variant != "prenorm":
        kw.update(norm_first=False, bias=True, rope_freq_group_pattern="closure", rope_share_heads=True)
    torch.manual_seed(dim)
    block = MultilevelSelfAttentionBlockWithRoPE(36, 3, **kw).double()
    pos, lvl, shapes, offsets = _tokens(dim)
    x = torch.randn(pos.shape[0], 36, dtype=torch.float64)
    out = block(x, pos, lvl, shapes, offsets)
    torch.testing.assert_close(out, naive_token_block(block, x, pos, lvl, shapes, offsets), rtol=1e-10, atol=1e-10)
    # integer positions are cell indices at their centres
    ipos = pos.floor().long()
    torch.testing.assert_close(block(x, ipos, lvl, shapes, offsets), naive_token_block(block, x, ipos, lvl, shapes, offsets), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["b_s_s", "bh_s_s", "b_h_s_s"])
def test_token_block_attn_mask_layouts(layout):
    torch.manual_seed(1)
    H = 2
    block = MultilevelSelfAttentionBlockWithRoPE(16, H).double()
    pos, lvl, shapes, offsets = _tokens(2, n_items=(6, 4))
    x = torch.randn(pos.shape[0], 16, dtype=torch.float64)
    S, B = 6, 2
    shape = {"b_s_s": (B, S, S), "bh_s_s": (B * H, S, S), "b_h_s_s": (B, H, S, S)}[layout]
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[..., 1, :] = True  # one fully masked query row per item: zero attention output
    out = block(x, pos, lvl, shapes, offsets, attn_mask=mask)
    torch.testing.assert_close(out, naive_token_block(block, x, pos, lvl, shapes, offsets, mask), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, block(x, pos, lvl, shapes, offsets))


def test_token_block_gradients_and_errors():
    block = MultilevelSelfAttentionBlockWithRoPE(8, 2).double()
    pos, lvl, shapes, offsets = _tokens(2, n_items=(3, 2))
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t, pos, lvl, shapes, offsets), (x,))
    with pytest.raises(ValueError, match="Mismatched sequence lengths"):
        block(x, pos[:4], lvl, shapes, offsets)
    with pytest.raises(ValueError, match="position_dim"):
        block(x, torch.rand(5, 3, dtype=torch.float64), lvl, torch.tensor([[4, 4, 4]]), offsets)
    with pytest.raises(ValueError, match="Mismatched position dimensions"):
        block(x, pos, lvl, torch.tensor([[4, 4, 4]]), offsets)
    with pytest.raises(ValueError, match="batch_offsets"):
        block(x, pos, lvl, shapes, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="attn_mask"):
        block(x, pos, lvl, shapes, offsets, attn_mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="level_indices"):
        block(x, pos, lvl + 3, shapes, offsets)


def test_token_block_attributes_are_the_references():
    block = MultilevelSelfAttentionBlockWithRoPE(16, 2, dropout=0.1, bias=True)
    names = set(dict(block.named_children()))
    assert {"norm", "qkv", "pos_encoding", "out_proj", "out_proj_drop"} <= names
    assert block.qkv.weight.shape == (48, 16) and block.attn_drop_rate == 0.1
    sd = block.state_dict()
    assert "rope_spatial_base_theta" in sd and "rope_level_base_theta" in sd
    assert "attn_drop_rate=0.1" in repr(block)


def test_old_block_name_raises_with_the_new_names():
    with pytest.raises(ImportError, match="SparseMultilevelMapAttentionBlock.*MultilevelSelfAttentionBlockWithRoPE"):
        from sparse_msda import SparseMultilevelSelfAttentionBlock  # noqa: F401
    assert "SparseMultilevelSelfAttentionBlock" not in sparse_msda.__all__


# ------------------------------------------------------------------------------------------
# checkpoint converter (self-contained: reference layouts written out from its documentation)
# ------------------------------------------------------------------------------------------
def _reference_rope_entries(freqs: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict:
    """Our ``[H', pairs, D+1]`` frequencies in the reference's RoPEEncodingND layout."""
    groups, ranges = [], []
    j = 0
    while j < mask.shape[1]:
        coords = mask[0, j].nonzero().flatten().tolist()
        e = j
        while e < mask.shape[1] and mask[0, e].nonzero().flatten().tolist() == coords:
            e += 1
        groups.append(coords)
        ranges.append((j, e))
        j = e
    out = {
        prefix + "freq_group_pattern": torch.tensor([[k in g for k in range(mask.shape[2])] for g in groups]),
        prefix + "encoding_ranges": torch.tensor(ranges),
    }
    for g, (coords, (s, e)) in enumerate(zip(groups, ranges)):
        out[prefix + f"freqs.{g}"] = freqs[:, s:e][..., coords].permute(2, 0, 1).clone()
    return out


def test_converter_token_block_roundtrip_with_interleaved_pairs():
    """A reference-layout state_dict (interleaved RoPE pairs: our rows permuted back) converts
    to exactly the original parameters."""
    torch.manual_seed(3)
    ours = MultilevelSelfAttentionBlockWithRoPE(24, 2, bias=True, rope_freq_group_pattern="partition")
    sd = ours.state_dict()
    order = split_half_row_order(2, 12)
    inv = torch.argsort(order)
    qkv_inv = torch.cat((inv, inv + 24, torch.arange(48, 72)))
    ref = {k: v for k, v in sd.items() if not k.startswith("pos_encoding.")}
    ref["qkv.weight"], ref["qkv.bias"] = sd["qkv.weight"][qkv_inv], sd["qkv.bias"][qkv_inv]
    ref.update(_reference_rope_entries(sd["pos_encoding.freqs"], ours.pos_encoding.freq_mask, "pos_encoding."))
    fresh = MultilevelSelfAttentionBlockWithRoPE(24, 2, bias=True, rope_freq_group_pattern="partition")
    load_reference_state_dict(fresh, ref)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # a raw reference state_dict is refused with a pointer to the converter
    with pytest.raises((RuntimeError, ValueError)):
        MultilevelSelfAttentionBlockWithRoPE(24, 2, bias=True, rope_freq_group_pattern="partition").load_state_dict(ref)
    # another pattern than the checkpoint's is refused
    with pytest.raises(ValueError, match="frequency groups"):
        load_reference_state_dict(MultilevelSelfAttentionBlockWithRoPE(24, 2, bias=True), ref)


def test_converter_deformable_row_orders():
    """Reference rows: sampling_offsets [P, L, H, 2] in (y, x), attention_weights [P, L, H];
    ours (Deformable DETR's): [H, L, P, 2] in (x, y) and [H, L, P]."""
    H, L, P, E = 2, 3, 4, 16
    torch.manual_seed(4)
    ours = SparseMSDeformableAttentionBlock(E, H, L, P)
    ref = {k: v.clone() for k, v in ours.state_dict().items()}
    so_w = torch.randn(P, L, H, 2, E)
    so_b = torch.randn(P, L, H, 2)
    aw_w, aw_b = torch.randn(P, L, H, E), torch.randn(P, L, H)
    ref["msdeform_attn.sampling_offsets.weight"] = so_w.reshape(-1, E)
    ref["msdeform_attn.sampling_offsets.bias"] = so_b.reshape(-1)
    ref["msdeform_attn.attention_weights.weight"] = aw_w.reshape(-1, E)
    ref["msdeform_attn.attention_weights.bias"] = aw_b.reshape(-1)
    conv = convert_reference_state_dict(ref, ours)
    w = conv["msdeform_attn.sampling_offsets.weight"].view(H, L, P, 2, E)
    b = conv["msdeform_attn.sampling_offsets.bias"].view(H, L, P, 2)
    aw = conv["msdeform_attn.attention_weights.weight"].view(H, L, P, E)
    for h, l, p in [(0, 0, 0), (1, 2, 3), (1, 0, 2), (0, 1, 1)]:
        assert torch.equal(w[h, l, p, 0], so_w[p, l, h, 1]) and torch.equal(w[h, l, p, 1], so_w[p, l, h, 0])  # x <- j, y <- i
        assert torch.equal(b[h, l, p], so_b[p, l, h].flip(0))
        assert torch.equal(aw[h, l, p], aw_w[p, l, h])
    load_reference_state_dict(ours, ref)  # strict: every key accounted for


# ------------------------------------------------------------------------------------------
# against the reference's own code (optional)
# ------------------------------------------------------------------------------------------
def _reference():
    paths = [p for p in os.environ.get("SPARSE_MSDA_REFERENCE_PATH", "").split(os.pathsep) if p]
    if not paths:
        pytest.skip("sparse-transformer-layers is not installed here: set SPARSE_MSDA_REFERENCE_PATH to its source "
                    "(with nd_rotary_encodings and pytorch_sparse_utils) to run the parity tests")
    for p in paths:
        if p not in sys.path:
            sys.path.append(p)
    try:
        return importlib.import_module("sparse_transformer_layers.blocks")
    except Exception as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"sparse-transformer-layers not importable from SPARSE_MSDA_REFERENCE_PATH: {err!r}")


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("pattern", ["single", "partition", "closure"])
def test_reference_token_block_parity(dim, pattern):
    blocks = _reference()
    torch.manual_seed(5)
    kw = dict(position_dim=dim, bias=True, rope_freq_group_pattern=pattern, rope_enforce_freq_groups_equal=False)
    ref = blocks.MultilevelSelfAttentionBlockWithRoPE(36, 3, **kw).double()
    ours = MultilevelSelfAttentionBlockWithRoPE(36, 3, **kw).double()
    load_reference_state_dict(ours, ref.state_dict())
    pos, lvl, shapes, offsets = _tokens(dim, n_items=(7, 5))
    x = torch.randn(pos.shape[0], 36, dtype=torch.float64)
    torch.testing.assert_close(ours(x, pos, lvl, shapes, offsets), ref(x, pos, lvl, shapes, offsets), rtol=1e-12, atol=1e-12)
    mask = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(6)) < 0.3
    torch.testing.assert_close(ours(x, pos, lvl, shapes, offsets, mask), ref(x, pos, lvl, shapes, offsets, mask), rtol=1e-12, atol=1e-12)


def _coo_map(shapes, batch, density, E, seed):
    """COO stack [batch, *max_shape, L, E] with random voxels (each inside its level)."""
    g = torch.Generator().manual_seed(seed)
    idx, vals = [], []
    for lvl, shape in enumerate(shapes):
        cells = torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape))
        for b in range(batch):
            keep = torch.rand(cells.shape[0], generator=g) < density
            c = cells[keep]
            idx.append(torch.cat([torch.full((c.shape[0], 1), b), c, torch.full((c.shape[0], 1), lvl)], 1))
            vals.append(torch.randn(c.shape[0], E, generator=g, dtype=torch.float64))
    idx, vals = torch.cat(idx).T, torch.cat(vals)
    size = (batch, *[max(s[k] for s in shapes) for k in range(len(shapes[0]))], len(shapes), E)
    return torch.sparse_coo_tensor(idx, vals, size).coalesce()


@pytest.mark.parametrize("with_levels", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_reference_neighborhood_block_parity(with_levels, background):
    """Windows inside the map (the out-of-map cell difference does not arise); full-scale query
    positions with or without query_level_indices."""
    blocks = _reference()
    torch.manual_seed(7)
    shapes = [[16, 16], [8, 8]]
    E, H = 16, 2
    kw = dict(n_levels=2, neighborhood_sizes=[3, 3], bias=True, rope_freq_group_pattern="partition")
    ref = blocks.SparseNeighborhoodAttentionBlock(E, H, **kw).double()
    ours = SparseNeighborhoodAttentionBlock(E, H, **kw).double()
    load_reference_state_dict(ours, ref.state_dict())
    stacked = _coo_map(shapes, 2, 0.5, E, seed=8)
    g = torch.Generator().manual_seed(9)
    pos = 4.0 + torch.rand(11, 2, generator=g, dtype=torch.float64) * 8.0  # full scale, windows inside
    offsets = torch.tensor([0, 6, 11])
    query = torch.randn(11, E, dtype=torch.float64, generator=g)
    qlev = torch.randint(0, 2, (11,), generator=g) if with_levels else None
    bg = torch.randn(2, 2, E, dtype=torch.float64, generator=g) if background else None
    st = torch.tensor(shapes)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference makes its key positions in the default dtype
    try:
        out_ref = ref(query, pos, offsets, stacked, st, background_embedding=bg, query_level_indices=qlev)
    finally:
        torch.set_default_dtype(previous)
    out = ours(query, pos, offsets, stacked, st, background_embedding=bg, query_level_indices=qlev)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_levels", [False, True])
def test_reference_deformable_block_parity(with_levels):
    """Samples away from the map edges (the reference clamps there; we do not)."""
    blocks = _reference()
    torch.manual_seed(10)
    shapes = [[32, 32], [16, 16]]
    E, H, L, P = 16, 2, 2, 3
    ref = blocks.SparseMSDeformableAttentionBlock(E, H, L, P, bias=True).double()
    with torch.no_grad():
        ref.msdeform_attn.sampling_offsets.weight.normal_(0, 0.01)
        ref.msdeform_attn.attention_weights.weight.normal_(0, 0.3)
    ours = SparseMSDeformableAttentionBlock(E, H, L, P, bias=True).double()
    load_reference_state_dict(ours, ref.state_dict())
    stacked = _coo_map(shapes, 2, 0.6, E, seed=11)
    g = torch.Generator().manual_seed(12)
    qlev = torch.randint(0, 2, (9,), generator=g) if with_levels else None
    full = 12.0 + torch.rand(9, 2, generator=g, dtype=torch.float64) * 8.0
    st = torch.tensor(shapes)
    pos = full if qlev is None else full / 32 * st[qlev].double()  # each query's own level frame
    offsets = torch.tensor([0, 4, 9])
    query = torch.randn(9, E, dtype=torch.float64, generator=g)
    out_ref = ref(query, pos, offsets, stacked, st, query_level_indices=qlev)
    out = ours(query, pos, offsets, stacked, st, query_level_indices=qlev)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    # control: the raw (unconverted) state_dict loads but computes something else
    raw = SparseMSDeformableAttentionBlock(E, H, L, P, bias=True).double()
    raw.load_state_dict(ref.state_dict())
    assert not torch.allclose(raw(query, pos, offsets, stacked, st, query_level_indices=qlev), out_ref, atol=1e-6)


# ------------------------------------------------------------------------------------------
# multilevel_sparse_bilinear_grid_sample / sparse_split_heads conventions
# ------------------------------------------------------------------------------------------
def test_sparse_split_heads_makes_the_head_a_sparse_dim():
    stack = _coo_map([[6, 5], [3, 3]], 2, 0.5, 8, seed=20)
    split = sparse_split_heads_(stack, 4)
    assert split.shape == (2, 6, 5, 2, 4, 2)
    assert split.sparse_dim() == 5 and split.dense_dim() == 1 and split.is_coalesced()
    assert split._nnz() == 4 * stack._nnz()
    dense = split.to_dense()
    torch.testing.assert_close(dense.reshape(*stack.shape[:-1], 8), stack.to_dense(), rtol=0, atol=0)


def _loop_sample(split, pos, b, shapes, lvl, heads, bg=None):
    """Per-point reference alignment, sampled one point at a time with the broadcast API."""
    from sparse_msda.functional.deformable import sparse_bilinear_sample

    out = torch.zeros(*pos.shape[:-1], split.shape[-1], dtype=pos.dtype)
    for idx in itertools.product(*[range(s) for s in pos.shape[:-1]]):
        lead, li, hi = idx[:-2], idx[-2], idx[-1]
        out[idx] = sparse_bilinear_sample(
            split, pos[idx], b[lead], shapes, lvl[li], heads[hi], background_embedding=bg
        )
    return out


def test_grid_sample_reference_alignment():
    """batch_indices lines up with the leading dims, level_indices [L] with dim -3, head_indices
    [H] with dim -2 (defaults arange); N == L == H included, where a numpy-style broadcast
    would silently read the call differently."""
    g = torch.Generator().manual_seed(21)
    shapes = torch.tensor([[8, 7], [4, 4], [2, 2]])
    stack = _coo_map(shapes.tolist(), 3, 0.6, 6, seed=22)
    split = sparse_split_heads_(stack, 3)
    N = 3  # == n_levels == n_heads
    pos = torch.rand(N, 3, 3, 2, generator=g, dtype=torch.float64) * shapes[:, None, :].double()
    b = torch.tensor([2, 0, 1])
    out = sparse_msda.multilevel_sparse_bilinear_grid_sample(split, pos, b, shapes)
    assert out.shape == (N, 3, 3, 2)
    ref = _loop_sample(split, pos, b, shapes, torch.arange(3), torch.arange(3))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # explicit level/head subsets and an extra batch dim
    pos2 = torch.rand(2, 4, 2, 1, 2, generator=g, dtype=torch.float64) * 2
    b2 = torch.randint(0, 3, (2, 4), generator=g)
    lvl, heads = torch.tensor([2, 1]), torch.tensor([1])
    bg = torch.randn(3, 3, 3, 2, generator=g, dtype=torch.float64)
    out2 = sparse_msda.multilevel_sparse_bilinear_grid_sample(split, pos2, b2, shapes, lvl, heads, bg)
    torch.testing.assert_close(out2, _loop_sample(split, pos2, b2, shapes, lvl, heads, bg), rtol=0, atol=1e-12)


def test_grid_sample_rejects_other_alignments():
    shapes = torch.tensor([[8, 7], [4, 4], [2, 2]])
    stack = _coo_map(shapes.tolist(), 3, 0.6, 6, seed=23)
    split = sparse_split_heads_(stack, 3)
    pos = torch.rand(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="head-split"):  # an un-split stack (the former API)
        sparse_msda.multilevel_sparse_bilinear_grid_sample(stack, pos[:, None, None], torch.zeros(3, dtype=torch.long), shapes)
    with pytest.raises(ValueError, match=r"\[N, \.\.\., L, H, 2\]"):  # [N, D] points with [N] level indices
        sparse_msda.multilevel_sparse_bilinear_grid_sample(split, pos, torch.zeros(3, dtype=torch.long), shapes, torch.arange(3))
    p = torch.rand(3, 3, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_indices"):
        sparse_msda.multilevel_sparse_bilinear_grid_sample(split, p, torch.zeros(3, 3, dtype=torch.long), shapes)
    with pytest.raises(RuntimeError, match="Default level_indices"):  # the reference's type (also a ValueError)
        sparse_msda.multilevel_sparse_bilinear_grid_sample(split, p[:, :2], torch.zeros(3, dtype=torch.long), shapes)
    with pytest.raises(ValueError, match="Default head_indices"):
        sparse_msda.multilevel_sparse_bilinear_grid_sample(split, p[..., :2, :], torch.zeros(3, dtype=torch.long), shapes)
    with pytest.raises(ValueError, match="level_indices must be"):
        sparse_msda.multilevel_sparse_bilinear_grid_sample(split, p, torch.zeros(3, dtype=torch.long), shapes, torch.zeros(3, 1, dtype=torch.long))


def test_reference_grid_sample_parity():
    _reference()
    from sparse_transformer_layers.layers.sparse_ms_deform_attn.utils import (
        multilevel_sparse_bilinear_grid_sample as ref_sample,
        sparse_split_heads as ref_split,
    )

    g = torch.Generator().manual_seed(24)
    shapes = torch.tensor([[16, 12], [8, 6]])
    stack = _coo_map(shapes.tolist(), 2, 0.6, 6, seed=25)
    ours_split, ref_split_t = sparse_split_heads_(stack, 3), ref_split(stack, 3)
    assert torch.equal(ours_split.indices(), ref_split_t.indices()) and torch.equal(ours_split.values(), ref_split_t.values())
    # interior points (the reference clamps at the edges)
    pos = 1.0 + torch.rand(5, 2, 2, 3, 2, generator=g, dtype=torch.float64) * (shapes[None, None, :, None, :].double() - 2.0)
    b = torch.randint(0, 2, (5, 2), generator=g)
    bg = torch.randn(2, 2, 3, 2, generator=g, dtype=torch.float64)
    for background in (None, bg):
        ref = ref_sample(ref_split_t, pos, b, shapes, background_embedding=background)
        out = sparse_msda.multilevel_sparse_bilinear_grid_sample(ours_split, pos, b, shapes, background_embedding=background)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_reference_get_multilevel_neighborhoods_parity():
    blocks = _reference()
    from sparse_transformer_layers.blocks.neighborhood_attn import get_multilevel_neighborhoods as ref_fn

    g = torch.Generator().manual_seed(26)
    shapes = torch.tensor([[16, 12], [8, 6], [4, 3]])
    pos = torch.rand(20, 2, generator=g, dtype=torch.float64) * torch.tensor([16.0, 12.0])
    cells, oob, lv = sparse_msda.get_multilevel_neighborhoods(pos, shapes, [3, 5, 3])
    r_cells, r_oob, r_lv = ref_fn(pos, shapes, [3, 5, 3])
    assert torch.equal(lv, r_lv.long()) and torch.equal(oob, r_oob)
    assert torch.equal(cells[~oob], r_cells.long()[~r_oob])
    assert blocks is not None


def test_reference_attribute_names_resolve():
    nb = SparseNeighborhoodAttentionBlock(16, 2, dropout=0.2, rope_share_heads=True)
    assert nb.q_in_proj is nb.q_proj and nb.pos_encoding is nb.rope and nb.out_proj_drop is nb.dropout
    assert nb.attn_drop_rate == 0.2 and nb.rope_share_heads is True
    assert not any(k.startswith(("q_in_proj", "pos_encoding")) for k in nb.state_dict())  # aliases add no keys
    db = SparseMSDeformableAttentionBlock(16, 2, 2, 2, dropout=0.1)
    assert db.out_proj_drop is db.dropout and db.msdeform_attn is not None and db.q_in_proj is not None
