"""Test-time adaptation: batch-norm statistics (and parameters) re-estimated on test data.

A batch-norm network's inference map is frozen at the training distribution's
statistics. Under a covariate shift (noise, blur, contrast, a new sensor) the
statistics of every layer move, and re-estimating them on the test stream
recovers much of the lost accuracy. Every method here has one interface, pure
and `jit`-compiled, whose state is a pytree (so resetting is handing back the
source):

```python
adapter = bnjax.adapt.norm(prior=16.0)           # or tent(optax.sgd(1e-3, 0.9)), robust()
state = adapter.init(model, variables, train=False)  # a linen Module + its variables
logits, state = adapter.step(state, x)           # predict this batch, then adapt
state = adapter.reset(state)                     # back to the source model, exactly
variables = adapter.variables(state)             # the adapted variables
```

For an NNX model, `adapter.init(model, **call_kwargs)`; the model itself is never
modified (its state is split off and merged into a copy at every step). Keyword
arguments of `init` are passed to the model on every call (e.g. `train=False`).
The source variables are never modified or donated.

Methods (per batch-norm layer, with `n` the number of *examples* in the batch
and `mu_B`, `sigma2_B` the batch's per-feature mean and biased variance over
every reduced axis, i.e. over examples and spatial positions for a convolution):

* :func:`norm` `(prior=N)` (Schneider et al., NeurIPS 2020):
  `mu = (N mu_s + n mu_B) / (N + n)`, `var = (N var_s + n sigma2_B) / (N + n)`
  with the source (running) `mu_s, var_s`; `prior=0` is prediction-time BN
  (Nado et al. 2020), `prior=inf` the source model. `n` counts examples, not
  spatial positions: for a convolution, `N` is a number of pseudo-*images*,
  as in Schneider et al.
* :func:`tent` `(optimizer, steps=1, episodic=False)` (Wang et al., ICLR 2021):
  test-batch statistics (`prior=0`) and `steps` optax updates per batch of
  the batch-norm scales and biases only, minimizing the mean entropy of the
  predictions. The returned logits are the prediction *before* this batch's
  updates. `episodic=True` resets after every batch.
* :func:`robust` `(momentum=0.05)` (RoTTA's robust batch norm, Yuan et al., CVPR 2023):
  statistics estimated *across* batches: an exponential moving average of the
  test batches' statistics, started at the source statistics,
  `mu <- (1 - momentum) mu + momentum mu_B` (the same for the variance; a
  feature with a single value in the batch keeps its variance estimate), and
  every batch normalized with the updated estimate. A small batch moves the
  estimate a little, and a label-shifted stream (whose batch statistics carry
  the batch's classes) is averaged over many batches: the two known failures
  of prediction-time BN and TENT.

Supported layers: `bnjax.linen.BatchNorm` / `BatchRenorm` / `BatchNormAct`
and `flax.linen.BatchNorm` (linen models), `bnjax.nnx.BatchNorm` (and its
subclasses) and `flax.nnx.BatchNorm` (NNX models), at any depth. Every layer
is adapted with its own rule above, its call reduced over its own axes (masks
too). `BatchWhitening` is not supported (a `TypeError` naming the layer);
a model without a batch-norm layer is a `ValueError`. Cross-device pooling
(`axis_name`) is ignored: each device adapts on its own batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct, traverse_util
from flax.core import unfreeze

from bnjax import functional as F
from bnjax import linen as bnlinen
from bnjax import nnx as bnnnx
from bnjax._capture import linen_config, linen_params, local
from bnjax._module_common import config_from
from bnjax.compat import is_batch_norm
from bnjax.population import BatchStats

__all__ = ["AdaptState", "Adapter", "norm", "robust", "tent"]

Array = jax.Array
_Path = tuple[Any, ...]


class Adapter(NamedTuple):
    """A test-time adaptation method: four pure functions (optax's style).

    Attributes:
      init: `(model, variables, **call_kwargs) -> AdaptState` for a linen
        model; `(model, **call_kwargs) -> AdaptState` for an NNX model.
      step: `(state, x) -> (logits, state)`: predict the batch `x`, then adapt
        (`jit`-compiled; also usable inside `jax.lax.scan`).
      reset: `state -> state`: the source model's state, exactly.
      variables: `state -> variables`: the adapted linen variables (NNX: an
        `nnx.State` for `nnx.update`). For :func:`norm` these are the source
        variables (its statistics depend on each batch); for :func:`tent` the
        adapted scales and biases with the source statistics; for :func:`robust`
        the source parameters with the adapted statistics.
    """

    init: Callable[..., AdaptState]
    step: Callable[[AdaptState, Array], tuple[Array, AdaptState]]
    reset: Callable[[AdaptState], AdaptState]
    variables: Callable[[AdaptState], Any]


class _Static:
    """The model and its call arguments: static (hashable) pytree metadata of a state."""

    def __init__(self, kind: str, model: Any, call_kwargs: Mapping[str, Any]):
        self.kind, self.model, self.call_kwargs = kind, model, dict(call_kwargs)
        key = (kind, model, tuple(sorted(self.call_kwargs.items())))
        try:
            hash(key)
        except TypeError:  # an unhashable model or argument: equal only to itself
            key = None
        self._key = key

    def __hash__(self) -> int:
        return id(self) if self._key is None else hash(self._key)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, _Static):
            return False
        if self._key is None or other._key is None:
            return self is other
        return self._key == other._key


@struct.dataclass
class AdaptState:
    """The state of an :class:`Adapter`: a pytree (jit / scan carry).

    Attributes:
      source: the source variables (linen) or `nnx.State` (NNX), never modified.
      params: the adapted batch-norm scales and biases `{path: array}` (`tent`;
        empty for the others).
      stats: the adapted statistics `{layer: (mean, var)}` (`robust`; empty
        for the others).
      opt_state: the optimizer's state (`tent`; `()` otherwise).
      steps: int32 scalar, batches adapted on since the last reset.
      static: the model and its call arguments (static metadata).
    """

    source: Any
    params: dict
    stats: dict
    opt_state: Any
    steps: Array
    static: _Static = struct.field(pytree_node=False)


# --------------------------------------------------------------------------- layer rules

# rule(path, x, mask, cfg, params, source_stats, stats) -> (y, new (mean, var) or None)
_Rule = Callable[..., tuple[Array, Any]]


def _batch(x: Array, mask: Array | None, cfg: F.BatchNormConfig):
    """`(n examples, mu_B, sigma2_B, values per feature)` of one layer's input."""
    faxes = F.feature_axes(x.ndim, cfg.axis)
    if 0 in faxes:
        raise ValueError(
            f"bnjax.adapt needs axis 0 to be the batch axis; axis={cfg.axis!r} makes it a "
            f"feature axis (input shape {tuple(x.shape)})"
        )
    per_example = math.prod(s for i, s in enumerate(x.shape) if i not in faxes and i != 0)
    m = F.batch_moments(x, cfg, mask=mask)
    return m.count / max(per_example, 1), m.mean, m.var(), m.count


def _normalize(x, cfg, params: F.BNParams, mean, var) -> Array:
    """The layer's inference map with statistics `(mean, var)` (its activation too)."""
    count = jnp.zeros_like(var)
    return F.apply_eval(params, BatchStats(mean, var, count, count), x, cfg)


def _check_values(path: str, x: Array, cfg: F.BatchNormConfig, what: str) -> None:
    faxes = F.feature_axes(x.ndim, cfg.axis)
    values = math.prod(s for i, s in enumerate(x.shape) if i not in faxes)
    if values <= 1:
        raise ValueError(
            f"{what}: batch-norm layer {path!r} gets an input of shape {tuple(x.shape)}, one "
            "value per feature: its batch variance is 0 and the output meaningless. Use a "
            "batch of more than one example, or a prior (bnjax.adapt.norm(prior=N > 0))"
        )


def _mixture_rule(prior: float) -> _Rule:
    def rule(path, x, mask, cfg, params, source, stats):
        if math.isinf(prior):
            return _normalize(x, cfg, params, source.mean, source.var), None
        if prior == 0:
            _check_values(path, x, cfg, "prior=0 (prediction-time BN)")
        n, mu_b, var_b, _ = _batch(x, mask, cfg)
        w = n / (prior + n) if prior else jnp.where(n > 0, 1.0, 0.0)
        mean = (1 - w) * source.mean + w * mu_b
        var = (1 - w) * source.var + w * var_b
        return _normalize(x, cfg, params, mean, var), None

    return rule


def _robust_rule(momentum: float) -> _Rule:
    def rule(path, x, mask, cfg, params, source, stats):
        mean0, var0 = stats
        _, mu_b, var_b, count = _batch(x, mask, cfg)
        a = jnp.where(count > 0, momentum, 0.0)
        mean = (1 - a) * mean0 + a * mu_b
        av = jnp.where(count > 1, momentum, 0.0)
        var = (1 - av) * var0 + av * var_b
        return _normalize(x, cfg, params, mean, var), (mean, var)

    return rule


# --------------------------------------------------------------------------- model walks


def _unsupported(path: str, module: Any) -> TypeError:
    return TypeError(
        f"bnjax.adapt does not support {type(module).__name__} (layer {path!r}): only "
        "batch-norm layers (bnjax BatchNorm / BatchRenorm / BatchNormAct, flax BatchNorm) "
        "are adapted"
    )


def _linen_forward(static: _Static, variables, x, rule: _Rule, stats: dict):
    """`(logits, new stats)`: the linen model with every batch norm replaced by `rule`."""
    current = dict(stats)

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(mod, bnlinen.BatchWhitening):
            raise _unsupported("/".join(mod.path), mod)
        cfg = linen_config(mod)
        if cfg is None:
            return next_fun(*args, **kwargs)
        path = "/".join(mod.path)
        params = linen_params(mod, cfg)
        mean, var = mod.get_variable("batch_stats", "mean"), mod.get_variable("batch_stats", "var")
        if mean is None or var is None:
            raise ValueError(f"batch-norm layer {path!r} has no batch_stats/mean and var")
        source = BatchStats(mean, var, jnp.zeros_like(var), jnp.zeros_like(var))
        x_in = jnp.asarray(args[0])
        y, st = rule(path, x_in, kwargs.get("mask"), cfg, params, source, current.get(path))
        if st is not None:  # a layer called twice updates its estimate twice
            current[path] = st
        return y

    with nn.intercept_methods(interceptor):
        logits = static.model.apply(variables, x, **static.call_kwargs)
    return logits, current


@contextlib.contextmanager
def _nnx_hooks(hook: Callable) -> Iterator[None]:
    """Routes every NNX batch-norm call (bnjax's through :func:`bnjax.nnx.intercept`,
    flax's `nnx.BatchNorm` by a temporary wrapper of its `__call__`) through
    `hook(module, x, mask)`."""
    flax_call = nnx.BatchNorm.__dict__["__call__"]

    def flax_bn(self, x, use_running_average=None, *, mask=None):
        return hook(self, x, mask)

    nnx.BatchNorm.__call__ = flax_bn
    try:
        with bnnnx.intercept(lambda mod, x, mask, use_ra: hook(mod, x, mask)):
            yield
    finally:
        nnx.BatchNorm.__call__ = flax_call


def _nnx_layer(mod: Any):
    """`(config, params, source stats)` of an NNX batch-norm layer (flax's or bnjax's)."""
    if isinstance(mod, bnnnx.BatchNorm):
        return local(mod.config()), mod.bn_params(), mod.bn_state()
    cfg = config_from(mod, F.BatchNormConfig, local=True)
    params = F.BNParams(
        None if mod.scale is None else mod.scale[...], None if mod.bias is None else mod.bias[...]
    )
    zeros = jnp.zeros_like(mod.var[...])
    return cfg, params, BatchStats(mod.mean[...], mod.var[...], zeros, zeros)


def _nnx_forward(static: _Static, state, x, rule: _Rule, stats: dict):
    graphdef = static.model
    model = nnx.merge(graphdef, state)
    paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model)}
    current = dict(stats)

    def hook(mod, x_in, mask):
        path = paths.get(id(mod), type(mod).__name__)
        cfg, params, source = _nnx_layer(mod)
        y, st = rule(path, jnp.asarray(x_in), mask, cfg, params, source, current.get(path))
        if st is not None:
            current[path] = st
        return y

    with _nnx_hooks(hook):
        logits = model(x, **static.call_kwargs)
    return logits, current


def _forward(static: _Static, source, params: dict, x, rule: _Rule, stats: dict):
    """The model on `x` with the adapted `params` merged into `source`."""
    return (_linen_forward if static.kind == "linen" else _nnx_forward)(
        static, _merge(static, source, params), x, rule, stats
    )


# --------------------------------------------------------------------------- layers


def _layers(static: _Static, source) -> dict[str, tuple[_Path, _Path, Any]]:
    """Every batch-norm layer of the model by path: `(scale path, bias path, (mean,
    var))` with the flat paths of its parameters (`None` where unused) and its source
    statistics; read from the variables' structure (a linen batch norm stores
    `params/{scale,bias}` and `batch_stats/{mean,var}` at one path).

    Raises:
      TypeError: a `BatchWhitening` layer.
      ValueError: no batch-norm layer.
    """
    out: dict[str, tuple[_Path, _Path, Any]] = {}
    if static.kind == "linen":
        flat = traverse_util.flatten_dict(unfreeze(dict(source)))
        for k in flat:
            if k[0] == "batch_stats" and k[-1] == "whitening":
                raise _unsupported("/".join(k[1:-1]), bnlinen.BatchWhitening)
        for k, mean in flat.items():
            if k[0] == "batch_stats" and k[-1] == "mean" and k[:-1] + ("var",) in flat:
                path = k[1:-1]
                scale, bias = ("params", *path, "scale"), ("params", *path, "bias")
                out["/".join(path)] = (
                    scale if scale in flat else None,
                    bias if bias in flat else None,
                    (mean, flat[k[:-1] + ("var",)]),
                )
    else:
        model = nnx.merge(static.model, source)
        for p, m in nnx.iter_modules(model):
            if isinstance(m, bnnnx.BatchWhitening):
                raise _unsupported("/".join(map(str, p)), m)
            if is_batch_norm(m):
                _, params, st = _nnx_layer(m)
                out["/".join(map(str, p))] = (
                    None if params.scale is None else (*p, "scale"),
                    None if params.bias is None else (*p, "bias"),
                    (st.mean, st.var),
                )
    if not out:
        raise ValueError(
            "the model has no batch-norm layer (bnjax or flax BatchNorm, with its "
            "batch_stats mean and var) for bnjax.adapt to adapt"
        )
    return out


def _bn_params(static: _Static, source) -> dict[_Path, Array]:
    """The batch-norm scales and biases `{flat path: value}` of the source."""
    if static.kind == "linen":
        flat = traverse_util.flatten_dict(unfreeze(dict(source)))
    else:
        flat = {k: v.get_value() for k, v in nnx.to_flat_state(source)}
    return {
        k: flat[k]
        for scale, bias, _ in _layers(static, source).values()
        for k in (scale, bias)
        if k is not None
    }


def _merge(static: _Static, source, params: dict):
    """`source` with the flat `params` replacing its values."""
    if not params:
        return source
    if static.kind == "linen":
        flat = traverse_util.flatten_dict(unfreeze(dict(source)))
        flat.update(params)
        return traverse_util.unflatten_dict(flat)
    flat = [(k, v.replace(params[k]) if k in params else v) for k, v in nnx.to_flat_state(source)]
    return nnx.from_flat_state(flat)


def _split(model: Any, variables: Any, call_kwargs: Mapping[str, Any]):
    """`(static, source)` for a linen model + variables, or an NNX model."""
    if isinstance(model, nn.Module):
        if variables is None:
            raise TypeError("adapter.init(model, variables, ...) needs the linen model's variables")
        return _Static("linen", model, call_kwargs), variables
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError(
                "adapter.init(nnx_model, **call_kwargs) takes no variables: the NNX model "
                "carries its own state"
            )
        graphdef, state = nnx.split(model)
        return _Static("nnx", graphdef, call_kwargs), state
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model)}")


# --------------------------------------------------------------------------- the adapters


def _adapter(
    rule: _Rule,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1,
    episodic: bool = False,
    running: bool = False,
) -> Adapter:
    """The :class:`Adapter` of a layer `rule` (with `optimizer`: TENT's updates of
    the batch-norm parameters; with `running`: statistics carried across batches)."""

    def fresh(static: _Static, source) -> AdaptState:
        layers = _layers(static, source)  # validates the model
        params = _bn_params(static, source) if optimizer is not None else {}
        stats = {k: st for k, (_, _, st) in layers.items()} if running else {}
        opt_state = optimizer.init(params) if optimizer is not None else ()
        return AdaptState(source, params, stats, opt_state, jnp.zeros((), jnp.int32), static)

    def init(model: Any, variables: Any = None, **call_kwargs: Any) -> AdaptState:
        static, source = _split(model, variables, call_kwargs)
        return fresh(static, source)

    def _step(state: AdaptState, x: Array) -> tuple[Array, AdaptState]:
        x = jnp.asarray(x)
        static, stats = state.static, state.stats

        def predict(params):
            return _forward(static, state.source, params, x, rule, stats)

        if optimizer is None:
            logits, new_stats = predict(state.params)
            return logits, state.replace(stats=new_stats, steps=state.steps + 1)

        def entropy(params):
            logits, _ = predict(params)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1)), logits

        params, opt_state, first = state.params, state.opt_state, None
        for _ in range(steps):
            (_, logits), grads = jax.value_and_grad(entropy, has_aux=True)(params)
            first = logits if first is None else first
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        new = state.replace(params=params, opt_state=opt_state, steps=state.steps + 1)
        return first, reset(new) if episodic else new

    def reset(state: AdaptState) -> AdaptState:
        return fresh(state.static, state.source)

    def variables(state: AdaptState) -> Any:
        out = _merge(state.static, state.source, state.params)
        if not state.stats:
            return out
        if state.static.kind == "linen":
            flat = traverse_util.flatten_dict(unfreeze(dict(out)))
            for name, stat in state.stats.items():
                for field, value in zip(("mean", "var"), stat, strict=True):
                    key = ("batch_stats", *name.split("/"), field)
                    flat[key] = value.astype(flat[key].dtype)
            return traverse_util.unflatten_dict(flat)
        model = nnx.merge(state.static.model, out)
        for p, m in nnx.iter_modules(model):
            name = "/".join(map(str, p))
            if name in state.stats:
                mean, var = state.stats[name]
                m.mean[...] = mean.astype(m.mean[...].dtype)
                m.var[...] = var.astype(m.var[...].dtype)
        return nnx.state(model)

    return Adapter(init, jax.jit(_step), reset, variables)


def _check_prior(prior: Any) -> float:
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise TypeError(f"prior must be a number >= 0 (or math.inf), got {prior!r}")
    if not prior >= 0:  # NaN too
        raise ValueError(f"prior must be >= 0 (pseudo-examples of the source), got prior={prior!r}")
    return float(prior)


def norm(prior: float = 16.0) -> Adapter:
    """Statistics mixed from the source and the test batch (Schneider et al. 2020).

    Every batch-norm layer normalizes with `mu = (N mu_s + n mu_B) / (N + n)` and
    `var = (N var_s + n sigma2_B) / (N + n)`: `N = prior` pseudo-examples of the
    source statistics, `n` the number of examples in the batch (for a convolution
    `n` counts images, not positions), `sigma2_B` the biased batch variance.
    Nothing is learned; the state only counts batches.

    Args:
      prior: `N >= 0`; `0` is prediction-time BN (the batch's own statistics),
        `math.inf` the source model.

    Raises:
      TypeError, ValueError: a prior that is not a number `>= 0`. `step` with
        `prior=0` on a batch with one value per feature (e.g. one example of a
        dense layer) raises a `ValueError` naming the layer and the shape.

    Examples:
      >>> adapter = norm(prior=16.0)                         # doctest: +SKIP
      >>> state = adapter.init(model, variables, train=False)
      >>> logits, state = adapter.step(state, x_test_batch)
    """
    return _adapter(_mixture_rule(_check_prior(prior)))


def tent(
    optimizer: optax.GradientTransformation, steps: int = 1, episodic: bool = False
) -> Adapter:
    """TENT (Wang et al., ICLR 2021): test-batch statistics and entropy minimization of
    the batch-norm scales and biases.

    Every batch-norm layer normalizes with the test batch's statistics (`norm(prior=0)`);
    per batch, `steps` updates of `optimizer` on the batch-norm `scale` / `bias`
    only (every other parameter and every running statistic stays the source's)
    minimize the mean entropy `-mean_i sum_c p_ic log p_ic` of the predictions.

    Args:
      optimizer: an optax transformation, e.g. `optax.sgd(1e-3, momentum=0.9)`
        (TENT's) or `optax.adam(1e-3)`.
      steps: updates per batch (`>= 1`).
      episodic: reset to the source after every batch (each batch adapted alone).

    Raises:
      TypeError: `optimizer` is not an optax `GradientTransformation`.
      ValueError: `steps < 1`.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(1e-3, "
            f"momentum=0.9)), got {optimizer!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got steps={steps!r}")
    return _adapter(_mixture_rule(0.0), optimizer=optimizer, steps=steps, episodic=episodic)


def robust(momentum: float = 0.05) -> Adapter:
    """Statistics estimated across test batches: RoTTA's robust batch norm (Yuan et al.,
    CVPR 2023).

    Every batch-norm layer keeps test statistics `(mu, var)`, started at the
    source's, and per batch moves them towards the batch's,
    `mu <- (1 - m) mu + m mu_B` and `var <- (1 - m) var + m sigma2_B`
    (`m = momentum`; a feature with one value in the batch keeps its `var`,
    one without a valid value keeps both), then normalizes with the updated
    estimate. A batch of one example moves the estimate by `m` only and a
    label-shifted stream is averaged over about `1 / m` batches, which is what
    prediction-time BN and TENT lack on small and non-i.i.d. batches. (RoTTA adds
    a class-balanced memory bank and a teacher-student pair on top; this is its
    normalization layer alone.)

    Args:
      momentum: `m` in `(0, 1]` (RoTTA's default 0.05).

    Raises:
      ValueError: `momentum` out of range.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in (0, 1], got {momentum!r}")
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got momentum={momentum!r}")
    return _adapter(_robust_rule(float(momentum)), running=True)
