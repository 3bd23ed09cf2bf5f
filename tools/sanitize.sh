#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer (`make test-sanitize`).
#
# Copies the tree (git's tracked and untracked-but-not-ignored files, as they are in the working tree) to
# build/sanitize/src, builds medkernels._C there with MEDKERNELS_SANITIZE=address,undefined (CPU kernels only,
# -O1), and runs the CPU kernel tests from that copy with libasan preloaded.  The in-place build and the
# installed package are not touched: the copy comes first on PYTHONPATH (before the editable install's finder,
# which sys.meta_path puts after the path finder), and the check below makes sure that medkernels, medkernels._C
# and medkernels.kernels are the copy's.
#
# Usage: tools/sanitize.sh [--no-sync] [--build-only] [pytest arguments]
#   --no-sync     build and test build/sanitize/src as it is, without copying the tree over it again (for
#                 trying a change to the copy's csrc/, e.g. a planted fault; the next run without it restores
#                 the copy)
#   --build-only  stop after the build
#   pytest arguments replace the default selection (DEFAULT_TESTS and DEFAULT_SELECTION below).
# Environment: PY (the python, default .venv/bin/python), MAX_JOBS (compile jobs, default 2), SANITIZE_DIR
# (default build/sanitize).  A build is reused while its sources, flags, compiler and torch are unchanged.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
case "$PY" in /*) ;; *) PY=$ROOT/$PY ;; esac
WORK=${SANITIZE_DIR:-$ROOT/build/sanitize}
SRC=$WORK/src
LIB=$WORK/lib
TEMP=$WORK/temp
export MAX_JOBS=${MAX_JOBS:-2}

# The CPU kernel tests, forward and backward, every dtype and odd shape, with the AVX2 and baseline variants
# (the capped_cpu_isa tests); the suites that call the kernels under autocast, opcheck and deterministic mode;
# the networks and modules (the kernels at the stages' shapes).  The Triton tests and the ref backend's cases
# are left out: nothing compiled runs in them, and the Triton interpreter is very slow under ASan.  Also left
# out: tests/cross/test_memory_growth.py (ASan's quarantine holds freed memory, so resident memory is not flat),
# test_distributed.py and test_compile_models.py (DDP processes and torch.compile tracing around the same ops).
DEFAULT_TESTS=(tests/kernels tests/ops tests/models tests/cross/test_autocast_ops.py tests/cross/test_library.py
               tests/cross/test_deterministic.py)
DEFAULT_SELECTION=(-k "not triton and not cpu-ref and not [ref]")

sync=1
build_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --no-sync) sync=0; shift ;;
        --build-only) build_only=1; shift ;;
        *) break ;;
    esac
done
if [ $# -gt 0 ]; then pytest_args=("$@"); else pytest_args=("${DEFAULT_TESTS[@]}" "${DEFAULT_SELECTION[@]}"); fi

say() { echo "sanitize: $*"; }
if [ ! -x "$PY" ]; then
    echo "sanitize: no python at $PY (run \`make venv\`, or set PY)" >&2
    exit 1
fi

# Preloaded: libasan, which must be the process's first library (it replaces malloc and friends) and python is
# not built with it; and libstdc++, because libasan looks up the real __cxa_throw when it starts, and python
# itself does not load libstdc++: without it the first C++ exception (each TORCH_CHECK the bad-input tests
# trigger) dies in "CHECK failed: ... real___cxa_throw != 0".  libubsan is a normal dependency of the
# sanitized _C and needs no preload.
CXX=${CXX:-g++}
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
    if [ ! -e "$lib" ]; then
        echo "sanitize: $CXX -print-file-name found no $(basename "$lib") (got $lib); install gcc's libasan" >&2
        exit 1
    fi
done

start=$(date +%s)
if [ "$sync" = 1 ]; then
    say "copying the working tree to $SRC"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    # files deleted in the working tree but still in git's index are skipped
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$ROOT" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
        tar -C "$ROOT" --null -T - -cf - | tar -C "$SRC" -xf -
    # kernels/ is installed as medkernels.kernels; without this link the editable install's finder would
    # supply the original tree's kernels/ to the copy
    [ -e "$SRC/medkernels/kernels" ] || ln -s ../kernels "$SRC/medkernels/kernels"
elif [ ! -f "$SRC/setup.py" ]; then
    echo "sanitize: --no-sync, but there is no copy at $SRC yet" >&2
    exit 1
fi

# -O1: ASan's usual level (-O0 makes the tests several times slower, -O3 the build slower and the stacks less
# exact)
export MEDKERNELS_BUILD_CUDA=0 MEDKERNELS_SANITIZE=address,undefined MEDKERNELS_CPU_OPT=-O1
key=$(cd "$SRC" && {
    find setup.py pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha256sum
    echo "$MEDKERNELS_SANITIZE $MEDKERNELS_CPU_OPT"
    "$CXX" --version | head -n 1
    "$PY" -c "import torch; print(torch.__version__)"
} | sha256sum | cut -d' ' -f1)
so=$(find "$LIB/medkernels" -maxdepth 1 -name '_C*.so' 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ "$(cat "$LIB/key" 2>/dev/null)" = "$key" ]; then
    say "reusing the sanitized build in $LIB (sources and flags unchanged)"
else
    say "building medkernels._C with -fsanitize=$MEDKERNELS_SANITIZE $MEDKERNELS_CPU_OPT, CPU kernels only" \
        "(MAX_JOBS=$MAX_JOBS)"
    rm -rf "$LIB" "$TEMP"
    (cd "$SRC" && "$PY" setup.py --quiet build_ext --build-lib "$LIB" --build-temp "$TEMP")
    echo "$key" >"$LIB/key"
    so=$(find "$LIB/medkernels" -maxdepth 1 -name '_C*.so' | head -n 1)
fi
rm -f "$SRC"/medkernels/_C*.so
cp "$so" "$SRC/medkernels/"
built=$(date +%s)
say "build took $((built - start))s"
[ "$build_only" = 1 ] && exit 0

export LD_PRELOAD="$LIBASAN $LIBSTDCXX${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design, so LeakSanitizer would report
#   thousands of "leaks" at the end of every run.
# abort_on_error=1: a report ends in abort(), so pytest's faulthandler prints the Python stack, naming the test.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# print_stacktrace=1: UBSan's reports show the call stack (they give only the file:line by default);
# halt_on_error/abort_on_error: as above (the build already makes UB fatal with -fno-sanitize-recover).
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# the copy's _C has no CUDA kernels; hiding the GPUs keeps a run on a GPU machine on the CPU as well (the CUDA
# driver is known to want ASAN_OPTIONS=protect_shadow_gap=0 under ASan; not tried)
export CUDA_VISIBLE_DEVICES=
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
cd "$SRC"

"$PY" - "$SRC" <<'EOF'
import importlib.util
import os
import sys

import medkernels
from medkernels import _ext

src = os.path.realpath(sys.argv[1])
ext = _ext.module()
kernels = importlib.util.find_spec("medkernels.kernels").origin
for name, path in (("medkernels", medkernels.__file__), ("medkernels._C", ext.__file__),
                   ("medkernels.kernels", kernels)):
    if not os.path.realpath(path).startswith(src + os.sep):
        sys.exit(f"sanitize: {name} was imported from {path}, not from the sanitized copy {src}")
flags = _ext.build_info()["cxx_flags"]
if "-fsanitize=address,undefined" not in flags.split():
    sys.exit(f"sanitize: medkernels._C was not built with the sanitizers (cxx_flags: {flags})")
print(f"sanitize: testing {ext.__file__} (cxx_flags: {flags})")
EOF

say "pytest ${pytest_args[*]}"
status=0
# --capture=sys: pytest captures Python's sys.stdout/stderr only, so a sanitizer's report (written to file
# descriptor 2 just before the abort) reaches the log instead of dying in pytest's capture file; -v names each test
# before it runs, so the report follows the name of the test that triggered it
"$PY" -m pytest -p no:cacheprovider --capture=sys -v "${pytest_args[@]}" || status=$?
say "tests took $(($(date +%s) - built))s (build $((built - start))s), exit status $status"
exit "$status"
