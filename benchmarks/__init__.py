"""fastnca benchmarks: the runner (``python -m benchmarks``), the FLOP model, pytest-benchmark suites.

See benchmarks/README.md. Importing this package changes nothing: each entry point (``python -m benchmarks``,
``python -m benchmarks.profiling``, ``python -m benchmarks.precompile``, the pytest conftest) chooses the kernels'
mode itself with ``fastnca.kernels.use_interpreter`` before it imports a kernel module (the interpreter without
a GPU, so the fused kernels run at tiny sizes).
"""
