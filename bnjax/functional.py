"""Functional batch normalization: Algorithm 1 (training), Algorithm 2 (inference).

Pure functions on explicit pytrees, no hidden state, no Flax:

```python
cfg = BatchNormConfig(axis=-1, momentum=0.99)
params, state = init(100, cfg)                  # BNParams, BatchStats
y, state = apply_train(params, state, x, cfg)   # mini-batch statistics
y = apply_eval(params, state, x, cfg)           # frozen statistics, one affine map
```

`cfg` is a frozen (hashable) dataclass, so it can be a static argument of
`jax.jit` and equal configs never retrace.

Gradient (`cfg.grad`):

* `"vjp"` (default): A `jax.custom_vjp` implementing the paper's backward pass in its fused form
  `dx = gamma / (m sigma) * (m dy - sum(dy) - xhat sum(dy xhat))`,
  `dgamma = sum(dy xhat)`, `dbeta = sum(dy)`, with masks (only valid
  elements enter the statistics; `m` is their count) and with cotangents of
  the returned batch statistics. It saves only `x`, the mean and the inverse
  standard deviation. The backward rule is plain `jax.numpy`, so
  reverse-over-reverse (Hessian-vector products by `grad(grad(...))`) works;
  forward mode (`jax.jvp`, `jax.jacfwd`) is not available on a
  `custom_vjp`.
* `"jvp"`: A `jax.custom_jvp` whose tangent map is the linearization of the same
  algebra, `dy = gamma (dxhat) + dgamma xhat + dbeta` with
  `dxhat = (dx - mean(dx) - xhat mean(dx xhat)) / sigma`; JAX transposes it
  into exactly the fused backward above. Forward and reverse mode, any order.
* `"autodiff"`: Plain JAX autodiff of the forward computation (a reference).

Batch Renormalization (Ioffe 2017; `BatchNormConfig(renorm=RenormConfig(...))`)
is an option of the same kernel, not a second copy of it. With the running
statistics `mu, sigma = sqrt(var + eps)` *before* the update and the batch
statistics `mu_B, sigma_B = sqrt(sigma2_B + eps)` (pooled over `axis_name`,
masked, per ghost batch with `virtual_batch_size`), per feature:

```python
r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
y = gamma * (r * xhat + d) + beta,     xhat = (x - mu_B) / sigma_B
```

so the training map is the inference map `gamma (x - mu) / sigma + beta`
wherever the clips are inactive. The gradient is batch norm's with `gamma`
replaced by `gamma r` (`dgamma = sum(dy (r xhat + d))`, `dbeta = sum(dy)`),
in all three `grad` implementations; nothing flows into the running statistics
through `r` and `d`. The state is a :class:`~bnjax.population.RenormStats`
(`BatchStats` plus an int32 `steps` counter, incremented by every training
call); for `steps < warmup_steps` the layer is plain batch norm (`r = 1`,
`d = 0`, bit for bit), and `r_max`/`d_max` may be schedules of `steps`
(:func:`renorm_schedule` is the paper's). Details in :class:`RenormConfig`.

Masks and complex inputs: see :func:`apply_train` (a feature without a valid
element is normalized with the running statistics; complex inputs follow flax:
complex mean, real variance `E|x - mu|^2`). For complex inputs the custom
rules use JAX's convention for complex cotangents (the pairing
`Re(sum(ct * t))`): `dx = gamma_inv dy + w (p + q conj(x - mean))`.

`jax.vmap` without an `axis_name`: each mapped slice is normalized with its
own statistics and gets its own state (an ensemble of models). With
`cfg.axis_name` bound by `vmap`/`pmap`/`shard_map`, statistics (and the
backward reductions) are pooled exactly over that axis. Parameter gradients are
the per-device contributions under `pmap` and `shard_map(check_vma=False)`
(psum them as usual); under `shard_map` with `check_vma=True` JAX already sums
the gradients of replicated gamma/beta (see docs/multidevice.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from bnjax import population as _pop
from bnjax._checks import canonicalize_axes, check_input, check_mask, check_shape, check_use_flags
from bnjax._config import check_choice, check_common
from bnjax._kernel import Spec, normalize
from bnjax._numerics import is_complex, real_dtype, safe_rsqrt, stats_dtype
from bnjax._sharding import match_varying, unmapped
from bnjax.activations import Activation
from bnjax.activations import resolve as resolve_activation
from bnjax.population import VARIANCES, BatchStats, Population, RenormStats, Variance
from bnjax.stats import (
    ALGORITHMS,
    Algorithm,
    Moments,
    all_reduce,
    merge_along,
    moments,
    resolve_algorithm,
)

__all__ = [
    "GRADS",
    "BNParams",
    "BatchNormConfig",
    "BatchStats",
    "Grad",
    "Kernel",
    "RenormConfig",
    "RenormStats",
    "apply",
    "apply_eval",
    "apply_train",
    "batch_moments",
    "effective_params",
    "feature_axes",
    "inference_affine",
    "init",
    "renorm_schedule",
]

Array = jax.Array
Axes = int | tuple[int, ...]
Schedule = Callable[[Array], Array]
Grad = Literal["vjp", "jvp", "autodiff"]
GRADS: tuple[str, ...] = get_args(Grad)


def _check_bound(name: str, value: Any, low: float) -> Any:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a float or a schedule (a callable of the step count), "
            f"got {value!r}"
        )
    if not value >= low:  # also rejects NaN
        raise ValueError(f"{name} must be >= {low:g}, got {name}={value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class RenormConfig:
    """Batch Renormalization (Ioffe 2017) options of a :class:`BatchNormConfig`.

    Attributes:
      r_max: bound of `r = clip(sigma_B / sigma, 1 / r_max, r_max)`: a float
        `>= 1`, or a schedule `f(steps) -> value` (a plain callable or an optax
        schedule; traced under `jit`, evaluated at the state's stored `steps`).
      d_max: bound of `d = clip((mu_B - mu) / sigma, -d_max, d_max)`: a float
        `>= 0` or a schedule.
      warmup_steps: the first `warmup_steps` training calls (`steps <
        warmup_steps`) are plain batch norm (`r = 1`, `d = 0`), while the
        running statistics settle. An int `>= 0`.

    `r_max = 1` and `d_max = 0` is plain batch norm. Floats out of range (or
    NaN) raise `ValueError` here; a schedule's values cannot be checked when
    traced, so they are clamped at use (`r_max` to `>= 1`, `d_max` to
    `>= 0`), which is the nearest valid bound.

    Behaviour at the edges (documented choices):

    * ghost batches (`virtual_batch_size`): `r` and `d` are computed per
      ghost batch, from its own moments against the (shared) running statistics;
      the running statistics are updated with the whole batch, as for batch norm;
    * a feature with no valid element in the batch (masks) gets `r = 1`,
      `d = 0` and, as in batch norm, is normalized with the running statistics:
      its output is the inference map `gamma (x - mu) / sigma + beta` (batch
      norm's output for it, bit for bit) and it keeps its state;
    * complex inputs raise `TypeError` (the clips of `r` and `d` are defined
      for real statistics only);
    * a feature whose batch moments are not finite (a NaN or inf in the batch)
      keeps its stored statistics (`mean`, `var`, `count`, `batches`):
      unlike batch norm, Batch Renorm's *training* output depends on the
      running statistics, so one bad batch would otherwise poison every later
      step. The bad batch itself is visible: its outputs (and loss) for that
      feature are NaN, and that feature's `count` does not advance
      (`steps` does: it counts training calls).

    Examples:
      >>> cfg = BatchNormConfig(renorm=RenormConfig(r_max=3.0, d_max=5.0, warmup_steps=1000))
      >>> r_max, d_max = renorm_schedule()              # the paper's relaxation
      >>> cfg = BatchNormConfig(momentum=0.99, renorm=RenormConfig(r_max, d_max))
    """

    r_max: float | Schedule = 3.0
    d_max: float | Schedule = 5.0
    warmup_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "r_max", _check_bound("r_max", self.r_max, 1.0))
        object.__setattr__(self, "d_max", _check_bound("d_max", self.d_max, 0.0))
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"warmup_steps must be an int, got {w!r}")
        if w < 0:
            raise ValueError(f"warmup_steps must be >= 0, got warmup_steps={w}")

    def bounds(self, steps: Array, dtype=jnp.float32) -> tuple[Array, Array]:
        """`(r_max, d_max)` at the (possibly traced) step count `steps`.

        Schedules are evaluated at `steps` and clamped into range; before
        `warmup_steps` the bounds are `(1, 0)` (plain batch norm).
        """

        def at(v, low):
            if callable(v):
                return jnp.maximum(jnp.asarray(v(steps), dtype), low)
            return jnp.asarray(v, dtype)

        r_max, d_max = at(self.r_max, 1), at(self.d_max, 0)
        if self.warmup_steps:
            warm = steps < self.warmup_steps
            r_max = jnp.where(warm, jnp.ones((), dtype), r_max)
            d_max = jnp.where(warm, jnp.zeros((), dtype), d_max)
        return r_max, d_max


def renorm_schedule(
    start: int = 5_000,
    r_max: float = 3.0,
    r_max_steps: int = 40_000,
    d_max: float = 5.0,
    d_max_steps: int = 25_000,
) -> tuple[Schedule, Schedule]:
    """The paper's relaxation of the Batch Renorm bounds, as two optax schedules.

    `r_max` is 1 and `d_max` 0 (plain batch norm) for the first `start`
    steps, then both grow linearly, reaching `r_max` at step `r_max_steps`
    and `d_max` at step `d_max_steps` and staying there. The defaults are
    Ioffe (2017)'s Inception setting (plain BN for ~5k steps, `r_max = 3` by
    ~40k, `d_max = 5` by ~25k); scale the step counts to your run length.

    Returns:
      `(r_max_fn, d_max_fn)` (`optax.linear_schedule` s), for
      `RenormConfig(r_max_fn, d_max_fn)` or the modules' `r_max=` / `d_max=`.

    Raises:
      ValueError: `r_max < 1`, `d_max < 0`, `start < 0`, or an end step
        not after `start`.

    Examples:
      >>> r_fn, d_fn = renorm_schedule(start=100, r_max_steps=800, d_max_steps=500)
      >>> float(r_fn(100)), float(r_fn(450)), float(d_fn(10_000))
      (1.0, 2.0, 5.0)
    """
    _check_bound("r_max", r_max, 1.0)
    _check_bound("d_max", d_max, 0.0)
    if start < 0:
        raise ValueError(f"start must be >= 0, got start={start}")
    for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
        if end <= start:
            raise ValueError(f"{name}={end} must be after start={start}")
    r_fn = optax.linear_schedule(1.0, float(r_max), r_max_steps - start, start)
    d_fn = optax.linear_schedule(0.0, float(d_max), d_max_steps - start, start)
    return r_fn, d_fn


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """Static (hashable) configuration of a batch-norm layer.

    Attributes:
      axis: feature axis or axes (one gamma/beta per feature); statistics are
        taken over all other axes. `-1` for NHWC / (batch, features), `1` for NCHW.
      epsilon: added to the variance for numerical stability (>= 0; with 0 a
        constant feature is mapped to `beta` rather than to `0/0`).
      momentum: EMA momentum, flax convention `new = momentum * old + (1 - momentum) * batch`.
      use_scale: learn `gamma` (else gamma = 1).
      use_bias: learn `beta` (else beta = 0).
      dtype: output dtype; `None` means `result_type(x, params)` like flax.
      param_dtype: dtype of gamma and beta made by :func:`init`.
      population: `"ema"`, `"average"` (the paper's Algorithm 2) or
        `"cumulative"` (PyTorch's `momentum=None`), see :mod:`bnjax.population`.
      running_variance: the batch variance that `"ema"` and `"cumulative"`
        fold into `var`: `"biased"` (`sigma2_B`, flax's; the default) or
        `"unbiased"` (`m / (m - 1) sigma2_B`, PyTorch's `running_var`). The
        training output always uses the biased `sigma2_B` (both libraries do);
        `"average"` always keeps the pooled unbiased variance.
      axis_name: a named axis (`shard_map`/`pmap`/`vmap`) over which the
        statistics are pooled exactly, or `None`.
      axis_index_groups: optional groups of indices of `axis_name` to pool within.
      virtual_batch_size: ghost batch norm: normalize sub-batches of this many
        examples along axis 0 independently (`None`: the whole batch).
      stats_method: `"auto"` (default: `"two_pass"` on CPU, `"shifted"` on
        GPU/TPU), `"two_pass"` or `"shifted"`; all exact, see :mod:`bnjax.stats`.
      grad: `"vjp"`, `"jvp"` or `"autodiff"` (see the module docstring).
      renorm: `None` (batch norm) or a :class:`RenormConfig`: Batch
        Renormalization, whose state is a :class:`~bnjax.population.RenormStats`.
      activation: `None`, or an invertible activation fused after the affine
        map (In-Place Activated BN, :mod:`bnjax.activations`): `"identity"`,
        `"leaky_relu"`, `"elu"` or an :class:`~bnjax.activations.Activation`;
        the output is `f(gamma' xhat + beta)` and the backward pass
        (`grad="vjp"`) keeps only that output, never the input.
      scale_epsilon: with an activation, the scale used is
        `gamma' = gamma + scale_epsilon * sign(gamma)` (`sign(0) = +1`), so
        `|gamma'| >= scale_epsilon` and the affine map stays invertible; the
        gradient with respect to `gamma` is unchanged (`d gamma' / d gamma = 1`).
        A batch-norm checkpoint evaluates within `scale_epsilon |xhat|` of
        plain batch norm. Must be > 0; unused without an activation.
    """

    axis: Axes = -1
    epsilon: float = 1e-5
    momentum: float = 0.99
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    population: Population = "ema"
    running_variance: Variance = "biased"
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    virtual_batch_size: int | None = None
    stats_method: Algorithm = "auto"
    grad: Grad = "vjp"
    renorm: RenormConfig | None = None
    activation: Activation | str | None = None
    scale_epsilon: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "activation", resolve_activation(self.activation))
        if self.activation is not None and not self.scale_epsilon > 0:
            raise ValueError(
                f"scale_epsilon must be > 0 with an activation (it keeps gamma invertible), "
                f"got {self.scale_epsilon}"
            )
        if self.renorm is not None and not isinstance(self.renorm, RenormConfig):
            raise TypeError(f"renorm must be None or a RenormConfig, got {self.renorm!r}")
        check_common(self)
        check_choice("grad", self.grad, GRADS)
        check_choice("running_variance", self.running_variance, VARIANCES)
        check_choice("stats_method", self.stats_method, ALGORITHMS)
        if self.virtual_batch_size is not None and self.virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {self.virtual_batch_size}")
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))

    def kernel(self) -> Kernel:
        """This layer's pure functions, `Kernel(apply_train, apply_eval)` (see :func:`apply`)."""
        return Kernel(apply_train, apply_eval)


class BNParams(NamedTuple):
    """Learned parameters: `scale` (gamma) and `bias` (beta), or `None` if unused."""

    scale: Array | None
    bias: Array | None


class Kernel(NamedTuple):
    """The two pure functions of a layer, as a config's `kernel()` names them.

    Attributes:
      apply_train: `(params, state, x, config, *, mask=None) -> (y, new_state)`.
      apply_eval: `(params, state, x, config) -> y`.
    """

    apply_train: Callable[..., tuple[Array, Any]]
    apply_eval: Callable[..., Array]


# --------------------------------------------------------------------------- shapes


def feature_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
    """The canonical (sorted, non-negative) feature axes of a rank-`ndim` input."""
    return canonicalize_axes(ndim, axis, name="axis")


def _feature_shape(shape: tuple[int, ...], faxes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in faxes)


def _bcast(a, shape, faxes):
    """A feature-shaped `a` reshaped to broadcast against an input of `shape`."""
    if a is None:
        return None
    return jnp.reshape(a, tuple(s if i in faxes else 1 for i, s in enumerate(shape)))


def _check_features(x_shape, faxes, arr: Array | None, name: str) -> None:
    fshape = _feature_shape(x_shape, faxes)
    check_shape(arr, fshape, name, x_shape, f"features {fshape} on axis {faxes}")


# --------------------------------------------------------------------------- init


def init(
    feature_shape: int | Sequence[int], config: BatchNormConfig = BatchNormConfig()
) -> tuple[BNParams, BatchStats | RenormStats]:
    """Parameters (gamma = 1, beta = 0) and fresh statistics for `feature_shape`.

    Args:
      feature_shape: number of features, or the shape of the feature axes
        (`(C,)` for `axis=-1`; `(H, W)` for `axis=(1, 2)`).
      config: the layer's :class:`BatchNormConfig` (`param_dtype`, `use_scale`, `use_bias`).

    Returns:
      `(BNParams, BatchStats)`; statistics are float32 (at least). With
      `config.renorm` the state is a :class:`~bnjax.population.RenormStats`
      with `steps = 0`.

    Examples:
      >>> params, state = init(64)
      >>> params.scale.shape, state.var.shape
      ((64,), (64,))
    """
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    pdt = config.param_dtype
    params = BNParams(
        scale=jnp.ones(shape, pdt) if config.use_scale else None,
        bias=jnp.zeros(shape, pdt) if config.use_bias else None,
    )
    # real var/count (a complex param_dtype gives complex gamma/beta, float32 state;
    # the mean turns complex at the first complex batch)
    state = _pop.init_stats(shape, real_dtype(stats_dtype(pdt)))
    if config.renorm is not None:
        state = _pop.renorm_stats(state)
    return params, state


# --------------------------------------------------------------------------- checks


def _out_dtype(x, params: BNParams, config: BatchNormConfig):
    if config.dtype is not None:
        dtype = jnp.dtype(config.dtype)
        if is_complex(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"config.dtype={dtype} is real but would drop the imaginary part of the "
                f"{jnp.result_type(x)} input x of shape {tuple(x.shape)}: use a complex "
                "dtype (e.g. jnp.complex64) or dtype=None"
            )
        return dtype
    args = [x] + [p for p in params if p is not None]
    return jnp.result_type(*args)


def _prepare(
    params: BNParams, x: Array, config: BatchNormConfig, state, *, train: bool = True
):
    """`(x, feature axes)` after every check of a call's arguments. At inference
    (`train=False`) an unbatched example (every axis a feature axis) is accepted."""
    x = jnp.asarray(x)
    check_input(x)
    faxes = feature_axes(x.ndim, config.axis)
    if train and len(faxes) == x.ndim:
        raise ValueError(
            f"axis={config.axis!r} makes every axis of the input (shape {tuple(x.shape)}) a "
            "feature axis: there is nothing to normalize over"
        )
    _check_features(x.shape, faxes, params.scale, "params.scale")
    _check_features(x.shape, faxes, params.bias, "params.bias")
    for name, p in zip(("params.scale", "params.bias"), params, strict=True):
        if is_complex(p) and not is_complex(x):
            raise TypeError(
                f"{name} is {p.dtype} but the input x (shape {tuple(x.shape)}) is real "
                f"({x.dtype}): complex parameters need a complex x, e.g. "
                "x.astype(jnp.complex64)"
            )
    if state is not None:
        for name in state._fields:
            if name != "steps":
                _check_features(x.shape, faxes, getattr(state, name), f"state.{name}")
    check_use_flags(params, config)
    return x, faxes


def _check_renorm(config: BatchNormConfig, state, x: Array) -> None:
    """Batch Renorm needs a scalar integer step counter and a real input."""
    if config.renorm is None:
        return
    steps = getattr(state, "steps", None)
    if steps is None:
        raise ValueError(
            f"Batch Renorm (config.renorm) needs a RenormStats state with a step counter, "
            f"got {type(state).__name__}; make one with init(features, config) or "
            "bnjax.renorm_stats(state)"
        )
    if jnp.ndim(steps) != 0 or not jnp.issubdtype(jnp.result_type(steps), jnp.integer):
        raise ValueError(
            f"state.steps must be an integer scalar, got shape {tuple(jnp.shape(steps))} "
            f"and dtype {jnp.result_type(steps)}"
        )
    if is_complex(x):
        raise TypeError(
            f"Batch Renorm (config.renorm) is defined for real inputs only, got a "
            f"{x.dtype} x of shape {tuple(x.shape)}: use batch norm (renorm=None) for "
            "complex inputs"
        )


def _check_activation(config: BatchNormConfig, x: Array) -> None:
    if config.activation is not None and is_complex(x):
        raise TypeError(
            f"a fused activation (config.activation={config.activation.name!r}) is defined for "
            f"real inputs only, got a {x.dtype} x of shape {tuple(x.shape)}"
        )


def effective_params(params: BNParams, config: BatchNormConfig) -> BNParams:
    """The parameters a layer applies: with `config.activation` the scale is
    `gamma + scale_epsilon * sign(gamma)` (`sign(0) = +1`: never 0, so the
    fused layer's affine map is invertible); else `params` unchanged.

    Use it with :func:`inference_affine` to get the inference map of a fused layer
    (the activation then follows the affine map).
    """
    if config.activation is None or params.scale is None:
        return params
    g = params.scale
    eps = jnp.asarray(config.scale_epsilon, g.dtype)
    return params._replace(scale=g + jnp.where(g < 0, -eps, eps))


# --------------------------------------------------------------------------- train


class _Call(NamedTuple):
    """One kernel call's operands: `x` (grouped into ghost batches along a new axis 0
    with `virtual_batch_size`), its mask, the broadcast parameters, the reduced
    axes and the axis to pool over (ghost batches are local: `None`)."""

    x: Array
    mask: Array | None
    scale: Array | None
    bias: Array | None
    stat_axes: tuple[int, ...]
    axis_name: Any
    ghost: bool


def _operands(params: BNParams, x: Array, mask, faxes, config: BatchNormConfig) -> _Call:
    """The operands of the kernel: the whole batch, or its ghost batches."""
    shape = x.shape
    red = tuple(i for i in range(x.ndim) if i not in faxes)
    scale, bias = _bcast(params.scale, shape, faxes), _bcast(params.bias, shape, faxes)
    vbs = config.virtual_batch_size
    if vbs is None:
        return _Call(x, mask, scale, bias, red, config.axis_name, False)
    if 0 in faxes:
        raise ValueError("virtual_batch_size needs axis 0 (the batch axis) to be reduced")
    if shape[0] % vbs:
        raise ValueError(
            f"virtual_batch_size={vbs} does not divide the batch size {shape[0]} "
            f"(input shape {tuple(shape)})"
        )
    x_k = x.reshape((shape[0] // vbs, vbs) + shape[1:])
    mask_k = None if mask is None else jnp.broadcast_to(mask, shape).reshape(x_k.shape)
    add_axis = lambda a: None if a is None else a.reshape((1,) + a.shape)
    stat_axes = tuple(a + 1 for a in red)
    return _Call(x_k, mask_k, add_axis(scale), add_axis(bias), stat_axes, None, True)


def _check_reduction(call: _Call, shape, mask, config: BatchNormConfig) -> None:
    """A training call must reduce over more than one element per feature."""
    per_stat = math.prod(call.x.shape[a] for a in call.stat_axes)
    if mask is None and per_stat <= 1 and call.axis_name is None:
        raise ValueError(
            f"training batch norm on an input of shape {tuple(shape)} with axis={config.axis!r} "
            f"reduces over {'one element' if per_stat else 'no elements'} per feature: the batch "
            "statistics are degenerate and the output meaningless (flax returns beta here). Use "
            "a larger batch, or apply_eval / use_running_average for inference; to check "
            "shapes only, use jax.eval_shape, train=False or a batch of two"
        )


def _running(state, call: _Call, x: Array, faxes, config: BatchNormConfig, mask):
    """`(run, bounds)`: the running `(mean, var)` broadcast to the kernel's operands
    (they normalize features without a valid element, and give Batch Renorm's `r` and
    `d`), and Batch Renorm's `(r_max, d_max)` at `state.steps`; `None` if unused."""
    if mask is None and config.renorm is None:
        return None, None
    dt = stats_dtype(x.dtype)
    run = (
        _bcast(state.mean.astype(dt), x.shape, faxes),
        _bcast(state.var.astype(real_dtype(dt)), x.shape, faxes),
    )
    if call.ghost:
        run = (run[0][None], run[1][None])
    bounds = None if config.renorm is None else config.renorm.bounds(state.steps, dt)
    return run, bounds


def _new_state(state, m: Moments, config: BatchNormConfig):
    """The state updated with the batch moments by the configured population estimator."""
    update = lambda m: _pop.update(
        state,
        m,
        population=config.population,
        momentum=config.momentum,
        variance=config.running_variance,
    )
    if config.renorm is None:
        return update(m)
    # Batch Renorm: a feature whose batch moments are not finite keeps its state
    # (the running statistics enter later training outputs; see RenormConfig).
    ok = jnp.isfinite(m.mean) & jnp.isfinite(m.m2)
    new = update(Moments(*(jnp.where(ok, f, 0) for f in m)))
    return RenormStats(*new, steps=state.steps + 1)


def batch_moments(
    x: Array,
    config: BatchNormConfig = BatchNormConfig(),
    *,
    mask: Array | None = None,
) -> Moments:
    """The (cross-device pooled) batch moments of `x`, feature-shaped.

    What :func:`apply_train` folds into the running statistics; useful for
    population estimation (PreciseBN) and diagnostics.
    """
    x = jnp.asarray(x)
    check_input(x)
    faxes = feature_axes(x.ndim, config.axis)
    red = tuple(i for i in range(x.ndim) if i not in faxes)
    if mask is not None:
        mask = check_mask(mask, x.shape)
    m = moments(x, red, mask=mask, algorithm=config.stats_method)
    m = all_reduce(m, config.axis_name, config.axis_index_groups)
    fshape = _feature_shape(x.shape, faxes)
    return Moments(*(f.reshape(fshape) for f in m))


def apply_train(
    params: BNParams,
    state: BatchStats,
    x: Array,
    config: BatchNormConfig = BatchNormConfig(),
    *,
    mask: Array | None = None,
) -> tuple[Array, BatchStats]:
    """Algorithm 1: normalize `x` with its mini-batch statistics; update the state.

    Args:
      params: :class:`BNParams` with feature-shaped `scale`/`bias`.
      state: :class:`BatchStats` (feature-shaped).
      x: floating input, e.g. `(N, C)`, NHWC `(N, H, W, C)` (`axis=-1`) or
        NCHW (`axis=1`). Statistics are per feature over all other axes (the
        paper's conv rule: `m' = N H W` per feature map).
      config: a :class:`BatchNormConfig`.
      mask: optional boolean array broadcastable to `x`: only `True`
        elements enter the statistics (all elements are normalized).

    Empty features (the rule): a feature with no valid element under `mask`
    (after pooling over `axis_name`; per ghost batch with
    `virtual_batch_size`) is normalized with the running statistics, i.e. its
    output is the inference map `gamma (x - mean) / sqrt(var + eps) + beta` of
    :func:`apply_eval` (not `x / sqrt(eps)`), its gradients are that map's (no
    gradient reaches the running statistics), and its state is unchanged.

    Complex `x` (complex64/complex128; flax's rule): complex mean, real variance
    `E|x - mu|^2`, statistics in complex64/float32 at least, output in the
    complex dtype; `new_state.mean` is complex (a real stored mean turns
    complex), `new_state.var` real. Real inputs trace the same program as
    without complex support.

    Returns:
      `(y, new_state)`: `y` has `x`'s shape (dtype `config.dtype` or
      `result_type(x, params)`); `new_state` has the population statistics
      updated with the (biased) batch moments by the configured estimator.
      Features without a valid element keep their state.

    With `config.renorm` (Batch Renormalization, see :class:`RenormConfig`)
    `state` must be a :class:`~bnjax.population.RenormStats`; the output is
    `gamma (r xhat + d) + beta` with `r`, `d` from the batch and the
    running statistics before the update, and `new_state.steps` is
    `state.steps + 1`.

    Raises:
      TypeError: integer input, non-boolean mask, complex parameters with a real
        input, or Batch Renorm on a complex input.
      ValueError: mismatched feature shapes, bad axis, bad mask shape, a real
        `config.dtype` for a complex input, a
        reduction of one element per feature, a virtual batch size that
        does not divide the batch, or (Batch Renorm) a state without a
        scalar integer `steps` counter.
    """
    x, faxes = _prepare(params, x, config, state)
    _check_renorm(config, state, x)
    _check_activation(config, x)
    if mask is not None:
        mask = check_mask(mask, x.shape)
    out_dtype = _out_dtype(x, params, config)
    params = effective_params(params, config)
    call = _operands(params, x, mask, faxes, config)
    _check_reduction(call, x.shape, mask, config)
    spec = Spec(
        stat_axes=call.stat_axes,
        epsilon=float(config.epsilon),
        axis_name=call.axis_name,
        axis_index_groups=config.axis_index_groups if call.axis_name is not None else None,
        algorithm=resolve_algorithm(config.stats_method),  # masked: always two-pass
        out_dtype=out_dtype,
        activation=config.activation,
        in_dtype=x.dtype,
    )
    # shard_map(check_vma=True): replicated gamma/beta enter the kernel cast to
    # "varying", so their gradients come back summed over devices (JAX's rule).
    scale, bias = match_varying(call.scale, call.bias, like=(call.x,))
    run, bounds = _running(state, call, x, faxes, config, mask)
    y, m = normalize(config.grad, spec, call.x, call.mask, scale, bias, run, bounds)
    if call.ghost:
        y = y.reshape(x.shape)
        m = all_reduce(merge_along(m, 0), config.axis_name, config.axis_index_groups)
    m = Moments(*(f.reshape(_feature_shape(x.shape, faxes)) for f in m))
    # The pooled moments, one unmapped copy: a replicated state stays unmapped.
    m = unmapped(m, config.axis_name, config.axis_index_groups, like=x)
    return y, _new_state(state, m, config)


def inference_affine(
    params: BNParams, state: BatchStats, epsilon: float = 1e-5
) -> tuple[Array, Array]:
    """Algorithm 2's per-feature affine map `y = a * x + b`.

    `a = gamma / sqrt(var + eps)`, `b = beta - mean * a`, computed in at
    least float32 whatever the parameter and state dtypes (`a = 0` where
    `var + eps = 0`: a constant feature with `epsilon = 0` maps to `beta`).
    """
    dt = stats_dtype(state.var.dtype)
    a = safe_rsqrt(state.var.astype(dt) + jnp.asarray(epsilon, dt))

    def wide(v):  # dt, or its complex counterpart for a complex v (complex inputs)
        return stats_dtype(jnp.promote_types(dt, v.dtype)) if is_complex(v) else dt

    if params.scale is not None:
        a = a * params.scale.astype(wide(params.scale))
    b = -state.mean.astype(wide(state.mean)) * a
    if params.bias is not None:
        b = b + params.bias.astype(wide(params.bias))
    return a, b


def apply_eval(
    params: BNParams,
    state: BatchStats,
    x: Array,
    config: BatchNormConfig = BatchNormConfig(),
) -> Array:
    """Algorithm 2: `y = a * x + b` with the frozen population statistics.

    Deterministic and per example (no batch statistics), so an unbatched example
    (`x` of the feature shape, e.g. `(C,)`) works too. `a, b` come from
    :func:`inference_affine` (of :func:`effective_params`); the product is formed
    in at least float32 and cast to the output dtype. With `config.activation`
    the output is `f(a * x + b)`.
    """
    x, faxes = _prepare(params, x, config, state, train=False)
    _check_activation(config, x)
    out_dtype = _out_dtype(x, params, config)
    a, b = inference_affine(effective_params(params, config), state, config.epsilon)
    dt = a.dtype
    if is_complex(x) or is_complex(b):  # complex: x - mean, gamma or beta complex
        dt = jnp.promote_types(jnp.result_type(a, b), stats_dtype(x.dtype))
    y = x.astype(dt) * _bcast(a, x.shape, faxes) + _bcast(b, x.shape, faxes)
    if config.activation is not None:
        y = config.activation(y)
    return y.astype(out_dtype)


def apply(
    params: BNParams,
    state: Any,
    x: Array,
    config: Any = BatchNormConfig(),
    *,
    train: bool,
    mask: Array | None = None,
) -> tuple[Array, Any]:
    """:func:`apply_train` if `train` else (:func:`apply_eval`, unchanged state).

    One switch for every layer of bnjax: `config` is a :class:`BatchNormConfig`
    or a :class:`bnjax.whitening.WhiteningConfig`, whose `kernel()` names the
    layer's two functions.
    """
    kernel = config.kernel()
    if train:
        return kernel.apply_train(params, state, x, config, mask=mask)
    return kernel.apply_eval(params, state, x, config), state
