"""``python -m benchmarks [--quick] [--tiny] [--cases ...] [--backends ...] [--out DIR]``: see benchmarks/runner.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted

from benchmarks.runner import main  # noqa: E402

if __name__ == "__main__":
    main()
