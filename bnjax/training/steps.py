"""One compiled-ready train step and one eval step of a flax model with batch norm.

* :func:`make_train_step`: `(state, x, y) -> (state, metrics)`, batch norm in
  training mode (Algorithm 1) and its population statistics updated; the same
  step per device for data parallelism (`axis_name`).
* :func:`make_eval_step`: accuracy / loss in inference mode (population
  statistics, Algorithm 2) on a whole evaluation set, plus optional probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax.training.state import TrainState, cross_entropy_loss

__all__ = ["LossFn", "StepProbe", "make_eval_step", "make_train_step"]

Array = jax.Array
PyTree = Any
LossFn = Callable[[Array, Array], Array]
StepProbe = Callable[..., dict[str, Array]]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy_loss,
    *,
    probe: StepProbe | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """One training step `(state, x, y) -> (new_state, {"loss", "accuracy"})` (pure, not jitted).

    Batch norm runs in training mode (mini-batch statistics, Algorithm 1) and
    its population statistics are updated; `loss_fn(logits, y)` is
    differentiated w.r.t. `state.params`; the per-step `"dropout"` key is
    `fold_in(state.rng, state.step)`.

    `probe`: optional `probe(params=, grads=, updates=, intermediates=,
    logits=, labels=) -> dict` of extra metrics of this step, from its own
    forward pass (training mode, the parameters *before* the update):
    `updates` are the optimizer's parameter deltas, `intermediates` the
    model's `"intermediates"` collection (made mutable for the probe, e.g. the
    inputs a model sows before its batch-norm layers). Its metrics are added to
    `"loss"` and `"accuracy"`.

    `axis_name`: the data-parallel form of the same step, written per device
    for a mapped axis (`jax.shard_map` over a mesh axis, as
    :func:`bnjax.training.parallel.data_parallel` does, or `pmap`): `x` and `y`
    are the device's shard of the global batch, the loss is the `lax.pmean`
    over `axis_name` of the per-device `loss_fn` (the global-batch mean for
    equal shards), so its gradient with respect to the replicated parameters
    is the full-batch gradient (`shard_map` with `check_vma=True` sums the
    per-device contributions of a replicated value); the metrics (`"loss"`,
    `"accuracy"` and every floating probe metric) are `pmean`-ed too, and
    identical on every device. The model's batch-norm layers should pool over
    the same axis (`BatchNorm(axis_name=...)`) so the statistics are those
    of the global batch. The `"dropout"` key is additionally folded with
    the device's `lax.axis_index(axis_name)`, so devices draw independent
    masks. `None` (default): the single-device step.
    """
    mutable = ["batch_stats", "intermediates"] if probe is not None else ["batch_stats"]

    def over_devices(v: Array) -> Array:
        return v if axis_name is None else lax.pmean(v, axis_name)

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        rngs = {"dropout": key}

        def loss(params):
            variables = state.replace(params=params).variables()
            logits, updates = model.apply(variables, x, train=True, mutable=mutable, rngs=rngs)
            return over_devices(loss_fn(logits, y)), (logits, updates)

        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, deltas),
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        acc = over_devices(jnp.mean(jnp.argmax(logits, -1) == y))
        metrics = {"loss": value, "accuracy": acc}
        if probe is not None:
            extra = probe(
                params=state.params,
                grads=grads,
                updates=deltas,
                intermediates=updates.get("intermediates", {}),
                logits=logits,
                labels=y,
            )
            floating = lambda v: jnp.issubdtype(jnp.result_type(v), jnp.floating)
            metrics.update(jax.tree.map(lambda v: over_devices(v) if floating(v) else v, extra))
        return new, metrics

    return step



def make_eval_step(
    model: nn.Module,
    *,
    loss_fn: LossFn = cross_entropy_loss,
    probe: Callable[[PyTree], dict[str, Array]] | None = None,
    batch_size: int | None = None,
    over_seeds: bool = True,
    batch_statistics: bool = False,
) -> Callable[[TrainState, Array, Array], dict[str, Array]]:
    """`evaluate(state, images, labels) -> metrics` in inference mode (population statistics).

    Args:
      model: the flax module.
      loss_fn: as for training; reported as `"loss"` next to `"accuracy"`.
      probe: optional `probe(intermediates) -> dict` of extra metrics computed
        from the `"intermediates"` collection the model sows (e.g. the
        percentiles of one unit, see :mod:`bnjax.experiments.models`), over the whole set.
      batch_size: evaluate in chunks of this many examples (must divide `N`)
        to bound memory; default: the whole set at once.
      over_seeds: `jax.vmap` over the leading seed axis of `state`.
      batch_statistics: evaluate in *training* mode instead (`train=True`):
        every chunk of `batch_size` examples (default: the whole set) is
        normalized with its own statistics, as a training mini-batch is
        (Algorithm 1; ghost batches as configured in the model), so the
        grouping of `images` into consecutive chunks matters. The stored
        statistics are only read (by layers that use them in training, such as
        Batch Renorm); the updates are discarded, `state` is unchanged. The
        gap to the default inference-mode accuracy is batch norm's
        train/inference mismatch.

    Returns:
      A jitted function; metrics have shape `(seeds,)` (plus the probe's own shape).
    """
    mutable = (["intermediates"] if probe is not None else []) + (
        ["batch_stats"] if batch_statistics else []
    )

    def forward(state, x):
        if not mutable:
            return model.apply(state.variables(), x, train=False), {}
        logits, aux = model.apply(state.variables(), x, train=batch_statistics, mutable=mutable)
        return logits, aux.get("intermediates", {}) if probe is not None else {}

    def one_seed(state, images, labels):
        n = images.shape[0]
        if batch_size is None or batch_size >= n:
            logits, inter = forward(state, images)
        else:
            if n % batch_size:
                raise ValueError(
                    f"eval batch_size={batch_size} must divide the number of examples {n} "
                    f"(images {images.shape})"
                )
            chunks = images.reshape((n // batch_size, batch_size) + images.shape[1:])
            logits, inter = lax.map(lambda c: forward(state, c), chunks)
            merge = lambda a: a.reshape((n,) + a.shape[2:])
            logits, inter = merge(logits), jax.tree.map(merge, inter)
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "loss": loss_fn(logits, labels),
        }
        if probe is not None:
            metrics.update(probe(inter))
        return metrics

    f = jax.vmap(one_seed, in_axes=(0, None, None)) if over_seeds else one_seed
    return jax.jit(f)

