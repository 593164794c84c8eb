"""Compile every Triton kernel of this backend for a CUDA target without a GPU.

``python -m sparse_msda.backends.triton.compile_check [--arch 90] [--quick]`` runs
``triton.compile`` (Triton's front end, its MLIR passes and the ``ptxas`` bundled with the triton
wheel) on each kernel for 2D and 3D, with and without background, float32 / bfloat16 / float64
(``--quick``: float32 and float64), and prints one line per kernel variant. It catches what
Triton's interpreter does not check (type rules of compiled code, constexpr globals, unsupported
ops) for the installed triton version, e.g. in a separate virtual environment holding only the
triton version of the GPU machine (the kernel modules are loaded by path: no torch needed).
Exit status 1 if any variant fails to compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time
import traceback


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_compile_check_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _signature(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*fp32")
        else:
            sig[name] = types.get(name, "i32")
    return sig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--quick", action="store_true", help="float32 and float64 only")
    args = parser.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sk, nk = _load("sampling_kernels"), _load("neighborhood_kernels")
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failed = 0

    def compile_one(fn, types, constexprs, label):
        nonlocal failed
        t0 = time.time()
        try:
            triton.compile(ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs), target=target)
            print(f"ok     {fn.__name__:28s} {label} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001  (report every variant, then fail)
            failed += 1
            print(f"FAILED {fn.__name__:28s} {label}\n{traceback.format_exc()}", flush=True)

    dtypes = (("*fp32", False), ("*fp64", True)) if args.quick else (("*fp32", False), ("*bf16", False), ("*fp64", True))
    tile_names = (
        "qorder_ptr", "qstart_ptr", "qcount_ptr", "tbatch_ptr", "kstart_ptr", "kcount_ptr", "krow_ptr", "klev_ptr",
        "kcell_ptr", "centres_ptr", "radius_ptr", "shapes_ptr", "slot_start_ptr", "slot_off_ptr", "size_ptr",
    )
    for dt, f64 in dtypes:
        acc = "*fp64" if f64 else "*fp32"
        for dim in (2, 3):
            for bg in (False, True):
                label = f"{dt[1:]:5s} {dim}D {'background' if bg else 'no background'}"
                types = {n: "*i64" for n in ("batch_ptr", "level_ptr", "head_ptr", "shapes_ptr")}
                types.update(ids_ptr="*i32", ctab_ptr="*i32", gtable_ptr=acc, pos_ptr=acc if f64 else "*fp32")
                types.update({n: dt for n in ("table_ptr", "w_ptr", "out_ptr", "gout_ptr", "gw_ptr")}, gpos_ptr=types["pos_ptr"])
                ce = dict(DIM=dim, N_CORNERS=2**dim, HAS_BG=bg, POS_F64=f64, COMPUTE_F64=f64, BLOCK_S=16, BLOCK_C=32)
                compile_one(sk.sample_forward_kernel, types, ce, label)
                compile_one(sk.sample_backward_kernel, types, dict(ce, NEED_TABLE=True, NEED_POS=True, NEED_W=True), label)
                types = {n: "*i64" for n in tile_names}
                types.update({n: dt for n in ("q_ptr", "k_ptr", "v_ptr", "bgv_ptr", "gout_ptr")}, occ_ptr="*i8", scale="fp32")
                types.update({n: acc for n in ("ql_ptr", "tab_ptr", "out_ptr", "lse_ptr", "delta_ptr", "dq_ptr", "dk_ptr",
                                                "dv_ptr", "dql_ptr", "dtab_ptr", "dbgv_ptr")})
                ce = dict(H=2, HEAD_DIM=32, N_LEVELS=3, DIM=dim, HAS_BG=bg, F64=f64, BLOCK_Q=32, BLOCK_K=32, BLOCK_D=32)
                compile_one(nk.attention_forward_kernel, types, ce, label)
                compile_one(nk.attention_backward_kernel, types, ce, label)
                if bg and not f64 and dt == "*fp32":
                    compile_one(nk.mark_occupied_kernel, types, dict(N_LEVELS=3, DIM=dim, BLOCK_Q=32, BLOCK_K=32), f"{dim}D")
    print("all kernels compiled" if not failed else f"{failed} variant(s) failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
