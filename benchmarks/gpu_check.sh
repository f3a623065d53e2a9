#!/usr/bin/env bash
# The fast path's first GPU run, as one script, ordered so that the key number comes first: one H100/H200
# (torch 2.11, Triton 3.6, Python 3.12, no network, no TensorRT), every step under a time limit, the limits
# adding up to at most 540 s, at most 8 files under $OUT (no folders), each rewritten as soon as it has news.
#
#   bash benchmarks/gpu_check.sh --plan      the steps in order (STEP <name> <limit_s>), then the files (FILE <name>)
#   OUT=/some/dir bash benchmarks/gpu_check.sh            the whole run (OUT defaults to ./gpu_check_out)
#   OUT=/some/dir bash benchmarks/gpu_check.sh --quick    the benchmark alone: a second try inside the same budget
#
# Steps (full run):
#   bench-2b-512        benchmarks/gpu_fast_path.py: 2B-512, the fast path against the official order of work,
#                       bit agreement and finite logits first, then 10 timed edits of each, interleaved, with
#                       their spread; gpu_fast_path.json/.md are rewritten after every phase and every timed pair
#   gpu-tests           pytest: the GPU-marked fast-path tests and the kernel and fixture tests, compiled
#                       (named one by one: no -k filter that could drop a test by a substring of its name)
#   batch-steps-2b-512  benchmarks/gpu_batch_steps.py: the fast path's step at batch 1, 4, 16 (docs/batching.md)
#   env                 versions, the three GPU probes, nvidia-smi
# A step that finds no GPU fails loudly (exit 2); if the benchmark finds none, the run stops after `env`.
# Nothing is installed: the package runs from this checkout (PYTHONPATH). Golden fixtures: $VAREDIT_FIXTURES,
# else ./.fixtures, else ../shared/fixtures; tests of fixtures that are not there are deselected by node id.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=full
PLAN=0
for arg in "$@"; do
    case $arg in
        --plan) PLAN=1 ;;
        --quick) MODE=quick ;;
        *) echo "error: unknown option $arg (options: --plan, --quick)" >&2; exit 2 ;;
    esac
done

# The plan: the one definition of what runs, in which order, for how long, and what it leaves under $OUT.
RUNS=10  # timed edits of each path
if [ "$MODE" = quick ]; then
    STEPS=("bench-2b-512 270" "env 30")
    FILES=(summary.md gpu_fast_path.json gpu_fast_path.md benchmark.log env.txt)
else
    STEPS=("bench-2b-512 270" "gpu-tests 150" "batch-steps-2b-512 90" "env 30")
    FILES=(summary.md gpu_fast_path.json gpu_fast_path.md benchmark.log tests.log batch_steps.json batch_steps.md
           env.txt)
fi
if [ "$PLAN" = 1 ]; then
    for s in "${STEPS[@]}"; do echo "STEP $s"; done
    for f in "${FILES[@]}"; do echo "FILE $f"; done
    exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
STATUS=0
STEPS_DONE=$(mktemp)  # outside $OUT: only the planned files land there
trap 'rm -f "$STEPS_DONE"' EXIT
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$OUT/env.txt"; }

summary() {  # rewritten after every step: the key number first, then what ran
    {
        echo "# gpu_check.sh ($MODE), $(elapsed) s so far"
        echo
        cat "$OUT/gpu_fast_path.md" 2>/dev/null || echo "(no benchmark results)"
        echo
        echo "| step | limit | exit | time |"
        echo "|---|---:|---:|---:|"
        cat "$STEPS_DONE"
        if [ -f "$OUT/benchmark.log" ]; then
            echo
            echo "benchmark.log, last lines:"
            echo '```'
            tail -6 "$OUT/benchmark.log"
            echo '```'
        fi
        if [ -f "$OUT/tests.log" ]; then
            echo
            grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|error:" "$OUT/tests.log" | tail -12
        fi
        if [ -f "$OUT/batch_steps.md" ]; then
            echo
            cat "$OUT/batch_steps.md"
        fi
    } >"$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

step() {  # step NAME LOG COMMAND...: run under the plan's limit (SIGINT first, SIGKILL 5 s later)
    local name=$1 log=$2 limit="" entry
    shift 2
    for entry in "${STEPS[@]}"; do [ "${entry% *}" = "$name" ] && limit=${entry#* }; done
    [ -n "$limit" ] || { note "error: step $name is not in the plan"; exit 3; }
    local t0=$(date +%s)
    note "== $name (limit ${limit}s, started at +$(elapsed)s)"
    timeout --signal=INT --kill-after=5 $(( limit - 5 )) "$@" >>"$log" 2>&1
    local rc=$?
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note "   TIMED OUT after ${limit}s"
    note "   exit $rc after $(( $(date +%s) - t0 ))s"
    echo "| $name | ${limit} s | $rc | $(( $(date +%s) - t0 )) s |" >>"$STEPS_DONE"
    [ $rc -ne 0 ] && STATUS=1
    summary
    return $rc
}

: >"$OUT/env.txt"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export VAREDIT_EXPECT_GPU=1  # tests/conftest.py and the scripts fail loudly instead of falling back to the CPU
unset TRITON_INTERPRET
for candidate in "${VAREDIT_FIXTURES:-}" "$ROOT/.fixtures" "$ROOT/../shared/fixtures"; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then export VAREDIT_FIXTURES=$candidate; break; fi
done

step bench-2b-512 "$OUT/benchmark.log" \
    $PY benchmarks/gpu_fast_path.py --models 2b-512 --runs $RUNS --out "$OUT"
BENCH=$?
if [ "$BENCH" -eq 2 ]; then
    note "== no GPU: the benchmark found none (benchmark.log says why); skipping to env"
elif [ "$MODE" = full ]; then
    TESTS=(tests/test_gpu.py tests/test_plugins.py::test_scale_step_attention_matches_the_reference
           tests/test_plugins.py::test_flat_attention_matches_sdpa
           tests/test_plugins.py::test_fused_sampler_and_next_scale_input_match_the_reference
           "tests/test_fast_path.py::test_bf16_autocast_branch_agrees_with_the_fp32_reference[cuda]")
    for f in tiny-2b tiny-8b tiny-8b-1024; do
        if [ -f "${VAREDIT_FIXTURES:-/nonexistent}/$f/config.json" ]; then
            TESTS+=("tests/test_fast_path.py::test_fast_path_reproduces_the_official_fixtures[$f]")
        else
            note "   fixture $f is not here: its fixture test is not run"
        fi
    done
    step gpu-tests "$OUT/tests.log" \
        $PY -m pytest -q -p no:cacheprovider -ra -m "not trt" "${TESTS[@]}"
    step batch-steps-2b-512 "$OUT/benchmark.log" \
        $PY benchmarks/gpu_batch_steps.py --model 2b-512 --device cuda --out "$OUT"
fi

step env "$OUT/env.txt" bash -c '
    echo "== versions and GPU probes"
    "$0" - <<"EOF"
import platform, sys
from varedit_deploy.runtime.gpu import gpu_probes, gpu_verdict
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "triton", "transformers", "onnxruntime", "tensorrt", "cuda.bindings"):
    try:
        module = __import__(name, fromlist=["_"])
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "not installed")
probes = gpu_probes()
for p in probes:
    print(f"probe {p.name}: {p.detail}")
try:
    gpu_verdict(probes, expect_gpu=True)
except Exception as e:
    print("error:", e)
    sys.exit(2)
EOF
    rc=$?
    echo "== nvidia-smi"
    { command -v nvidia-smi >/dev/null && nvidia-smi; } || echo "(nvidia-smi failed or is missing)"
    echo "== git"
    git log -1 --oneline 2>/dev/null || echo "(no git metadata)"
    echo "fixtures: ${VAREDIT_FIXTURES:-none}"
    exit $rc' "$PY"

summary
cat "$OUT/summary.md"
[ "$BENCH" -eq 2 ] && exit 2
exit $STATUS
