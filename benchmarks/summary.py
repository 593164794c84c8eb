"""The README's benchmark cases on one device, in one table (the benchmark step of ``make gpu-check``).

Run from the repository root::

    python -m benchmarks.summary --device cuda --group msda --jsonl LOG/bench.jsonl
    python -m benchmarks.summary --device cuda --group neighborhood --jsonl LOG/bench.jsonl
    python -m benchmarks.summary --device cuda --group encoder --jsonl LOG/bench.jsonl
    python -m benchmarks.summary --report LOG/bench.jsonl [--out LOG/summary.md]

Groups (forward+backward, embed 256 / 8 heads as in :mod:`benchmarks.msda` and
:mod:`benchmarks.neighborhood`, whose setups these are):

* ``msda``: :class:`SparseMSDeformableAttention` (``sparse``) vs Deformable DETR's dense
  ``F.grid_sample`` formulation (``dense``, 2D only) vs its four linear layers (``floor``) on the
  synthetic BEV levels, the real scan's BEV pyramid and its 3D VoxelBackBone8x levels, encoder
  (every voxel a query) and decoder (900 queries per item);
* ``neighborhood``: :class:`SparseNeighborhoodAttentionBlock` (``block``) vs its linear layers
  (``floor``) vs gather-everything (``naive``, where it fits), same settings, plus 100k queries;
* ``encoder``: :class:`SparseMSDAEncoder` (1 layer, embed 64, 8 heads, 4 points, windows 3) on the
  real scan's 3D levels (all ~118k voxels are queries), forward and forward+backward.

Unlike ``python -m benchmarks.msda``, the cases of one group run in *this* process one after the
other (:func:`benchmarks.common._measure`: warm-up, then timed calls with
``torch.cuda.synchronize()`` around each and CUDA events, peak ``torch.cuda.max_memory_allocated``
reset per case): on a GPU a fresh process per case would pay the CUDA context, the imports and
the Triton compilation each time. One process per group keeps a crash from taking the others
down; ``gpu_check.sh`` runs each under ``timeout``. Every case appends a ``start`` line and then
its result to the JSON-lines file at once, so a group killed by its time limit still reports
what finished and names the case it was in. ``--quick`` uses small synthetic sizes (the CPU
rehearsal of the GPU check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

OURS = ("sparse", "block", "encoder")
COLUMNS = ("ours", "dense", "naive", "floor")


# --- the encoder case -------------------------------------------------------------------------
def setup_encoder(backward: bool, quick: bool = False, device: str = "cpu"):
    """SparseMSDAEncoder on 3D levels (the real scan; ``quick``: small synthetic levels)."""
    import torch

    from benchmarks.common import levels_to, scan_levels
    from sparse_msda import SparseMSDAEncoder

    embed = 64
    if quick:
        from sparse_msda.lidar import random_sparse_levels

        levels = random_sparse_levels([[8, 64, 64], [4, 32, 32], [2, 16, 16], [1, 8, 8]], 0.05, 1, embed)
    else:
        levels = scan_levels(batch_size=1, channels=embed)
    levels = levels_to(levels, device)
    torch.manual_seed(0)
    encoder = SparseMSDAEncoder(
        embed_dim=embed, n_heads=8, n_levels=4, n_layers=1, n_points=4, neighborhood_sizes=[3, 3, 3, 3], position_dim=3
    ).to(device)
    feats = [lvl.features.requires_grad_(backward) for lvl in levels]

    def fn():
        if not backward:
            with torch.no_grad():
                encoder(levels)
            return None
        encoder.zero_grad(set_to_none=True)
        for f in feats:
            f.grad = None
        out = encoder(levels)
        sum(lvl.features.square().mean() for lvl in out).backward()
        return None

    return fn


# --- case lists -------------------------------------------------------------------------------
def group_cases(group: str, quick: bool, device: str):
    """``[(setting, impl, Case)]`` of one group, most important first (a time limit cuts the tail)."""
    from benchmarks import msda, neighborhood
    from benchmarks.common import Case, with_device

    out = []
    if group == "msda":
        for c in msda.cases(quick, "synthetic" if quick else None, device=device):
            setting, _, impl = c.name.rpartition("/")
            if "fwd+bwd" in setting and impl in ("sparse", "dense", "floor") and not setting.startswith("sweep"):
                out.append((setting, impl, c))
        out.sort(key=lambda t: "scan_3d" in t[0])  # the 3D cases last (stable)
    elif group == "neighborhood":
        cases = neighborhood.build_cases(quick)
        for c in with_device(cases, device):
            label, impl, mode = c.name.split(" ")
            # the floor (linear layers) does not depend on the background: once per setting
            if mode == "fwd+bwd" and impl in ("block", "floor", "naive") and not (impl == "floor" and label.endswith("-bg")):
                out.append((f"{label} {mode}", impl, c))
        out.sort(key=lambda t: (t[1] == "naive", "3d" in t[0]))  # block/floor first, 3D and naive last
    elif group == "encoder":
        for backward in (False, True):
            kw = dict(backward=backward, quick=quick)
            if device != "cpu":
                kw["device"] = device
            setting = f"encoder 3D {'scan' if not quick else 'synthetic'} {'fwd+bwd' if backward else 'fwd'}"
            out.append((setting, "encoder", Case(setting, setup_encoder, kw, device=None if device == "cpu" else device)))
    else:
        raise ValueError(f"group must be msda, neighborhood or encoder, got {group=}")
    return out


def _backend_name(device: str) -> str:
    """The backend the CUDA/CPU dispatch would pick (``sparse_msda.backends`` when present)."""
    forced = os.environ.get("SPARSE_MSDA_BACKEND")
    try:
        import torch

        from sparse_msda import backends  # noqa: F401  (issue 13's backend layer)

        chosen = backends.choose_backend("weighted_gather", torch.zeros(2, 2, device=device))
        name = getattr(chosen, "__name__", str(chosen)).rsplit(".", 1)[-1]
        return name if not forced else f"{name} (SPARSE_MSDA_BACKEND={forced})"
    except Exception as err:  # no backend layer yet, or another interface
        return forced or f"default ({type(err).__name__})"


def run_group(group: str, device: str, quick: bool, jsonl: Path, warmup: int, repeats: int, threads: int) -> int:
    import torch

    from benchmarks import common

    common.NUM_THREADS = threads
    backend = _backend_name(device)
    failed = 0
    for setting, impl, case in group_cases(group, quick, device):
        base = dict(group=group, setting=setting, impl=impl, device=device, backend=backend)
        with jsonl.open("a") as f:
            f.write(json.dumps({**base, "event": "start", "time": time.time()}) + "\n")
        print(f"[summary] {group}: {setting} / {impl} on {device} ...", file=sys.stderr, flush=True)
        row = dict(base, event="result")
        try:
            r = common._measure(case, warmup, repeats)
            row.update(
                median_ms=r.median_ms,
                min_ms=r.min_ms,
                cuda_event_ms=(1e3 * sorted(r.cuda_times_s)[len(r.cuda_times_s) // 2]) if r.cuda_times_s else None,
                peak_mib=(r.peak_cuda_bytes if r.peak_cuda_bytes is not None else r.peak_rss_bytes) / 2**20,
                peak_kind="CUDA" if r.peak_cuda_bytes is not None else "RSS",
            )
        except Exception as err:  # reported in the table; the next case still runs
            failed += 1
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            import traceback

            traceback.print_exc()
        finally:
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[summary]   -> {row.get('median_ms') or row.get('error')}", file=sys.stderr, flush=True)
    return failed


# --- the one table ----------------------------------------------------------------------------
def report(paths) -> str:
    """One markdown table from the JSON-lines files: ms / MiB per implementation, ours / floor."""
    rows, started = {}, {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            key = (rec["group"], rec["setting"], rec["device"], rec["backend"])
            col = "ours" if rec["impl"] in OURS else rec["impl"]
            if rec["event"] == "start":
                started.setdefault(key, {})[col] = True
            else:
                rows.setdefault(key, {})[col] = rec
    for key, cols in started.items():  # a case that started and never reported: killed by its time limit
        for col in cols:
            rows.setdefault(key, {}).setdefault(col, {"error": "no result (time limit or crash)"})
    head = ["group", "case", "device", "backend", *(f"{c} ms / MiB" for c in COLUMNS), "ours / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(rec):
        if rec is None:
            return ""
        if rec.get("error"):
            return "error: " + rec["error"].replace("|", "/")
        return f"{rec['median_ms']:.1f} / {rec['peak_mib']:.0f}"

    for (group, setting, device, backend), cols in rows.items():
        if "floor" not in cols and "-bg " in setting:  # the same setting's floor without background
            cols["floor"] = rows.get((group, setting.replace("-bg ", " "), device, backend), {}).get("floor")
        ours, floor = cols.get("ours"), cols.get("floor")
        ratio = ""
        if ours and floor and ours.get("median_ms") and floor.get("median_ms"):
            ratio = f"{ours['median_ms'] / floor['median_ms']:.2f}x"
        lines.append("| " + " | ".join([group, setting, device, backend, *(cell(cols.get(c)) for c in COLUMNS), ratio]) + " |")
    note = (
        "ms: median wall time of the timed calls (synchronised); MiB: peak torch.cuda.max_memory_allocated "
        "above the inputs on CUDA, peak RSS rise on CPU. ours = sparse (msda), block (neighborhood), encoder."
    )
    return "\n".join(lines) + "\n\n" + note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=["msda", "neighborhood", "encoder"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small synthetic sizes (CPU rehearsal)")
    parser.add_argument("--jsonl", type=Path, help="append results here")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--report", nargs="+", type=Path, help="print the one table of these JSON-lines files")
    parser.add_argument("--out", type=Path, help="with --report: also write the table here")
    args = parser.parse_args(argv)
    if args.report:
        text = report(args.report)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    if not args.group or not args.jsonl:
        parser.error("--group and --jsonl are required (or --report)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
    return 1 if run_group(args.group, args.device, args.quick, args.jsonl, args.warmup, args.repeats, args.threads) else 0


if __name__ == "__main__":
    sys.exit(main())
