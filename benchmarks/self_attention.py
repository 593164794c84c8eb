"""Speed and memory of SparseMultilevelMapAttentionBlock (issue 4, global window).

Run from the repository root (one benchmark at a time on the machine)::

    flock /tmp/bench.lock .venv/bin/python -m benchmarks.self_attention [--quick] [--out FILE]

Implementations, side by side for each setting (embed 256, 8 heads):

* ``block``: :class:`sparse_msda.SparseMultilevelMapAttentionBlock` (per-item
  ``scaled_dot_product_attention``, flash kernel on CPU: no ``[Q_b, N_b]`` matrix kept);
* ``math``: the same block forced onto SDPA's math backend (``SDPBackend.MATH``): plain
  autograd that materialises and saves the ``[H, Q_b, N_b]`` scores/weights, the
  "naive dense softmax" reference;
* ``floor``: the block's own linear layers alone (q and output projections on the queries,
  the k/v projection on every voxel of the map), what any implementation must pay.

Modes: ``fwd`` (autograd records, graph dropped) and ``fwd+bwd`` (backward of ``(out * w).sum()``).
Settings on the real scans (batch 2, two frames, :func:`benchmarks.common.scan_levels`):

* ``bev-c2``: the two coarsest BEV levels ``[50,44], [25,22]``;
* ``bev-all``: all four BEV levels ``[200,176]..[25,22]``;
* ``3d-c1``: the coarsest 3D VoxelBackBone8x level ``[5,200,176]``.

Token self-attention (:class:`sparse_msda.MultilevelSelfAttentionBlockWithRoPE`, the
reference's block; ``tokens`` cases, every voxel of the setting a token, both items):

* ``token``: ours (one SDPA per item; flash kernel on CPU);
* ``token-padded``: the reference's strategy on the same block: items padded to the longest,
  one batched SDPA with the padding as a boolean mask (SDPA's math path on CPU);
* ``token-floor``: ``qkv`` and ``out_proj`` alone.

Roles: ``enc`` every voxel is a query (positions = cell centres mapped to full scale,
``query_level_indices`` = level, query = the voxel's feature); ``dec`` 900 queries per item near
random finest-level voxels (+-2 cells jitter).
"""

from __future__ import annotations


import torch

from benchmarks.common import Case, block_queries, block_runner, run_main, scan_levels

EMBED, HEADS = 256, 8
SETTINGS = {"bev-c2": (True, slice(2, 4)), "bev-all": (True, slice(0, 4)), "3d-c1": (False, slice(3, 4))}


def _inputs(setting: str, role: str, n_queries: int, seed: int = 0):
    from adapters import multilevel_features

    bev, levels_slice = SETTINGS[setting]
    levels = scan_levels(batch_size=2, channels=EMBED, bev=bev)[levels_slice]
    features, index = multilevel_features(levels)
    g = torch.Generator().manual_seed(seed)
    query, pos, qlev, offsets = block_queries(features, index, role, n_queries, g, EMBED)
    return dict(query=query, pos=pos, offsets=offsets, levels=levels, features=features, index=index, qlev=qlev)


def _run_block(block, x):
    return block(x["query"], x["pos"], x["offsets"], x["levels"], None, query_level_indices=x["qlev"],
                 coordinate_index=x["index"])


def _run_math(block, x):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _run_block(block, x)


def _run_floor(block, x):
    q = block.out_proj(block.q_proj(x["query"]))
    kv = block.kv_proj(x["features"])
    return q.sum() + kv.sum()


IMPLS = {"floor": _run_floor, "block": _run_block, "math": _run_math}


def setup(impl: str, mode: str, setting: str, role: str, n_queries: int = 900):
    from sparse_msda import SparseMultilevelMapAttentionBlock

    x = _inputs(setting, role, n_queries)
    torch.manual_seed(0)
    index = x["index"]
    block = SparseMultilevelMapAttentionBlock(EMBED, HEADS, n_levels=index.n_levels, position_dim=index.position_dim)
    run = IMPLS[impl]
    query = x["query"].requires_grad_(True)
    return block_runner(block, query, run, x, backward=mode == "fwd+bwd")


def _token_inputs(setting: str):
    from adapters import multilevel_features

    bev, levels_slice = SETTINGS[setting]
    levels = scan_levels(batch_size=2, channels=EMBED, bev=bev)[levels_slice]
    features, index = multilevel_features(levels)
    order = torch.argsort(index.batch_indices, stable=True)
    counts = torch.bincount(index.batch_indices, minlength=index.batch_size)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return dict(
        x=features[order].clone(), pos=index.spatial_indices[order].clone(), lvl=index.level_indices[order].clone(),
        shapes=index.level_spatial_shapes, offsets=offsets,
    )


def _run_token(block, t):
    return block(t["x"], t["pos"], t["lvl"], t["shapes"], t["offsets"])


def _run_token_padded(block, t):
    """The reference's strategy: pad every item to the longest, one SDPA with a padding mask."""
    import torch.nn.functional as F

    from sparse_msda.functional.token_self_attention import multilevel_token_positions

    x, offsets = t["x"], t["offsets"]
    n, e, h = x.shape[0], block.embed_dim, block.n_heads
    counts = offsets.diff()
    bsz, s = counts.numel(), int(counts.max())
    batch = torch.repeat_interleave(torch.arange(bsz), counts)
    slot = torch.arange(n) - offsets[batch]
    q, k, v = block.qkv(block.norm(x)).chunk(3, -1)
    u = multilevel_token_positions(t["pos"], batch, t["lvl"], t["shapes"]).float()
    q = block.pos_encoding(q.reshape(n, h, -1), u)
    k = block.pos_encoding(k.reshape(n, h, -1), u)
    v = v.reshape(n, h, -1)
    pad = [torch.zeros(bsz, s, h, e // h).index_put((batch, slot), z) for z in (q, k, v)]
    keep = torch.zeros(bsz, s, dtype=torch.bool).index_put((batch, slot), torch.tensor(True))
    o = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in pad), attn_mask=keep[:, None, None, :])
    o = o.transpose(1, 2)[batch, slot].reshape(n, e)
    return x + block.out_proj(o)


def _run_token_floor(block, t):
    return block.out_proj(block.qkv(t["x"])[:, :EMBED])


TOKEN_IMPLS = {"token": _run_token, "token-padded": _run_token_padded, "token-floor": _run_token_floor}


def setup_tokens(impl: str, mode: str, setting: str):
    from sparse_msda import MultilevelSelfAttentionBlockWithRoPE

    t = _token_inputs(setting)
    torch.manual_seed(0)
    block = MultilevelSelfAttentionBlockWithRoPE(EMBED, HEADS, position_dim=t["pos"].shape[1])
    x = t["x"].requires_grad_(True)
    return block_runner(block, x, TOKEN_IMPLS[impl], t, backward=mode == "fwd+bwd")


def build_cases(quick: bool) -> list[Case]:
    settings = [("bev-c2", "enc"), ("bev-c2", "dec"), ("bev-all", "enc"), ("bev-all", "dec"), ("3d-c1", "dec"), ("3d-c1", "enc")]
    if quick:
        settings = [("bev-c2", "enc")]
    cases = []
    for setting, role in settings:
        for impl in ("floor", "block", "math"):
            if impl == "math" and (setting, role) == ("3d-c1", "enc"):
                continue  # [8, 12k, 12k] float32 scores per item, several copies: ~20 GB
            for mode in ("fwd", "fwd+bwd"):
                cases.append(Case(f"{setting}-{role} {impl} {mode}", setup, dict(impl=impl, mode=mode, setting=setting, role=role)))
    for setting in ["bev-c2"] if quick else ["bev-c2", "bev-all"]:
        for impl in TOKEN_IMPLS:
            for mode in ("fwd", "fwd+bwd"):
                cases.append(Case(f"{setting}-tokens {impl} {mode}", setup_tokens, dict(impl=impl, mode=mode, setting=setting)))
    return cases


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], build_cases, "SparseMultilevelMapAttentionBlock: embed 256, 8 heads, global window (real scans, batch 2)")
