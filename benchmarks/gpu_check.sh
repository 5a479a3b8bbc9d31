#!/usr/bin/env bash
# One GPU check (issue 20): correctness on the device against CPU float64 references, then timings
# at GPU sizes beside their floors; one table and gpu_check.json in ${OUT:-benchmarks/results}.
# Every step runs under its own timeout and is recorded; a failure never stops the script.
#   bash benchmarks/gpu_check.sh                      # CUDA, full sizes (< 6 min on one H200)
#   bash benchmarks/gpu_check.sh --device cpu --small # plumbing check without a GPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
ARGS=("$@")
STEP_TIMEOUT=${STEP_TIMEOUT:-150}  # seconds per step
BUDGET=${BUDGET:-330}              # seconds for all steps together; later steps get what is left

main() {
    date -u
    if [ -d .whl ]; then  # offline: wheels carried beside the repository
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || echo "WARNING: wheel install failed"
        export PYTHONPATH=/tmp/site:$PWD
    else
        python3 -m pip install -q -e ".[test,bench]" || echo "WARNING: pip install failed"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi || echo "nvidia-smi not available"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    python3 -c "import fusion_bench, fusion_bench_pave; print('fusion_bench and fusion_bench_pave import')" || echo "WARNING: import failed"

    local statuses=() step rc start
    for step in $(python3 benchmarks/gpu_check.py list); do
        local left=$(( BUDGET - SECONDS )) limit=$STEP_TIMEOUT
        [ "$left" -lt "$limit" ] && limit=$left
        if [ "$limit" -lt 10 ]; then
            statuses+=(--status "$step=SKIPPED (time budget of ${BUDGET}s spent)"); continue
        fi
        echo "=== $step (timeout ${limit}s)"
        start=$(date +%s)
        timeout "$limit" python3 benchmarks/gpu_check.py "$step" --out "$OUT" "${ARGS[@]}"
        rc=$?
        case $rc in
            0) statuses+=(--status "$step=pass $(( $(date +%s) - start ))s") ;;
            124|137) statuses+=(--status "$step=TIMEOUT after ${limit}s") ;;
            *) statuses+=(--status "$step=FAIL rc=$rc $(( $(date +%s) - start ))s") ;;
        esac
    done
    echo
    python3 benchmarks/gpu_check.py report --out "$OUT" "${statuses[@]}"
    date -u
}

main 2>&1 | tee "$LOG"
