"""Sample links: step N+1's input id for a token step N is still sampling on the device."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.runner.sample_links import (is_sample_link, link_to_sample, linked_sample,
                                          resolve_sample_links)


def test_links_round_trip_and_never_collide_with_vocabulary_ids():
    assert [link_to_sample(i) for i in range(3)] == [-1, -2, -3]
    assert [linked_sample(link_to_sample(i)) for i in range(5)] == list(range(5))
    index = np.arange(8, dtype=np.int32)
    links = link_to_sample(index)
    assert links.dtype == np.int32 and is_sample_link(links).all()
    np.testing.assert_array_equal(linked_sample(links), index)
    assert not is_sample_link(np.array([0, 1, 151_935], np.int32)).any()


def test_forward_resolves_links_from_the_previous_steps_padded_samples():
    previous_ids = jnp.asarray([40, 41, 42, 0, 0, 0, 0, 0], jnp.int32)  # [R] N's, padded
    input_ids = np.array([7, link_to_sample(2), 9, link_to_sample(0), 0], np.int32)  # [T]
    resolved = jax.jit(resolve_sample_links)(jnp.asarray(input_ids), previous_ids)
    assert resolved.dtype == jnp.int32
    np.testing.assert_array_equal(resolved, [7, 42, 9, 40, 0])
    no_step = jnp.zeros(8, jnp.int32)  # no step in flight: ids pass through
    np.testing.assert_array_equal(resolve_sample_links(jnp.asarray([3, 0, 5]), no_step),
                                  [3, 0, 5])
