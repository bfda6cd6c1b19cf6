"""Fuzz bpfast.load and bpfast.io.read_header for longer than CI does.

Runs the checks of tests/test_load_fuzz.py (model files whose declared sizes lie,
and random damage of a valid model file) with fresh random examples until the
given number of cases or seconds is reached, then reports how many ran, how
they ended, and the largest allocation past the file's size. Any case that
raises something other than a ValueError, or allocates more than the file's
size plus the test's ALLOCATION_SLACK, stops the run with hypothesis's minimal
example.

    PYTHONPATH=src python tools/fuzz_load.py --seconds 180
    PYTHONPATH=src python tools/fuzz_load.py --cases 20000
"""
import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_load_fuzz as fuzz  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BATCH = 200  # examples per hypothesis run; the limits are checked between runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, help="stop after about this long")
    parser.add_argument("--cases", type=int, help="stop after this many cases")
    args = parser.parse_args(argv)
    if args.seconds is None and args.cases is None:
        parser.error("give --seconds, --cases or both")
    counts = collections.Counter()
    worst_peak = 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        valid = fuzz.model_bytes(directory)
        path = os.path.join(directory, "case.npz")
        strategies = {"lying sizes": fuzz.lying_zips(valid),
                      "random damage": fuzz.damaged_files(valid)}

        def runner(kind, strategy, examples):
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(data=st.data())
            def run(data):
                nonlocal worst_peak
                for name, (outcome, peak) in fuzz.check_file(path, data.draw(strategy)).items():
                    ending = "ValueError" if isinstance(outcome, ValueError) else "loaded"
                    counts[kind, name, ending] += 1
                    worst_peak = max(worst_peak, peak)
            return run

        while args.seconds is None or time.monotonic() - start < args.seconds:
            remaining = BATCH if args.cases is None else args.cases - counts.total() // 2
            if remaining <= 0:
                break
            for kind, strategy in strategies.items():
                runner(kind, strategy, max(1, min(BATCH, remaining) // 2))()
    elapsed = time.monotonic() - start
    cases = counts.total() // 2  # each case is read by load and by read_header
    print(f"{cases} cases in {elapsed:.0f} s, no failure")
    for (kind, name, ending), count in sorted(counts.items()):
        print(f"  {kind:14} {name:12} {ending:11} {count}")
    print(f"largest allocation past the file's size: {worst_peak} bytes "
          f"(bound {fuzz.ALLOCATION_SLACK})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
