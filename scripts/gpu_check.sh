#!/usr/bin/env bash
# The GPU proof of the fast path in one device call (`make gpu-check`), or every stage tiny on the
# CPU (`bash scripts/gpu_check.sh --cpu-smoke`, part of `make test`).
#
#   1. tests        pytest -m gpu tests/test_gpu.py: trimmed vs stock features/gradients under autocast,
#                   the frozen tower under AMP, open_clip_train --paraclip-loss steps (amp_bf16, --torchcompile).
#                   scripts/pytest_parallel.py runs each open_clip_train test in a process of its own, all
#                   at once (start-up and Inductor on the CPU are most of their time). Meanwhile the CPU
#                   writes stage 3's shards (stage "shards": nothing is timed while the tests run).
#   2. step         scripts/bench_step.py at batch 1,024, each case at the longest texts 40 (the headline), 24 and
#                   77 tokens: naive; the plugin's step from images (frozen tower forward included,
#                   --causal-attention, torch.compile: the >= 3x target); the same from cached embeddings
#   3. e2e          scripts/bench_e2e.py: real open_clip_train runs from shards on local disk, 3 windows each
#                   (median, range): at longest text 40 stock (every ratio's baseline), --paraclip-loss from
#                   JPEGs, embed (one pass over every setting's shards), cached+causal+compile, and the 32,768
#                   --accum-freq step with the loss in blocks (peak torch.cuda.max_memory_allocated); then
#                   cached+causal+compile at 24 and 77; last, embed-device-decode (the embedding pass with
#                   --decode-device cuda: JPEGs decoded by nvJPEG)
#
# Device time, estimated from the H200 call of 2026-11-26 13:24 (benchmarks/nvidia-h200-2026-11-26-1324*: install
# and report ~12 s; tests 87 s; a step case ~15 s eager, ~45 s with its first compile; an e2e run ~25 s of start-up
# and teardown + its first step ~9 s + its steps: stock 0.38 s, cached 0.07 s; embed ~23 s start-up + ~1,100
# images/s): tests ~90 s; step ~165 s (naive 3 x 5 s + 5 s, each compiled case a first compile and one dynamic
# recompile ~75 s); e2e ~300 s (stock and paraclip 45 steps ~50 s each, embed of 3 x 4,096 images ~34 s,
# cached+causal+compile ~40 s at each setting, accum 4 steps of 32,768 in micro-batches of 2,048 ~47 s): ~9.3 minutes. Each stage has a
# hard time budget (tests 100 s, shards 120 s beside them, step 160 s, e2e 300 s): at most ~9.8 minutes in all,
# inside one 10-minute device call; a stage stopped at its budget keeps what it measured, and what it did not
# reach is reported as not measured. stock and paraclip at 24 and 77 do not fit: a second call measures them,
# GPU_CHECK_STAGES=e2e GPU_CHECK_E2E_CASES=stock@24,paraclip@24,stock@77,paraclip@77 (~4.5 minutes: the shards ~50 s, 4 runs ~50 s each).
# GPU_CHECK_STAGES="e2e" (say) reruns only some stages. GPU_CHECK_STEP_CASES and GPU_CHECK_E2E_CASES pick
# bench_step.py's and bench_e2e.py's cases (in the order given: results are kept case by case, so a stage stopped
# at its budget keeps what it measured); GPU_CHECK_TESTS_BUDGET, GPU_CHECK_SHARDS_BUDGET, GPU_CHECK_STEP_BUDGET and
# GPU_CHECK_E2E_BUDGET their seconds. GPU_CHECK_COMMIT names the commit measured (pass it where the copy's git
# metadata is not the tree's).
# Results: $OUT/gpu_check.json and gpu_check.md (+ logs.tar.gz), made by scripts/gpu_report.py;
# `python scripts/gpu_report.py publish $OUT/gpu_check.json` files them under benchmarks/ and
# regenerates the GPU section of docs/benchmarks.md. Until the end, every stage's results are kept in
# $OUT/work (the machine's facts in started.json first): a device call stopped at its limit still brings
# them back, and `python scripts/gpu_report.py collect --work <that>/work --out DIR` makes the result.
#
# On the GPU machine (no package index) it first installs the wheels of `make wheelhouse` (.whl/,
# carried with the call) and this checkout into the machine's python3, and gives open_clip_train
# its hook points. With --cpu-smoke it uses the current environment as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
WORK=$OUT/work                                        # stage results: small, come back with $OUT
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # shards and runs of bench_e2e.py: large, stay here
rm -rf "$WORK"  # what an earlier check left
mkdir -p "$OUT" "$WORK/logs"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
STATUS=0
STAGES=${GPU_CHECK_STAGES:-tests step e2e}  # a subset reruns only those stages
# the commit measured (started.json): GPU_CHECK_COMMIT, or this checkout's HEAD, marked +changes where the
# files differ from it: changed, or new and not ignored (a copied tree whose git metadata is older than
# its files: pass GPU_CHECK_COMMIT)
if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
    export GPU_CHECK_COMMIT_SOURCE="GPU_CHECK_COMMIT"
elif git rev-parse --verify -q HEAD > /dev/null 2>&1; then
    GPU_CHECK_COMMIT=$(git rev-parse --short=12 HEAD)$([ -z "$(git status --porcelain 2> /dev/null)" ] || echo +changes)
    export GPU_CHECK_COMMIT GPU_CHECK_COMMIT_SOURCE="git HEAD of the checkout"
fi

want() { [[ " $STAGES " == *" $1 "* ]]; }
LENGTHS=40,24,77  # longest text per setting, in tokens; the first is the headline
E2E_CASES=stock@40,paraclip@40,embed,cached+causal+compile@40,accum@40,cached+causal+compile@24,cached+causal+compile@77,embed-device-decode

stage() {  # stage NAME BUDGET_SECONDS COMMAND...: run it under a hard time limit, log to $WORK/logs/NAME.log
    local name=$1 budget=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (budget ${budget}s, $(( start - T0 ))s into the check)"
    timeout -k 20 "$budget" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"budget\": $budget}" >> "$WORK/stages.jsonl"
    tail -n 30 "$WORK/logs/$name.log"
    echo "== $name: exit $rc in $(( $(date +%s) - start ))s"
    [ "$rc" -eq 0 ] || STATUS=1
    return "$rc"
}

SHARDS=
shards() {  # stage 3's shards, written in the background (CPU only) while the tests run
    want e2e || return 0
    stage shards "${GPU_CHECK_SHARDS_BUDGET:-120}" $PY scripts/bench_e2e.py --shards-only --folder "$SCRATCH/e2e" \
        --text-lengths "$LENGTHS" "$@" &
    SHARDS=$!
}

shards_done() {  # before anything is timed
    [ -z "$SHARDS" ] || wait "$SHARDS" || STATUS=1
}

run_tests() {  # run_tests BUDGET ENV...: stage 1 under `env ENV...` (the tests' files in $SCRATCH, removed at the end)
    local budget=$1
    shift
    stage tests "$budget" env "$@" $PY scripts/pytest_parallel.py tests/test_gpu.py --alone open_clip_train \
        --tmp "$SCRATCH" --junitxml "$WORK/tests.xml" --logs "$WORK/logs" -- -p no:cacheprovider -m gpu -o junit_family=xunit1
}

if [ "$SMOKE" = 0 ]; then
    ls .whl/*.whl > /dev/null 2>&1 || { echo "gpu_check: no wheels in .whl/: run 'make wheelhouse' and carry .whl"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 2
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
    if command -v patch > /dev/null; then
        $PY -m paraclip_plugin.patching apply || exit 2
    else  # the same patch series, applied by `make wheelhouse`
        SITE=$($PY -c "import open_clip_train, os; print(os.path.dirname(os.path.dirname(open_clip_train.__file__)))")
        tar -C "$SITE" -xf .whl/open_clip_train-patched.tar && echo "patched from .whl/open_clip_train-patched.tar" || exit 2
    fi
    { nvidia-smi; df -h /dev/shm "$SCRATCH"; nproc; free -g; } > "$WORK/logs/machine.log" 2>&1
    $PY scripts/gpu_report.py started --work "$WORK"
    shards
    want tests && run_tests "${GPU_CHECK_TESTS_BUDGET:-100}" PARACLIP_TEST_DEVICE=cuda
    shards_done
    want step && stage step "${GPU_CHECK_STEP_BUDGET:-160}" $PY scripts/bench_step.py --steps 10 --skip-steps 3 --json "$WORK/step.json" \
        --batch-sizes 1024 --text-lengths "$LENGTHS" \
        --steps-only "${GPU_CHECK_STEP_CASES:-naive,plugin-img+causal+compile,plugin-emb+causal+compile}"
    want e2e && stage e2e "${GPU_CHECK_E2E_BUDGET:-300}" $PY scripts/bench_e2e.py --folder "$SCRATCH/e2e" --json "$WORK/e2e.json" \
        --run-timeout 120 --embed-samples 4096 --text-lengths "$LENGTHS" --cases "${GPU_CHECK_E2E_CASES:-$E2E_CASES}"
else
    $PY scripts/gpu_report.py started --work "$WORK" --cpu-smoke
    # beside the rest of `make test` (pytest -n 2 on 2 cores) stages take minutes: budgets of 600 s, not the device's
    GPU_CHECK_SHARDS_BUDGET=${GPU_CHECK_SHARDS_BUDGET:-600}
    shards --cpu-smoke
    want tests && run_tests 600 PARACLIP_TEST_DEVICE=cpu
    shards_done
    # the device's cases without +compile (Inductor on 2 CPU cores: minutes), and the other cases once
    want step && stage step 600 $PY scripts/bench_step.py --cpu-smoke --json "$WORK/step.json" --text-lengths "$LENGTHS" \
        --steps-only naive,plugin-img+causal,plugin-emb+causal@16,plugin-emb@16
    want e2e && stage e2e 600 $PY scripts/bench_e2e.py --cpu-smoke --folder "$SCRATCH/e2e" --json "$WORK/e2e.json" \
        --text-lengths "$LENGTHS" --cases "${E2E_CASES//+compile/},embed-float32,cached@40,compact@40"
fi
$PY scripts/gpu_report.py collect --work "$WORK" --out "$OUT" $([ "$SMOKE" = 1 ] && echo --cpu-smoke) || STATUS=1
mkdir -p "$WORK/logs/e2e" && cp "$SCRATCH"/e2e/*.log "$WORK/logs/e2e/" 2>/dev/null
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
echo "gpu_check: $([ $STATUS = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - T0 ))s; results in $OUT"
rm -rf "$WORK" "$SCRATCH"
exit $STATUS
