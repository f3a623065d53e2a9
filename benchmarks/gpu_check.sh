#!/usr/bin/env bash
# The fast path's first GPU run, as one script: fits 7 minutes on one H100/H200 (torch 2.11, Triton 3.6,
# Python 3.12, no network, no TensorRT) and writes everything under $OUT:
#   env.txt            versions, nvidia-smi, what ran and how long each step took
#   tests.log          pytest -m gpu (the fast-path GPU tests), then the kernel and fast-path tests, compiled
#   benchmark.log      benchmarks/gpu_fast_path.py progress: 2b-512 (2 runs), then 8b-512 if time is left
#   gpu_fast_path.json / .md / .png   the benchmark's results; the .md table is ready for RESULTS.md
#   batch_steps.json / .md   benchmarks/gpu_batch_steps.py: 2b-512 steps at batch 1, 4, 16 (what a batch axis would gain)
#   summary.md         one page: steps, exit codes, and the benchmark table
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from the repository root; OUT defaults to ./gpu_check_out)
#
# Nothing is installed: the package runs from this checkout (PYTHONPATH), everything else is in the image.
# Golden fixtures: $VAREDIT_FIXTURES, else ./.fixtures, else ../shared/fixtures; tests of fixtures that are
# not there are deselected and said so (the 1024-px one does not fit the 64 MiB a device run carries with
# the other two). Without a GPU it stops at once with exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-420}  # 7 minutes
mkdir -p "$OUT"
START=$(date +%s)
STATUS=0
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$OUT/env.txt"; }
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, record exit code and duration
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$(date +%s)
    note "== $name (limit ${limit}s, started at +$(elapsed)s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note "   TIMED OUT after ${limit}s"
    note "   exit $rc after $(( $(date +%s) - t0 ))s"
    echo "| $name | $rc | $(( $(date +%s) - t0 )) s |" >>"$OUT/steps.md"
    [ $rc -ne 0 ] && STATUS=1
    return $rc
}

: >"$OUT/env.txt"
: >"$OUT/steps.md"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    note "error: no NVIDIA GPU here (nvidia-smi is missing or sees no device); gpu_check.sh needs one"
    exit 2
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    note "error: $PY's torch sees no CUDA GPU (torch.cuda.is_available() is False); gpu_check.sh needs one"
    exit 2
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
for candidate in "${VAREDIT_FIXTURES:-}" "$ROOT/.fixtures" "$ROOT/../shared/fixtures"; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then export VAREDIT_FIXTURES=$candidate; break; fi
done
MISSING=()
for f in tiny-2b tiny-8b tiny-8b-1024; do
    [ -f "${VAREDIT_FIXTURES:-/nonexistent}/$f/config.json" ] || MISSING+=("$f")
done

{
    echo "== versions"
    $PY - <<'EOF'
import platform, sys
import torch, triton
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
try:
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
except (AssertionError, RuntimeError) as e:
    print("device: none visible to torch:", e)
for name in ("transformers", "onnxruntime", "tensorrt"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
    echo "== nvidia-smi"
    nvidia-smi
    echo "== git"
    git -C "$ROOT" log -1 --oneline 2>/dev/null || echo "(no git metadata)"
    echo "fixtures: ${VAREDIT_FIXTURES:-none}; missing: ${MISSING[*]:-none}"
} >>"$OUT/env.txt" 2>&1

KEEP="not tensor_cores"  # the ahead-of-time kernel report tests are CPU proofs, run by CI
for f in "${MISSING[@]}"; do KEEP="$KEEP and not $f"; done
step "pytest -m gpu: the fast path on the GPU (TensorRT tests skip)" 120 "$OUT/tests.log" \
    $PY -m pytest -q -p no:cacheprovider -ra -m gpu tests/test_gpu.py tests/test_fast_path.py
step "kernel and fast-path tests, compiled kernels" 120 "$OUT/tests.log" \
    $PY -m pytest -q -p no:cacheprovider -ra -m "not gpu" tests/test_plugins.py tests/test_fast_path.py -k "$KEEP"

left=$(( BUDGET - $(elapsed) - 15 ))
step "benchmark 2b-512, 2 runs" $(( left < 180 ? left : 180 )) "$OUT/benchmark.log" \
    $PY benchmarks/gpu_fast_path.py --models 2b-512 --runs 2 --out "$OUT"
left=$(( BUDGET - $(elapsed) - 15 ))
if [ $left -ge 30 ]; then
    step "batched steps 2b-512, batch 1/4/16" $(( left < 90 ? left : 90 )) "$OUT/benchmark.log" \
        $PY benchmarks/gpu_batch_steps.py --model 2b-512 --out "$OUT"
fi
left=$(( BUDGET - $(elapsed) - 10 ))
if [ $left -ge 120 ]; then
    step "benchmark 8b-512, 2 runs" "$left" "$OUT/benchmark.log" \
        $PY benchmarks/gpu_fast_path.py --models 8b-512 --runs 2 --out "$OUT" --append
else
    note "== 8b-512 skipped: ${left}s left of the ${BUDGET}s budget"
fi

{
    echo "# gpu_check.sh on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(elapsed) s"
    echo
    echo "| step | exit | time |"
    echo "|---|---:|---:|"
    cat "$OUT/steps.md"
    echo
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -4
    echo
    cat "$OUT/gpu_fast_path.md" 2>/dev/null || echo "(no benchmark results)"
    echo
    cat "$OUT/batch_steps.md" 2>/dev/null || echo "(no batched-step results)"
} >"$OUT/summary.md"
rm -f "$OUT/steps.md"
cat "$OUT/summary.md"
exit $STATUS
