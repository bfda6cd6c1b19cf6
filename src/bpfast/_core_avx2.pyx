# The same engine as _core, compiled with -mavx2 on x86-64. Private: bpfast/_compiled.py
# loads it only after checking the CPU (its own initialisation already uses AVX).
include "_core.pyx"
