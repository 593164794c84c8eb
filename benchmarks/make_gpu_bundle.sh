#!/usr/bin/env bash
# Prepare, on a machine WITH package-registry access, the spconv bundle that
# benchmarks/gpu_check.sh installs on a CUDA machine WITHOUT it.
#
#   bash benchmarks/make_gpu_bundle.sh [OUTDIR]        # default OUTDIR: .gpu_bundle (git-ignore it)
#
# What it holds: spconv-cu126 2.3.8 and cumm-cu126 0.7.11 for CPython 3.12 (manylinux_2_28 x86-64)
# and the pure-Python runtime dependencies of theirs that the GPU machine's image lacks (pccm,
# ccimport, fire, termcolor, lark). numpy, pybind11, sympy, portalocker, ninja and requests are in
# that image and are not bundled (gpu_check.sh checks that they import).
#
# cumm-cu126 0.7.11, not 0.8.x: spconv-cu126 2.3.8 declares `cumm-cu126<0.8.0,>=0.7.11`.
#
# Size: the spconv wheel is 70 MB (its core_cc .so is 284 MB unpacked) and cumm's 27 MB (58 MB of
# vendored libnvrtc), over the device tool's 64 MiB transfer limit together. The bundle is
# therefore the *installed* tree (`pip install --no-deps --target`, for cp312, no byte-code) as one
# xz-compressed tar, site-cp312.tar.xz, plus MANIFEST.txt (wheel names, sizes, sha256, and the
# tar's sha256, which gpu_check.sh verifies before unpacking).
#
# CUDA runtime: both wheels vendor their CUDA 12.6 runtime (auditwheel: spconv_cu126.libs/ and
# cumm_cu126.libs/ hold libcudart-*.so.12.6.68, cumm's also libnvrtc 12.6; the .so files find them
# through RPATH $ORIGIN/../*.libs and import versioned symbols `cudaMalloc@libcudart.so.12`), so
# nothing from a CUDA 12 toolkit or the nvidia-*-cu12 wheels is needed next to a CUDA 13 torch;
# a CUDA 13 driver runs CUDA 12 runtimes. spconv's .so holds sm_90 cubins (H100/H200).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/.gpu_bundle}
PY=${PYTHON:-python3}
WHEELS=(spconv-cu126==2.3.8 cumm-cu126==0.7.11 pccm==0.4.16 ccimport==0.4.4 fire==0.7.1 termcolor==3.3.0 lark==1.3.1)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT" "$work/wheels" "$work/site"

echo "== downloading ${WHEELS[*]} (cp312, no dependencies)"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$work/wheels" "${WHEELS[@]}"
n=$(ls "$work/wheels"/*.whl | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; }

echo "== installing them into a cp312 target tree"
"$PY" -m pip install -q --no-index --no-deps --no-compile "${TARGET[@]}" --target "$work/site" "$work/wheels"/*.whl

echo "== checking the shared libraries' vendored dependencies"
for so in "$work"/site/spconv/core_cc*.so "$work"/site/cumm/core_cc*.so; do
    if command -v readelf >/dev/null; then
        rpath=$(readelf -d "$so" | sed -n 's/.*R\(UN\)\?PATH.*\[\(.*\)\].*/\2/p' | sed "s|\$ORIGIN|$(dirname "$so")|")
        for lib in $(readelf -d "$so" | sed -n 's/.*NEEDED.*\[\(lib\(cudart\|nvrtc\)[^]]*\)\].*/\1/p'); do
            [ -f "$rpath/$lib" ] || { echo "$so needs $lib, not in its RPATH $rpath" >&2; exit 1; }
            echo "   ${so#$work/site/} -> $lib, vendored in its RPATH ${rpath#$work/site/}"
        done
    fi
done

echo "== compressing (xz -9; a few minutes)"
tar -C "$work/site" -cf - . | xz -9 -T2 > "$work/site-cp312.tar.xz"
mv "$work/site-cp312.tar.xz" "$OUT/site-cp312.tar.xz"

{
    echo "# sparse-msda GPU bundle, made $(date -u +%Y-%m-%dT%H:%MZ) by benchmarks/make_gpu_bundle.sh"
    echo "# python: cp312 manylinux x86-64; unpack: tar -xJf site-cp312.tar.xz -C SITE; PYTHONPATH=SITE"
    echo "# wheel  bytes  sha256"
    for w in "$work/wheels"/*.whl; do
        echo "$(basename "$w")  $(stat -c %s "$w")  $(sha256sum "$w" | cut -d' ' -f1)"
    done
    echo "# tar  bytes  sha256"
    echo "site-cp312.tar.xz  $(stat -c %s "$OUT/site-cp312.tar.xz")  $(sha256sum "$OUT/site-cp312.tar.xz" | cut -d' ' -f1)"
} > "$OUT/MANIFEST.txt"
cat "$OUT/MANIFEST.txt"
du -sh "$OUT"
