"""Population statistics: the running state of a batch-norm layer and its update rules.

The state is a :class:`BatchStats` pytree of per-feature arrays (float32, or the
statistics dtype of the input):

* ``mean``: the population mean used at inference;
* ``var``: the population variance used at inference; its meaning depends on
  the estimator (see below);
* ``count``: total number of valid elements seen since the last reset;
* ``batches``: number of batches (with at least one valid element) seen since
  the last reset.

Two estimators (the static option ``population=``):

``"ema"`` (the default; what flax, haiku, Keras and PyTorch do)
    ``mean <- momentum * mean + (1 - momentum) * mu_B`` and the same for ``var``
    with the *biased* batch variance ``sigma2_B`` (flax's convention, so flax
    checkpoints stay valid). ``count`` and ``batches`` are informational.

``"average"`` (the paper's Algorithm 2)
    An exact running average over every batch since the last reset:
    ``mean = sum_B n_B mu_B / sum_B n_B`` (``E_B[mu_B]``, weighted by element
    counts so unequal and masked batches are handled exactly) and ``var`` the
    pooled *unbiased* within-batch variance
    ``sum_B n_B sigma2_B / sum_B (n_B - 1)``, which for equal batch sizes ``m``
    is exactly the paper's ``m / (m - 1) * E_B[sigma2_B]``. ``n_B`` is the
    batch's element count per feature (batch times spatial positions for a
    convolution, the paper's ``m' = m p q``).

A batch with no valid element for a feature leaves that feature's state as it
was (no NaN, nothing lost).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnjax.stats import Moments

__all__ = ["BatchStats", "POPULATION_ESTIMATORS", "update", "reset_population"]

Array = jax.Array

POPULATION_ESTIMATORS = ("ema", "average")


class BatchStats(NamedTuple):
    """Running (population) statistics of one batch-norm layer, per feature."""

    mean: Array
    var: Array
    count: Array
    batches: Array


def update(state: BatchStats, batch: Moments, *, estimator: str, momentum: float) -> BatchStats:
    """Folds one batch's moments (feature-shaped) into the population statistics.

    Args:
      state: the current :class:`BatchStats`.
      batch: the batch's :class:`~bnjax.stats.Moments`, with the state's shape.
      estimator: ``"ema"`` or ``"average"`` (see the module docstring).
      momentum: the EMA momentum (ignored by ``"average"``).

    Returns:
      The new :class:`BatchStats`, in the state's dtypes.
    """
    n = batch.count.astype(state.count.dtype)
    seen = n > 0
    count = state.count + n
    batches = state.batches + seen.astype(state.batches.dtype)
    if estimator == "ema":
        mean = momentum * state.mean + (1 - momentum) * batch.mean
        var = momentum * state.var + (1 - momentum) * batch.var()
    elif estimator == "average":
        safe_count = jnp.where(count > 0, count, 1)
        mean = state.mean + (batch.mean - state.mean) * (n / safe_count)
        dof_old = state.count - state.batches
        dof = dof_old + jnp.maximum(n - 1, 0)
        var = (state.var * dof_old + batch.m2) / jnp.where(dof > 0, dof, 1)
        var = jnp.where(dof > 0, var, state.var)
    else:
        raise ValueError(
            f"population must be one of {POPULATION_ESTIMATORS}, got {estimator!r}"
        )
    mean = jnp.where(seen, mean, state.mean).astype(state.mean.dtype)
    var = jnp.where(seen, var, state.var).astype(state.var.dtype)
    return BatchStats(mean, var, count, batches)


def reset_population(state: BatchStats, where: bool | Array = True) -> BatchStats:
    """Starts a fresh population average: zeroes ``count`` and ``batches``.

    The mean and variance are kept until the next batch replaces them (in
    ``"average"`` mode the old values get weight zero). ``where`` may be a traced
    boolean, so this works inside ``jit`` (for example every K steps).
    """
    where = jnp.asarray(where)
    zero = lambda a: jnp.where(where, jnp.zeros_like(a), a)
    return state._replace(count=zero(state.count), batches=zero(state.batches))
