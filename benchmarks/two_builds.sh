#!/bin/bash
# The issue-11 guard, one run per build: every neighborhood and MSDA case, the kernel, its PyTorch
# path and the linear-layer floor side by side (forward+backward, median of 3), for the host's ISA
# and for an AVX2-only build. Run from the repository root on a quiet machine (~10 min per build):
#
#     bash benchmarks/two_builds.sh [OUTDIR] [MARCH ...]     # default: /tmp/two_builds native x86-64-v3
#
# Writes OUTDIR/{nb,ms_synthetic,ms_scan_bev,ms_scan_3d}_<march>.md; each ends with the
# "Kernel vs its PyTorch path" table (kernel / PyTorch path / floor ratios).
set -u
out=${1:-/tmp/two_builds}; shift || true
marches=${*:-native x86-64-v3}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
names=""
for s in syn-enc syn-enc-bg syn-dec syn-dec-bg scan-bev-enc scan-bev-enc-bg scan-bev-dec scan-bev-dec-bg scan-3d-dec scan-3d-enc; do
  for i in block pytorch floor; do names="$names,$s $i fwd+bwd"; done
done
names="${names#,},syn-dec-100k block fwd+bwd,syn-dec-100k pytorch fwd+bwd"
for march in $marches; do
  export SPARSE_MSDA_CPU_MARCH=$march
  echo "##### build $march $(date -u +%T) $(git log --oneline -1 2>/dev/null | cut -c1-60)"
  $py -m sparse_msda.build_kernels --march "$march" 2>&1 | tail -2
  $py -m benchmarks.neighborhood --repeats 3 --timeout 900 --only "$names" --out "$out/nb_$march.md" 2>&1 | tail -16
  for src in synthetic scan_bev scan_3d; do
    $py -m benchmarks.msda --repeats 3 --timeout 900 --only $src \
      --match "fwd+bwd/sparse,fwd+bwd/pytorch,fwd+bwd/floor" --out "$out/ms_${src}_$march.md" 2>&1 | tail -6
  done
done
echo "##### done $(date -u +%T)"
