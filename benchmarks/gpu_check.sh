#!/usr/bin/env bash
# The one-call GPU check (issue 14): `bash benchmarks/gpu_check.sh LOGDIR` or `make gpu-check LOGDIR=...`.
#
# On a CUDA machine with no internet and its own torch (expected: Python 3.12, torch 2.11 for CUDA
# 13, triton 3.6, an H200), from the repository root:
#   1. bundle   unpack the spconv bundle (.gpu_bundle/site-cp312.tar.xz, made beforehand by
#               benchmarks/make_gpu_bundle.sh; sha256 checked against its MANIFEST.txt) into a
#               target directory and put it and the repository on PYTHONPATH (nothing is built or
#               installed into the machine's Python; the project itself needs no build: its CPU
#               kernels are compiled on first use and are not used on CUDA);
#   2. env      versions (python, torch, CUDA, triton, spconv, cumm), the GPU, the backends;
#   3. spconv   spconv's CUDA hash table and a sparse convolution on the GPU against the CPU;
#   4. check    python -m adapters.check_spconv (spconv's CPU convolution defects, this build);
#   5. tests    pytest -m cuda (the CUDA tests) plus tests/test_triton_backend.py when present;
#   6. bench    the README's benchmark cases on the device (benchmarks/summary.py: deformable
#               attention sparse vs dense grid_sample vs floor, neighborhood attention vs floor
#               and naive, the 3D encoder), one group per process;
#   7. report   one table: every step's status and time, then the benchmark table.
# Every step runs under `timeout` within an overall budget (GPU_CHECK_BUDGET, default 450 s, so the
# whole script ends within 8 minutes), and a failed step does not stop the next. LOGDIR gets at
# most 5 files: gpu_check.log (everything), summary.md (the final tables), bench.jsonl,
# pytest.xml, env.txt.
#
# Rehearsal without a GPU (CPU tensors, small sizes, the local environment's spconv):
#   GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gpu-check-rehearsal
# The bundle is then still unpacked into a fresh directory and, when its Python version differs
# from PYTHON's, imported by GPU_CHECK_BUNDLE_PYTHON (a python3.12 with numpy) if given.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
LOG=${1:?usage: bash benchmarks/gpu_check.sh LOGDIR}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-$REPO/.gpu_bundle}
SITE=${GPU_CHECK_SITE:-/tmp/sparse_msda_gpu_site}
BUDGET=${GPU_CHECK_BUDGET:-450}
RESERVE=15 # seconds kept for the report
QUICK=()
[ "$DEVICE" = cpu ] && QUICK=(--quick)
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.ext}
exec > >(tee -a "$LOG/gpu_check.log") 2>&1

T0=$SECONDS
STEPS=()
status() { STEPS+=("| $1 | $2 | $3 s |"); }

# step NAME LIMIT CMD...: run CMD under timeout, capped by what is left of the budget
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - RESERVE - (SECONDS - T0)))
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== [$(date -u +%H:%M:%S)] step $name (limit ${limit} s, $((SECONDS - T0)) s elapsed)"
    if [ "$limit" -lt 5 ]; then
        status "$name" "skipped: no time left" 0
        return 0
    fi
    local t=$SECONDS rc
    timeout -k 5 "$limit" "$@"
    rc=$?
    local what="ok"
    [ $rc -ne 0 ] && what="FAILED (exit $rc)"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${limit} s"
    status "$name" "$what" $((SECONDS - t))
    echo "=== step $name: $what in $((SECONDS - t)) s"
    return 0
}

echo "=== sparse-msda GPU check: device=$DEVICE python=$PY log=$LOG budget=${BUDGET}s $(date -u +%FT%TZ)"
echo "=== repository: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo '(no git)')"

# --- 1. bundle --------------------------------------------------------------------------------
unpack_bundle() {
    local tar=$BUNDLE/site-cp312.tar.xz
    [ -f "$tar" ] || { echo "no bundle at $tar (make it with benchmarks/make_gpu_bundle.sh)"; return 3; }
    if [ -f "$BUNDLE/MANIFEST.txt" ]; then
        local want got
        want=$(awk '$1 == "site-cp312.tar.xz" {print $3}' "$BUNDLE/MANIFEST.txt")
        got=$(sha256sum "$tar" | cut -d' ' -f1)
        [ "$want" = "$got" ] || { echo "sha256 mismatch: MANIFEST $want, file $got"; return 4; }
        echo "sha256 ok ($got)"
    fi
    rm -rf "$SITE" && mkdir -p "$SITE" || return 5
    if command -v xz >/dev/null; then
        tar -xJf "$tar" -C "$SITE" || return 6
    else # no xz binary: Python's tarfile reads xz through lzma
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$tar" "$SITE" || return 6
    fi
    echo "unpacked into $SITE: $(ls "$SITE" | tr '\n' ' ')"
    du -sh "$SITE"
}
step bundle 120 bash -c "$(declare -f unpack_bundle); BUNDLE='$BUNDLE' SITE='$SITE' PY='$PY' unpack_bundle"

PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null || echo "?")
if [ "$PYTAG" = cp312 ] && [ -d "$SITE/spconv" ]; then
    export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "=== PYTHONPATH=$PYTHONPATH (bundled spconv)"
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    echo "=== $PY is $PYTAG, the bundle is cp312 (or missing): using $PY's own spconv; PYTHONPATH=$PYTHONPATH"
    if [ -n "${GPU_CHECK_BUNDLE_PYTHON:-}" ] && [ -d "$SITE/spconv" ]; then
        step bundle-import 60 env PYTHONPATH="$SITE" "$GPU_CHECK_BUNDLE_PYTHON" -c "
import cumm, spconv, spconv.core_cc as cc
from spconv.core_cc.csrc.hash.core import HashTable
print('bundle imports with', __import__('sys').version.split()[0], ': spconv', spconv.__version__, 'cumm', cumm.__version__, cc.__file__)"
    fi
fi

# the fused CPU kernels (the CPU side of the CUDA-vs-CPU tests) compile in the background meanwhile
BUILD_LOG=/tmp/sparse_msda_build_kernels.log BUILD_RC=/tmp/sparse_msda_build_kernels.rc
rm -f "$BUILD_RC"
("$PY" -m sparse_msda.build_kernels > "$BUILD_LOG" 2>&1; echo $? > "$BUILD_RC") &

# --- 2. environment ---------------------------------------------------------------------------
step env 60 "$PY" - "$DEVICE" "$LOG/env.txt" <<'EOF'
import importlib, platform, subprocess, sys
device, out = sys.argv[1], sys.argv[2]
lines = [f"python {sys.version.split()[0]} at {sys.executable} ({platform.machine()})"]
import torch
lines.append(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    lines.append(f"GPU {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                 f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
    try:
        lines.append(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip())
    except Exception as err:
        lines.append(f"nvidia-smi: {err}")
for name in ("triton", "numpy", "spconv", "cumm", "pccm", "ccimport", "fire", "lark", "pybind11", "sympy",
             "portalocker", "ninja", "requests", "hypothesis", "pytest"):
    try:
        m = importlib.import_module(name)
        lines.append(f"{name} {getattr(m, '__version__', '?')} ({getattr(m, '__file__', '?')})")
    except Exception as err:
        lines.append(f"{name}: NOT IMPORTABLE ({type(err).__name__}: {err})")
try:
    import sparse_msda, adapters
    lines.append(f"sparse_msda from {sparse_msda.__file__}")
    try:
        from sparse_msda import backends
        for name in ("reference", "cpu", "triton"):
            try:
                mod = importlib.import_module(f"sparse_msda.backends.{name}")
                lines.append(f"backend {name}: available() = {mod.available()}")
            except Exception as err:
                lines.append(f"backend {name}: {type(err).__name__}: {err}")
        x = torch.zeros(2, 2, device=device)
        lines.append(f"choose_backend('weighted_gather', {device} tensor) = {backends.choose_backend('weighted_gather', x)}")
    except ImportError as err:
        lines.append(f"no sparse_msda.backends ({err})")
except Exception as err:
    lines.append(f"import sparse_msda FAILED: {type(err).__name__}: {err}")
text = "\n".join(lines)
print(text)
open(out, "w").write(text + "\n")
EOF

# --- 3. spconv on the device -----------------------------------------------------------------
step spconv 90 "$PY" - "$DEVICE" <<'EOF'
"""spconv's hash table and a submanifold convolution on the device, against the CPU."""
import sys, time
import torch
import adapters  # noqa: F401  (spconv patches)
from adapters.spconv_compat import hash_insert, hash_query, new_hash_table
import spconv.pytorch as spconv
device = torch.device(sys.argv[1])
g = torch.Generator().manual_seed(0)
keys = torch.randperm(1 << 20, generator=g)[:5000].to(torch.int64)
values = torch.arange(5000, dtype=torch.int64)
queries = torch.cat([keys[:100], torch.tensor([-1, 1 << 40, 7 << 50]), keys[-100:]])
table = new_hash_table(device, keys.numel())
hash_insert(table, keys.to(device), values.to(device))
got, found = hash_query(table, queries.to(device))
found = found.cpu()
expect = torch.cat([torch.ones(100, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.ones(100, dtype=torch.bool)])
assert torch.equal(found, expect), f"found mask wrong: {found.tolist()}"
assert torch.equal(got.cpu()[found], torch.cat([values[:100], values[-100:]])), "values wrong"
print(f"hash table on {device}: 5000 keys, 203 queries (3 absent, incl. the key -1): ok")
coords = torch.unique(torch.randint(0, 32, (4000, 3), generator=g), dim=0)
idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int64), coords], 1).int()
feats = torch.randn(len(coords), 16, generator=g, dtype=torch.float64)
conv = spconv.SubMConv3d(16, 8, 3, bias=False, indice_key="s").double()
x_cpu = spconv.SparseConvTensor(feats, idx, [32, 32, 32], 1)
ref = conv(x_cpu).features
t = time.perf_counter()
conv_d = conv.to(device)
f_d = feats.to(device).requires_grad_(True)
out = conv_d(spconv.SparseConvTensor(f_d, idx.to(device), [32, 32, 32], 1))
out.features.sum().backward()
if device.type == "cuda":
    torch.cuda.synchronize()
err = (out.features.detach().cpu() - ref).abs().max().item()
print(f"SubMConv3d on {device}: {len(coords)} voxels, max |device - cpu| = {err:.2e}, backward ok, {time.perf_counter() - t:.2f} s")
assert err < 1e-9, err
EOF

# --- 4. spconv's CPU defects (this build) -----------------------------------------------------
step check_spconv 90 "$PY" -m adapters.check_spconv --repeats 2

# --- 5. CUDA tests ----------------------------------------------------------------------------
wait_build() {
    while [ ! -f "$1" ]; do sleep 1; done
    cat "$2"
    return "$(cat "$1")"
}
step cpu-kernels 90 bash -c "$(declare -f wait_build); wait_build $BUILD_RC $BUILD_LOG"
# (without a GPU, i.e. in the rehearsal, the same command selects the same tests and they skip)
TESTS=(tests)
MARK=(-m cuda)
[ -f tests/test_triton_backend.py ] && TESTS+=(tests/test_triton_backend.py)
if [ -f tests/test_triton_backend.py ] && [ "$DEVICE" != cpu ]; then
    # the marker selects the CUDA tests in tests/; the Triton file runs whole (its CUDA cases on the GPU)
    step tests 130 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$LOG/pytest.xml" "${MARK[@]}" tests \
        --ignore=tests/test_triton_backend.py
    step tests-triton 90 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_triton_backend.py
else
    step tests 130 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$LOG/pytest.xml" "${MARK[@]}" "${TESTS[@]}"
fi

# --- 6. benchmarks ----------------------------------------------------------------------------
THREADS=$([ "$DEVICE" = cpu ] && echo 2 || echo 8)
for group in msda neighborhood encoder; do
    limit=$([ $group = encoder ] && echo 60 || echo 110)
    step "bench-$group" "$limit" "$PY" -m benchmarks.summary --device "$DEVICE" --group $group "${QUICK[@]}" \
        --threads "$THREADS" --jsonl "$LOG/bench.jsonl"
done

# --- 7. the one table -------------------------------------------------------------------------
{
    echo "## sparse-msda GPU check ($DEVICE), $(date -u +%FT%TZ), $((SECONDS - T0)) s"
    echo
    echo "$(head -3 "$LOG/env.txt" 2>/dev/null | sed 's/^/    /')"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    if [ -s "$LOG/bench.jsonl" ]; then
        "$PY" -m benchmarks.summary --report "$LOG/bench.jsonl" 2>&1
    else
        echo "(no benchmark results)"
    fi
} > "$LOG/summary.md"
echo
cat "$LOG/summary.md"
echo "=== done in $((SECONDS - T0)) s; logs: $(ls "$LOG" | tr '\n' ' ')"
