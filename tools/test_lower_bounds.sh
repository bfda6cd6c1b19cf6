#!/usr/bin/env bash
# Install bpfast with the oldest NumPy, SciPy and scikit-learn that pyproject.toml
# allows, in a fresh virtual environment, and run the test suite against that install
# from outside the source tree, on the baseline engine (the main run takes the AVX2 one
# where the CPU has it, so CI tests both builds whole). Run by .ci/run; a minute or two.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/bpfast-lower-bounds.XXXXXX")
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# the lower bounds of [project] dependencies and of the [test] extra's scikit-learn
lowest=("numpy==1.25.2" "scipy==1.11.4" "scikit-learn==1.6.1")
python -m pip install --quiet "$root[test]" "${lowest[@]}"
python -c "import numpy, scipy, sklearn; print('lower bounds: numpy', numpy.__version__,
'scipy', scipy.__version__, 'scikit-learn', sklearn.__version__)"
cp -r "$root/tests" "$work/tests"
cd "$work"
export BPFAST_ENGINE=baseline
python -c "import bpfast; print('testing', bpfast.__file__); bpfast.show_config()"
python -m pytest -q -p no:cacheprovider tests
