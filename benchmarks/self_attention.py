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

Roles: ``enc`` every voxel is a query (positions = cell centres in their own level's frame,
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
    return cases


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], build_cases, "SparseMultilevelMapAttentionBlock: embed 256, 8 heads, global window (real scans, batch 2)")
