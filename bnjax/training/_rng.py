"""The keys derived from a :class:`~bnjax.training.TrainState`'s `rng` (private).

The data order and the per-step randomness are `fold_in`s of one raw key, never
splits, so they depend only on `(rng, step)`: a resumed run sees exactly the
batches of an uninterrupted one, on one process or many.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DATA_STREAM = 0x0DA7A  # fold_in tag: the data-order key of a state's rng


def raw_key(key: Array) -> Array:
    """`key` as a raw key array (`uint32[2]` for the default PRNG; typed keys unwrapped)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key)


def data_key(rng: Array) -> Array:
    """The key of a state's data order (:mod:`bnjax.training.data_order`)."""
    return jax.random.fold_in(rng, DATA_STREAM)
