#!/usr/bin/env bash
# Build bpfast's compiled core with AddressSanitizer (or plainly, for valgrind) in a
# temporary copy of the repository and run tests and a workload there. The in-place
# extension under src/ is never touched. Slow (minutes); not run in CI.
#
#   tools/sanitize.sh                 ASan build of both engines (_core and, on x86-64,
#                                     _core_avx2); pytest on a selection of tests with the
#                                     engine bpfast picks, then tools/sanitize_workload.py
#                                     under each engine
#   tools/sanitize.sh --valgrind      plain -g build; tools/sanitize_workload.py --quick
#                                     under valgrind memcheck
#   tools/sanitize.sh --asan -- ARGS  ASan build; pytest ARGS instead of the selection
#
# Exit status 0: no invalid read or write (nor any other ASan report) was found.
# Environment: KEEP=1 keeps the temporary copy; CC picks the compiler (gcc default);
# BPFAST_ROOT another checkout to copy; PYTHON the interpreter; REPORTS_DIR where
# ASan/valgrind reports are copied (default /tmp/bpfast-sanitize-reports);
# BPFAST_ENGINE=baseline|avx2 the engine for the pytest run (default: bpfast's choice).
set -euo pipefail

mode=asan
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --asan) mode=asan ;;
        --valgrind) mode=valgrind ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ ${#pytest_args[@]} -eq 0 ]; then
    # every test that drives the compiled core hard, the hostile-input ones and both
    # engines (test_engines.py runs a workload under each). All of it, hypothesis
    # included, is about 3.5 minutes under ASan on 2 busy cores.
    pytest_args=(tests/test_network.py tests/test_gradcheck.py tests/test_bad_input.py
                 tests/test_extremes.py tests/test_threads.py tests/test_properties.py
                 tests/test_io.py tests/test_cli.py tests/test_load_fuzz.py
                 tests/test_kinks.py tests/test_training.py tests/test_engines.py)
fi

# BPFAST_ROOT: the repository to copy (default: the one this script is in)
root=${BPFAST_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-python}
# the interpreter itself, not a launcher script (pyenv shims exec it, and neither
# valgrind nor the ASan preload should be spent on a shell)
python=$("$python" -c 'import sys; print(sys.executable)')
# where reports are kept (outside the repository, so nothing lands in the working tree)
reports_dir=${REPORTS_DIR:-${TMPDIR:-/tmp}/bpfast-sanitize-reports}
export CC=${CC:-gcc}
work=$(mktemp -d "${TMPDIR:-/tmp}/bpfast-sanitize.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then
    trap 'rm -rf "$work"' EXIT
fi
echo "== copying $root to $work (tracked and untracked files, no build outputs)"
# git ls-files only reads the repository; deleted-but-tracked files are skipped
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    grep -zvE '\.so$|^src/bpfast/_core(_avx2)?\.c$' |
    tar --null --files-from=- --ignore-failed-read -cf - 2> /dev/null) | tar -xf - -C "$work"

cd "$work"
log="$work/sanitize.log"
if [ "$mode" = asan ]; then
    echo "== building with -fsanitize=address"
    CFLAGS="-fsanitize=address -fsanitize-recover=address -fno-omit-frame-pointer -g" \
    LDFLAGS="-fsanitize=address" \
        "$python" setup.py build_ext --inplace > "$work/build.log" 2>&1 ||
        { tail -40 "$work/build.log"; exit 1; }
    # No pipe into `grep -q` here: grep exits at the first match, ldd (which writes line
    # by line) then dies of SIGPIPE, and with pipefail a linked extension read as
    # unlinked, now and then (this was "not linked against libasan" with two engines).
    for so in src/bpfast/_core*.so; do
        deps=$(ldd "$so")
        if [[ $deps != *libasan* ]] || ! grep -q __asan_report_load "$so"; then
            echo "$so is not an ASan build:"; echo "$deps"; exit 1
        fi
    done
    libasan=$("$CC" -print-file-name=libasan.so)
    # the interpreter is not instrumented: preload the runtime. PYTHONMALLOC=malloc lets
    # ASan see Python's and numpy's allocations too. Leaks are not this script's subject
    # (CPython keeps much alive at exit). Built with -fsanitize-recover, a run goes on after
    # a report, so one bug does not hide the rest of the suite.
    export LD_PRELOAD="$libasan"
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:abort_on_error=0:exitcode=86:log_path=$work/asan:symbolize=1:detect_stack_use_after_return=0"
    export PYTHONMALLOC=malloc PYTHONPATH="$work/src" PYTHONFAULTHANDLER=1
    # engine_in_use CHOICE: the module bpfast imports with BPFAST_ENGINE=CHOICE, checked
    # to be one of the ASan builds above (not an installed or in-place copy) and to run
    # under a live ASan runtime (a freed block is poisoned); fails otherwise.
    engine_in_use() {
        BPFAST_ENGINE=$1 "$python" - "$work/src/bpfast" <<'PY'
import ctypes, os, sys
from bpfast import _compiled
core, built_in = _compiled.core, os.path.realpath(sys.argv[1])
path = os.path.realpath(core.__file__)
runtime = ctypes.CDLL(None)
if not hasattr(runtime, "__asan_address_is_poisoned"):
    sys.exit("the ASan runtime is not loaded")
runtime.malloc.restype = ctypes.c_void_p
runtime.free.argtypes = [ctypes.c_void_p]
runtime.__asan_address_is_poisoned.argtypes = [ctypes.c_void_p]
block = runtime.malloc(16)
runtime.free(block)
if not runtime.__asan_address_is_poisoned(block):
    sys.exit("malloc is not ASan's: the LD_PRELOAD of its runtime did not take")
if os.path.dirname(path) != built_in:
    sys.exit(f"{core.__name__} was imported from {path}, not from the ASan build in {built_in}")
print(core.__name__)
PY
    }
    # the engines to check: bpfast's own choice, and baseline (_core) when that is avx2
    engines=(auto)
    auto_engine=$(engine_in_use auto) || { echo "engine check failed"; exit 1; }
    [ "$auto_engine" = bpfast._core ] || engines+=(baseline)
    for choice in "${engines[@]}"; do
        module=$(engine_in_use "$choice") || { echo "engine check failed ($choice)"; exit 1; }
        echo "== BPFAST_ENGINE=$choice imports $module (ASan build, ASan runtime live)"
    done
    pytest_engine=${BPFAST_ENGINE:-auto}
    module=$(engine_in_use "$pytest_engine") || { echo "engine check failed"; exit 1; }
    echo "== pytest with $module: ${pytest_args[*]}"
    set +e
    start=$SECONDS
    "$python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" > "$log" 2>&1
    status=$?
    tail -40 "$log"
    echo "   ($((SECONDS - start)) s)"
    for choice in "${engines[@]}"; do
        echo "== tools/sanitize_workload.py with BPFAST_ENGINE=$choice"
        BPFAST_ENGINE=$choice "$python" tools/sanitize_workload.py > "$work/workload.log" 2>&1
        workload_status=$?
        tail -3 "$work/workload.log"
        [ "$status" -ne 0 ] || status=$workload_status
    done
    set -e
    unset LD_PRELOAD
    reports=$(ls "$work"/asan.* 2>/dev/null || true)
    if [ -n "$reports" ]; then
        echo "== AddressSanitizer reports"
        for r in $reports; do cat "$r"; echo; done
        mkdir -p "$reports_dir" && cp $reports "$reports_dir"/
        echo "ASan: FOUND ERRORS (reports copied to $reports_dir)"
        exit 1
    fi
    if [ "$status" -ne 0 ]; then
        echo "ASan: no sanitizer report, but the tests/workload failed (status $status); see above"
        exit "$status"
    fi
    echo "ASan: clean (no invalid read or write, no other report; $SECONDS s in all)"
else
    command -v valgrind > /dev/null || { echo "valgrind not installed"; exit 2; }
    echo "== building with -g (no sanitizer) for valgrind"
    CFLAGS="-g" "$python" setup.py build_ext --inplace > "$work/build.log" 2>&1 ||
        { tail -40 "$work/build.log"; exit 1; }
    export PYTHONMALLOC=malloc PYTHONPATH="$work/src" OMP_NUM_THREADS=2
    echo "== valgrind --tool=memcheck python tools/sanitize_workload.py --quick"
    status=0
    valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --num-callers=40 \
        --log-file="$work/valgrind.log" \
        "$python" tools/sanitize_workload.py --quick > "$work/workload.log" 2>&1 || status=$?
    tail -3 "$work/workload.log"
    set +e
    # Sort memcheck's reports: any whose stack passes through bpfast's extension is a
    # failure (invalid read/write/free above all); the rest (the dynamic loader's
    # word-wise strncmp, CPython start-up without suppressions) is counted and ignored.
    "$python" - "$work/valgrind.log" "$status" "$work/workload.log" <<'PY'
import re, sys
log, status = open(sys.argv[1]).read(), int(sys.argv[2])
finished = "sanitize workload:" in open(sys.argv[3]).read()
blocks = [b for b in re.split(r"\n==\d+== ?\n", log) if re.search(r"==\d+== \S", b)]
kinds = r"(Invalid (read|write|free)|Mismatched free|Source and destination overlap|" \
        r"Conditional jump|Use of uninitialised|Syscall param)"
ours, others = [], {}
for block in blocks:
    head = re.sub(r"^==\d+== ", "", block.strip().splitlines()[0])
    if not re.match(kinds, head):
        continue
    if re.search(r"bpfast/_core|6bpfast_5_core|6bpfast_10_core_avx2", block):
        ours.append(block)
    else:
        others[head] = others.get(head, 0) + 1
if not finished:
    print(f"valgrind: the workload did not finish (status {status})")
    sys.exit(status or 1)
for head, count in sorted(others.items()):
    print(f"ignored (no bpfast frame): {count} x {head}")
if ours:
    for block in ours[:20]:
        print(block, "\n")
    invalid = sum(bool(re.search(r"Invalid|Mismatched|overlap", b.splitlines()[0])) for b in ours)
    print(f"valgrind: {len(ours)} report(s) in bpfast's extension, {invalid} invalid access(es)")
    sys.exit(1)
print("valgrind: no invalid read or write (nor other report) in bpfast's extension")
PY
    result=$?
    if [ "$result" -ne 0 ]; then
        mkdir -p "$reports_dir" && cp "$work/valgrind.log" "$reports_dir"/
        echo "full log: $reports_dir/valgrind.log"
        exit "$result"
    fi
fi
