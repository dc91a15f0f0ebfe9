"""Root pytest set-up: the ``--benchmark`` switch.

Plain ``pytest`` collects tests/ only (pyproject's testpaths) and runs no benchmark. ``pytest
--benchmark`` runs the benchmark suite in benchmarks/ instead of tests/ when no path is given; the
pytest-benchmark flags (``--benchmark-json``, ...) work as usual. Without ``--benchmark``,
benchmarks named explicitly (``pytest benchmarks/``) are skipped, with the reason.
"""
from pathlib import Path

import pytest

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
