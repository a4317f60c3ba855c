"""``python -m benchmarks [--quick] [--tiny] [--cases ...] [--backends ...] [--out DIR]``: see benchmarks/runner.py."""

from benchmarks.runner import main

if __name__ == "__main__":
    main()
