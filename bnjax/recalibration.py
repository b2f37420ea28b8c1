"""PreciseBN: recompute the population statistics of a trained network (Algorithm 2).

The paper's inference rule (Algorithm 2, lines 8-10) freezes the trained weights,
runs many training mini-batches of size `m` through the network and sets, for
every batch-norm layer,

    `E[x] = E_B[mu_B]`  and  `Var[x] = m / (m - 1) * E_B[sigma2_B]`.

Wu & Johnson's PreciseBN ("Rethinking 'Batch' in BatchNorm", 2021) is the same
recipe after (or during) training. :func:`recalibrate` (Flax linen) and
:func:`recalibrate_nnx` (Flax NNX) implement it for every bnjax batch-norm layer
of a model, wherever it is nested, leaving the parameters untouched:

* batches are count-weighted exactly (unequal sizes and masks are fine): the
  mean is `sum_B n_B mu_B / sum_B n_B`;
* `variance="within"` (default, the paper's rule) is the pooled *unbiased
  within-batch* variance `sum_B n_B sigma2_B / sum_B (n_B - 1)`, which is
  `m/(m-1) E_B[sigma2_B]` for equal batch sizes: exactly what
  `population="average"` accumulates during training (:mod:`bnjax.population`).
  It depends on the batch *size* by design (it is the variance that a
  mini-batch of that size sees, without the between-batch spread of the batch
  means); feed batches of the training batch size. `variance="total"` is the
  unbiased variance of all the inputs pooled (Chan merge of all batches),
  independent of how the data is split into batches.

Both estimates are independent of the order of the batches (up to float rounding).
`n_B` counts valid elements (batch times spatial positions for convolutions).

Which network produces each layer's inputs (`mode`):

* `"train"` (default; the paper's Algorithm 2 and PreciseBN as published):
  One pass; every layer sees its input as computed by the *training* network,
  i.e. the earlier batch-norm layers normalize with their batch statistics.
  The statistics are those of the activations the weights were trained on.
* `"layerwise"`: The statistics of each layer's input in the *inference* network whose
  earlier layers already use their recalibrated statistics: layer `k` is
  recalibrated in pass `k` over the data, so it takes as many passes as
  there are batch-norm calls (in call order). The result is self-consistent:
  on the calibration data, each layer's population statistics are exactly
  the statistics of its eval-mode input.
* `"single_pass"`: One pass through the inference network with the *old* statistics upstream:
  cheap, but a layer's new statistics describe inputs produced with the old
  statistics of the layers before it, so it is only as good as those were.

With `"train"` a small batch makes the inputs of deep layers noisier than at
inference; `"layerwise"` removes that train/eval mismatch at the cost of
depth passes. On a well-trained network the three agree closely.

Each batch step is `jax.jit`-compiled once per input shape and cached per
(model, keyword arguments, mode): the statistics are arguments, so neither the
`"layerwise"` passes nor a later recalibration (say, every epoch) recompile.
Statistics are computed locally: `axis_name` of the layers is ignored (run
the calibration data on one host). A feature that gets no valid element (or,
for the variance, a single one) keeps its old statistics.

Batch Renorm layers (`bnjax.linen.BatchRenorm`, `bnjax.nnx.BatchRenorm`) are
batch-norm layers here: in `"train"` mode they produce their Batch Renorm
training output (at their stored `steps`); their `mean`/`var` (and
`count`/`batches`) are replaced and their `steps` counter is kept.

Limits: only `bnjax.nnx.BatchNorm` layers are found in NNX models (not
`flax.nnx.BatchNorm`; it has no interception hook); in linen models a batch
norm inside a lifted transform (`nn.scan`, `nn.vmap`) is intercepted per
call of the transformed body, which is untested.

Example:

```python
new_variables = recalibrate(model, variables, (x for x, _ in loader), train=False)
recalibrate_nnx(nnx_model, batches, mode="layerwise")   # in place
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import unfreeze

from bnjax import functional as F
from bnjax import population as _pop
from bnjax._capture import as_args, compiled, nnx_layers
from bnjax.stats import Moments, merge

__all__ = ["RECALIBRATION_MODES", "Mode", "Variance", "recalibrate", "recalibrate_nnx"]

Array = jax.Array
Mode = Literal["train", "layerwise", "single_pass"]
Variance = Literal["within", "total"]
RECALIBRATION_MODES: tuple[str, ...] = get_args(Mode)
_VARIANCES: tuple[str, ...] = get_args(Variance)


# --------------------------------------------------------------------------- record


def _layer_output(x, mask, cfg, params, state, upstream):
    if upstream == "train":
        return F.apply_train(params, state, x, cfg, mask=mask)[0]
    return F.apply_eval(params, state, x, cfg)


def _record_moments(x, mask, cfg, params, state, upstream):
    m = F.batch_moments(x, cfg, mask=mask)
    return _layer_output(x, mask, cfg, params, state, upstream), (m, state)


# --------------------------------------------------------------------------- accumulate


def _batches_source(batches: Iterable | Callable[[], Iterable], passes: int):
    """A function returning a fresh iterator per pass."""
    if callable(batches) and not isinstance(batches, Iterable):
        return batches
    if passes > 1 and iter(batches) is batches:
        batches = list(batches)  # a one-shot iterator, needed several times
    return lambda: iter(batches)


def _progress(it: Iterable, enabled: bool | str, desc: str, total: int | None) -> Iterable:
    """A tqdm bar over ``it`` labelled ``"<label>: <desc>"`` (``enabled`` a string: the
    label, else ``"recalibrate"``), with the number of batches where it is known."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover
        raise ImportError("progress=True needs tqdm: pip install tqdm") from e
    label = enabled if isinstance(enabled, str) else "recalibrate"
    return tqdm(it, desc=f"{label}: {desc}", unit=" batches", total=total)


def _zero_acc(recs):
    """Zero accumulators shaped like the abstract records `{path: [(Moments, state)]}`."""

    def zeros(a):
        return jnp.zeros(a.shape, a.dtype)

    acc = {}
    for path, calls in recs.items():
        m, state = calls[0]
        real = zeros(state.var)  # count, batches, var: real also for complex inputs
        mean = zeros(m.mean) if jnp.iscomplexobj(m.mean) else zeros(state.mean)
        st = F.BatchStats(mean, real, real, real)
        acc[path] = (st, Moments(*(zeros(f) for f in m)), jax.tree.map(zeros, state))
    return acc


def _fold_in(acc, recs):
    acc = dict(acc)
    for path, calls in recs.items():
        st, tot, _ = acc[path]
        for m, _ in calls:
            st = _pop.update(st, m, population="average", momentum=0.0)
            tot = merge(tot, m)
        acc[path] = (st, tot, calls[-1][1])  # the layer's current (old) statistics
    return acc


class _Stepper:
    """One jitted per-batch step for all passes (the statistics are arguments)."""

    def __init__(self, kind, model, kwargs, upstream):
        self.trace, self.step = compiled(kind, model, kwargs, upstream, _record_moments, _fold_in)
        self.upstream = upstream
        self.order: list[str] = []  # layer paths in call order
        self._zero = None

    def zero(self, carry, args):
        if self._zero is None:

            def records(carry, args):
                recs = self.trace(carry, args, self.upstream, _record_moments)
                self.order[:] = list(recs)  # a jitted dict would come back sorted
                return recs

            self._zero = _zero_acc(jax.eval_shape(records, carry, args))
        return self._zero


def _accumulate(stepper, carry, source, progress, desc, total=None):
    """One pass over the data: per layer path, (average BatchStats, total Moments, old)."""
    acc = None
    for batch in _progress(source(), progress, desc, total):
        args = as_args(batch)
        if acc is None:
            acc = stepper.zero(carry, args)
        acc = stepper.step(acc, carry, args)
    if acc is None:
        raise ValueError(
            "batches is empty: recalibration needs at least one batch of inputs "
            "(an iterable of arrays, or of tuples of the model's positional arguments)"
        )
    if not acc:
        raise ValueError("the model called no bnjax batch-norm layer: nothing to recalibrate")
    return acc


def _finalize(acc_entry, variance: str) -> F.BatchStats:
    """The new statistics; features without data (or one element) keep the old ones."""
    st, tot, old = acc_entry
    mean = jnp.where(st.count > 0, st.mean, old.mean)
    if variance == "total":
        var = jnp.where(tot.count > 1, tot.var(ddof=1), old.var)
    else:
        var = jnp.where(st.count - st.batches > 0, st.var, old.var)
    return F.BatchStats(mean, var, st.count, st.batches)


def _check(mode: str, variance: str) -> None:
    if mode not in RECALIBRATION_MODES:
        raise ValueError(f"mode must be one of {RECALIBRATION_MODES}, got {mode!r}")
    if variance not in _VARIANCES:
        raise ValueError(f"variance must be one of {_VARIANCES}, got {variance!r}")


def _run(kind, model, kwargs, carry, batches, mode, variance, progress, write):
    """The driver shared by linen and NNX; `write(carry, {path: BatchStats}) -> carry`."""
    stepper = _Stepper(kind, model, kwargs, "train" if mode == "train" else "eval")
    total = len(batches) if hasattr(batches, "__len__") else None
    if mode != "layerwise":
        source = _batches_source(batches, 1)
        desc = f"every layer, one {mode}-mode pass"
        acc = _accumulate(stepper, carry, source, progress, desc, total)
        return write(carry, {p: _finalize(a, variance) for p, a in acc.items()})
    source = _batches_source(batches, 2)
    first = next(iter(source()), None)
    if first is not None:  # traced once up front: the layers in call order (the bars' k/K)
        stepper.zero(carry, as_args(first))
    for k in range(len(stepper.order) or 1):  # pass k: layer k (no batch or layer: pass 0 raises)
        desc = f"layer {k + 1}/{len(stepper.order)}"
        acc = _accumulate(stepper, carry, source, progress, desc, total)
        path = stepper.order[k]
        carry = write(carry, {path: _finalize(acc[path], variance)})
    return carry


# --------------------------------------------------------------------------- public


def recalibrate(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable | Callable[[], Iterable],
    *,
    mode: Mode = "train",
    variance: Variance = "within",
    progress: bool | str = False,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Recomputes the population statistics of every batch-norm layer of a linen model.

    Handles `bnjax.linen.BatchNorm` and `flax.linen.BatchNorm` layers, nested
    in submodules at any depth; a layer called several times pools all its calls.

    Args:
      model: the `flax.linen` module (unbound).
      variables: its variables, `{"params": ..., "batch_stats": ...}`.
      batches: an iterable of inputs (each item an array passed as the one
        positional argument, or a tuple of positional arguments), or a callable
        returning a fresh iterable. `"layerwise"` iterates it once per layer
        (a one-shot iterator is kept in a list).
      mode: `"train"`, `"layerwise"` or `"single_pass"` (module docstring).
      variance: `"within"` (the paper's) or `"total"` (module docstring).
      progress: show a tqdm progress bar per pass (with the number of batches
        where `batches` has a length); a string labels the bars (e.g. `"PreciseBN"`).
      **apply_kwargs: passed to `model.apply` (e.g. `train=False`, so
        dropout is off). The batch-norm layers' own train/eval switch is ignored:
        they run as `mode` says and nothing is mutated.

    Returns:
      New variables: `batch_stats` `mean`/`var` replaced (and `count`/
      `batches`, where stored, set to the totals of the calibration data);
      everything else, params included, is the same objects.

    Raises:
      ValueError: empty `batches`, no batch-norm layer, a bad `mode` /
        `variance`, or inputs whose shapes do not match a layer (naming it).

    Example:

    ```python
    new_vars = recalibrate(model, variables, (x for x, _ in train_batches), train=False)
    ```
    """
    _check(mode, variance)

    def write(variables, new):
        stats = traverse_util.flatten_dict(unfreeze(variables["batch_stats"]))
        for path, st in new.items():
            key = tuple(path.split("/")) if path else ()
            for name in ("mean", "var", "count", "batches"):
                if key + (name,) in stats:
                    old, value = stats[key + (name,)], getattr(st, name)
                    # a complex mean stays complex (flax's float32 init turns complex)
                    keep = jnp.iscomplexobj(value) and not jnp.iscomplexobj(old)
                    stats[key + (name,)] = value if keep else value.astype(old.dtype)
        out = dict(variables)
        out["batch_stats"] = traverse_util.unflatten_dict(stats)
        return out

    return _run(
        "linen", model, apply_kwargs, dict(variables), batches, mode, variance, progress, write
    )


def recalibrate_nnx(
    model: nnx.Module,
    batches: Iterable | Callable[[], Iterable],
    *,
    mode: Mode = "train",
    variance: Variance = "within",
    progress: bool | str = False,
    **call_kwargs: Any,
) -> nnx.Module:
    """Recomputes, in place, the statistics of every `bnjax.nnx.BatchNorm` in `model`.

    The NNX counterpart of :func:`recalibrate` (same `batches`, `mode`,
    `variance` and `progress`); `call_kwargs` go to `model(*args, **call_kwargs)`.
    Only the `mean`/`var` (and `count`/`batches`) `nnx.BatchStat` of the
    batch-norm layers change; put dropout and the like in eval mode yourself
    (`model.eval()`; the batch-norm layers ignore their own switch here).

    Returns:
      `model` (mutated in place).
    """
    _check(mode, variance)
    graphdef, state = nnx.split(model)
    layers = nnx_layers(model)

    def write(state, new):
        for path, st in new.items():
            layers[path].set_bn_state(st)
        return nnx.split(model)[1]

    _run("nnx", graphdef, call_kwargs, state, batches, mode, variance, progress, write)
    return model
