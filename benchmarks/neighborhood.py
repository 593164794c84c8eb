"""Speed and memory of SparseNeighborhoodAttentionBlock (issue 4).

Run from the repository root (one benchmark at a time on the machine)::

    flock /tmp/bench.lock .venv/bin/python -m benchmarks.neighborhood [--quick] [--out FILE]
    python -m benchmarks.neighborhood --device cuda     # inputs and block on the GPU

Implementations, side by side for each setting (embed 256, 8 heads, windows [3, 5, 7, 9]):

* ``block``: :class:`sparse_msda.SparseNeighborhoodAttentionBlock` (tiled window plan looked
  up through the coordinate index, per-voxel k/v, the fused CPU kernel with its recomputing
  backward);
* ``shared-plan``: the block with its plan built once before the timed calls and passed as
  ``plan=`` (what every encoder layer after the first pays: :class:`SparseMSDAEncoder` builds
  the plan once per forward); only for the encoder settings;
* ``pytorch``: the same block on the same inputs with ``SPARSE_MSDA_CPU_KERNELS=0`` set during
  its calls (the PyTorch path the kernel replaces); the table below the results gives kernel /
  PyTorch path per case, and names every case where the kernel loses (the guard of issue 11);
* ``floor``: the block's own linear layers alone (q and output projections on the queries,
  the k/v projection on *every* voxel of the map), i.e. what any implementation must pay;
* ``naive``: gather everything: the same window lookup, then ``[Q, K, H, d]`` keys/values
  gathered per (query, window cell), dense masked softmax, plain autograd. Skipped (with the
  reason in the table) where its estimated memory would not fit this machine.

``--dtype bfloat16`` / ``float16``: the block, queries, features and background in that dtype
(positions float32); ``--dtype autocast-bfloat16``: float32 block and inputs, the forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``. The naive reference runs in float32 only.

Timing: the implementations of one setting and mode are set up in one subprocess on the same
inputs and timed in interleaved rounds (``--repeats`` rounds, one call each, order rotated; the
ratios below the table are medians of per-round ratios), the peak memory of each case (``--peak``:
all, none or substrings of case names) in a fresh subprocess of its own
(:mod:`benchmarks.common`, "Interleaved rounds"). ``--separate``: every case in its own
subprocess, time and peak from the same calls (the method before).

Modes: ``fwd`` (training forward: autograd records, the graph is then dropped) and
``fwd+bwd`` (forward + backward of ``(out * w).sum()``). Settings:

* ``syn``: synthetic BEV levels 256^2..32^2, 5 % occupancy, batch 2
  (:func:`sparse_msda.lidar.random_bev_levels`);
* ``scan-bev`` / ``scan-3d``: the real scans' BEV pyramid ``[200,176]..[25,22]`` / the 3D
  VoxelBackBone8x levels ``[41,1600,1408]..[5,200,176]``, batch 2 (two frames);
* ``enc``: every voxel of every level is a query (positions = cell centres mapped to full
  scale, ``query_level_indices`` = level, query = the voxel's feature);
  ``dec``: ``n_queries`` per item, positions near random finest-level voxels (jitter of
  +-2 cells) for the scans, uniform over the frame for ``syn``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import (
    Case, block_queries, block_runner, cpu_kernels_off, dtype_label, kernel_vs_pytorch_table, levels_to, precision,
    run_main, scan_levels, under_autocast,
)

EMBED, HEADS, SIZES = 256, 8, [3, 5, 7, 9]
NAIVE_LIMIT_BYTES = 8 * 2**30  # estimated naive peak above which it is skipped (24 GiB machine)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _levels(setting: str):
    from sparse_msda.lidar import random_bev_levels

    if setting == "syn":
        return random_bev_levels(channels=EMBED)
    if setting == "syn3d":
        from sparse_msda.lidar import random_sparse_levels

        return random_sparse_levels([[16, 128, 128], [8, 64, 64], [4, 32, 32], [2, 16, 16]], 0.05, 2, EMBED)
    return scan_levels(batch_size=2, channels=EMBED, bev=setting == "scan-bev")


def _inputs(setting: str, role: str, n_queries: int, background: bool, seed: int = 0, device: str = "cpu"):
    from adapters import multilevel_features

    levels = _levels(setting)
    features, index = multilevel_features(levels)
    shapes = index.level_spatial_shapes
    g = torch.Generator().manual_seed(seed)
    query, pos, qlev, offsets = block_queries(features, index, role, n_queries, g, EMBED, uniform=setting.startswith("syn"))
    bg = torch.randn(index.batch_size, shapes.shape[0], EMBED, generator=g) if background else None
    x = dict(query=query, pos=pos, offsets=offsets, levels=levels, features=features, index=index, qlev=qlev, bg=bg)
    if torch.device(device).type == "cpu":
        return x
    x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    x["levels"], x["index"] = levels_to(levels, device), index.to(device)  # the index is rebuilt there
    return x


def _block(dim: int):
    from sparse_msda import SparseNeighborhoodAttentionBlock

    torch.manual_seed(0)
    return SparseNeighborhoodAttentionBlock(EMBED, HEADS, n_levels=4, neighborhood_sizes=SIZES, position_dim=dim)


# ------------------------------------------------------------------------------------------
# implementations
# ------------------------------------------------------------------------------------------
def _run_block(block, x):
    return block(
        x["query"], x["pos"], x["offsets"], x["levels"], None, background_embedding=x["bg"],
        query_level_indices=x["qlev"], coordinate_index=x["index"],
    )


def _run_floor(block, x):
    q = block.out_proj(block.q_proj(x["query"]))
    kv = block.kv_proj(x["features"])
    return q.sum() + kv.sum()  # scalar; both branches in the graph


def _run_naive(block, x):
    """Gather-everything reference: [Q, K, H, d] keys/values, plain autograd."""
    from sparse_msda.functional.neighborhood import (
        get_multilevel_neighborhoods,
        query_rope_positions,
        voxel_rope_positions,
    )
    from sparse_msda.inputs import prepare_inputs

    qb = prepare_inputs(
        x["query"], x["pos"], x["offsets"], x["levels"], None, embed_dim=EMBED, n_levels=4,
        position_dim=block.position_dim, query_level_indices=x["qlev"], background_embedding=x["bg"], index=x["index"],
    )
    index, shapes = qb.index, qb.level_spatial_shapes
    full = shapes[int(torch.argmax(shapes.prod(-1)))]
    H, d = HEADS, EMBED // HEADS
    query = x["query"]
    full_pos = x["pos"]  # full-scale positions (the block's convention, as sparse-transformer-layers)
    cells, oob, lev = get_multilevel_neighborhoods(full_pos, shapes, SIZES)
    rows, found = index.lookup(qb.batch_indices[:, None], lev[None], cells)
    full_shapes = full.float().expand(full_pos.shape[0], -1)
    q = block.rope(block.q_proj(block.norm(query)).view(-1, H, d), query_rope_positions(full_pos, full_shapes, qb.query_level_indices, full))
    kv = block.kv_proj(qb.features).view(-1, 2, H, d)
    k = block.rope(kv[:, 0], voxel_rope_positions(index.spatial_indices, index.level_indices, shapes, full))
    K = k[rows.clamp_min(0)]  # [Q, K, H, d]
    V = kv[:, 1][rows.clamp_min(0)]
    if x["bg"] is not None:
        bkv = block.kv_proj(x["bg"]).view(-1, 4, 2, H, d)
        cell_pos = voxel_rope_positions(cells.reshape(-1, cells.shape[-1]), lev.repeat(cells.shape[0]), shapes, full)
        Kb = block.rope(bkv[:, :, 0][qb.batch_indices[:, None], lev[None]].reshape(-1, H, d), cell_pos).view(K.shape)
        Vb = bkv[:, :, 1][qb.batch_indices[:, None], lev[None]]
        K = torch.where(found[..., None, None], K, Kb)
        V = torch.where(found[..., None, None], V, Vb)
        valid = ~oob
    else:
        valid = found
    s = torch.einsum("qhd,qkhd->qhk", q, K) / math.sqrt(d)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    a = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("qhk,qkhd->qhd", a, V).reshape(-1, EMBED)
    branch = block.out_proj(out) * valid.any(-1, keepdim=True)
    return query + branch


IMPLS = {"block": _run_block, "pytorch": _run_block, "floor": _run_floor, "naive": _run_naive}


def _run_shared_plan(block, x):
    if "plan" not in x:  # built by the untimed warmup call, then reused as by encoder layers 2..n
        x["plan"] = block.build_plan(
            x["pos"], x["offsets"], x["levels"], None, background=x["bg"] is not None,
            query_level_indices=x["qlev"], coordinate_index=x["index"],
        )
    return block(
        x["query"], x["pos"], x["offsets"], x["levels"], None, background_embedding=x["bg"],
        query_level_indices=x["qlev"], coordinate_index=x["index"], plan=x["plan"],
    )


IMPLS["shared-plan"] = _run_shared_plan


def setup(
    impl: str, mode: str, setting: str, role: str, n_queries: int = 900, background: bool = False,
    dtype: str = "float32", device: str = "cpu",
):
    x = _inputs(setting, role, n_queries, background, device=device)
    block = _block(x["index"].position_dim).to(device)
    tensor_dtype = precision(dtype)[0]  # --dtype: block, query, features, background (positions stay float32)
    block = block.to(tensor_dtype)
    x["levels"] = [lvl.replace_feature(lvl.features.to(tensor_dtype)) for lvl in x["levels"]]
    for key in ("query", "features", "bg"):
        if x[key] is not None:
            x[key] = x[key].to(tensor_dtype)
    run = under_autocast(IMPLS[impl], dtype, torch.device(device).type)
    query = x["query"].requires_grad_(True)
    fn = block_runner(block, query, run, x, backward=mode == "fwd+bwd")
    # pytorch: the block without the fused CPU kernels (SPARSE_MSDA_CPU_KERNELS=0 during each call)
    return cpu_kernels_off(fn) if impl == "pytorch" else fn


def naive_estimate_bytes(setting: str, role: str, n_queries: int) -> int:
    """~5 live float32 [Q, K, E] tensors (gathered K, V, rotated/where'd copies, grads)."""
    n_q = {"syn": 8704, "syn3d": 0, "scan-bev": 11700, "scan-3d": 236000}[setting] if role == "enc" else 2 * n_queries
    dim = 3 if "3d" in setting else 2
    k = sum(s**dim for s in SIZES)
    return 5 * n_q * k * EMBED * 4


def build_cases(quick: bool, dtype: str = "float32") -> list[Case]:
    settings = [
        ("syn", "enc", 0, False),
        ("syn", "enc", 0, True),
        ("syn", "dec", 900, False),
        ("syn", "dec", 900, True),
        ("scan-bev", "enc", 0, False),
        ("scan-bev", "enc", 0, True),
        ("scan-bev", "dec", 900, False),
        ("scan-bev", "dec", 900, True),
        ("scan-3d", "enc", 0, False),  # every voxel of the VoxelBackBone8x levels (236k queries): block and floor
        ("scan-3d", "dec", 900, False),
        ("syn", "dec", 50_000, False),  # 100k queries (2 x 50k): block only
    ]
    if quick:
        settings = [("syn", "dec", 900, False)]
    cases = []
    for setting, role, n, bg in settings:
        label = dtype_label(dtype) + f"{setting}-{role}" + (f"-{2 * n // 1000}k" if n >= 10_000 else "") + ("-bg" if bg else "")
        for impl in ("floor", "block", "pytorch", "naive"):
            if impl == "naive" and naive_estimate_bytes(setting, role, n) > NAIVE_LIMIT_BYTES:
                continue
            if impl in ("floor", "naive") and n >= 10_000 or impl == "naive" and dtype != "float32":
                continue
            for mode in ("fwd", "fwd+bwd"):
                kw = dict(impl=impl, mode=mode, setting=setting, role=role, n_queries=n, background=bg)
                if dtype != "float32":
                    kw["dtype"] = dtype
                cases.append(Case(f"{label} {impl} {mode}", setup, kw))
        if role == "enc" and setting.startswith("scan"):  # the block as encoder layers 2..n run it
            for mode in ("fwd", "fwd+bwd"):
                kw = dict(impl="shared-plan", mode=mode, setting=setting, role=role, n_queries=n, background=bg)
                if dtype != "float32":
                    kw["dtype"] = dtype
                cases.append(Case(f"{label} shared-plan {mode}", setup, kw))
    return cases


def _group(case: Case) -> tuple[str, str]:
    label, impl, mode = case.name.split(" ")
    return f"{label} {mode}", impl


def summarize(results) -> str:
    return kernel_vs_pytorch_table(results, _group, kernel="block", pytorch="pytorch", floor="floor")


def timing_group(case: Case) -> str:
    """The cases timed together in interleaved rounds: every implementation of one setting and mode."""
    return _group(case)[0]


if __name__ == "__main__":
    run_main(
        __doc__.splitlines()[0],
        build_cases,
        "SparseNeighborhoodAttentionBlock: embed 256, 8 heads, windows [3, 5, 7, 9]",
        summarize=summarize,
        group=timing_group,
    )
