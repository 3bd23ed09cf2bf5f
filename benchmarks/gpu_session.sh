#!/usr/bin/env bash
# One call on a lent GPU machine: build medkernels, then run the named stages in order, each under its own time
# limit, logging to $OUT/<stage>.log (the device tool brings $OUT back).  Usage:
#   bash benchmarks/gpu_session.sh [info] [build] [smoke] [tests] [sanitize] [bench-dw] [bench-hff] [bench] ...
# The bench stages run `python -m benchmarks` from the repository root and write one JSON each (with the
# .md table beside it) under $OUT.
# Stage limits come from <STAGE>_LIMIT in seconds (dashes as underscores, e.g. BENCH_HFF_LIMIT=240), cut to
# what is left of SESSION_LIMIT (default 570).
set -u
cd "$(dirname "$0")/.."  # the repository root: `python -m benchmarks` imports the package from there
OUT=${OUT:-/tmp/medkernels-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
# every stage ends this many seconds after the script starts (SESSION_LIMIT), so the logs come back in time
DEADLINE=$(( $(date +%s) + ${SESSION_LIMIT:-570} ))

stage() {  # stage NAME DEFAULT_LIMIT COMMAND...
    local name=$1 limit_var; limit_var=$(echo "${1}_LIMIT" | tr 'a-z-' 'A-Z_'); shift
    local limit=${!limit_var:-$1}; shift
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 10 )); then echo "== $name: skipped, ${left}s left before the session deadline"; return; fi
    local start; start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - start ))s"
    tail -n "${TAIL_LINES:-15}" "$OUT/$name.log"
}

for s in "$@"; do
    case $s in
    info) stage info 60 bash -c 'nvidia-smi; '"$PY"' -c "import torch, triton, sys; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; nvcc --version | tail -2; lscpu | grep -E "Model name|Flags" | cut -c1-400' ;;
    build) export MEDKERNELS_CPU_OPT=${MEDKERNELS_CPU_OPT:--O1}; stage build 300 "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
    smoke) stage smoke 120 bash -c "for b in cuda triton; do for d in float32 bfloat16; do $PY benchmarks/gpu_sanitize.py --backend \$b --dtype \$d || echo FAILED \$b \$d; done; done" ;;
    tests) stage tests 330 "$PY" -m pytest tests -n "${TEST_WORKERS:-16}" -k "${TEST_SELECT:-cuda}" -p no:cacheprovider -v \
               --timeout 120 --tb=short -rfE --junitxml="$OUT/tests.xml" ;;
    sanitize) stage sanitize 240 bash -c "for t in ${SANITIZE_TOOLS:-memcheck racecheck}; do compute-sanitizer --tool \$t --error-exitcode 9 $PY benchmarks/gpu_sanitize.py --backend cuda; echo \"\$t rc=\$?\"; done" ;;
    bench-dw) stage bench-dw 200 "$PY" -m benchmarks --device cuda --full --warmup 2 --repeats 10 --ops depthwise_conv2d --models --no-progress \
                 --no-plot --out "$OUT/depthwise.json" ;;
    bench-hff) stage bench-hff 300 "$PY" -m benchmarks --device cuda --warmup 2 --repeats 10 --ops hff_attention --models --no-progress --no-plot \
                  --out "$OUT/hff.json" ${BENCH_HFF_ARGS:-} ;;
    bench) stage bench 580 "$PY" -m benchmarks ${BENCH_ARGS:---full} --no-progress --no-plot --out "$OUT/gpu.json" ;;
    *) echo "unknown stage $s"; exit 2 ;;
    esac
done
