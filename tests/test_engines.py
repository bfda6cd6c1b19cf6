"""The two builds of the compiled engine: _core (baseline) and _core_avx2 (x86-64, AVX2).

bpfast loads _core_avx2 where the CPU has AVX2 (bpfast/_compiled.py), else _core.
Both are compiled from _core.pyx, the AVX2 one without fused multiply-adds, so every
operation rounds alike and the two must give bit-identical results: the same workload
runs under each in a fresh interpreter and the digests of everything it computed must
match. BPFAST_ENGINE chooses by hand; a wrong value is an ImportError naming it.
"""
import importlib.util
import io
import os
import subprocess
import sys

import pytest

import bpfast as bp
from bpfast import _compiled

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))

# Every activation, loss (from logits and from probabilities) and optimizer, both
# dtypes, the training options, one-row predicts (GEMV) and a predict large enough for
# the parallel elementwise passes.
WORKLOAD = r"""
import hashlib
import numpy as np
import bpfast as bp
from bpfast import _compiled

digest = hashlib.sha256()
def add(array):
    digest.update(np.ascontiguousarray(array).tobytes())

for dtype in (np.float32, np.float64):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((160, 12)).astype(dtype)
    y = rng.integers(0, 4, 160)
    for activation in bp.ACTIVATIONS:
        if activation == "softmax":
            continue
        for opt in (bp.SGD(lr=0.05, momentum=0.9, nesterov=True), bp.Adam(lr=1e-2),
                    bp.AdamW(lr=1e-2), bp.RMSprop(lr=1e-3, momentum=0.5),
                    bp.Adagrad(lr=0.1)):
            net = bp.Network([bp.Dense(12, 10, activation=activation), bp.Dense(10, 4)],
                             dtype=dtype, seed=3)
            net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=32)
            add(net.parameters)
            add(net.predict(X[:1]))
    Xr = rng.standard_normal((160, 7)).astype(dtype)
    Yr = rng.standard_normal((160, 3)).astype(dtype)
    for loss in ("mse", "l1", "huber"):
        net = bp.Network([bp.Dense(7, 9, activation="tanh"), bp.Dense(9, 3)], dtype=dtype,
                         seed=4)
        net.fit(Xr, Yr, loss=loss, optimizer="adam", epochs=2, batch_size=16, l2=1e-3,
                clip_norm=0.5, sample_weight=rng.uniform(0.5, 2.0, 160))
        add(net.parameters)
        add(net.compute_gradients(Xr, Yr, loss))
    Yb = (rng.uniform(size=(160, 3)) < 0.5).astype(dtype)
    for from_logits in (True, False):
        last = "identity" if from_logits else "sigmoid"
        net = bp.Network([bp.Dense(7, 8, activation="relu"), bp.Dense(8, 3, activation=last)],
                         dtype=dtype, seed=5)
        net.fit(Xr, Yb, loss=bp.BinaryCrossEntropy(from_logits=from_logits), optimizer="sgd",
                epochs=2, clip_value=0.1)
        add(net.parameters)
    net = bp.Network([bp.Dense(12, 10, activation="elu"), bp.Dense(10, 4, activation="softmax")],
                     dtype=dtype, seed=7)
    net.fit(X, y, loss=bp.CrossEntropy(from_logits=False), optimizer="rmsprop", epochs=2)
    add(net.parameters)
    big = bp.Network([bp.Dense(64, 256, activation="gelu"), bp.Dense(256, 10)], dtype=dtype,
                     seed=6)
    add(big.predict(rng.standard_normal((1024, 64)).astype(dtype)))
print(_compiled.core.__name__, digest.hexdigest())
"""


def _run(code, engine):
    env = dict(os.environ, BPFAST_ENGINE=engine)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def _avx2_runs_here():
    from bpfast import _core
    return (importlib.util.find_spec("bpfast._core_avx2") is not None
            and _core.kernel_info()[1])


needs_avx2 = pytest.mark.skipif(not _avx2_runs_here(),
                                reason="no _core_avx2 in this build, or no AVX2 on this CPU")


def test_the_engine_in_use_matches_the_cpu_and_the_choice():
    choice = os.environ.get("BPFAST_ENGINE", "auto").strip().lower() or "auto"
    avx2 = choice != "baseline" and _avx2_runs_here()
    expected = "bpfast._core_avx2" if avx2 else "bpfast._core"
    assert _compiled.core.__name__ == expected
    name, _ = _compiled.core.kernel_info()
    assert name == ("avx2" if expected.endswith("avx2") else "baseline")
    out = io.StringIO()
    bp.show_config(file=out)
    assert f"engine: {expected.split('.')[-1]} ({name})" in out.getvalue()


@needs_avx2
def test_both_engines_give_bit_identical_results():
    results = {}
    for engine in ("baseline", "avx2"):
        proc = _run(WORKLOAD, engine)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[engine] = proc.stdout.split()
    assert results["baseline"][0] == "bpfast._core"
    assert results["avx2"][0] == "bpfast._core_avx2"
    assert results["baseline"][1] == results["avx2"][1]


def test_a_wrong_engine_choice_is_an_import_error_naming_the_variable():
    proc = _run("import bpfast", "fastest")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "BPFAST_ENGINE" in proc.stderr and "'fastest'" in proc.stderr


def test_baseline_is_always_available():
    proc = _run("from bpfast import _compiled; print(_compiled.core.__name__)", "baseline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "bpfast._core"


@pytest.mark.skipif(_avx2_runs_here(), reason="this machine can run the AVX2 engine")
def test_asking_for_avx2_where_it_cannot_run_fails_clearly():
    proc = _run("import bpfast", "avx2")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr


def test_loading_leaves_the_openmp_environment_as_it_was():
    code = "import os, bpfast; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    env_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    proc = _run(code, "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == env_policy
