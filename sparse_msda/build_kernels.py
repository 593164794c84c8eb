"""Prebuild the fused CPU kernels: ``python -m sparse_msda.build_kernels [--march MARCH]``.

Builds (or finds already built) the C++ CPU kernels of :mod:`sparse_msda.functional.cpu_kernels`
for the target ISA (``--march``, else ``$SPARSE_MSDA_CPU_MARCH``, else ``native``) and prints
their build directories; exit status 1 if a build failed. For a container image that runs on
other CPUs than the one it is built on, prebuild a portable target and run with the same
setting, e.g. ``SPARSE_MSDA_CPU_MARCH=x86-64-v3`` (any AVX2 CPU) at build and at run time.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_msda.build_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--march", help="target ISA (a -march value; default $SPARSE_MSDA_CPU_MARCH or 'native')")
    args = parser.parse_args(argv)
    if args.march:
        os.environ["SPARSE_MSDA_CPU_MARCH"] = args.march
    os.environ["SPARSE_MSDA_CPU_KERNELS"] = "1"
    from sparse_msda.functional import cpu_kernels

    failed = False
    for name, getter in (
        ("sparse_msda_sample_cpu", cpu_kernels.sampling_kernels),
        ("sparse_msda_neighborhood_cpu", cpu_kernels.neighborhood_kernels),
        ("sparse_msda_rope_cpu", cpu_kernels.rope_kernels),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # reported below instead
            ok = getter() is not None
        if ok:
            print(f"{name}: {cpu_kernels.build_directory(name)}")
        else:
            failed = True
            print(f"{name}: FAILED ({cpu_kernels.build_error()!r})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
