"""Run the one-network thread races of tests/test_threads.py for many more rounds.

CI runs each scenario for a few rounds (seconds) and relies on the forced interleavings
of the same file to catch a regression every time; this script is the long run that
looks for what those do not force. Each scenario runs in its own subprocess; the exit
status is 1 if any round returned another call's data, a torn save, an unexpected
error or a starved thread.

    PYTHONPATH=src python tools/stress_threads.py --factor 50
    PYTHONPATH=src python tools/stress_threads.py --only forward_backward_race --factor 200
"""
import argparse
import importlib.util
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_tests():
    # as pytest does: the test file imports the shared harness beside it
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("test_threads",
                                                  ROOT / "tests" / "test_threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, default=50,
                        help="rounds per scenario, as a multiple of CI's (default 50)")
    parser.add_argument("--only", action="append", default=None,
                        help="run only this scenario (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds allowed per scenario (default 3600)")
    args = parser.parse_args(argv)
    tests = _load_tests()
    names = args.only or sorted(tests.SCENARIOS)
    unknown = sorted(set(names) - set(tests.SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {sorted(tests.SCENARIOS)}")
    failed = False
    for name in names:
        body, ci_rounds = tests.SCENARIOS[name]
        rounds = max(1, ci_rounds * args.factor)
        started = time.perf_counter()
        try:
            result = tests._run_isolated(body, rounds, timeout=args.timeout)
        except AssertionError as error:  # the subprocess died (a crash)
            result = {"unexpected": [str(error)[-2000:]], "mismatches": [], "completed": 0}
        seconds = time.perf_counter() - started
        bad = bool(result["unexpected"] or result["mismatches"] or not result["completed"])
        failed |= bad
        print(json.dumps({"scenario": name, "rounds": rounds, "seconds": round(seconds, 1),
                          "completed": result["completed"],
                          "mismatches": len(result["mismatches"]),
                          "unexpected": len(result["unexpected"]),
                          "first": (result["mismatches"] + result["unexpected"])[:3],
                          "ok": not bad}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
