"""The compilation counter and the forbid_compilation() guard."""

import jax
import numpy as np
import pytest

from jaxserve.testing.compilation import CompilationCounter, CompilationError, forbid_compilation


def test_counter_counts_each_new_shape_once():
    f = jax.jit(lambda x: x * 3 + 1)
    five, six = np.ones(5, np.float32), np.ones(6, np.float32)
    counter = CompilationCounter()
    try:
        with counter.track():
            f(five), f(five), f(six)
    finally:
        counter.close()
    assert counter.count == 2


def test_counter_ignores_compilations_outside_its_track_block():
    g = jax.jit(lambda x: x / 5)
    mine, other = CompilationCounter(), CompilationCounter()
    try:
        with mine.track():
            g(np.ones(7, np.float32))
        g(np.ones(8, np.float32))
    finally:
        mine.close(), other.close()
    assert (mine.count, other.count) == (1, 0)


def test_forbid_compilation_allows_cached_calls_and_rejects_new_shapes():
    f = jax.jit(lambda x: x - 2)
    f(np.ones(3))
    with forbid_compilation():
        f(np.ones(3))
    with pytest.raises(CompilationError, match="inside forbid_compilation"):
        with forbid_compilation():
            f(np.ones(4))
