"""Sparse multi-scale deformable attention vs dense grid_sample vs the four-linear floor.

Run from the repository root::

    flock /tmp/bench.lock .venv/bin/python -m benchmarks.msda [--quick] [--only synthetic|scan|scan_bev|scan_3d|sweep]
    python -m benchmarks.msda --device cuda     # inputs and modules on the GPU (the dense maps too)

Settings: embed 256, 8 heads, 4 levels, 4 points, ``torch.set_num_threads(2)``. The
implementations of one setting (source, mode, pass) are set up in one fresh subprocess on the same
inputs and timed in interleaved rounds (``--repeats`` rounds, one call each, order rotated; the
ratios below the table are medians of per-round ratios); the peak memory of each case (``--peak``:
all, none or substrings of case names) comes from a fresh subprocess of its own
(:mod:`benchmarks.common`, "Interleaved rounds"). ``--separate``: every case in its own
subprocess, time and peak from the same calls (the method before). Implementations, on the same
inputs:

* ``sparse``: :class:`sparse_msda.SparseMSDeformableAttention` on the spconv levels, with a
  prebuilt coordinate index (built once per map, as an encoder does for all its layers).
* ``pytorch``: the same sparse module on the same inputs with ``SPARSE_MSDA_CPU_KERNELS=0`` set
  during its calls (the PyTorch path the fused sampling kernel replaces); the table below the
  results gives kernel / PyTorch path per case and names every case where the kernel loses (the
  guard of issue 11).
* ``dense``: Deformable DETR's ``MSDeformAttn`` formulation (``value_proj`` over every cell of
  the densified maps, ``F.grid_sample`` per level); the densified input maps are built in setup
  (not timed). Skipped where the dense maps would not fit in memory (3D ``[41,1600,1408]`` x 256
  channels is 94 GB per item).
* ``floor``: the module's four linear layers alone (``value_proj`` on the voxels,
  ``sampling_offsets`` / ``attention_weights`` on the queries, ``output_proj`` on a ``[Q, 256]``
  tensor): a lower bound no implementation can beat.

``--dtype bfloat16`` / ``float16``: the module, the query and the features in that dtype (positions
float32); ``--dtype autocast-bfloat16``: float32 module and inputs, the forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``. The dense cases run in float32 only.

Passes: ``fwd`` under ``torch.no_grad()`` (inference); ``fwd+bwd`` with gradients to queries and
features and a scalar loss ``out.square().mean()``.

Cases: (1) synthetic BEV levels 256,128,64,32 at 5 % occupancy, batch 2 (the reference setting),
encoder (every voxel a query, at its own level's cell centre) and decoder (900 queries per item);
(2) the real scan as a BEV stack ``[200,176]..[25,22]`` and as VoxelBackBone8x 3D levels
``[41,1600,1408]..[5,200,176]`` (one frame), encoder and decoder; (3) an occupancy sweep (2D encoder).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Case, add_common_args, add_interleave_args, cpu_kernels_off, dtype_label, dtype_list, without_dtype,
    kernel_vs_pytorch_table, levels_to, precision, run_cases, scan_levels, under_autocast,
)

EMBED, HEADS, LEVELS, POINTS = 256, 8, 4, 4
N_DECODER = 900
BEV_SHAPES = ((256, 256), (128, 128), (64, 64), (32, 32))


# --- inputs ---------------------------------------------------------------------------------
def _levels(source: str, occupancy: float, batch_size: int):
    from sparse_msda import lidar

    if source == "synthetic":
        return lidar.random_bev_levels(BEV_SHAPES, occupancy=occupancy, batch_size=batch_size, channels=EMBED)
    if source == "scan_bev":
        return scan_levels(batch_size=batch_size, channels=EMBED, bev=True)
    if source == "scan_3d":
        return scan_levels(batch_size=batch_size, channels=EMBED)
    raise ValueError(f"unknown {source=}")


def _queries(levels, mode: str, seed: int = 0):
    """(query [Q, C], positions [Q, D], offsets [B+1], query_level_indices [Q])."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = levels[0].batch_size
    dim = len(levels[0].spatial_shape)
    if mode == "encoder":  # every voxel of every level is a query, at its cell centre
        b = torch.cat([lvl.indices[:, 0].long() for lvl in levels])
        pos = torch.cat([lvl.indices[:, 1:].float() + 0.5 for lvl in levels])
        lev = torch.cat([torch.full((lvl.indices.shape[0],), i) for i, lvl in enumerate(levels)])
        order = torch.argsort(b, stable=True)
        b, pos, lev = b[order], pos[order], lev[order]
    else:  # decoder: N_DECODER queries per item near random voxels of the finest level
        shape0 = torch.tensor(levels[0].spatial_shape, dtype=torch.float32)
        idx0 = levels[0].indices.long()
        pos, b = [], []
        for item in range(batch_size):
            rows = (idx0[:, 0] == item).nonzero().squeeze(1)
            pick = rows[torch.randint(0, max(len(rows), 1), (N_DECODER,), generator=gen)] if len(rows) else None
            centre = idx0[pick, 1:].float() + 0.5 if pick is not None else torch.rand(N_DECODER, dim, generator=gen) * shape0
            pos.append((centre + torch.randn(N_DECODER, dim, generator=gen) * 2).clamp(torch.zeros(dim), shape0 - 1e-3))
            b.append(torch.full((N_DECODER,), item))
        pos, b = torch.cat(pos), torch.cat(b)
        lev = torch.zeros(len(b), dtype=torch.int64)
    counts = torch.bincount(b, minlength=batch_size)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    query = torch.randn(len(b), EMBED, generator=gen)
    return query, pos, offsets, lev


def _module(dim: int):
    from sparse_msda import SparseMSDeformableAttention

    torch.manual_seed(0)
    m = SparseMSDeformableAttention(EMBED, HEADS, LEVELS, POINTS, dim)
    with torch.no_grad():  # trained-looking offsets/weights instead of the all-zero-weight init
        m.sampling_offsets.weight.normal_(0, 0.01)
        m.attention_weights.weight.normal_(0, 0.01)
    return m


def _threads(threads: int) -> None:
    """``threads > 0`` overrides the harness's ``torch.set_num_threads(2)`` (e.g. 1 on a loaded machine)."""
    if threads > 0:
        torch.set_num_threads(threads)


def _runner(fn, backward: bool, inputs):
    if not backward:
        def run():
            with torch.no_grad():
                return fn()
        return run

    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.square().mean().backward()
        return None
    return run


# --- the three implementations ---------------------------------------------------------------
def _cast(levels, query, module, dtype: str, device: str = "cpu"):
    """Levels' features, the query and the module in ``dtype``'s tensor dtype (:func:`benchmarks.common.precision`)
    and on ``device``; positions stay float32."""
    tensor_dtype = precision(dtype)[0]
    levels = [lvl.replace_feature(lvl.features.to(tensor_dtype)) for lvl in levels_to(levels, device)]
    return levels, query.to(device, tensor_dtype), module.to(device, tensor_dtype)


def setup_sparse(
    source: str, mode: str, backward: bool, occupancy: float = 0.05, batch_size: int = 2, threads: int = 0,
    dtype: str = "float32", device: str = "cpu",
):
    _threads(threads)
    from adapters import SparseCoordinateIndex

    levels = _levels(source, occupancy, batch_size)
    dim = len(levels[0].spatial_shape)
    query, pos, offsets, lev = _queries(levels, mode)
    pos, offsets, lev = pos.to(device), offsets.to(device), lev.to(device)
    levels, query, module = _cast(levels, query, _module(dim), dtype, device)
    index = SparseCoordinateIndex.from_spconv(levels)
    feats = [lvl.features.requires_grad_(backward) for lvl in levels]
    query.requires_grad_(backward)
    fn = lambda: module(query, pos, offsets, levels, None, query_level_indices=lev, coordinate_index=index)  # noqa: E731
    return _runner(under_autocast(fn, dtype, torch.device(device).type), backward, [query, *feats])


def setup_pytorch(
    source: str, mode: str, backward: bool, occupancy: float = 0.05, batch_size: int = 2, threads: int = 0,
    dtype: str = "float32", device: str = "cpu",
):
    """``setup_sparse`` without the fused CPU kernel (``SPARSE_MSDA_CPU_KERNELS=0`` during each call)."""
    return cpu_kernels_off(setup_sparse(source, mode, backward, occupancy, batch_size, threads, dtype, device))


def setup_floor(
    source: str, mode: str, backward: bool, occupancy: float = 0.05, batch_size: int = 2, threads: int = 0,
    dtype: str = "float32", device: str = "cpu",
):
    _threads(threads)
    levels = _levels(source, occupancy, batch_size)
    dim = len(levels[0].spatial_shape)
    query, _, _, _ = _queries(levels, mode)
    levels, query, module = _cast(levels, query, _module(dim), dtype, device)
    feats = torch.cat([lvl.features for lvl in levels]).requires_grad_(backward)
    query.requires_grad_(backward)

    def fn():
        v = module.value_proj(feats)
        o = module.sampling_offsets(query)
        a = module.attention_weights(query)
        y = module.output_proj(query)
        return y + (v.sum() + o.sum() + a.sum()) * 0  # keep every product alive in the graph
    return _runner(under_autocast(fn, dtype, torch.device(device).type), backward, [query, feats])


def _dense_core(value_list, sampling_locations, attention_weights):
    """Deformable DETR's ``ms_deform_attn_core_pytorch`` (2D/3D): value_list per level ``[B, C, *shape]``."""
    b, q, h, n_levels, n_points, d = sampling_locations.shape
    dh = value_list[0].shape[1] // h
    grids = 2 * sampling_locations - 1
    out = 0
    for lvl, value in enumerate(value_list):
        v = value.reshape(b * h, dh, *value.shape[2:])
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * h, q, n_points, *([1] * (d - 2)), d)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(b * h, dh, q, n_points)
        w = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(b * h, 1, q, n_points)
        out = out + (s * w).sum(-1)
    return out.view(b, h * dh, q).transpose(1, 2)


def setup_dense(
    source: str, mode: str, backward: bool, occupancy: float = 0.05, batch_size: int = 2, threads: int = 0, device: str = "cpu"
):
    _threads(threads)
    levels = _levels(source, occupancy, batch_size)
    dim = len(levels[0].spatial_shape)
    query, pos, offsets, lev = _queries(levels, mode)
    module = _module(dim).to(device)
    shapes = torch.tensor([list(lvl.spatial_shape) for lvl in levels])
    dense_inputs = []
    for lvl in levels:  # densified input maps [B, *shape, C] (setup, not timed)
        d = torch.zeros(batch_size, *lvl.spatial_shape, EMBED)
        d[tuple(lvl.indices.long().T)] = lvl.features
        dense_inputs.append(d.to(device).requires_grad_(backward))
    counts = offsets.diff()
    q_max = int(counts.max())
    # pad queries to [B, q_max] as Deformable DETR batches them
    slot = (torch.arange(len(lev)) - offsets[:-1].repeat_interleave(counts)).to(device)
    bidx = torch.arange(batch_size).repeat_interleave(counts).to(device)
    ref = torch.zeros(batch_size, q_max, dim, device=device)
    ref[bidx, slot] = (pos / shapes[lev].float()).flip(-1).to(device)
    query_b = torch.zeros(batch_size, q_max, EMBED, device=device)
    query = query.to(device).requires_grad_(backward)
    shapes = shapes.to(device)
    h, l, p = HEADS, LEVELS, POINTS
    normalizer = shapes.flip(-1).float()

    def fn():
        qb = query_b.index_put((bidx, slot), query)
        value_list = [module.value_proj(x).movedim(-1, 1) for x in dense_inputs]
        off = module.sampling_offsets(qb).view(batch_size, q_max, h, l, p, dim)
        attn = module.attention_weights(qb).view(batch_size, q_max, h, l * p).softmax(-1).view(batch_size, q_max, h, l, p)
        loc = ref[:, :, None, None, None, :] + off / normalizer[None, None, None, :, None, :]
        out = module.output_proj(_dense_core(value_list, loc, attn))
        return out[bidx, slot]
    return _runner(fn, backward, [query, *dense_inputs])


# --- case list ------------------------------------------------------------------------------
def cases(quick: bool, only: str | None, threads: int = 0, dtype: str = "float32", device: str = "cpu"):
    out = []
    impls = (("sparse", setup_sparse), ("pytorch", setup_pytorch), ("dense", setup_dense), ("floor", setup_floor))

    def add(source, mode, occupancy=0.05, batch_size=2, dense=True, tag=""):
        for backward in (False, True):
            for name, setup in impls:
                if name == "dense" and (not dense or dtype != "float32"):  # the dense reference: float32 only
                    continue
                kw = dict(source=source, mode=mode, backward=backward, occupancy=occupancy, batch_size=batch_size)
                if threads:
                    kw["threads"] = threads
                if dtype != "float32":
                    kw["dtype"] = dtype
                if device != "cpu":
                    kw["device"] = device
                label = f"{dtype_label(dtype)}{tag}{source}/{mode}/{'fwd+bwd' if backward else 'fwd'}/{name}"
                out.append(Case(label, setup, kw, device=None if device == "cpu" else device))

    if only in (None, "synthetic"):
        for mode in ("encoder", "decoder"):
            add("synthetic", mode, 0.01 if quick else 0.05)
    if only in (None, "scan", "scan_bev"):
        for mode in ("encoder", "decoder"):
            add("scan_bev", mode, batch_size=1 if quick else 2)
    if only in (None, "scan", "scan_3d"):
        # one frame: the 3D encoder has ~120k queries x 1024 corners; dense 3D is skipped
        # (41*1600*1408 cells x 256 channels x 4 B = 94 GB per item for level 0 alone)
        for mode in ("encoder", "decoder"):
            add("scan_3d", mode, batch_size=1, dense=False)
    if only in (None, "sweep"):
        for occ in (0.01, 0.05, 0.1, 0.2):
            add("synthetic", "encoder", occ, tag="sweep ")
    return out


def _group(case: Case) -> tuple[str, str]:
    group, _, impl = case.name.rpartition("/")
    return group, impl


def summarize(results) -> str:
    return kernel_vs_pytorch_table(results, _group, kernel="sparse", pytorch="pytorch", floor="floor")


def timing_group(case: Case) -> str:
    """The cases timed together in interleaved rounds: every implementation of one source, mode and pass."""
    return _group(case)[0]


if __name__ == "__main__":
    parser = add_interleave_args(add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    parser.add_argument("--only", choices=["synthetic", "scan", "scan_bev", "scan_3d", "sweep"], default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (default: the harness's 2)")
    parser.add_argument("--match", default=None, help="comma-separated substrings: run only cases whose name contains one")
    parser.add_argument(
        "--dtype", type=dtype_list, default=["float32"],
        help="module and input dtype(s), comma-separated: float32, bfloat16, float16, autocast-bfloat16 (dense: float32 only)",
    )
    args = parser.parse_args()
    selected = [c for d in args.dtype for c in cases(args.quick, args.only, args.threads, d, args.device)]
    if len(args.dtype) > 1:  # each case's dtypes next to each other
        order = {c.name: i for i, c in enumerate(cases(args.quick, args.only, args.threads))}
        selected.sort(key=lambda c: order.get(without_dtype(c.name), len(order)))
    if args.match:
        selected = [c for c in selected if any(part in c.name for part in args.match.split(","))]
    run_cases(
        selected,
        repeats=args.repeats,
        warmup=args.warmup,
        timeout=args.timeout,
        out=args.out,
        title="Sparse MSDA vs dense grid_sample vs four-linear floor (embed 256, 8 heads, 4 levels, 4 points)",
        summarize=summarize,
        **({} if args.separate else dict(group=timing_group, peak=args.peak, peak_repeats=args.peak_repeats)),
    )
