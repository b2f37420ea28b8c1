"""The train state: everything that changes during training, as one pytree.

* :class:`TrainState`: `step`, `params`, `batch_stats`, `opt_state`,
  `rng` (a flax `struct` pytree: jit-, vmap- and checkpoint-friendly).
* :func:`create_train_state` makes one; :func:`create_train_states` one per
  seed, stacked on a leading "seed" axis; :func:`state_from_variables` one from
  initialized flax variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bnjax.training._rng import raw_key

__all__ = [
    "TrainState",
    "create_train_state",
    "create_train_states",
    "cross_entropy_loss",
    "state_from_variables",
]

Array = jax.Array
PyTree = Any


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: int32 scalar, steps taken (`(seeds,)` when stacked over seeds).
      params: the model's `"params"` collection.
      batch_stats: the model's `"batch_stats"` collection (`{}` without BN).
      opt_state: the optax state.
      rng: a raw `uint32[2]` PRNG key; the data order and any per-step
        randomness (`"dropout"`) are derived from it by `fold_in`, never by
        splitting, so they depend only on `(rng, step)`.
    """

    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: Array

    def variables(self) -> dict[str, PyTree]:
        """`{"params": ..., "batch_stats": ...}` for `model.apply` (no empty collections)."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def cross_entropy_loss(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy; `logits (B, C)`, integer `labels (B,)` -> scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: Array, sample_input: Array
) -> TrainState:
    """A fresh :class:`TrainState` for one seed.

    Args:
      model: a flax module called as `model(x, train=...)`.
      tx: the optax optimizer.
      rng: a raw PRNG key (`jax.random.PRNGKey(seed)`); the parameters are
        initialized from `fold_in(rng, 1)`, `rng` itself is kept for the data order.
      sample_input: an input batch with the training shapes (e.g. `x[:1]`).
    """
    variables = model.init(jax.random.fold_in(rng, 1), sample_input, train=False)
    return state_from_variables(variables, tx, rng)


def state_from_variables(
    variables: Mapping[str, PyTree], tx: optax.GradientTransformation, rng: Array
) -> TrainState:
    """A :class:`TrainState` at step 0 from initialized flax `variables` (fresh optimizer).

    `rng` is a raw (`jax.random.PRNGKey`) or typed (`jax.random.key`) key,
    stored raw.
    """
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=raw_key(jnp.asarray(rng)),
    )


def create_train_states(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seeds: Sequence[int] | Array,
    sample_input: Array,
) -> TrainState:
    """One :class:`TrainState` per seed, stacked: every leaf gets a leading axis `len(seeds)`.

    Seed `s` uses `jax.random.PRNGKey(s)`; two models with the same
    parameter shapes get the same initial weights and the same data order for
    the same seed (a paired comparison).

    Example:

    ```python
    states = create_train_states(MLP(), optax.sgd(1.0), seeds=[0, 1, 2], sample_input=x[:1])
    states.step.shape   # (3,)
    ```
    """
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda k: create_train_state(model, tx, k, sample_input))(keys)

