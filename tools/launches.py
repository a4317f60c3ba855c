"""Kernel launches per training iteration: a count made with ``torch.profiler``, the launch budget's yardstick.

Usage::

    python -m tools.launches --preset mnist-doubling              # CPU: the Triton interpreter
    python -m tools.launches --preset celeba-nondoubling-256 --device cuda --json

One training iteration is run as the Trainer runs it (``Trainer.train_step``: zero_grad, ELBO, backward, gradient
clipping, Adam) on synthetic images of the preset's shape, after one unprofiled warm-up iteration (Adam's state,
compiles). What is counted:

- **CPU** (the fused backend runs in the Triton interpreter): every ATen event that has no ATen descendant, minus
  views and allocations (:data:`NOT_LAUNCHES`: ``empty``, ``view``, ``permute``, ``as_strided``...), minus every
  event inside a Triton launch (the interpreter runs numpy and torch inside ``InterpretedFunction.run``, which is
  wrapped in a ``record_function`` named ``fastnca::triton::<kernel>`` to find them), plus one per Triton launch.
  With ``execute=False`` (``--no-execute``) the launches are counted and their bodies skipped: no op of the
  training step depends on the values the kernels compute, so the count is the same, ~100x faster.
  A ``aten::_foreach_*`` or ``aten::_fused_adam*`` op counts as one launch and its descendants as none
  (on CUDA each is a multi-tensor kernel; the CPU runs it as a loop of per-tensor ops). On a GPU each counted
  op launches about one kernel; the count does not depend on channel widths or batch size, so small ones serve.
- **CUDA**: the device's kernel, memcpy and memset events in the profiler's trace, Triton kernels told apart by
  their names (``_nca_...``, ``_rollout_...`` and ``_dml_...``, the kernels of ``fastnca.kernels``).

Returns ``{"triton", "aten", "total", "by_op", "steps"}``: launches of each kind, their sum, the count per op
name (Triton kernels as ``triton::<name>``), and the number of NCA steps the iteration ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from fastnca.kernels import use_interpreter

__all__ = ["NOT_LAUNCHES", "count_training_launches", "interpreter_launches", "main"]

# Leaf ATen ops that launch no kernel: views, metadata changes and allocations.
NOT_LAUNCHES = frozenset(
    "aten::" + n
    for n in (
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
        "_reshape_alias", "as_strided", "permute", "transpose", "t", "expand", "expand_as", "slice", "select",
        "unsqueeze", "squeeze", "alias", "detach", "detach_", "narrow", "split", "split_with_sizes", "unbind",
        "chunk", "view_as", "contiguous", "lift_fresh", "resize_", "set_", "to", "_to_copy", "type_as",
        "unflatten", "flatten", "movedim", "numpy_T", "result_type", "is_nonzero", "_has_compatible_shallow_copy_type",
        "resolve_conj", "resolve_neg", "conj", "real", "_local_scalar_dense_noop", "size", "stride", "dim",
        "is_floating_point", "record_stream", "diagonal", "indices", "values", "unfold", "_nested_tensor_size",
        "lift_fresh_copy_noop", "requires_grad_", "retain_grad", "output_nr", "_version", "is_leaf",
    )
)
_MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_adam")
_TRITON_PREFIX = "fastnca::triton::"


@contextlib.contextmanager
def interpreter_launches(counts: Counter, execute: bool) -> Iterator[None]:
    """Count every interpreted Triton launch by kernel name.

    ``execute``: run the kernel inside a ``record_function`` named ``fastnca::triton::<kernel>`` whose ATen
    descendants (the interpreter's own numpy and torch work) are then not counted; else skip the kernel's body
    (the host issues the same ops whatever the kernels compute, and the count takes seconds instead of minutes).
    """
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts["triton::" + self.fn.__name__] += 1
        if not execute:
            return None
        with torch.profiler.record_function(_TRITON_PREFIX + self.fn.__name__):
            return real_run(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = real_run


def _count_cpu(events: list[Any]) -> Counter:
    """Launches by op name from the profiler's CPU events (rules in the module docstring)."""
    by_op: Counter = Counter()

    def visit(ev: Any) -> None:
        name = ev.name
        if name.startswith(_TRITON_PREFIX):
            return  # what the interpreter does inside a launch is no launch (the launch is counted apart)
        if name.startswith(_MULTI_TENSOR):
            by_op[name] += 1
            return  # one multi-tensor kernel on CUDA
        kids = ev.cpu_children
        if name.startswith("aten::") and name not in NOT_LAUNCHES and not _has_aten_descendant(ev):
            by_op[name] += 1
        for k in kids:
            visit(k)

    for ev in events:
        if ev.cpu_parent is None:
            visit(ev)
    return by_op


def _has_aten_descendant(ev: Any) -> bool:
    return any(k.name.startswith(("aten::", _TRITON_PREFIX)) or _has_aten_descendant(k) for k in ev.cpu_children)


def _count_cuda(events: list[Any]) -> Counter:
    from torch.autograd import DeviceType

    by_op: Counter = Counter()
    for ev in events:
        if ev.device_type == DeviceType.CUDA:
            name = ev.name
            by_op[("triton::" + name) if name.startswith(("_nca_", "_rollout_", "_dml_")) else name] += 1
    return by_op


def _synthetic_splits(cfg: Any) -> Any:
    """Random uint8 images of the preset's shape (the count does not depend on the pixels)."""
    import torch

    from fastnca.data import Splits

    g = torch.Generator().manual_seed(0)
    shape = (max(2 * cfg.batch_size, 8), cfg.image_channels, cfg.image_size, cfg.image_size)
    high = 2 if cfg.likelihood == "bernoulli" else 256
    train = torch.randint(0, high, shape, generator=g, dtype=torch.uint8)
    return Splits(cfg.dataset, train, train[:8].clone(), "synthetic")


def count_training_launches(preset: str, *, device: str = "cpu", overrides: dict[str, Any] | None = None,
                            execute: bool = True) -> dict:
    """Kernel launches of one training iteration of ``preset`` on the fused backend (see the module docstring).

    Args:
        preset: a preset name (``fastnca.preset_names()``).
        device: "cpu" (Triton's interpreter) or "cuda" (compiled): chosen with ``fastnca.kernels.use_interpreter``,
            so no kernel module may have been imported in the other mode before.
        overrides: config fields to override (e.g. smaller channel widths for the interpreter).
        execute: on the CPU, run the kernels in the interpreter (False: count each launch and skip its body; the
            host issues the same ops, the numbers are garbage, and the count is ~100x faster).

    Returns:
        ``{"triton": int, "aten": int, "total": int, "by_op": {name: count}, "steps": int}``.
    """
    # the CPU runs the kernels in the interpreter, CUDA compiled (raises where a kernel module was imported in the
    # other mode: call this before anything imports one)
    use_interpreter(device == "cpu")
    import tempfile

    import torch

    from fastnca.config import get_preset
    from fastnca.train import Trainer

    cfg = get_preset(preset, backend="triton", device=device, **(overrides or {}))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, splits=_synthetic_splits(cfg), progress=False, final_outputs=False,
                          log=lambda msg: None)
        steps: list[int] = []
        nca = trainer.model.nca
        real_run = nca.run

        def run(state, schedule, **kw):
            steps.append(schedule if isinstance(schedule, int) else len(schedule))
            return real_run(state, schedule, **kw)

        nca.run = run
        # warm-up: Adam's state, compiles (kernel bodies skipped too when not executing: the host work is the same)
        warm = interpreter_launches(Counter(), execute) if device == "cpu" else contextlib.nullcontext()
        with warm:
            trainer.train_step()
        steps.clear()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        triton_counts: Counter = Counter()
        marks = interpreter_launches(triton_counts, execute) if device == "cpu" else contextlib.nullcontext()
        with marks, torch.profiler.profile(activities=activities) as prof:
            trainer.train_step()
            if device == "cuda":
                torch.cuda.synchronize()
        del nca.run
    events = list(prof.events())
    by_op = _count_cuda(events) if device == "cuda" else _count_cpu(events) + triton_counts
    triton = sum(v for k, v in by_op.items() if k.startswith("triton::"))
    aten = sum(v for k, v in by_op.items() if not k.startswith("triton::"))
    return {"triton": triton, "aten": aten, "total": triton + aten, "by_op": dict(by_op.most_common()),
            "steps": sum(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-execute", action="store_true",
                        help="CPU: count Triton launches without running them in the interpreter (same count)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set state_channels=32")
    args = parser.parse_args(argv)
    from fastnca.config import parse_value

    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        overrides[key] = parse_value(key, text)
    res = count_training_launches(args.preset, device=args.device, overrides=overrides,
                                  execute=not args.no_execute)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.preset} on {args.device}: {res['total']} launches per training iteration "
          f"({res['triton']} Triton, {res['aten']} ATen) over {res['steps']} NCA steps")
    for name, n in list(res["by_op"].items())[:25]:
        print(f"  {n:6d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
