"""A pytest plugin that records the Triton launches of every test instead of running them.

    python -m pytest tests/kernels -p benchmarks.record_plugin --record-launches OUT.pkl

Each test function runs inside ``fastnca.kernels.warmup.record_launches`` (no kernel is compiled or launched, so
its assertions are meaningless and their outcome is discarded: every test reports as passed), and the launches of
the whole session are written to ``OUT.pkl`` at the end. ``python -m fastnca.kernels.warmup --compile OUT.pkl``
then compiles them all in parallel into Triton's cache, so the real test run that follows loads instead of
compiling (benchmarks/gpu_check.sh's compile pass).
"""

from __future__ import annotations

import pytest

_LAUNCHES: list = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-launches", default=None, metavar="FILE",
                     help="record every test's Triton launches into FILE instead of running them")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not pyfuncitem.config.getoption("--record-launches"):
        return None
    from fastnca.kernels.warmup import record_launches

    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    with record_launches() as launches:
        try:
            pyfuncitem.obj(**args)
        except Exception:  # noqa: BLE001 - the recorded outputs are meaningless; only the launches count
            pass
    _LAUNCHES.extend(launches)
    return True


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--record-launches")
    if path:
        from fastnca.kernels.warmup import save_launches

        save_launches(_LAUNCHES, path)
