"""Developer tools beside the library, run from a checkout (``python -m tools.<name>``), never installed.

- ``tools/fit.py``: compiles the shipped kernels for sm_90 on the CPU and reads their machine code (registers,
  spills, shared memory, tensor-core instructions), the fit tests' and ``benchmarks/gpu_check.sh``'s yardstick.
- ``tools/launches.py``: counts the kernel launches of one training iteration (the launch budget's yardstick).
- ``tools/_import_shim/``: a ``sitecustomize`` that serves ``fastnca.kernels`` from ``kernels/`` when the
  checkout is on ``PYTHONPATH`` but not installed (the GPU check's fallback, the fit tool's compiling children).

The tools import ``fastnca`` and ``fastnca.kernels``; nothing in those packages imports the tools
(``tests/test_packaging.py`` checks both that and that the wheel ships neither this folder nor benchmarks/).
"""
