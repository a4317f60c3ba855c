"""fastnca benchmarks: the runner (``python -m benchmarks``), the FLOP model, pytest-benchmark suites.

See benchmarks/README.md. Importing this package on a machine without a GPU sets TRITON_INTERPRET=1 (unless
already set) before Triton is imported, so the fused kernels run in the interpreter at tiny sizes.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
