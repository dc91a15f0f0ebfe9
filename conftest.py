"""Root pytest set-up: the ``--benchmark`` switch, and room on the interpreter's frame stack.

Plain ``pytest`` collects tests/ only (pyproject's testpaths) and runs no benchmark. ``pytest
--benchmark`` runs the benchmark suite in benchmarks/ instead of tests/ when no path is given; the
pytest-benchmark flags (``--benchmark-json``, ...) work as usual. Without ``--benchmark``,
benchmarks named explicitly (``pytest benchmarks/``) are skipped, with the reason.
"""
import types
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suite in benchmarks/ (see benchmarks/__init__.py)")


def pytest_configure(config):
    """No path on the command line (pytest took testpaths, or the current directory):
    benchmarks/."""
    if config.getoption("benchmark") and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(BENCHMARKS)]


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest --benchmark`")
    for item in items:
        if BENCHMARKS in Path(item.path).parents:
            item.add_marker(skip)


def _call(function):
    return function()


# CPython (3.11 at least) keeps frames on a per-thread stack of chunks and frees a chunk as soon as
# the frame at its base returns, so a hot call path that dips across a chunk boundary maps, faults
# in and unmaps a fresh chunk on every crossing. Triton's interpreter calls deep in tight loops, and
# pytest's own frames put that dip on a boundary: measured on 2 cores, a 2-step interpreted CLI run
# took 16 s with 2.6 million page faults under pytest and 8 s with 0.07 million run directly. A test
# run from a frame that reserves 256 KB of stack slots (its code's stack size; they stay unused)
# starts a chunk of 512 KB, so everything it calls stays inside that chunk.
_call_with_room = types.FunctionType(
    _call.__code__.replace(co_stacksize=_call.__code__.co_stacksize + 32768), {})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """pytest's own protocol (set-up, call, teardown and their reports) in _call_with_room."""
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    _call_with_room(lambda: runtestprotocol(item, nextitem=nextitem))
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
