"""Fixtures of the benchmark tests: the benchmark scripts as modules (benchmarks/ is not a
package; its scripts import each other by name, so it goes on sys.path while they load)."""

import importlib
import pathlib
import sys
import types

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def import_benchmarks():
    """`import_benchmarks(*names)`: a namespace of those benchmarks/ modules by name; every
    module they loaded is unloaded and benchmarks/ leaves sys.path after the test module."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))

    def load(*names: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(**{n: importlib.import_module(n) for n in names})

    try:
        yield load
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in set(sys.modules) - before:
            if (BENCHMARKS / f"{name}.py").is_file():
                sys.modules.pop(name)
