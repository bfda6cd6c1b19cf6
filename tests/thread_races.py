"""The thread-race harness test_network.py and test_threads.py share.

A race on one network runs in a fresh interpreter (``run_isolated``), so that a crash
fails the test instead of ending the session; its code starts with ``RACE_PRELUDE``,
whose ``race(*targets)`` releases the racing threads together behind a barrier.
"""
import json
import os
import subprocess
import sys

import bpfast as bp

RACE_PRELUDE = """
import threading
def race(*targets):
    barrier = threading.Barrier(len(targets))
    def wrap(f):
        def run():
            barrier.wait()
            f()
        return run
    threads = [threading.Thread(target=wrap(f)) for f in targets]
    [t.start() for t in threads]; [t.join() for t in threads]
"""


def run_isolated(code, timeout):
    """Run ``code`` in a fresh interpreter that imports this bpfast; the JSON object its
    last line of output prints. A crash (non-zero exit) fails with its stderr."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"the scenario died with return code {proc.returncode}:\n"
                                  f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_and_join(threads):
    """Start every thread, then wait for all of them."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def blas_threads():
    """The thread count of every BLAS threadpoolctl sees (None without threadpoolctl)."""
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - optional
        return None
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS so that threadpoolctl sees it)
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
            if pool.get("user_api") == "blas"]
