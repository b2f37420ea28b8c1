"""``bnjax.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Same constructor, same variables (``scale``/``bias`` as :class:`flax.nnx.Param`,
``mean``/``var`` as :class:`flax.nnx.BatchStat`, same shapes and dtypes), the
same ``.train()`` / ``.eval()`` / :func:`flax.nnx.view` switching, so the state of
a ``flax.nnx.BatchNorm`` loads unchanged (``nnx.update(bn, nnx.state(flax_bn))``).
All numerics live in :mod:`bnjax.functional`; this module only maps NNX variables
to the functional pytrees and back.

Extra keyword arguments (defaults keep flax's behaviour):

* ``population="average"``: the paper's exact population average (Algorithm 2)
  instead of the EMA; adds ``count`` and ``batches`` as ``nnx.BatchStat``. What
  ``var`` means in each mode is documented in :mod:`bnjax.population`: with
  ``"ema"`` it is an EMA of the *biased* batch variance (flax's convention); with
  ``"average"`` it is the pooled *unbiased* within-batch variance
  ``sum_B n_B sigma2_B / sum_B (n_B - 1)`` (the paper's ``m/(m-1) E_B[sigma2_B]``
  for equal batch sizes; ``n_B`` counts batch times spatial positions);
* ``virtual_batch_size``: ghost batch norm; ``grad``: ``"vjp"`` (the paper's
  backward pass), ``"jvp"`` or ``"autodiff"``.

Complex inputs and masks behave as in :mod:`bnjax.linen` (complex mean, real
variance; a fully masked feature is normalized with the running statistics). The
float32 ``mean`` turns complex64 at the first complex training call, as
``flax.linen.BatchNorm``'s does (``flax.nnx.BatchNorm`` keeps it float32 and so
drops the imaginary part of the running mean).

``use_fast_variance`` and ``promote_dtype`` are accepted and ignored: the
variance is always exact and statistics are always at least float32.

Example::

    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> bn = BatchNorm(6, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.ones((4, 6)) + jnp.arange(4.0)[:, None])   # train mode: batch stats
    >>> bn.eval()
    >>> y = bn(jnp.ones((1, 6)))                              # population stats
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from bnjax import functional as F
from bnjax import whitening as W
from bnjax._module_common import (
    batch_stats,
    config_of,
    renorm_config_of,
    resolve_use_running_average,
    stat_names,
    whitening_config_of,
    whitening_stat_names,
    whitening_stats,
)
from bnjax.population import renorm_stats

__all__ = ["BatchNorm", "BatchRenorm", "BatchWhitening", "intercept"]

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
    """Routes every :class:`BatchNorm` call through ``fn`` inside the ``with`` block.

    The NNX counterpart of :func:`flax.linen.intercept_methods`, used by
    :mod:`bnjax.recalibrate` and :mod:`bnjax.diagnostics` to capture each layer's
    input. ``fn(module, x, mask, use_running_average)`` returns the layer's output
    and must not mutate the module (it runs at trace time under ``jit``).
    """
    token = _INTERCEPTOR.set(fn)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015) as a ``flax.nnx`` module.

    Args:
      num_features: number of features (an int; or a tuple, the feature shape
        for several feature ``axis``).
      use_running_average: if True, use the population statistics (Algorithm 2);
        if False, normalize with batch statistics and update the population.
        ``.train()`` / ``.eval()`` set it to False / True.
      axis: feature axis or axes (default -1).
      momentum: EMA momentum, flax convention (default 0.99).
      epsilon: default 1e-5.
      dtype: output dtype (default: ``result_type(x, params)``).
      param_dtype: dtype of scale and bias (default float32).
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: initializers (zeros / ones).
      axis_name, axis_index_groups: pool statistics exactly over a named axis.
      use_fast_variance, promote_dtype: accepted for flax compatibility, ignored.
      rngs: :class:`flax.nnx.Rngs`; one ``params`` key is drawn for each of scale
        and bias, exactly as flax does (so the streams of later layers match).
        May be omitted (the initializers are deterministic).
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` variables.
      population: ``"ema"`` (default, flax's) or ``"average"`` (the paper's).
      virtual_batch_size: ghost batch size along axis 0 (``None``: whole batch).
      grad: ``"vjp"`` (default), ``"jvp"`` or ``"autodiff"``.

    Attributes:
      scale, bias: ``nnx.Param`` of shape ``(num_features,)`` (or ``None``).
      mean, var: ``nnx.BatchStat`` float32 of shape ``(num_features,)``.
      count, batches: ``nnx.BatchStat`` (only with ``population="average"``).
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
        population: str = "ema",
        virtual_batch_size: int | None = None,
        grad: str = "vjp",
    ):
        fshape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = tuple(axis) if not isinstance(axis, int) else axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.population = population
        self.virtual_batch_size = virtual_batch_size
        self.grad = grad
        cfg = self.config()  # validates the options early, with the functional core's messages

        fresh = F.init_state(fshape, jnp.float32)
        if cfg.renorm is not None:  # BatchRenorm: plus the int32 step counter
            fresh = renorm_stats(fresh)
        for name in self._stat_names():  # mean, var (, count, batches) (, steps)
            setattr(self, name, nnx.BatchStat(getattr(fresh, name)))

        def param(used: bool, init: Callable, metadata: Mapping[str, Any]) -> Any:
            if not used:
                return nnx.data(None)
            key = rngs.params() if rngs is not None else jax.random.key(0)
            return nnx.Param(init(key, fshape, param_dtype), **metadata)

        self.scale = param(use_scale, scale_init, scale_metadata)
        self.bias = param(use_bias, bias_init, bias_metadata)

    def config(self) -> F.BatchNormConfig:
        """The functional :class:`~bnjax.BatchNormConfig` this module runs."""
        return config_of(
            self,
            population=self.population,
            virtual_batch_size=self.virtual_batch_size,
            grad=self.grad,
        )

    def _stat_names(self) -> tuple[str, ...]:
        return stat_names(self.population, renorm=self.config().renorm is not None)

    def bn_params(self) -> F.BNParams:
        """The current ``(scale, bias)`` as a :class:`~bnjax.BNParams`."""
        return F.BNParams(
            scale=None if self.scale is None else self.scale[...],
            bias=None if self.bias is None else self.bias[...],
        )

    def bn_state(self) -> F.BatchStats:
        """The current population statistics as a :class:`~bnjax.BatchStats`
        (:class:`~bnjax.RenormStats` for :class:`BatchRenorm`).

        In ``"ema"`` mode ``count``/``batches`` are not stored and are returned as zeros.
        """
        names = self._stat_names()
        return batch_stats({k: getattr(self, k)[...] for k in names}, renorm="steps" in names)

    def set_bn_state(self, state: F.BatchStats) -> None:
        """Writes population statistics (``count``/``batches`` only if stored).

        A complex ``mean`` (complex inputs) replaces a real stored one: the float32
        mean turns complex64 at the first complex training call (flax.linen's
        convention; ``flax.nnx.BatchNorm`` 0.12 instead casts it back to float32,
        dropping its imaginary part).
        """
        for k in self._stat_names():
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
        """Normalizes ``x``.

        Args:
          x: floating input, features on ``axis``, e.g. ``(N, C)`` or NHWC.
          use_running_average: overrides the attribute for this call (flax's rule).
          train: bnjax's explicit switch, ``train = not use_running_average``;
            overrides the attribute, contradicting ``use_running_average`` is an error.
          mask: optional boolean array broadcastable to ``x``; only ``True``
            elements enter the batch statistics. A feature with no ``True``
            element is normalized with the running statistics (the inference
            map) and keeps them.

        Returns:
          The normalized ``x`` (same shape). In training mode the population
          statistics are updated in place (with ``stop_gradient``).
        """
        use_running_average = resolve_use_running_average(
            use_running_average,
            train,
            default=self.use_running_average,
            missing="BatchNorm needs use_running_average: pass it to the constructor or the "
            "call, or use model.train() / model.eval() / nnx.view(model, use_running_average=...)",
        )
        x = jnp.asarray(x)
        hook = _INTERCEPTOR.get()
        if hook is not None:
            return hook(self, x, mask, bool(use_running_average))
        cfg = self.config()
        params, state = self.bn_params(), self.bn_state()
        if use_running_average:
            return F.apply_eval(params, state, x, cfg)
        y, new_state = F.apply_train(params, state, x, cfg, mask=mask)
        self.set_bn_state(jax.lax.stop_gradient(new_state))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by :func:`flax.nnx.view` (``nnx.view(model, use_running_average=True)``)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) as a ``flax.nnx`` module.

    :class:`BatchNorm` (same constructor, call, ``.train()`` / ``.eval()`` /
    :func:`flax.nnx.view` switching, ``mask``, ``axis_name``, ghost batches) whose
    training output is ``gamma (r xhat + d) + beta`` with ``r``, ``d`` clipped by
    ``r_max``, ``d_max`` and constant for the gradient; inference is exactly
    batch norm's Algorithm 2 map. Same numerics and rules as
    :class:`bnjax.linen.BatchRenorm` (see there and :class:`bnjax.RenormConfig`).

    Args:
      num_features: as :class:`BatchNorm`.
      r_max: a float ``>= 1`` or a schedule ``f(steps)`` (default 3).
      d_max: a float ``>= 0`` or a schedule (default 5).
      warmup_steps: plain batch norm while ``steps < warmup_steps`` (default 0).
      **kwargs: every other keyword argument of :class:`BatchNorm` (``momentum``,
        ``epsilon``, ``axis``, ``axis_name``, ``rngs``, ...), same defaults.

    Attributes:
      scale, bias, mean, var (, count, batches): as :class:`BatchNorm`.
      steps: ``nnx.BatchStat``, int32 scalar, training calls so far (the warm-up
        and the schedules are evaluated at it before it advances).

    The state of a ``flax.nnx.BatchNorm`` or :class:`BatchNorm` loads with
    ``nnx.update(brn, nnx.state(bn))``; ``steps`` is not in it and keeps its
    value (0 for a new layer: the warm-up starts from the beginning).

    Example::

        >>> from flax import nnx
        >>> brn = BatchRenorm(6, momentum=0.9, r_max=3.0, d_max=5.0, rngs=nnx.Rngs(0))
        >>> y = brn(jax.random.normal(jax.random.key(0), (8, 6)))   # train mode
        >>> int(brn.steps[...])
        1
        >>> brn.eval(); y = brn(jnp.ones((1, 6)))                    # Algorithm 2
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

    def config(self) -> F.BatchNormConfig:
        """The functional :class:`~bnjax.BatchNormConfig` this module runs (with ``renorm``)."""
        return dataclasses.replace(super().config(), renorm=renorm_config_of(self))


class BatchWhitening(nnx.Module):
    """Batch whitening (Decorrelated BN / IterNorm) as a ``flax.nnx`` module.

    Numerics in :mod:`bnjax.whitening`; the same options as
    :class:`bnjax.linen.BatchWhitening` and the same ``.train()`` / ``.eval()`` /
    :func:`flax.nnx.view` switching as :class:`BatchNorm`.

    Args:
      num_features: number of features ``d`` (an int).
      group_size: features per group (must divide ``d``; ``None``: all).
      method: ``"zca"`` or ``"iternorm"``; iterations: Newton-Schulz steps (5).
      use_running_average, axis, momentum, epsilon, dtype, param_dtype: as
        :class:`BatchNorm` (``axis`` is one int here), and so are ``use_bias``,
        ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
        ``axis_index_groups``, ``rngs``, ``population``.
      allow_singular: train on batches with no more examples than ``group_size``.

    Attributes:
      scale, bias: ``nnx.Param`` of shape ``(d,)`` (or ``None``).
      mean: ``nnx.BatchStat`` ``(d,)``; whitening: ``nnx.BatchStat``
        ``(g, G, G)`` (the inference map per group); with
        ``population="average"`` also ``cov``, ``count``, ``batches``.

    Example::

        >>> from flax import nnx
        >>> bw = BatchWhitening(8, group_size=4, rngs=nnx.Rngs(0))
        >>> y = bw(jax.random.normal(jax.random.key(0), (32, 8)))   # train mode
        >>> bw.eval(); y = bw(jnp.ones((1, 8)))                      # population map
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        method: str = "zca",
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
        population: str = "ema",
        allow_singular: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        self.num_features = num_features
        self.group_size = group_size
        self.method = method
        self.iterations = iterations
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.population = population
        self.allow_singular = allow_singular
        fresh = W.init_state(num_features, self.config())  # validates the options
        for name in whitening_stat_names(population):
            setattr(self, name, nnx.BatchStat(getattr(fresh, name)))

        def param(used: bool, init: Callable) -> Any:
            if not used:
                return nnx.data(None)
            key = rngs.params() if rngs is not None else jax.random.key(0)
            return nnx.Param(init(key, (num_features,), param_dtype))

        self.scale = param(use_scale, scale_init)
        self.bias = param(use_bias, bias_init)

    def config(self) -> W.WhiteningConfig:
        """The functional :class:`~bnjax.whitening.WhiteningConfig` this module runs."""
        return whitening_config_of(self)

    def bn_params(self) -> F.BNParams:
        """The current ``(scale, bias)`` as a :class:`~bnjax.BNParams`."""
        return F.BNParams(
            scale=None if self.scale is None else self.scale[...],
            bias=None if self.bias is None else self.bias[...],
        )

    def whitening_state(self) -> W.WhiteningStats:
        """The population statistics as :class:`~bnjax.whitening.WhiteningStats`
        (fields not stored are fresh values)."""
        fresh = W.init_state(self.num_features, self.config())
        names = whitening_stat_names(self.population)
        return whitening_stats({k: getattr(self, k)[...] for k in names}, fresh)

    def set_whitening_state(self, state: W.WhiteningStats) -> None:
        """Writes the stored population statistics."""
        for k in whitening_stat_names(self.population):
            stored = getattr(self, k)
            stored[...] = getattr(state, k).astype(stored[...].dtype)

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: Array | None = None,
    ) -> Array:
        """Whitens ``x``; in training mode the statistics are updated in place."""
        use_running_average = resolve_use_running_average(
            use_running_average,
            train,
            default=self.use_running_average,
            missing="BatchWhitening needs use_running_average: pass it to the constructor or "
            "the call, or use model.train() / model.eval()",
        )
        cfg = self.config()
        params, state = self.bn_params(), self.whitening_state()
        if use_running_average:
            return W.apply_eval(params, state, x, cfg)
        y, new_state = W.apply_train(params, state, x, cfg, mask=mask)
        self.set_whitening_state(jax.lax.stop_gradient(new_state))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by :func:`flax.nnx.view`."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
