"""Population statistics: the running state of a batch-norm layer and its update rules.

The state is a :class:`BatchStats` pytree of per-feature arrays (float32, or the
statistics dtype of the input):

* `mean`: the population mean used at inference;
* `var`: the population variance used at inference; its meaning depends on
  the estimator (see below);
* `count`: total number of valid elements seen since the last reset;
* `batches`: number of batches (with at least one valid element) seen since
  the last reset.

Three estimators (the static option `population=`, :data:`Population`):

* `"ema"` (the default; what flax, haiku, Keras and PyTorch do):
  `mean <- momentum * mean + (1 - momentum) * mu_B` and the same for `var`
  with the *biased* batch variance `sigma2_B` (flax's convention, so flax
  checkpoints stay valid). `count` and `batches` are informational. With
  `variance="unbiased"` the batch variance folded in is `n_B / (n_B - 1)
  sigma2_B` instead (PyTorch's `running_var`; with PyTorch's `momentum=0.1`
  being `momentum=0.9` here).

* `"cumulative"` (PyTorch's `momentum=None`):
  The unweighted average of the batch means, `mean <- mean + (mu_B - mean) / k`
  with `k` the updated `batches` counter (PyTorch's `num_batches_tracked`),
  and the same for `var` with the batch variance (biased, or unbiased with
  `variance="unbiased"` as PyTorch). It differs from `"average"` only for
  unequal batch sizes: every batch weighs the same, however many elements it
  has, where `"average"` weighs batches by their element counts and pools
  the variance over the degrees of freedom.

* `"average"` (the paper's Algorithm 2):
  An exact running average over every batch since the last reset:
  `mean = sum_B n_B mu_B / sum_B n_B` (`E_B[mu_B]`, weighted by element
  counts so unequal and masked batches are handled exactly) and `var` the
  pooled *unbiased* within-batch variance
  `sum_B n_B sigma2_B / sum_B (n_B - 1)`, which for equal batch sizes `m`
  is exactly the paper's `m / (m - 1) * E_B[sigma2_B]` (always unbiased:
  `variance=` does not apply). `n_B` is the
  batch's element count per feature (batch times spatial positions for a
  convolution, the paper's `m' = m p q`).

A batch with no valid element for a feature leaves that feature's state as it
was (no NaN, nothing lost).

Complex inputs: `mean` is complex and `var` real (`E|x - mu|^2`), flax's
convention. A real (float32) `mean`, as made by :func:`init_stats` and by
`flax.linen.BatchNorm`, turns complex at the first complex batch;
`bnjax.linen.BatchNorm` creates it complex from the start when it is
initialized on a complex input (so its type never changes inside a `jit` loop).

Batch Renormalization (`BatchNormConfig(renorm=...)`) keeps the same four
statistics plus an integer step counter, in a :class:`RenormStats`: a separate
type rather than an optional fifth field of :class:`BatchStats`, so that plain
batch norm's pytrees (and checkpoints written with `flax.serialization`, which
compares field names) stay exactly as they were. :class:`RenormStats` has the
four fields of :class:`BatchStats` first, under the same names, so everything
that reads `mean`/`var`/`count`/`batches` (:func:`update`,
:func:`reset_population`, inference, folding) takes either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from bnjax._sharding import like_sharding
from bnjax.stats import Moments

__all__ = [
    "BatchStats",
    "POPULATIONS",
    "Population",
    "VARIANCES",
    "Variance",
    "RenormStats",
    "init_stats",
    "renorm_stats",
    "reset_population",
    "update",
]

Array = jax.Array

Population = Literal["ema", "average", "cumulative"]
POPULATIONS: tuple[str, ...] = get_args(Population)
Variance = Literal["biased", "unbiased"]
VARIANCES: tuple[str, ...] = get_args(Variance)


class BatchStats(NamedTuple):
    """Running (population) statistics of one batch-norm layer, per feature."""

    mean: Array
    var: Array
    count: Array
    batches: Array


class RenormStats(NamedTuple):
    """:class:`BatchStats` plus the step counter of a Batch Renormalization layer.

    Attributes:
      mean: as in :class:`BatchStats` (per feature).
      var: as in :class:`BatchStats` (per feature).
      count: as in :class:`BatchStats` (per feature).
      batches: as in :class:`BatchStats` (per feature).
      steps: int32 scalar, the number of training calls (`apply_train`) made
        with this state; the warm-up and the `r_max`/`d_max` schedules are
        evaluated at this stored value, before it is incremented.
    """

    mean: Array
    var: Array
    count: Array
    batches: Array
    steps: Array

    @property
    def batch_stats(self) -> BatchStats:
        """The four population statistics, without the step counter."""
        return BatchStats(self.mean, self.var, self.count, self.batches)


def init_stats(feature_shape: int | Sequence[int], dtype=jnp.float32) -> BatchStats:
    """Fresh population statistics: mean 0, var 1, count 0 (flax's initial values)."""
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return BatchStats(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros(shape, dtype),
        batches=jnp.zeros(shape, dtype),
    )


def renorm_stats(state: BatchStats | RenormStats, steps: int | Array = 0) -> RenormStats:
    """`state` with a step counter (int32 scalar `steps`), e.g. to start Batch
    Renormalization from the statistics of a trained batch-norm layer.

    `steps=0` starts the warm-up (and the `r_max`/`d_max` schedules) from the
    beginning; pass the number of steps already done to skip it. A
    :class:`RenormStats` gets its counter replaced.
    """
    steps = jnp.asarray(steps)
    if steps.ndim != 0 or not jnp.issubdtype(steps.dtype, jnp.integer):
        raise ValueError(f"steps must be an integer scalar, got {steps!r}")
    return RenormStats(state.mean, state.var, state.count, state.batches, steps.astype(jnp.int32))


def update(
    state: BatchStats,
    batch: Moments,
    *,
    population: Population,
    momentum: float,
    variance: Variance = "biased",
) -> BatchStats:
    """Folds one batch's moments (feature-shaped) into the population statistics.

    Args:
      state: the current :class:`BatchStats`.
      batch: the batch's :class:`~bnjax.stats.Moments`, with the state's shape.
      population: `"ema"`, `"average"` or `"cumulative"` (see the module
        docstring).
      momentum: the EMA momentum (used by `"ema"` only).
      variance: the batch variance `"ema"` and `"cumulative"` fold in:
        `"biased"` (`sigma2_B`, flax) or `"unbiased"` (`n_B / (n_B - 1)
        sigma2_B`, PyTorch; a feature with one valid element keeps its `var`).

    Returns:
      The new :class:`BatchStats`, in the state's dtypes; except that a complex
      batch mean makes a real `mean` complex (`var` stays real: for complex
      inputs it is the variance `E|x - mu|^2`).
    """
    # (explicit-axis meshes: the stored statistics take the batch's feature sharding)
    state = BatchStats(*(like_sharding(a, batch.mean) for a in state[:4]))
    batch = Moments(*(like_sharding(a, batch.mean) for a in batch))
    n = batch.count.astype(state.count.dtype)
    seen = n > 0
    count = state.count + n
    batches = state.batches + seen.astype(state.batches.dtype)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if population in ("ema", "cumulative"):
        if variance == "unbiased":  # PyTorch's running_var: m2 / (n - 1)
            var_ok = n > 1
            batch_var = batch.m2 / jnp.where(var_ok, n - 1, 1)
        else:
            var_ok, batch_var = seen, batch.var()
        if population == "ema":
            w_old, w_new = momentum, 1 - momentum
        else:  # PyTorch's momentum=None: factor 1 / num_batches_tracked (after the increment)
            w_new = 1 / jnp.where(seen, batches, 1)
            w_old = 1 - w_new
        mean = w_old * state.mean + w_new * batch.mean
        var = w_old * state.var + w_new * batch_var
    elif population == "average":
        var_ok = seen
        safe_count = jnp.where(count > 0, count, 1)
        mean = state.mean + (batch.mean - state.mean) * (n / safe_count)
        dof_old = state.count - state.batches
        dof = dof_old + jnp.maximum(n - 1, 0)
        var = (state.var * dof_old + batch.m2) / jnp.where(dof > 0, dof, 1)
        var = jnp.where(dof > 0, var, state.var)
    else:
        raise ValueError(
            f"population must be one of {POPULATIONS}, got {population!r}"
        )
    mean_dtype = state.mean.dtype
    if jnp.iscomplexobj(batch.mean) and not jnp.iscomplexobj(state.mean):
        # A complex batch turns a real stored mean complex (flax does the same:
        # its float32 mean becomes complex64 after the first complex batch).
        mean_dtype = jnp.promote_types(mean_dtype, batch.mean.dtype)
    mean = jnp.where(seen, mean, state.mean).astype(mean_dtype)
    var = jnp.where(var_ok, var, state.var).astype(state.var.dtype)
    return BatchStats(mean, var, count, batches)


def reset_population(state: BatchStats, where: bool | Array = True) -> BatchStats:
    """Starts a fresh population average: zeroes `count` and `batches`.

    The mean and variance are kept until the next batch replaces them (in
    `"average"` mode the old values get weight zero). `where` may be a traced
    boolean, so this works inside `jit` (for example every K steps).
    """
    where = jnp.asarray(where)
    zero = lambda a: jnp.where(where, jnp.zeros_like(a), a)
    return state._replace(count=zero(state.count), batches=zero(state.batches))
