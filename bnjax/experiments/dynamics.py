"""Training dynamics: per-layer measurements of every training step (why a run fails).

:func:`layer_probe` measures one training step from its own forward and
backward pass (training mode, the parameters before the update):

* per parameter (`"<module>/<name>"`, e.g. `"conv_0/kernel"`, `"bn_0/bias"`):
  `w_norm/...` the Frobenius norm, `w_mean/...` the mean entry (the sign of
  a BN beta: negative pushes its relu units towards dead), `g_norm/...` the
  gradient's norm and
  `update_ratio/...` the norm of the optimizer's step over the weight norm
  (NaN where the weight is 0, e.g. a BN beta at initialization);
* per layer input the model sows into `"intermediates"` (flax `sow`; the
  models of :mod:`bnjax.experiments.models` sow `"bn_in_<i>"`, the input of the i-th batch
  norm, and `"act_in_<i>"`, the input of the i-th hidden nonlinearity), the
  per-feature mini-batch statistics over all but the last axis
  (:func:`bnjax.stats.moments`, two-pass, at least float32):
  `<name>/mean_abs` (mean over features of `|mu_B|`), `<name>/std`
  (mean over features of `sigma_B`), `<name>/std_max`;
  and for activation inputs `<name>/dead` (the fraction of features that
  are `<= 0` for every example and position of the batch: dead relu units)
  and `<name>/nonpos` (the fraction of entries `<= 0`: relu outputs that are 0);
* the output: `logit_rms` (root mean square of the logits), `logit_max`
  (max `|logit|`) and `logit_std` (mean over examples of the std over classes).

:func:`trace` trains with :func:`bnjax.training.make_train_loop` (same batches,
same result as the experiment's loop) and records the probe at every step:

```python
model, tx = ConvNet(features=(8, 16), dense=32, downsample="stride"), optax.sgd(1.5, 0.9)
states = training.create_train_states(model, tx, seeds=[0, 1], sample_input=x[:1])
states, rec = trace(model, tx, states, x, y, num_steps=300, batch_size=50)
rec["loss"].shape, rec["act_in_2/dead"].shape     # (2, 300), (2, 300)
```

Needs the `examples` extra (optax) for :func:`trace`; :func:`layer_probe` is
plain JAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from bnjax.stats import moments

__all__ = ["layer_probe", "trace", "first_step"]

Array = jax.Array
PyTree = Any


def _flat(tree: PyTree) -> dict[str, Array]:
    if not tree:
        return {}
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _norm(a: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.promote_types(a.dtype, jnp.float32)))))


def _feature_moments(x: Array):
    m = moments(x, tuple(range(x.ndim - 1)), algorithm="two_pass")
    return m.mean.reshape(-1), jnp.sqrt(m.var()).reshape(-1)


def layer_probe(
    *,
    params: PyTree,
    grads: PyTree,
    updates: PyTree,
    intermediates: Mapping[str, Any],
    logits: Array,
    labels: Array | None = None,
    bn_prefix: str = "bn_in",
    act_prefix: str = "act_in",
) -> dict[str, Array]:
    """Per-layer measurements of one training step (a `probe` for `make_train_step`).

    The hook is :func:`bnjax.training.make_train_step`'s `probe` argument.

    Args:
      params: the parameters before the step (a flax `"params"` tree).
      grads: their gradients (same tree).
      updates: the optimizer's deltas (same tree; `params + updates` is the new value).
      intermediates: the model's `"intermediates"` collection from the step's
        forward pass; sown values whose name (last path component) starts with
        `bn_prefix` are measured as batch-norm inputs, with `act_prefix` as
        activation inputs (also checked for dead units). A value sown more than
        once (a tuple) is measured at its last call.
      logits: the model output `(batch, classes)`.
      labels: unused (accepted so the signature matches the training hook).
      bn_prefix: the name prefixes above.
      act_prefix: the name prefixes above.

    Returns:
      A flat dict of float32 scalars (see the module docstring for the keys).

    Example:

    ```python
    step = training.make_train_step(model, tx, probe=layer_probe)
    state, metrics = step(state, x, y)
    metrics["act_in_0/dead"], metrics["w_norm/head/kernel"]
    ```
    """
    del labels
    out: dict[str, Array] = {}
    p, g, u = _flat(params), _flat(grads), _flat(updates)
    for name, w in p.items():
        wn = _norm(w)
        out[f"w_norm/{name}"] = wn
        out[f"w_mean/{name}"] = jnp.mean(w.astype(wn.dtype))
        out[f"g_norm/{name}"] = _norm(g[name])
        ratio = _norm(u[name]) / jnp.where(wn > 0, wn, 1)
        out[f"update_ratio/{name}"] = jnp.where(wn > 0, ratio, jnp.nan)
    for path, value in _flat(intermediates).items():
        name = path.rsplit("/", 1)[-1]
        is_bn, is_act = name.startswith(bn_prefix), name.startswith(act_prefix)
        if not (is_bn or is_act):
            continue
        x = value[-1] if isinstance(value, tuple | list) else value
        mean, std = _feature_moments(x)
        out[f"{path}/mean_abs"] = jnp.mean(jnp.abs(mean))
        out[f"{path}/std"] = jnp.mean(std)
        out[f"{path}/std_max"] = jnp.max(std)
        if is_act:
            xf = x.reshape(-1, x.shape[-1])
            out[f"{path}/dead"] = jnp.mean(jnp.all(xf <= 0, axis=0).astype(jnp.float32))
            out[f"{path}/nonpos"] = jnp.mean((xf <= 0).astype(jnp.float32))
    lf = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    out["logit_rms"] = jnp.sqrt(jnp.mean(jnp.square(lf)))
    out["logit_max"] = jnp.max(jnp.abs(lf))
    out["logit_std"] = jnp.mean(jnp.std(lf, axis=-1))
    return out


def trace(
    model: Any,
    tx: Any,
    states: Any,
    images: Array,
    labels: Array,
    *,
    num_steps: int,
    batch_size: int,
    steps_per_call: int | None = 10,
    probe=layer_probe,
) -> tuple[Any, dict[str, Array]]:
    """Trains `num_steps` steps and records `probe` at every step.

    The steps are those of :func:`bnjax.training.make_train_loop` with the same
    arguments (the same mini-batches, the same final states), so a trace
    shows the first steps of exactly the run an experiment makes.

    Args:
      model: the flax model and optax optimizer.
      tx: the flax model and optax optimizer.
      states: seed-stacked :class:`bnjax.training.TrainState` (`init_states`).
      images: the whole training set.
      labels: the whole training set.
      num_steps: steps to train and record.
      batch_size: mini-batch size.
      steps_per_call: unrolled steps per compiled call (see `make_train_loop`).
      probe: the per-step probe (default :func:`layer_probe`).

    Returns:
      `(states, record)`: the states after `num_steps` steps and a dict of
      `(seeds, num_steps)` arrays: `loss`, `accuracy` (of the training
      mini-batch, before the step's update) and the probe's keys.
    """
    from bnjax import training

    loop = training.make_train_loop(
        model,
        tx,
        batch_size=batch_size,
        steps_per_call=steps_per_call,
        probe=probe,
        per_step=True,
    )
    return loop(states, images, labels, num_steps=num_steps)


def first_step(values: Any, threshold: float, *, above: bool = True) -> int | None:
    """The first index (step) at which `values` (1-D) is `> threshold` (or `<` with
    `above=False`) or not finite; None if never.

    Examples:
      >>> first_step([0.1, 0.2, 5.0, 1.0], 1.0)
      2
    """
    import numpy as np

    v = np.asarray(values, np.float64)
    bad = ~np.isfinite(v) | ((v > threshold) if above else (v < threshold))
    idx = np.flatnonzero(bad)
    return int(idx[0]) if idx.size else None
