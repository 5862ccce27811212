#!/usr/bin/env bash
# The GPU check of issue 19, in one call of at most 8 minutes on one H100/H200: everything that needs
# a CUDA GPU and cannot be checked on the CPU.
#
#   1. the CUDA-only tests (they skip without a GPU): the compiled Triton kernels against the
#      reference generator (tests/test_triton.py -k gpu) and the model loader's auto device
#      (tests/test_models.py -k gpu);
#   2. benchmarks/sweep_gpu.py: each sweep kernel alone against a copy of the same bytes, 2^28
#      elements, fp16 and fp32 (CUDA-event medians): Gaussian 1/2 terms, Rademacher 1/2 terms; with
#      the kernels before issue 19's kernel changes (GPU_BEFORE=path to that gpu.py, or taken from git
#      at 3ac4d08 when .git is there) first checked to give the same bits in every case, then timed
#      beside the new ones;
#   3. benchmarks/step.py at OPT-125m fp32, OPT-13B fp16 seq 64 and OPT-13B fp16 seq 256 (batch 16),
#      with --kernel-time (kernel time from torch.profiler beside wall time, launches, host-to-device
#      copies, syncs) and --more-sweeps (the per-tensor/layerwise path and a 4-term n-SPSA/FZOO sweep);
#   4. an Nsight Compute summary of the sweep kernels (2^26 elements, one launch each, with the copy
#      kernel beside them), if ncu is on the PATH or in /opt/nvidia/nsight-compute;
#   5. benchmarks/sass.py with this machine's Triton: the kernels' machine code counted beside their timings.
#
# Every step runs under `timeout`, inside one overall budget (GPU_CHECK_BUDGET seconds, default 460):
# a hang costs its own limit, not the call. GPU_CHECK_SKIP="ncu step_13b_fp16_seq256" skips steps by name. Output goes to $OUT when it is set (the device tool brings
# back what is there: at most 8 files), else to /tmp/gpu_check/:
#   gpu_check.log    everything printed, step by step, with each step's exit status and seconds
#   results.md       the RESULTS.md sections (step.py, sweep_gpu.py), to be pasted into benchmarks/RESULTS.md
#   ncu.txt          the Nsight Compute details page; sweeps.ncu-rep the report itself
#   sass.md          benchmarks/sass.py's table (instructions per element on sm_90, old and new kernels)
#
# It assumes the device image's python3 (torch, triton, transformers, numba, pytest installed; zotune
# itself is used from src/ through PYTHONPATH: nothing is installed). PYTHON=... picks another.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: print the steps and their limits, run nothing
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-460}
LOG=$DEST/gpu_check.log
RESULTS=$DEST/results.md
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
mkdir -p "$DEST"
((DRY)) || : >"$LOG"
SUMMARY=()

say() { if ((DRY)); then echo "$*"; else echo "$*" | tee -a "$LOG"; fi; }

# step NAME SECONDS CMD...: run CMD under a limit of min(SECONDS, what is left of the budget)
step() {
    local name=$1 want=$2 left limit t0 rc
    shift 2
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        say "== $name: skipped (GPU_CHECK_SKIP)"
        SUMMARY+=("$name: skipped (GPU_CHECK_SKIP)")
        return 0
    fi
    left=$((BUDGET - SECONDS - 5))
    limit=$((want < left ? want : left))
    if ((limit < 15)); then
        say "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    say "== $name (limit ${limit}s): $*"
    ((DRY)) && return 0
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    SUMMARY+=("$name: exit $rc, $((SECONDS - t0))s")
}

find_ncu() {
    command -v ncu && return 0
    local c
    for c in /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu; do
        [[ -x $c ]] && { echo "$c"; return 0; }
    done
    return 1
}

say "gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s, output in $DEST"
if ((!DRY)); then
    (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true) 2>&1 | tee -a "$LOG"
    timeout 60 "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1 | tee -a "$LOG"
fi

# 1. the tests that skip without CUDA: the compiled kernels against zotune.rng, and the loader's device
step tests 100 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_triton.py tests/test_models.py -k gpu

# 2. the kernels alone, against a copy (the Rademacher kernel's target is <= 1.05x copy), and against the
#    kernels before issue 19's kernel changes: the same bits in every case (exit 1 if not), then side by side
BEFORE=${GPU_BEFORE:-}
if [[ -z $BEFORE ]] && git rev-parse -q --verify '3ac4d08^{commit}' >/dev/null 2>&1; then
    BEFORE=$(mktemp /tmp/gpu_before_XXXXXX.py)
    git show 3ac4d08:src/zotune/kernels/gpu.py >"$BEFORE"
fi
AGAINST=()
if [[ -n $BEFORE && -f $BEFORE ]]; then AGAINST=(--against "$BEFORE"); else say "(no GPU_BEFORE and no git: the new kernels alone)"; fi
step sweep_kernels 150 "$PY" benchmarks/sweep_gpu.py --dtypes float16,float32 --results "$RESULTS" "${AGAINST[@]}"

# 3. the step against its physical limit (RESULTS.md rows go to $RESULTS)
STEP=(benchmarks/step.py --kernel-time --more-sweeps --results "$RESULTS" --batch 16)
step step_125m_fp32 70 "$PY" "${STEP[@]}" --size 125m --dtype float32 --seq 64
step step_13b_fp16_seq64 110 "$PY" "${STEP[@]}" --size 13b --dtype float16 --seq 64 --skip-backprop
step step_13b_fp16_seq256 100 "$PY" "${STEP[@]}" --size 13b --dtype float16 --seq 256 --skip-backprop

# 4. Nsight Compute: one launch of each sweep kernel and of the copy, fp16 then fp32 (clocks left alone)
if NCU=$(find_ncu) || { ((DRY)) && NCU=ncu; }; then
    step ncu 70 "$NCU" --clock-control none --target-processes all -k 'regex:_sweep_kernel|_masked_kernel|copy' \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section LaunchStats --section Occupancy --section WarpStateStats \
        -f -o "$DEST/sweeps" "$PY" benchmarks/sweep_gpu.py --ncu --elements 67108864 --dtypes float16,float32
    if ((!DRY)) && [[ -f $DEST/sweeps.ncu-rep ]]; then
        timeout 60 "$NCU" --import "$DEST/sweeps.ncu-rep" --page details >"$DEST/ncu.txt" 2>&1
        timeout 60 "$NCU" --import "$DEST/sweeps.ncu-rep" --page raw --csv \
            --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
            2>&1 | tee -a "$LOG"
    fi
else
    say "== ncu: not found (command -v ncu, /opt/nvidia/nsight-compute/*/ncu): no kernel profile"
    SUMMARY+=("ncu: not found")
fi

# 5. the same kernels' machine code counted by this Triton (benchmarks/sass.py: instructions per element, registers,
#    vector widths), beside the timings above: it calibrates the static model that GPU-less sessions work with
if ((DRY)); then
    say "== sass (limit 45s): $PY benchmarks/sass.py ${AGAINST[*]} > $DEST/sass.md"
else
    step sass 45 bash -c "\"\$0\" benchmarks/sass.py \"\$@\" > \"$DEST/sass.md\"" "$PY" "${AGAINST[@]}"
fi

say ""
say "== summary (${SECONDS}s in all)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
if ((!DRY)) && [[ -f $RESULTS ]]; then
    say ""
    say "== ratios and kernel tables (full sections in $RESULTS)"
    grep -E '^## |/ copy|/ physical limit|kernel time|same bits|^\| (float|bfloat)' "$RESULTS" | tee -a "$LOG"
fi
exit 0
