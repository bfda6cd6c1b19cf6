# The same engine as _core, compiled with AVX2 and FMA; bpfast picks it on CPUs that have them.
include "_core.pyx"
