"""`bnjax.nnx.BatchNorm`: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor, same variables (`scale`/`bias` as :class:`flax.nnx.Param`,
`mean`/`var` as :class:`flax.nnx.BatchStat`, same shapes and dtypes), the
same `.train()` / `.eval()` / :func:`flax.nnx.view` switching, so the state of
a `flax.nnx.BatchNorm` loads unchanged (`nnx.update(bn, nnx.state(flax_bn))`).
All numerics live in :mod:`bnjax.functional`; this module only maps NNX variables
to the functional pytrees and back.

Extra keyword arguments (defaults keep flax's behaviour):

* `population="average"`: the paper's exact population average (Algorithm 2)
  instead of the EMA; adds `count` and `batches` as `nnx.BatchStat`. What
  `var` means in each mode is documented in :mod:`bnjax.population`: with
  `"ema"` it is an EMA of the *biased* batch variance (flax's convention); with
  `"average"` it is the pooled *unbiased* within-batch variance
  `sum_B n_B sigma2_B / sum_B (n_B - 1)` (the paper's `m/(m-1) E_B[sigma2_B]`
  for equal batch sizes; `n_B` counts batch times spatial positions);
* `virtual_batch_size`: ghost batch norm; `grad`: `"vjp"` (the paper's
  backward pass), `"jvp"` or `"autodiff"`.

Complex inputs and masks behave as in :mod:`bnjax.linen` (complex mean, real
variance; a fully masked feature is normalized with the running statistics). The
float32 `mean` turns complex64 at the first complex training call, as
`flax.linen.BatchNorm`'s does (`flax.nnx.BatchNorm` keeps it float32 and so
drops the imaginary part of the running mean).

`use_fast_variance` and `promote_dtype` are accepted and ignored: the
variance is always exact and statistics are always at least float32.

Example:

```python
>>> from flax import nnx
>>> import jax, jax.numpy as jnp
>>> bn = BatchNorm(6, rngs=nnx.Rngs(0))
>>> y = bn(jnp.ones((4, 6)) + jnp.arange(4.0)[:, None])   # train mode: batch stats
>>> bn.eval()
>>> y = bn(jnp.ones((1, 6)))                              # population stats
```
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from bnjax import functional as F
from bnjax import whitening as W
from bnjax._module_common import (
    BATCH_NORM,
    BATCH_RENORM,
    BATCH_WHITENING,
    Layer,
    resolve_use_running_average,
    tracks_running_stats,
)
from bnjax.population import Population, Variance

__all__ = ["BatchNorm", "BatchNormAct", "BatchRenorm", "BatchWhitening", "intercept"]

Array = jax.Array
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

# Called as fn(module, x, mask, use_running_average) -> y instead of the layer's
# own computation; see :func:`intercept`.
_INTERCEPTOR: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "bnjax_nnx_interceptor", default=None
)


@contextlib.contextmanager
def intercept(fn: Callable[[BatchNorm, Array, Array | None, bool], Array]) -> Iterator[None]:
    """Routes every :class:`BatchNorm` call through `fn` inside the `with` block.

    The NNX counterpart of :func:`flax.linen.intercept_methods`, used by
    :mod:`bnjax.recalibration` and :mod:`bnjax.diagnostics` to capture each layer's
    input. `fn(module, x, mask, use_running_average)` returns the layer's output
    and must not mutate the module (it runs at trace time under `jit`).
    """
    token = _INTERCEPTOR.set(fn)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


class _Layer(nnx.Module):
    """The one call path of bnjax's NNX layers, driven by the class's `_layer`
    description (:mod:`bnjax._module_common`)."""

    _layer: ClassVar[Layer]

    def _setup(
        self,
        num_features: int | Sequence[int],
        attributes: Mapping[str, Any],
        *,
        rngs: nnx.Rngs | None,
        inits: tuple[tuple[Callable, Mapping[str, Any]], tuple[Callable, Mapping[str, Any]]],
    ) -> None:
        """Sets the attributes, then the statistics and the parameters (flax's order of
        `rngs.params()` draws: scale, then bias)."""
        self.num_features = num_features
        for name, value in attributes.items():
            setattr(self, name, value)
        cfg = self._config()  # validates the options early, with the functional core's messages
        fshape = self._feature_shape()
        fresh = self._layer.fresh(fshape, cfg, None)
        for name in self._layer.stat_names(cfg, self):
            setattr(self, name, nnx.BatchStat(getattr(fresh, name)))

        def param(used: bool, init: Callable, metadata: Mapping[str, Any]) -> Any:
            if not used:
                return nnx.data(None)
            key = rngs.params() if rngs is not None else jax.random.key(0)
            return nnx.Param(init(key, fshape, cfg.param_dtype), **metadata)

        (scale_init, scale_meta), (bias_init, bias_meta) = inits
        self.scale = param(cfg.use_scale, scale_init, scale_meta)
        self.bias = param(cfg.use_bias, bias_init, bias_meta)

    def _feature_shape(self) -> tuple[int, ...]:
        n = self.num_features
        return (n,) if isinstance(n, int) else tuple(n)

    # The public accessors below are for users and bnjax.recalibration; the call path
    # uses the private ones (nnx.tabulate wraps every public method in jit, so a public
    # method called by __call__ must return JAX types and must not mutate the module).

    def _config(self) -> Any:
        return self._layer.config(self, False)

    def config(self) -> Any:
        """The functional config this module runs (:class:`~bnjax.BatchNormConfig`,
        or :class:`~bnjax.whitening.WhiteningConfig` for :class:`BatchWhitening`)."""
        return self._config()

    def _params(self) -> F.BNParams:
        return F.BNParams(
            scale=None if self.scale is None else self.scale[...],
            bias=None if self.bias is None else self.bias[...],
        )

    def bn_params(self) -> F.BNParams:
        """The current `(scale, bias)` as a :class:`~bnjax.BNParams`."""
        return self._params()

    def bn_state(self) -> Any:
        """The current statistics as the functional state: a :class:`~bnjax.BatchStats`
        (:class:`~bnjax.RenormStats` for :class:`BatchRenorm`,
        :class:`~bnjax.whitening.WhiteningStats` for :class:`BatchWhitening`).

        Statistics that are not stored (`count`/`batches` in `"ema"` mode) are
        returned as their fresh values (zeros).
        """
        return self._state()

    def _state(self) -> Any:
        cfg = self._config()
        stored = {k: getattr(self, k)[...] for k in self._layer.stat_names(cfg, self)}
        return self._layer.state(stored, self._layer.fresh(self._feature_shape(), cfg, None))

    def set_bn_state(self, state: Any) -> None:
        """Writes the stored statistics from a functional state (fields it lacks are kept).

        A complex `mean` (complex inputs) replaces a real stored one: the float32
        mean turns complex64 at the first complex training call (flax.linen's
        convention; `flax.nnx.BatchNorm` 0.12 instead casts it back to float32,
        dropping its imaginary part).
        """
        self._set_state(state)

    def _set_state(self, state: Any) -> None:
        for k in self._layer.stat_names(self._config(), self):
            if k not in state._fields:  # a BatchStats given to a BatchRenorm: keep steps
                continue
            stored, value = getattr(self, k), getattr(state, k)
            if jnp.iscomplexobj(value) and not jnp.iscomplexobj(stored[...]):
                stored.set_value(value)
            else:
                stored[...] = value.astype(stored[...].dtype)

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes `x`.

        Args:
          x: floating input, features on `axis`, e.g. `(N, C)` or NHWC.
          use_running_average: overrides the attribute for this call (flax's rule).
          train: bnjax's explicit switch, `train = not use_running_average`;
            overrides the attribute, contradicting `use_running_average` is an error.
          mask: optional boolean array broadcastable to `x`; only `True`
            elements enter the batch statistics. A feature with no `True`
            element is normalized with the running statistics (the inference
            map) and keeps them.

        Returns:
          The normalized `x` (same shape). In training mode the population
          statistics are updated in place (with `stop_gradient`).
        """
        name = type(self).__name__
        if not tracks_running_stats(self):  # PyTorch's track_running_stats=False
            use_running_average, train = False, None
        use_running_average = resolve_use_running_average(
            use_running_average,
            train,
            default=self.use_running_average,
            missing=f"{name} needs use_running_average: pass it to the constructor or the "
            "call, or use model.train() / model.eval() / nnx.view(model, use_running_average=...)",
        )
        x = jnp.asarray(x)
        hook = _INTERCEPTOR.get() if self._layer.intercepted else None
        if hook is not None:
            return hook(self, x, mask, bool(use_running_average))
        cfg = self._config()
        kernel = cfg.kernel()
        params, state = self._params(), self._state()
        if use_running_average:
            return kernel.apply_eval(params, state, x, cfg)
        y, new_state = kernel.apply_train(params, state, x, cfg, mask=mask)
        if tracks_running_stats(self):
            self._set_state(jax.lax.stop_gradient(new_state))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode; used by :func:`flax.nnx.view`
        (`nnx.view(model, use_running_average=True)`).

        Args:
          use_running_average: if True, normalize with the population statistics
            (inference); if False, with batch statistics (training). `None`
            keeps the current mode.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_Layer):
    """Batch normalization (Ioffe & Szegedy 2015) as a `flax.nnx` module.

    Args:
      num_features: number of features (an int; or a tuple, the feature shape
        for several feature `axis`).
      use_running_average: if True, use the population statistics (Algorithm 2);
        if False, normalize with batch statistics and update the population.
        `.train()` / `.eval()` set it to False / True.
      axis: feature axis or axes (default -1).
      momentum: EMA momentum, flax convention (default 0.99).
      epsilon: default 1e-5.
      dtype: output dtype (default: `result_type(x, params)`).
      param_dtype: dtype of scale and bias (default float32).
      use_bias: learn beta / gamma.
      use_scale: learn beta / gamma.
      bias_init: initializers (zeros / ones).
      scale_init: initializers (zeros / ones).
      axis_name: pool statistics exactly over a named axis.
      axis_index_groups: pool statistics exactly over a named axis.
      use_fast_variance: accepted for flax compatibility, ignored.
      promote_dtype: accepted for flax compatibility, ignored.
      rngs: :class:`flax.nnx.Rngs`; one `params` key is drawn for each of scale
        and bias, exactly as flax does (so the streams of later layers match).
        May be omitted (the initializers are deterministic).
      bias_metadata: metadata of the `nnx.Param` variables.
      scale_metadata: metadata of the `nnx.Param` variables.
      population: `"ema"` (default, flax's), `"average"` (the paper's) or
        `"cumulative"` (PyTorch's `momentum=None`).
      virtual_batch_size: ghost batch size along axis 0 (`None`: whole batch).
      grad: `"vjp"` (default), `"jvp"` or `"autodiff"`.
      running_variance: PyTorch's
        conventions, as :class:`bnjax.linen.BatchNorm`.
      track_running_stats: PyTorch's
        conventions, as :class:`bnjax.linen.BatchNorm`.
      count_batches: PyTorch's
        conventions, as :class:`bnjax.linen.BatchNorm`.

    Attributes:
      scale: `nnx.Param` of shape `(num_features,)` (or `None`).
      bias: `nnx.Param` of shape `(num_features,)` (or `None`).
      mean: `nnx.BatchStat` float32 of shape `(num_features,)` (none
        with `track_running_stats=False`).
      var: `nnx.BatchStat` float32 of shape `(num_features,)` (none
        with `track_running_stats=False`).
      count: `nnx.BatchStat` (`count` with `population="average"`;
        `batches` also with `"cumulative"` or `count_batches=True`).
      batches: `nnx.BatchStat` (`count` with `population="average"`;
        `batches` also with `"cumulative"` or `count_batches=True`).
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = _ZEROS,
        scale_init: Callable = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = None,
        rngs: nnx.Rngs | None = None,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        population: Population = "ema",
        virtual_batch_size: int | None = None,
        grad: F.Grad = "vjp",
        running_variance: Variance = "biased",
        track_running_stats: bool = True,
        count_batches: bool = False,
    ):
        self._setup(
            num_features,
            dict(
                use_running_average=use_running_average,
                axis=tuple(axis) if not isinstance(axis, int) else axis,
                momentum=momentum,
                epsilon=epsilon,
                dtype=dtype,
                param_dtype=param_dtype,
                use_bias=use_bias,
                use_scale=use_scale,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
                use_fast_variance=use_fast_variance,
                promote_dtype=promote_dtype,
                population=population,
                virtual_batch_size=virtual_batch_size,
                grad=grad,
                running_variance=running_variance,
                track_running_stats=track_running_stats,
                count_batches=count_batches,
            ),
            rngs=rngs,
            inits=((scale_init, scale_metadata), (bias_init, bias_metadata)),
        )

    _layer: ClassVar[Layer] = BATCH_NORM


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) as a `flax.nnx` module.

    :class:`BatchNorm` (same constructor, call, `.train()` / `.eval()` /
    :func:`flax.nnx.view` switching, `mask`, `axis_name`, ghost batches) whose
    training output is `gamma (r xhat + d) + beta` with `r`, `d` clipped by
    `r_max`, `d_max` and constant for the gradient; inference is exactly
    batch norm's Algorithm 2 map. Same numerics and rules as
    :class:`bnjax.linen.BatchRenorm` (see there and :class:`bnjax.RenormConfig`).

    Args:
      num_features: as :class:`BatchNorm`.
      r_max: a float `>= 1` or a schedule `f(steps)` (default 3).
      d_max: a float `>= 0` or a schedule (default 5).
      warmup_steps: plain batch norm while `steps < warmup_steps` (default 0).
      **kwargs: every other keyword argument of :class:`BatchNorm` (`momentum`,
        `epsilon`, `axis`, `axis_name`, `rngs`, ...), same defaults.

    Attributes:
      scale: as :class:`BatchNorm`.
      bias: as :class:`BatchNorm`.
      mean: as :class:`BatchNorm`.
      var: as :class:`BatchNorm` (and `count`, `batches` where it stores them).
      steps: `nnx.BatchStat`, int32 scalar, training calls so far (the warm-up
        and the schedules are evaluated at it before it advances).

    The state of a `flax.nnx.BatchNorm` or :class:`BatchNorm` loads with
    `nnx.update(brn, nnx.state(bn))`; `steps` is not in it and keeps its
    value (0 for a new layer: the warm-up starts from the beginning).

    Example:

    ```python
    >>> from flax import nnx
    >>> brn = BatchRenorm(6, momentum=0.9, r_max=3.0, d_max=5.0, rngs=nnx.Rngs(0))
    >>> y = brn(jax.random.normal(jax.random.key(0), (8, 6)))   # train mode
    >>> int(brn.steps[...])
    1
    >>> brn.eval(); y = brn(jnp.ones((1, 6)))                    # Algorithm 2
    ```
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        r_max: float | Callable[[Array], Array] = 3.0,
        d_max: float | Callable[[Array], Array] = 5.0,
        warmup_steps: int = 0,
        **kwargs: Any,
    ):
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        super().__init__(num_features, **kwargs)

    _layer: ClassVar[Layer] = BATCH_RENORM


class BatchNormAct(BatchNorm):
    """Batch norm fused with an invertible activation (In-Place Activated BN) in `flax.nnx`.

    :class:`BatchNorm` (same constructor, call, switching, variables: the state
    of a batch-norm layer loads) whose output is `f(gamma' xhat + beta)` and
    whose backward pass keeps only that output; see
    :class:`bnjax.linen.BatchNormAct` for the rules.

    Args:
      num_features: as :class:`BatchNorm`.
      activation: `"leaky_relu"` (default), `"elu"`, `"identity"` or an
        :class:`~bnjax.activations.Activation`; `"relu"` is an error.
      scale_epsilon: `gamma' = gamma + scale_epsilon sign(gamma)` (default 1e-5).
      **kwargs: every other keyword argument of :class:`BatchNorm`.

    Example:

    ```python
    >>> from flax import nnx
    >>> bn = BatchNormAct(6, activation="elu", rngs=nnx.Rngs(0))
    >>> y = bn(jax.random.normal(jax.random.key(0), (8, 6)))   # train mode
    ```
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        activation: Any = "leaky_relu",
        scale_epsilon: float = 1e-5,
        **kwargs: Any,
    ):
        self.activation = activation
        self.scale_epsilon = scale_epsilon
        super().__init__(num_features, **kwargs)


class BatchWhitening(_Layer):
    """Batch whitening (Decorrelated BN / IterNorm) as a `flax.nnx` module.

    Numerics in :mod:`bnjax.whitening`; the same options as
    :class:`bnjax.linen.BatchWhitening` and the same `.train()` / `.eval()` /
    :func:`flax.nnx.view` switching as :class:`BatchNorm`.

    Args:
      num_features: number of features `d` (an int).
      group_size: features per group (must divide `d`; `None`: all).
      method: `"zca"` or `"iternorm"`; iterations: Newton-Schulz steps (5).
      use_running_average: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      axis: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      momentum: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      epsilon: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      dtype: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      param_dtype: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `rngs`, `population`.
      allow_singular: train on batches with no more examples than `group_size`.

    Attributes:
      scale: `nnx.Param` of shape `(d,)` (or `None`).
      bias: `nnx.Param` of shape `(d,)` (or `None`).
      mean: `nnx.BatchStat` `(d,)`; whitening: `nnx.BatchStat`
        `(g, G, G)` (the inference map per group); with
        `population="average"` also `cov`, `count`, `batches`.

    Example:

    ```python
    >>> from flax import nnx
    >>> bw = BatchWhitening(8, group_size=4, rngs=nnx.Rngs(0))
    >>> y = bw(jax.random.normal(jax.random.key(0), (32, 8)))   # train mode
    >>> bw.eval(); y = bw(jnp.ones((1, 8)))                      # population map
    ```
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        method: W.Method = "zca",
        iterations: int = 5,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = _ZEROS,
        scale_init: Callable = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        population: Population = "ema",
        allow_singular: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        self._setup(
            num_features,
            dict(
                group_size=group_size,
                method=method,
                iterations=iterations,
                use_running_average=use_running_average,
                axis=axis,
                momentum=momentum,
                epsilon=epsilon,
                dtype=dtype,
                param_dtype=param_dtype,
                use_bias=use_bias,
                use_scale=use_scale,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
                population=population,
                allow_singular=allow_singular,
            ),
            rngs=rngs,
            inits=((scale_init, {}), (bias_init, {})),
        )

    _layer: ClassVar[Layer] = BATCH_WHITENING
