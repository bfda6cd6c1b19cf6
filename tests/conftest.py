"""Fixtures several test files use. Shared tables and helpers live in the modules beside
this one: central_differences.py, oracle.py (the NumPy oracle), oracle_checks.py,
optimizer_configs.py, thread_races.py and training_data.py."""
import pytest
from thread_races import blas_threads

import bpfast as bp


@pytest.fixture
def restore_thread_counts():
    """bpfast's and BLAS's thread counts are as before after the test, whatever it set."""
    omp, blas = bp.get_num_threads(), blas_threads()
    yield
    bp.set_num_threads(omp)
    if blas:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=max(blas), user_api="blas")
    assert bp.get_num_threads() == omp
