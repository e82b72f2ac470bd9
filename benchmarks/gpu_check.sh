#!/usr/bin/env bash
# The GPU checks of issue 12, prepared for a session that is lent a GPU machine (the `device`
# tool): device time is short (15 minutes, at most 10 a command), so the checks run in stages,
# in order of value, each under its own time limit, and every result is copied to $OUT as soon
# as it exists, so a stage that runs out of time loses only itself. STAGES picks them:
#
#   tests    the device tests (tests/test_devices.py and every test parametrised over "cuda"), 90 s
#   speed    benchmarks/ntk_speed.py --device cuda: mlp500, lenet, lenet10, n = 20,000, 150 s
#   scale    benchmarks/large_n.py --device cuda --scale-n 100000,30000,10000, 150 s
#   million  the same at n = 1,000,000, 150 s
#   suite    the whole test suite, 200 s
#
# Run it from the repository root on the GPU machine, whose python3 holds torch with CUDA, in
# two commands of at most 6.5 minutes each (results under $OUT, default /tmp/gpu_check); the
# copy there has no .git, so COMMIT names the commit (`git rev-parse --short HEAD` here). Its
# image lacks fastlmmclib and reaches no package index: first, here, `bash
# benchmarks/gpu_wheels.sh` (writes .whl/), then each run with `carry: [".whl"]`:
#
#   COMMIT=abc1234 STAGES="tests speed scale" bash benchmarks/gpu_check.sh
#   COMMIT=abc1234 STAGES="million suite" bash benchmarks/gpu_check.sh
#
# Every stage's results are kept, also those a stage wrote before it ran out of time (large_n
# appends each decision to its CSV as it is measured).
#
# A smoke test of the script itself on a CPU machine (small sizes, CPU results files rewritten:
# `git checkout benchmarks/results` afterwards): DEVICE=cpu QUICK=1 PY=.venv/bin/python bash ...
# Commit what comes back under benchmarks/results/ (ntk_speed_cuda.*, large_n_scale_cuda_*.md,
# large_n_cuda_*.csv); gpu_check.log names the card, the driver and torch.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STAGES=${STAGES:-tests speed scale million suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export REMLSTOP_COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/gpu_check.log"
RESULTS=benchmarks/results
SUFFIX=$([ "$DEVICE" = cpu ] && echo "" || echo "_cuda")

chosen() {  # chosen NAME: whether STAGES names the stage
    case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, logged
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"
    return $rc
}

keep() {  # keep FILE [NAME]: copy a result to $OUT when it exists
    [ -f "$1" ] && cp "$1" "$OUT/${2:-$(basename "$1")}"
}

# The image's own packages first; the carried wheels only for what it lacks.
if ! "$PY" -c "import remlstop" >>"$LOG" 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! "$PY" -c "import remlstop" >>"$LOG" 2>&1; then
    echo "import remlstop failed (see $LOG): bash benchmarks/gpu_wheels.sh here, carry .whl" |
        tee -a "$LOG"
    exit 1
fi

{
    date -u
    echo "commit $REMLSTOP_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
    nproc
} >>"$LOG" 2>&1

if [ "$QUICK" = 1 ]; then
    SPEED=(--quick --repeats 1 --models cnn,lenet)
    SCALE=(1000 2000)
else
    SPEED=(--repeats 3 --models mlp500,lenet,lenet10 --large-n 20000)
    SCALE=(100000,30000,10000 1000000)  # largest first: a timeout loses the small ones
fi

if chosen tests; then
    stage tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py \
        tests/test_ntk_conv.py tests/test_ntk_embedding.py tests/test_model.py -k "cuda or device"
fi
if chosen speed; then
    stage speed 150 "$PY" benchmarks/ntk_speed.py --device "$DEVICE" "${SPEED[@]}"
    keep "$RESULTS/ntk_speed$SUFFIX.md"
    keep "$RESULTS/ntk_speed$SUFFIX.csv"
fi
for part in scale million; do
    chosen $part || continue
    n=$([ $part = scale ] && echo "${SCALE[0]}" || echo "${SCALE[1]}")
    stage $part 150 "$PY" benchmarks/large_n.py --device "$DEVICE" --accuracy-n "" --scale-n "$n"
    keep "$RESULTS/large_n_scale$SUFFIX.md" "large_n_scale${SUFFIX}_$part.md"
    keep "$RESULTS/large_n$SUFFIX.csv" "large_n${SUFFIX}_$part.csv"
done
if chosen suite; then
    stage suite 200 "$PY" -m pytest -q -p no:cacheprovider tests
fi
