#!/bin/bash
# The issue-11 guard, one run per build: every neighborhood and MSDA case, the kernel, its PyTorch
# path and the linear-layer floor (forward+backward), for the host's ISA and for an AVX2-only build.
# The three implementations of a case are timed in interleaved rounds in one process (the ratios
# are medians of per-round ratios, so a machine whose speed drifts between minutes does not flip
# them; see README "Benchmarks"): 5 rounds for the sub-second and few-second cases, 3 for the two
# 3D encoders, whose peak memory (kernel and floor) is measured in a fresh process per case.
# Run from the repository root on a quiet machine (~10-12 min per build):
#
#     bash benchmarks/two_builds.sh [OUTDIR] [MARCH ...]     # default: /tmp/two_builds native x86-64-v3
#
# Writes OUTDIR/{nb,nb_3d_enc,ms_synthetic,ms_scan_bev,ms_scan_3d_dec,ms_scan_3d_enc}_<march>.md; each
# ends with the "Kernel vs its PyTorch path" table (kernel / PyTorch path / floor ratios).
# SEPARATE=1 times every case in its own process instead (the method before, median of 3).
set -u
out=${1:-/tmp/two_builds}; shift || true
marches=${*:-native x86-64-v3}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
names=""
for s in syn-enc syn-enc-bg syn-dec syn-dec-bg scan-bev-enc scan-bev-enc-bg scan-bev-dec scan-bev-dec-bg scan-3d-dec; do
  for i in block pytorch floor; do names="$names,$s $i fwd+bwd"; done
done
names="${names#,},syn-dec-100k block fwd+bwd,syn-dec-100k pytorch fwd+bwd"
enc3d="scan-3d-enc block fwd+bwd,scan-3d-enc pytorch fwd+bwd,scan-3d-enc floor fwd+bwd"
impls="fwd+bwd/sparse,fwd+bwd/pytorch,fwd+bwd/floor"
if [ "${SEPARATE:-0}" = 1 ]; then
  fast=(--separate --repeats 3); slow=(--separate --repeats 3); peak_nb=(); peak_ms=()
else
  fast=(--repeats 5 --peak none); slow=(--repeats 3)
  peak_nb=(--peak "scan-3d-enc block,scan-3d-enc floor"); peak_ms=(--peak "encoder/fwd+bwd/sparse,encoder/fwd+bwd/floor")
fi
for march in $marches; do
  export SPARSE_MSDA_CPU_MARCH=$march
  echo "##### build $march $(date -u +%T) $(git log --oneline -1 2>/dev/null | cut -c1-60)"
  $py -m sparse_msda.build_kernels --march "$march" 2>&1 | tail -2
  $py -m benchmarks.neighborhood "${fast[@]}" --timeout 900 --only "$names" --out "$out/nb_$march.md" 2>&1 | tail -15
  $py -m benchmarks.neighborhood "${slow[@]}" "${peak_nb[@]}" --timeout 900 --only "$enc3d" \
    --out "$out/nb_3d_enc_$march.md" 2>&1 | tail -5
  for src in synthetic scan_bev; do
    $py -m benchmarks.msda "${fast[@]}" --timeout 900 --only $src --match "$impls" --out "$out/ms_${src}_$march.md" 2>&1 | tail -6
  done
  $py -m benchmarks.msda "${fast[@]}" --timeout 900 --only scan_3d --match "${impls//fwd+bwd/decoder/fwd+bwd}" \
    --out "$out/ms_scan_3d_dec_$march.md" 2>&1 | tail -5
  $py -m benchmarks.msda "${slow[@]}" "${peak_ms[@]}" --timeout 900 --only scan_3d --match "${impls//fwd+bwd/encoder/fwd+bwd}" \
    --out "$out/ms_scan_3d_enc_$march.md" 2>&1 | tail -5
done
echo "##### done $(date -u +%T)"
