"""Compile every Triton kernel a job will launch up front, in parallel worker processes, into Triton's cache.

A training run launches a few dozen distinct kernels (one per tile, flag and precision the rollout meets); each
takes seconds to compile, and by default the first training step compiles them one after the other. This module
does it before the first step::

    report = precompile(job, target)   # job(): e.g. one training iteration of a throw-away copy of the model

1. **record**: ``job()`` runs with every Triton launch recorded and skipped (``JITFunction.run`` and the
   interpreter's ``InterpretedFunction.run`` are patched for the duration; nothing is compiled or executed, so the
   job's outputs are meaningless): which kernel, its arguments (a tensor as its dtype and its address modulo 16,
   which is all Triton specialises on), constexprs and launch options.
2. **compile** in ``workers`` child processes (``python -m fastnca.kernels.warmup --worker``; no GPU needed there,
   and nothing of the caller's script is imported again): each launch is specialised exactly as the
   runtime would for the target (Triton's own argument binder and packing), and compiled with ``triton.compile``
   where Triton's on-disk cache does not have it yet. Launches that specialise alike are compiled once.
3. The job's real launches then find every kernel in the cache: the first step loads them instead of compiling.
   A second run (or a second process) finds everything cached and compiles nothing.

The record / compile split is internal to Triton's JIT (its binder, ``_pack_args`` and cache key), which has been
stable from Triton 3.2 through 3.8; :func:`precompile` reports what it could not compile instead of failing the run
(those kernels are then compiled at their first launch, as without a warm-up).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import env_without_interpreter, interpreter_on

__all__ = ["Launch", "Pointer", "Report", "compile_launch", "load_launches", "precompile", "record_launches",
           "save_launches", "target_of"]


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton specialises it: its dtype and its address modulo 16 (16-byte alignment)."""

    dtype: torch.dtype
    offset: int  # data_ptr() % 16

    def data_ptr(self) -> int:
        return 1024 + self.offset  # any address with the same alignment

    @staticmethod
    def of(t: torch.Tensor) -> Pointer:
        return Pointer(t.dtype, t.data_ptr() % 16)


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel (``module:qualname``), its positional and keyword arguments (tensors as
    :class:`Pointer`), in a form that pickles to a worker process."""

    kernel: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    constexprs: frozenset[str] = frozenset()  # the kernel's constexpr parameters

    def dedupe_key(self) -> tuple[Any, ...]:
        """What Triton's specialisation can depend on: pointers' dtypes and alignment; for a runtime integer,
        whether it is 1, divisible by 16 and fits 32 bits; constexprs, options and everything else as they are."""
        def key(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, int):
                return v
            return ("int", v == 1, v % 16 == 0, -(2**31) <= v < 2**31)

        return (self.kernel, tuple(key(a) for a in self.args),
                tuple((k, v if k in self.constexprs else key(v)) for k, v in self.kwargs))


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return Pointer.of(v)
    return v


def _kernel_name(fn: Any) -> str:
    inner = getattr(fn, "fn", fn)  # a JITFunction's or an InterpretedFunction's Python function
    return f"{inner.__module__}:{inner.__qualname__}"


def _constexpr_names(fn: Any) -> frozenset[str]:
    """The parameters annotated ``tl.constexpr`` (as an object, or as a string under postponed annotations)."""
    import inspect

    inner = getattr(fn, "fn", fn)
    names = set()
    for name, param in inspect.signature(inner).parameters.items():
        ann = param.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann)):
            names.add(name)
    return frozenset(names)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, every Triton launch is appended to the yielded list and **not run** (nothing compiles).

    In the interpreter (``TRITON_INTERPRET=1``) the launches carry the interpreter's tiles and bf16 emulation; inside
    ``tiles.as_compiled()`` too they carry the GPU's, so a CPU records what a GPU run compiles::

        with tiles.as_compiled(), record_launches() as launches:
            job()
    """
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every Triton release this project supports has the interpreter
        pass
    launches: list[Launch] = []

    def recorder(self: Any, *args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any) -> None:
        launches.append(Launch(_kernel_name(self), tuple(_describe(a) for a in args),
                               tuple(sorted((k, _describe(v)) for k, v in kwargs.items())), _constexpr_names(self)))
        return None

    saved = [(cls, cls.__dict__["run"]) for cls in classes]
    try:
        for cls, _ in saved:
            cls.run = recorder
        yield launches
    finally:
        for cls, run in saved:
            cls.run = run


def target_of(device: torch.device | None = None) -> dict[str, Any]:
    """The compile target of a CUDA ``device`` (``GPUTarget`` as a dict: backend, arch, warp size)."""
    from triton.runtime import driver

    if device is not None:
        with torch.cuda.device(device):
            target = driver.active.get_current_target()
    else:
        target = driver.active.get_current_target()
    return {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size}


def _jit_function(kernel: str) -> Any:
    import importlib

    module, qualname = kernel.split(":")
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn


def _specialise(launch: Launch, target: dict[str, Any]) -> tuple[Any, Any, str, bool]:
    """``launch`` as its runtime would compile it for ``target``: (ASTSource, options, Triton's cache key hash,
    whether the cache holds it already). Needs real JIT functions (no ``TRITON_INTERPRET``)."""
    import hashlib

    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key, get_cache_manager
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    backend = make_backend(GPUTarget(**target))
    kwargs = dict(launch.kwargs)
    # as JITFunction.run completes the options before it binds the arguments
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    # triton.compile's own cache key and lookup
    opts = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    key = get_cache_key(src, backend, opts, env_vars=get_cache_invalidating_env_vars())
    key = hashlib.sha256(key.encode("utf-8")).hexdigest()
    name = f"{src.name[:150]}.json"
    cached = (get_cache_manager(key).get_group(name) or {}).get(name) is not None
    return src, options, key, cached


def compile_launch(launch: Launch, target: dict[str, Any]) -> tuple[str, bool, float]:
    """Compile ``launch`` for ``target`` into Triton's cache as its runtime would (in a process without
    ``TRITON_INTERPRET``). Returns (Triton's cache key hash, whether it was cached already, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    src, options, key, cached = _specialise(launch, target)
    if not cached:
        triton.compile(src, target=GPUTarget(**target), options=options.__dict__)
    return key, cached, time.perf_counter() - t0


def _compile_fn(name: str) -> Callable[[Launch, dict[str, Any]], tuple[str, bool, float]]:
    import importlib

    module, attr = name.split(":")
    return getattr(importlib.import_module(module), attr)


def _worker_main() -> None:
    """``python -m fastnca.kernels.warmup --worker``: read (compile function, target, [(index, launch)]) as a pickle
    on stdin, compile each, write one line per launch: ``index`` and its pickled result or error, hex-encoded."""
    import pickle
    import sys

    name, target, tasks = pickle.load(sys.stdin.buffer)
    compile_one = _compile_fn(name)
    for index, launch in tasks:
        try:
            result: Any = compile_one(launch, target)
        except Exception as err:  # noqa: BLE001 - reported to the parent
            result = RuntimeError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        sys.stdout.write(f"{index} {pickle.dumps(result).hex()}\n")
        sys.stdout.flush()


def _run_workers(tasks: list[Launch], target: dict[str, Any], workers: int, compile_name: str,
                 done: Callable[[Launch, Any], None]) -> None:
    """Compile ``tasks`` in ``workers`` child processes (``python -m fastnca.kernels.warmup --worker``, without
    TRITON_INTERPRET), round-robin; ``done(launch, result or exception)`` as each finishes."""
    import pickle
    import selectors
    import subprocess
    import sys

    env = env_without_interpreter()
    selector = selectors.DefaultSelector()
    procs = []
    for w in range(workers):
        chunk = [(i, tasks[i]) for i in range(w, len(tasks), workers)]
        if not chunk:
            continue
        proc = subprocess.Popen([sys.executable, "-m", "fastnca.kernels.warmup", "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdin.write(pickle.dumps((compile_name, target, chunk)))
        proc.stdin.close()
        selector.register(proc.stdout, selectors.EVENT_READ, (proc, {i for i, _ in chunk}))
        procs.append(proc)
    while selector.get_map():
        for key, _ in selector.select():
            proc, pending = key.data
            line = key.fileobj.readline()
            if line:
                index, blob = line.decode().split()
                pending.discard(int(index))
                done(tasks[int(index)], pickle.loads(bytes.fromhex(blob)))
                continue
            selector.unregister(key.fileobj)
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            proc.wait()
            for index in sorted(pending):  # a worker that died: its remaining launches are reported as failed
                done(tasks[index], RuntimeError(f"compile worker exited with {proc.returncode}: "
                                                f"{err[-1] if err else 'no message'}"))


@dataclass
class Report:
    """What :func:`precompile` did: distinct kernels, how many were cached already, compiled, failed, seconds."""

    kernels: int = 0
    cached: int = 0
    compiled: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    launches: int = 0

    def line(self, what: str = "") -> str:
        fail = f", {len(self.failed)} failed (compiled at their first launch instead)" if self.failed else ""
        where = f" for {what}" if what else ""
        return (f"compiled {self.compiled} of {self.kernels} kernels{where} in {self.seconds:.1f} s "
                f"({self.cached} cached, {self.workers} workers){fail}")


def default_workers() -> int:
    """Compile processes: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def precompile(
    job: Callable[[], Any] | list[Launch],
    target: dict[str, Any],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    compile_fn: Callable[[Launch, dict[str, Any]], tuple[str, bool, float]] = compile_launch,
) -> Report:
    """Record the launches of ``job`` (or take them) and compile the distinct ones for ``target`` in parallel.

    Args:
        job: runs the work to be compiled (its launches are skipped, its results meaningless), or launches already
            recorded.
        target: :func:`target_of` a device (``{"backend": "cuda", "arch": 90, "warp_size": 32}`` for an H100).
        workers: compile processes (default :func:`default_workers`); 0 compiles in this process.
        progress: called as ``progress(done, total)`` after each kernel.
        compile_fn: compiles one launch (tests pass a stand-in): a module-level function, which the workers import
            by name.

    Returns:
        A :class:`Report`; a kernel that fails to compile here is listed in ``failed``, not raised (its first launch
        compiles it, and raises there if it must).
    """
    t0 = time.perf_counter()
    if callable(job):
        with record_launches() as launches:
            job()
    else:
        launches = list(job)
    distinct = list({launch.dedupe_key(): launch for launch in launches}.values())
    workers = default_workers() if workers is None else workers
    report = Report(kernels=len(distinct), launches=len(launches))
    keys: set[str] = set()

    def done(launch: Launch, result: tuple[str, bool, float] | BaseException) -> None:
        if isinstance(result, BaseException):
            report.failed.append(f"{launch.kernel}: {type(result).__name__}: {str(result).splitlines()[0][:200]}")
        else:
            key, cached, _ = result
            if key not in keys:  # two launches Triton specialises alike: one kernel
                keys.add(key)
                report.cached += cached
                report.compiled += not cached
        if progress is not None:
            progress(len(keys) + len(report.failed), len(distinct))

    todo = distinct
    if compile_fn is compile_launch and not interpreter_on():
        # this process has real JIT functions: what the cache holds already needs no worker
        todo = []
        for launch in distinct:
            try:
                _, _, key, cached = _specialise(launch, target)
            except Exception:  # noqa: BLE001 - a worker tries again and reports it
                todo.append(launch)
                continue
            if cached:
                done(launch, (key, True, 0.0))
            else:
                todo.append(launch)
    report.workers = min(workers, len(todo))
    if workers == 0:
        for launch in todo:
            try:
                done(launch, compile_fn(launch, target))
            except Exception as err:  # noqa: BLE001 - reported, the first launch compiles it again
                done(launch, err)
    elif todo:
        name = f"{compile_fn.__module__}:{compile_fn.__qualname__}"
        _run_workers(todo, target, report.workers, name, done)
    report.kernels = len(keys) + len(report.failed)
    report.seconds = time.perf_counter() - t0
    return report


def save_launches(launches: list[Launch], path: str | os.PathLike[str]) -> None:
    """Write recorded launches (a pickle: Pointer and Launch hold only dtypes, numbers and strings)."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump(list(launches), f)


def load_launches(path: str | os.PathLike[str]) -> list[Launch]:
    """Read what :func:`save_launches` wrote (only ever a file this process's tools wrote: it is a pickle)."""
    import pickle

    with open(path, "rb") as f:
        return list(pickle.load(f))


def main(argv: list[str] | None = None) -> int:
    """``python -m fastnca.kernels.warmup --compile FILE... [--workers N]``: compile the launches recorded in the
    files for this machine's GPU, in parallel (``--worker``: one compile worker, used by :func:`precompile`)."""
    import argparse
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--worker"]:
        _worker_main()
        return 0
    p = argparse.ArgumentParser(prog="python -m fastnca.kernels.warmup", description=main.__doc__.split("\n")[0])
    p.add_argument("--compile", nargs="+", required=True, metavar="FILE", help="recorded launches (save_launches)")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPUs, at most 16)")
    p.add_argument("--arch", type=int, default=None, help="compile for this CUDA arch (e.g. 90) instead of the GPU's")
    p.add_argument("--max-kernels", type=int, default=None, help="compile only the first N distinct kernels (a "
                   "code-path check on a machine without a GPU)")
    a = p.parse_args(args)
    launches = [launch for path in a.compile for launch in load_launches(path)]
    recorded = len(launches)
    if a.max_kernels is not None:
        launches = list({launch.dedupe_key(): launch for launch in launches}.values())[: a.max_kernels]
    target = {"backend": "cuda", "arch": a.arch, "warp_size": 32} if a.arch else target_of()
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 5 or done == total:
            last[0] = time.perf_counter()
            print(f"warmup: {done}/{total} kernels, {time.perf_counter() - t0:.0f} s", flush=True)

    report = precompile(launches, target, workers=a.workers, progress=progress)
    arch = f"sm_{target['arch']}"
    print(f"warmup: {report.line(arch)} ({recorded} launches recorded)")
    for failure in report.failed:
        print(f"warmup: not compiled: {failure}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
