"""The public API type-checks: mypy --strict on a user's script passes, and catches misuse.

bpfast ships py.typed and _core.pyi, so a user's type checker sees its annotations.
The script (tests/typing_user_script.py) is checked against whichever bpfast the tests
import: the installed wheel, or the source tree.
"""
import os
import runpy
import site
import subprocess
import sys

import pytest

import bpfast

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "typing_user_script.py")

pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")


def run_mypy(script, cache_dir):
    """mypy --strict on script; (exit status, output)."""
    command = [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
               "--cache-dir", str(cache_dir), "--python-executable", sys.executable, script]
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bpfast.__file__)))
    installed = {os.path.realpath(path)
                 for path in [*site.getsitepackages(), site.getusersitepackages()]}
    if os.path.realpath(package_parent) not in installed:
        # bpfast from a source tree: show it to mypy like an installed package, whose
        # own modules are read for their types but not themselves checked
        env["MYPYPATH"] = package_parent
        command[4:4] = ["--follow-imports", "silent"]
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(str(cache_dir)), timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One mypy cache for the module: the second run reuses numpy's parsed stubs."""
    return tmp_path_factory.mktemp("mypy") / "cache"


def test_user_script_passes_mypy_strict(cache_dir):
    status, output = run_mypy(SCRIPT, cache_dir)
    assert status == 0, output


def test_mypy_catches_misuse(tmp_path, cache_dir):
    bad = tmp_path / "bad_script.py"
    bad.write_text(
        "import bpfast as bp\n"
        "layer = bp.Dense('3', 4)\n"
        "net = bp.Network([layer], seed='zero')\n"
        "value: str = net.train_step([[1.0, 2.0, 3.0]], [[1.0] * 4], bp.MSE(), bp.SGD())\n"
        "bp.Adam(betas=0.9)\n"
        "loaded: bp.Network = bp.load('model.npz', with_optimizer=True)\n")
    status, output = run_mypy(str(bad), cache_dir)
    assert status == 1
    for line in (2, 3, 4, 5, 6):
        assert f"bad_script.py:{line}: error" in output, output


def test_user_script_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(SCRIPT, run_name="__main__")
    assert "bpfast-model" in capsys.readouterr().out
