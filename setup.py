"""Build the compiled engine, bpfast._core (and on x86-64 bpfast._core_avx2), with OpenMP.

The typed engines (Engine32, Engine64) come from one Tempita template,
src/bpfast/_engine.pxi.tp, rendered here to _engine.pxi before cythonize (which then
sees it, like every other included file, as a dependency of both extensions).

OpenMP is detected by compiling and linking a tiny program with -fopenmp (on macOS
also with Apple clang's -Xpreprocessor -fopenmp and Homebrew's libomp); where that
fails the build warns and goes on serially: Cython's prange then compiles to a plain
loop.
"""
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython import Tempita
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_TEST = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def openmp_candidates():
    """(compile_args, link_args) to try, in order."""
    yield ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "darwin":
        # Apple clang: OpenMP through libomp (Homebrew's, or LIBOMP_PREFIX)
        prefixes = [os.environ.get("LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp",
                    "/usr/local/opt/libomp"]
        for prefix in filter(None, prefixes):
            if os.path.isdir(prefix):
                yield (["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"],
                       [f"-L{prefix}/lib", "-lomp", f"-Wl,-rpath,{prefix}/lib"])


def compiles(cc, compile_args, link_args, source=OPENMP_TEST):
    """Whether a test program (by default OpenMP's) compiles and links with these flags."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "test.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = cc.split() + compile_args + [src, "-o", os.path.join(tmp, "test")] + link_args
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) when unavailable."""
    if os.environ.get("BPFAST_DISABLE_OPENMP"):
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    for compile_args, link_args in openmp_candidates():
        if compiles(cc, compile_args, link_args):
            return compile_args, link_args
    warnings.warn("bpfast: OpenMP not found; building the serial version", stacklevel=1)
    return [], []


compile_args, link_args = openmp_flags()
if sys.platform != "win32":
    # -O3, but never -ffast-math (it breaks the exact PyTorch formulas and NaN checks)
    # and never -march=native (wheels must run on any x86-64 / aarch64 CPU).
    # -ffp-contract=off: no fused multiply-adds, even where CFLAGS make them available,
    # so both engines round every operation alike and give bit-identical results
    # (tests/test_engines.py).
    compile_args += ["-O3", "-fno-math-errno", "-ffp-contract=off"]


def engine(name, extra_compile_args=(), macros=()):
    return Extension(
        f"bpfast.{name}",
        [f"src/bpfast/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), *macros],
        extra_compile_args=compile_args + list(extra_compile_args),
        extra_link_args=link_args,
        # linked to libm by name, so that expf, exp and log bind to glibc's newest versions
        # (2.27/2.29 where the build's glibc has them); unversioned they bind to the 2.2.5
        # wrappers, which cost as much as the function (bench/README.md, note 0)
        libraries=["m"] if sys.platform.startswith("linux") else [],
    )


def builds_avx2_engine():
    """Whether to build _core_avx2: an x86-64 target whose compiler takes -mavx2.

    The platform names the target (cibuildwheel sets it when cross-compiling); the
    test compile, with the user's CFLAGS and ARCHFLAGS, catches the rest (a macOS
    build for arm64 from an x86-64 Python, say).
    """
    if os.environ.get("BPFAST_DISABLE_AVX2") or sys.platform == "win32":
        return False
    machine = (sysconfig.get_platform().split("-")[-1] or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    flags = [*shlex.split(os.environ.get("CFLAGS", "")),
             *shlex.split(os.environ.get("ARCHFLAGS", "")), "-mavx2", "-c"]
    return compiles(cc, flags, [], source="int main(void) { return 0; }\n")


def render_templates(folder="src/bpfast"):
    """Render every *.pxi.tp in folder next to it (without the .tp), with Cython's Tempita.

    The output is rewritten only when its text changes, so an unchanged template does
    not make cythonize rebuild the extensions.
    """
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".pxi.tp"):
            continue
        template = os.path.join(folder, name)
        with open(template) as f:
            text = (f"# Generated by setup.py from {name}: edit that file, not this one.\n"
                    + Tempita.Template(f.read(), name=template).substitute())
        target = template[:-len(".tp")]
        if os.path.exists(target):
            with open(target) as f:
                if f.read() == text:
                    continue
        with open(target, "w") as f:
            f.write(text)


render_templates()

# _core is built for the baseline instruction set; on x86-64 the same source is built
# a second time as _core_avx2 with -mavx2, which bpfast loads at run time when the CPU
# has AVX2 (bpfast/_compiled.py). No -march: both run on any CPU of their kind.
extensions = [engine("_core")]
if builds_avx2_engine():
    extensions.append(engine("_core_avx2", ["-mavx2"], [("BPFAST_AVX2", "1")]))

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
