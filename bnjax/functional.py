"""Functional batch normalization: Algorithm 1 (training), Algorithm 2 (inference).

Pure functions on explicit pytrees, no hidden state, no Flax::

    cfg = BatchNormConfig(axis=-1, momentum=0.99)
    params, state = init(100, cfg)                  # BNParams, BatchStats
    y, state = apply_train(params, state, x, cfg)   # mini-batch statistics
    y = apply_eval(params, state, x, cfg)           # frozen statistics, one affine map

``cfg`` is a frozen (hashable) dataclass, so it can be a static argument of
``jax.jit`` and equal configs never retrace.

Gradient (``cfg.grad``):

``"vjp"`` (default)
    A ``jax.custom_vjp`` implementing the paper's backward pass in its fused form
    ``dx = gamma / (m sigma) * (m dy - sum(dy) - xhat sum(dy xhat))``,
    ``dgamma = sum(dy xhat)``, ``dbeta = sum(dy)``, with masks (only valid
    elements enter the statistics; ``m`` is their count) and with cotangents of
    the returned batch statistics. It saves only ``x``, the mean and the inverse
    standard deviation. The backward rule is plain ``jax.numpy``, so
    reverse-over-reverse (Hessian-vector products by ``grad(grad(...))``) works;
    forward mode (``jax.jvp``, ``jax.jacfwd``) is not available on a
    ``custom_vjp``.
``"jvp"``
    A ``jax.custom_jvp`` whose tangent map is the linearization of the same
    algebra, ``dy = gamma (dxhat) + dgamma xhat + dbeta`` with
    ``dxhat = (dx - mean(dx) - xhat mean(dx xhat)) / sigma``; JAX transposes it
    into exactly the fused backward above. Forward and reverse mode, any order.
``"autodiff"``
    Plain JAX autodiff of the forward computation (a reference).

Batch Renormalization (Ioffe 2017; ``BatchNormConfig(renorm=RenormConfig(...))``)
is an option of the same kernel, not a second copy of it. With the running
statistics ``mu, sigma = sqrt(var + eps)`` *before* the update and the batch
statistics ``mu_B, sigma_B = sqrt(sigma2_B + eps)`` (pooled over ``axis_name``,
masked, per ghost batch with ``virtual_batch_size``), per feature::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * (r * xhat + d) + beta,     xhat = (x - mu_B) / sigma_B

so the training map is the inference map ``gamma (x - mu) / sigma + beta``
wherever the clips are inactive. The gradient is batch norm's with ``gamma``
replaced by ``gamma r`` (``dgamma = sum(dy (r xhat + d))``, ``dbeta = sum(dy)``),
in all three ``grad`` implementations; nothing flows into the running statistics
through ``r`` and ``d``. The state is a :class:`~bnjax.population.RenormStats`
(``BatchStats`` plus an int32 ``steps`` counter, incremented by every training
call); for ``steps < warmup_steps`` the layer is plain batch norm (``r = 1``,
``d = 0``, bit for bit), and ``r_max``/``d_max`` may be schedules of ``steps``
(:func:`renorm_schedule` is the paper's). Details in :class:`RenormConfig`.

Masks and complex inputs: see :func:`apply_train` (a feature without a valid
element is normalized with the running statistics; complex inputs follow flax:
complex mean, real variance ``E|x - mu|^2``). For complex inputs the custom
rules use JAX's convention for complex cotangents (the pairing
``Re(sum(ct * t))``): ``dx = gamma_inv dy + w (p + q conj(x - mean))``.

``jax.vmap`` without an ``axis_name``: each mapped slice is normalized with its
own statistics and gets its own state (an ensemble of models). With
``cfg.axis_name`` bound by ``vmap``/``pmap``/``shard_map``, statistics (and the
backward reductions) are pooled exactly over that axis. Parameter gradients are
the per-device contributions under ``pmap`` and ``shard_map(check_vma=False)``
(psum them as usual); under ``shard_map`` with ``check_vma=True`` JAX already sums
the gradients of replicated gamma/beta (see docs/multidevice.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax import population as _pop
from bnjax import stats as _stats
from bnjax.population import BatchStats, RenormStats
from bnjax.stats import Moments

__all__ = [
    "BatchNormConfig",
    "RenormConfig",
    "BNParams",
    "BatchStats",
    "RenormStats",
    "renorm_schedule",
    "init",
    "init_state",
    "apply_train",
    "apply_eval",
    "apply",
    "batch_moments",
    "inference_affine",
    "feature_axes",
]

Array = jax.Array
Axes = int | tuple[int, ...]
Schedule = Callable[[Array], Array]


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
      r_max: bound of ``r = clip(sigma_B / sigma, 1 / r_max, r_max)``: a float
        ``>= 1``, or a schedule ``f(steps) -> value`` (a plain callable or an optax
        schedule; traced under ``jit``, evaluated at the state's stored ``steps``).
      d_max: bound of ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``: a float
        ``>= 0`` or a schedule.
      warmup_steps: the first ``warmup_steps`` training calls (``steps <
        warmup_steps``) are plain batch norm (``r = 1``, ``d = 0``), while the
        running statistics settle. An int ``>= 0``.

    ``r_max = 1`` and ``d_max = 0`` is plain batch norm. Floats out of range (or
    NaN) raise ``ValueError`` here; a schedule's values cannot be checked when
    traced, so they are clamped at use (``r_max`` to ``>= 1``, ``d_max`` to
    ``>= 0``), which is the nearest valid bound.

    Behaviour at the edges (documented choices):

    * ghost batches (``virtual_batch_size``): ``r`` and ``d`` are computed per
      ghost batch, from its own moments against the (shared) running statistics;
      the running statistics are updated with the whole batch, as for batch norm;
    * a feature with no valid element in the batch (masks) gets ``r = 1``,
      ``d = 0`` and, as in batch norm, is normalized with the running statistics:
      its output is the inference map ``gamma (x - mu) / sigma + beta`` (batch
      norm's output for it, bit for bit) and it keeps its state;
    * complex inputs raise ``TypeError`` (the clips of ``r`` and ``d`` are defined
      for real statistics only);
    * a feature whose batch moments are not finite (a NaN or inf in the batch)
      keeps its stored statistics (``mean``, ``var``, ``count``, ``batches``):
      unlike batch norm, Batch Renorm's *training* output depends on the
      running statistics, so one bad batch would otherwise poison every later
      step. The bad batch itself is visible: its outputs (and loss) for that
      feature are NaN, and that feature's ``count`` does not advance
      (``steps`` does: it counts training calls).

    Example:
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
        """``(r_max, d_max)`` at the (possibly traced) step count ``steps``.

        Schedules are evaluated at ``steps`` and clamped into range; before
        ``warmup_steps`` the bounds are ``(1, 0)`` (plain batch norm).
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

    ``r_max`` is 1 and ``d_max`` 0 (plain batch norm) for the first ``start``
    steps, then both grow linearly, reaching ``r_max`` at step ``r_max_steps``
    and ``d_max`` at step ``d_max_steps`` and staying there. The defaults are
    Ioffe (2017)'s Inception setting (plain BN for ~5k steps, ``r_max = 3`` by
    ~40k, ``d_max = 5`` by ~25k); scale the step counts to your run length.

    Returns:
      ``(r_max_fn, d_max_fn)`` (``optax.linear_schedule`` s), for
      ``RenormConfig(r_max_fn, d_max_fn)`` or the modules' ``r_max=`` / ``d_max=``.

    Raises:
      ValueError: ``r_max < 1``, ``d_max < 0``, ``start < 0``, or an end step
        not after ``start``.

    Example:
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
        taken over all other axes. ``-1`` for NHWC / (batch, features), ``1`` for NCHW.
      epsilon: added to the variance for numerical stability (>= 0; with 0 a
        constant feature is mapped to ``beta`` rather than to ``0/0``).
      momentum: EMA momentum, flax convention ``new = momentum * old + (1 - momentum) * batch``.
      use_scale: learn ``gamma`` (else gamma = 1).
      use_bias: learn ``beta`` (else beta = 0).
      dtype: output dtype; ``None`` means ``result_type(x, params)`` like flax.
      param_dtype: dtype of gamma and beta made by :func:`init`.
      population: ``"ema"`` or ``"average"`` (the paper's Algorithm 2), see
        :mod:`bnjax.population`.
      axis_name: a named axis (``shard_map``/``pmap``/``vmap``) over which the
        statistics are pooled exactly, or ``None``.
      axis_index_groups: optional groups of indices of ``axis_name`` to pool within.
      virtual_batch_size: ghost batch norm: normalize sub-batches of this many
        examples along axis 0 independently (``None``: the whole batch).
      stats_method: ``"auto"`` (default: ``"two_pass"`` on CPU, ``"shifted"`` on
        GPU/TPU), ``"two_pass"`` or ``"shifted"``; all exact, see :mod:`bnjax.stats`.
      grad: ``"vjp"``, ``"jvp"`` or ``"autodiff"`` (see the module docstring).
      renorm: ``None`` (batch norm) or a :class:`RenormConfig`: Batch
        Renormalization, whose state is a :class:`~bnjax.population.RenormStats`.
    """

    axis: Axes = -1
    epsilon: float = 1e-5
    momentum: float = 0.99
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    population: str = "ema"
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    virtual_batch_size: int | None = None
    stats_method: str = "auto"
    grad: str = "vjp"
    renorm: RenormConfig | None = None

    def __post_init__(self):
        if self.renorm is not None and not isinstance(self.renorm, RenormConfig):
            raise TypeError(f"renorm must be None or a RenormConfig, got {self.renorm!r}")
        if self.population not in _pop.POPULATION_ESTIMATORS:
            raise ValueError(
                f"population must be one of {_pop.POPULATION_ESTIMATORS}, got {self.population!r}"
            )
        if self.grad not in ("vjp", "jvp", "autodiff"):
            raise ValueError(f"grad must be 'vjp', 'jvp' or 'autodiff', got {self.grad!r}")
        if self.stats_method not in _stats.METHODS:
            raise ValueError(
                f"stats_method must be one of {_stats.METHODS}, got {self.stats_method!r}"
            )
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.virtual_batch_size is not None and self.virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {self.virtual_batch_size}")
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        if self.axis_index_groups is not None:
            groups = tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)


class BNParams(NamedTuple):
    """Learned parameters: ``scale`` (gamma) and ``bias`` (beta), or ``None`` if unused."""

    scale: Array | None
    bias: Array | None


# --------------------------------------------------------------------------- shapes


def feature_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
    """The canonical (sorted, non-negative) feature axes of a rank-``ndim`` input."""
    return _stats.canonicalize_axes(ndim, axis, name="axis")


def _feature_shape(shape: tuple[int, ...], faxes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in faxes)


def _broadcast_shape(shape, faxes):
    return tuple(s if i in faxes else 1 for i, s in enumerate(shape))


def _check_input(x: Array, what: str = "x") -> None:
    dt = jnp.result_type(x)
    if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.complexfloating)):
        raise TypeError(
            f"batch norm needs a floating-point or complex {what}, got dtype {dt} (shape "
            f"{tuple(jnp.shape(x))}); cast it first, e.g. x.astype(jnp.float32)"
        )


def _is_complex(a: Array | None) -> bool:
    return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.complexfloating)


def _as(a: Array, dtype) -> Array:
    """``a`` cast to ``dtype``; a complex ``a`` cast to a real dtype keeps its real part
    (explicitly: the transpose of a real-to-complex cast, without JAX's warning)."""
    if _is_complex(a) and not jnp.issubdtype(dtype, jnp.complexfloating):
        a = jnp.real(a)
    return a.astype(dtype)


def _param_dtype(p: Array, dt, rdt):
    """The compute dtype of a parameter: the real statistics dtype ``rdt`` (so a real
    gamma scales a complex input with real products), ``dt`` for a complex parameter."""
    return dt if _is_complex(p) else rdt


def _check_features(x_shape, faxes, arr: Array | None, name: str) -> None:
    if arr is None:
        return
    fshape = _feature_shape(x_shape, faxes)
    if tuple(arr.shape) != fshape:
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)} but the input of shape {tuple(x_shape)} "
            f"has features {fshape} on axis {faxes}"
        )


# --------------------------------------------------------------------------- init


def init_state(feature_shape: int | Sequence[int], dtype=jnp.float32) -> BatchStats:
    """Fresh population statistics: mean 0, var 1, count 0 (flax's initial values)."""
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return BatchStats(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros(shape, dtype),
        batches=jnp.zeros(shape, dtype),
    )


def init(
    feature_shape: int | Sequence[int], config: BatchNormConfig = BatchNormConfig()
) -> tuple[BNParams, BatchStats | RenormStats]:
    """Parameters (gamma = 1, beta = 0) and fresh statistics for ``feature_shape``.

    Args:
      feature_shape: number of features, or the shape of the feature axes
        (``(C,)`` for ``axis=-1``; ``(H, W)`` for ``axis=(1, 2)``).
      config: the layer's :class:`BatchNormConfig` (``param_dtype``, ``use_scale``, ``use_bias``).

    Returns:
      ``(BNParams, BatchStats)``; statistics are float32 (at least). With
      ``config.renorm`` the state is a :class:`~bnjax.population.RenormStats`
      with ``steps = 0``.

    Example:
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
    state = init_state(shape, _stats.real_dtype(_stats.stats_dtype(pdt)))
    if config.renorm is not None:
        state = _pop.renorm_stats(state)
    return params, state


# --------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one normalization call (hashable, for custom_vjp)."""

    stat_axes: tuple[int, ...]
    epsilon: float
    axis_name: Any
    axis_index_groups: Any
    method: str
    out_dtype: Any


def _forward(spec: _Spec, x, mask, scale, bias, run=None, bounds=None):
    """Algorithm 1 on (possibly reshaped) ``x``. Returns (y, moments, mean, inv, rd).

    ``run`` is ``None`` or the running ``(mean, var)`` (broadcast to ``x``'s rank),
    passed with a mask or Batch Renorm. With a mask, a feature without a valid
    element (pooled count 0) is normalized with them: ``mean``/``inv`` are then the
    running ones (the inference map; see :func:`apply_train`). ``bounds`` is ``None``
    (batch norm; ``rd`` is ``None``) or Batch Renorm's ``(r_max, d_max)``; then
    ``rd = (r, d)``. The returned moments are the batch's in every case.

    Complex ``x``: the statistics dtype ``dt`` is complex (mean, ``x - mean``, the
    output), its real part ``rdt`` holds the variance and ``inv``.
    """
    dt = _stats.stats_dtype(x.dtype)
    rdt = _stats.real_dtype(dt)  # dt itself for real inputs
    xf = x.astype(dt)
    m = _stats.moments(xf, spec.stat_axes, mask=mask, method=spec.method)
    m = _stats.all_reduce(m, spec.axis_name, spec.axis_index_groups)
    mean = m.mean
    eps = jnp.asarray(spec.epsilon, rdt)
    var_eps = m.var() + eps
    if mask is not None and run is not None:
        # Features without a valid element: the running statistics (inference map).
        seen = m.count > 0
        mu_run, var_run = (lax.stop_gradient(r) for r in run)
        mean = jnp.where(seen, mean, mu_run.astype(dt))
        var_eps = jnp.where(seen, var_eps, var_run.astype(rdt) + eps)
    inv = _stats.safe_rsqrt(var_eps)
    sdt = None if scale is None else _param_dtype(scale, dt, rdt)
    bdt = None if bias is None else _param_dtype(bias, dt, rdt)
    if bounds is None:
        rd = None
        a = inv if scale is None else inv * scale.astype(sdt)
        b = None if bias is None else bias.astype(bdt)
    else:
        rd = _renorm_rd(spec, m, var_eps, run, bounds)
        r, d = rd
        a, b = inv * r, d
        if scale is not None:
            a, b = a * scale.astype(sdt), b * scale.astype(sdt)
        if bias is not None:
            b = b + bias.astype(bdt)
    y = _centred_affine(xf, a, b, mean, _centre(spec, xf, mask, 0))
    return y.astype(spec.out_dtype), m, mean, inv, rd


def _renorm_rd(spec: _Spec, m: Moments, var_eps, run, bounds):
    """Batch Renorm's per-feature ``(r, d)`` (gradient stopped), keepdims shape.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma,
    -d_max, d_max)`` with the running ``mu``, ``sigma = sqrt(var + eps)``; a feature
    without a valid element gets ``r = 1``, ``d = 0``: with its running statistics
    as the normalizing ones (batch norm's rule for empty features), its output is
    the inference map.
    """
    (mu, var), (r_max, d_max) = run, bounds
    dt = m.mean.dtype
    inv_run = _stats.safe_rsqrt(var.astype(dt) + jnp.asarray(spec.epsilon, dt))
    r = jnp.clip(jnp.sqrt(var_eps) * inv_run, 1 / r_max, r_max)
    d = jnp.clip((m.mean - mu.astype(dt)) * inv_run, -d_max, d_max)
    seen = m.count > 0
    r = jnp.where(seen, r, 1).astype(dt)
    d = jnp.where(seen, d, 0).astype(dt)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _centre(spec: _Spec, xf, mask, j: int):
    """Data point ``j`` of each feature (see :func:`bnjax.stats.data_point`), or None.

    Masked inputs may hold padding anywhere, so they are centred on the mean.
    """
    return None if mask is not None else _stats.data_point(xf, spec.stat_axes, j)


def _centred_affine(xf, a, b, mean, c):
    """``a * (x - mean) + b`` (``b`` may be None), formed as ``a (x - c) + (a (c - mean) + b)``.

    The full-size broadcast is of the data point ``c``, not of ``mean``, which a
    statistics reduction also broadcasts: one broadcast shared by a reduction and
    another full-size consumer is materialized by XLA:CPU (an extra write and read
    of the whole input). With ``|x - c|`` of the order of the spread, the rounding
    error stays at that of the float32 mean itself (about half the error of the
    folded ``a x + (b - a mean)`` when ``|mean| >> std``).
    """
    if c is None:
        y = (xf - mean) * a
        return y if b is None else y + b
    shift = (c - mean) * a
    return (xf - c) * a + (shift if b is None else shift + b)


def _sum_to(a: Array, shape: tuple[int, ...]) -> Array:
    pairs = enumerate(zip(a.shape, shape, strict=True))
    axes = tuple(i for i, (s, t) in pairs if t == 1 and s != 1)
    return jnp.sum(a, axis=axes, keepdims=True) if axes else a


def _psum(a, spec: _Spec):
    if spec.axis_name is None:
        return a
    return lax.psum(a, spec.axis_name, axis_index_groups=spec.axis_index_groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bn_vjp(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


def _bn_vjp_fwd(spec, x, mask, scale, bias, run, bounds):
    y, m, mean, inv, rd = _forward(spec, x, mask, scale, bias, run, bounds)
    return (y, m), (x, mask, scale, bias, mean, inv, m.count, rd)


def _bn_vjp_bwd(spec, res, cts):
    x, mask, scale, bias, mean, inv, count, rd = res
    gy, gm = cts
    dt = mean.dtype
    cplx = _is_complex(mean)
    rdt = _stats.real_dtype(dt)  # dt for real inputs
    xf = x.astype(dt)
    gyf = _as(gy, dt)  # (a complex output of a real input: its real part)
    # The two reductions of the fused backward (local), then one collective.
    # Complex inputs (JAX's convention: the cotangent pairing is Re(sum(ct * t))):
    # sum_dy and sum_dy_xhat are complex sums, the same expressions.
    sum_dy = jnp.sum(gyf, axis=spec.stat_axes, keepdims=True)
    k = _centre(spec, xf, mask, 1)
    if k is None:
        sum_dy_xc = jnp.sum(gyf * (xf - mean), axis=spec.stat_axes, keepdims=True)
    else:
        # sum(dy (x - mean)) = sum(dy (x - k)) + (k - mean) sum(dy) around a data
        # point k (|x - k| ~ spread: no cancellation). A second data point (not the
        # forward's mean, nor the point that dx below is centred on): a broadcast
        # shared between a reduction and another full-size consumer is
        # materialized by XLA:CPU.
        s_k = jnp.sum(gyf * (xf - k), axis=spec.stat_axes, keepdims=True)
        sum_dy_xc = s_k + (k - mean) * sum_dy
    sum_dy_xhat = inv * sum_dy_xc
    if scale is None:
        dscale = None
    elif rd is None:
        dscale = _as(_sum_to(sum_dy_xhat, scale.shape), scale.dtype)
    else:  # Batch Renorm: y = gamma (r xhat + d) + beta, r and d constant
        dscale = rd[0] * sum_dy_xhat + rd[1] * sum_dy
        dscale = _sum_to(dscale, scale.shape).astype(scale.dtype)
    dbias = None if bias is None else _as(_sum_to(sum_dy, bias.shape), bias.dtype)
    gmean = None if gm is None else gm.mean.astype(dt)
    gm2 = None if gm is None else gm.m2.astype(rdt)
    if spec.axis_name is not None:
        # One all-reduce. The pooled moments feed every device, so their
        # cotangent is the sum of the per-device ones (all_gather's transpose);
        # unless they are typed invariant (shard_map, check_vma): then it already is.
        names = spec.axis_name if isinstance(spec.axis_name, tuple) else (spec.axis_name,)
        typed = set(names) <= _stats.varying_axes(x)
        rows = [sum_dy, sum_dy_xhat]
        sum_gm = gm is not None and (not typed or set(names) <= _stats.varying_axes(gmean))
        if sum_gm:
            rows += [jnp.broadcast_to(gmean, sum_dy.shape), jnp.broadcast_to(gm2, sum_dy.shape)]
        both = _psum(jnp.stack(rows), spec)
        sum_dy, sum_dy_xhat = both[0], both[1]
        if sum_gm:
            gmean, gm2 = both[2], _as(both[3], rdt)
    gamma_inv = inv if scale is None else scale.astype(_param_dtype(scale, dt, rdt)) * inv
    if rd is not None:  # Batch Renorm: batch norm's dx with gamma -> gamma r
        gamma_inv = gamma_inv * rd[0]
    n = jnp.where(count > 0, count, 1)
    # dx = gamma / (m sigma) * (m dy - sum(dy) - xhat sum(dy xhat)), masked elements
    # outside the statistics; plus the cotangents of the returned mean and M2. As
    # dx = gamma_inv dy + w (p + q (x - mean)) with per-feature p, q. Complex x:
    # dx = gamma_inv dy + w (p + q conj(x - mean)) with a real
    # q = -inv Re(gamma_inv sum(dy xhat)) / m (the variance is real: |x - mean|^2).
    # A feature without a valid element (w = 0) gets the inference map's dx.
    p = -gamma_inv * sum_dy / n
    if cplx:
        q = -inv * jnp.real(gamma_inv * sum_dy_xhat) / n
    else:
        q = -gamma_inv * inv * sum_dy_xhat / n
    if gm is not None:
        p = p + gmean / n
        q = q + 2 * gm2
    if cplx:
        corr = jnp.conj(xf - mean) * q + p
    else:
        corr = _centred_affine(xf, q, p, mean, _centre(spec, xf, mask, 0))
    dx = gyf * gamma_inv + (corr if mask is None else mask.astype(rdt) * corr)
    return dx.astype(x.dtype), None, dscale, dbias, None, None


_bn_vjp.defvjp(_bn_vjp_fwd, _bn_vjp_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _bn_jvp(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


@_bn_jvp.defjvp
def _bn_jvp_rule(spec, primals, tangents):
    x, mask, scale, bias, run, bounds = primals
    tx, _, tscale, tbias, _, _ = tangents  # running statistics, Batch Renorm's r, d: constants
    y, m, mean, inv, rd = _forward(spec, x, mask, scale, bias, run, bounds)
    dt = mean.dtype
    cplx = _is_complex(mean)
    rdt = _stats.real_dtype(dt)
    n = jnp.where(m.count > 0, m.count, 1)
    w = 1 if mask is None else mask.astype(rdt)
    xc = x.astype(dt) - mean
    xhat = xc * inv
    txf = tx.astype(dt)
    # d sigma2 = 2 mean(Re(conj(x - mean) dx)) (complex; the real case without conj/Re)
    s0 = jnp.sum(w * txf, axis=spec.stat_axes, keepdims=True)
    dvar_terms = w * jnp.real(jnp.conj(xc) * txf) if cplx else w * xc * txf
    sums = jnp.stack([s0, jnp.sum(dvar_terms, axis=spec.stat_axes, keepdims=True).astype(dt)])
    sums = _psum(sums, spec)
    tmean = sums[0] / n
    if cplx:  # the variance's tangent is real
        s1 = jnp.real(sums[1])
        tm2 = 2 * s1
        txhat = inv * (txf - tmean - xhat * (inv * s1 / n))
    else:  # (the real program as written before complex support, op for op)
        tm2 = 2 * sums[1]
        txhat = inv * (txf - tmean - xhat * (inv * sums[1] / n))
    if rd is not None:  # Batch Renorm: y = gamma (r xhat + d) + beta
        txhat = rd[0] * txhat
        xhat = rd[0] * xhat + rd[1]
    ty = txhat if scale is None else txhat * scale.astype(_param_dtype(scale, dt, rdt))
    if tscale is not None and scale is not None:
        ty = ty + xhat * tscale.astype(_param_dtype(scale, dt, rdt))
    if tbias is not None and bias is not None:
        ty = ty + tbias.astype(_param_dtype(bias, dt, rdt))
    tmean, tm2 = _stats.match_varying(tmean, tm2, like=(m.mean,))
    tm = Moments(jnp.zeros_like(m.count), tmean.astype(m.mean.dtype), tm2.astype(m.m2.dtype))
    return (y, m), (ty.astype(y.dtype), tm)


def _bn_autodiff(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


_KERNELS = {"vjp": _bn_vjp, "jvp": _bn_jvp, "autodiff": _bn_autodiff}


# --------------------------------------------------------------------------- public


def _out_dtype(x, params: BNParams, config: BatchNormConfig):
    if config.dtype is not None:
        dtype = jnp.dtype(config.dtype)
        if _is_complex(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"config.dtype={dtype} is real but would drop the imaginary part of the "
                f"{jnp.result_type(x)} input x of shape {tuple(x.shape)}: use a complex "
                "dtype (e.g. jnp.complex64) or dtype=None"
            )
        return dtype
    args = [x] + [p for p in params if p is not None]
    return jnp.result_type(*args)


def _prepare(params: BNParams, x: Array, config: BatchNormConfig, state: BatchStats | None):
    x = jnp.asarray(x)
    _check_input(x)
    faxes = feature_axes(x.ndim, config.axis)
    if len(faxes) == x.ndim:
        raise ValueError(
            f"axis={config.axis!r} makes every axis of the input (shape {tuple(x.shape)}) a "
            "feature axis: there is nothing to normalize over"
        )
    _check_features(x.shape, faxes, params.scale, "params.scale")
    _check_features(x.shape, faxes, params.bias, "params.bias")
    for name, p in zip(("params.scale", "params.bias"), params, strict=True):
        if _is_complex(p) and not _is_complex(x):
            raise TypeError(
                f"{name} is {p.dtype} but the input x (shape {tuple(x.shape)}) is real "
                f"({x.dtype}): complex parameters need a complex x, e.g. "
                "x.astype(jnp.complex64)"
            )
    if state is not None:
        for name in state._fields:
            if name != "steps":
                _check_features(x.shape, faxes, getattr(state, name), f"state.{name}")
    if config.use_scale != (params.scale is not None) or config.use_bias != (
        params.bias is not None
    ):
        present = [f for f, v in zip(params._fields, params, strict=True) if v is not None]
        raise ValueError(
            f"params hold {present} but the config says use_scale={config.use_scale}, "
            f"use_bias={config.use_bias}"
        )
    return x, faxes


def _bcast(a, shape, faxes):
    return None if a is None else jnp.reshape(a, _broadcast_shape(shape, faxes))


def batch_moments(
    x: Array,
    config: BatchNormConfig = BatchNormConfig(),
    *,
    mask: Array | None = None,
) -> Moments:
    """The (cross-device pooled) batch moments of ``x``, feature-shaped.

    What :func:`apply_train` folds into the running statistics; useful for
    population estimation (PreciseBN) and diagnostics.
    """
    x = jnp.asarray(x)
    _check_input(x)
    faxes = feature_axes(x.ndim, config.axis)
    red = tuple(i for i in range(x.ndim) if i not in faxes)
    if mask is not None:
        mask = _stats.check_mask(mask, x.shape)
    m = _stats.moments(x, red, mask=mask, method=config.stats_method)
    m = _stats.all_reduce(m, config.axis_name, config.axis_index_groups)
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
    """Algorithm 1: normalize ``x`` with its mini-batch statistics; update the state.

    Args:
      params: :class:`BNParams` with feature-shaped ``scale``/``bias``.
      state: :class:`BatchStats` (feature-shaped).
      x: floating input, e.g. ``(N, C)``, NHWC ``(N, H, W, C)`` (``axis=-1``) or
        NCHW (``axis=1``). Statistics are per feature over all other axes (the
        paper's conv rule: ``m' = N H W`` per feature map).
      config: a :class:`BatchNormConfig`.
      mask: optional boolean array broadcastable to ``x``: only ``True``
        elements enter the statistics (all elements are normalized).

    Empty features (the rule): a feature with no valid element under ``mask``
    (after pooling over ``axis_name``; per ghost batch with
    ``virtual_batch_size``) is normalized with the running statistics, i.e. its
    output is the inference map ``gamma (x - mean) / sqrt(var + eps) + beta`` of
    :func:`apply_eval` (not ``x / sqrt(eps)``), its gradients are that map's (no
    gradient reaches the running statistics), and its state is unchanged.

    Complex ``x`` (complex64/complex128; flax's rule): complex mean, real variance
    ``E|x - mu|^2``, statistics in complex64/float32 at least, output in the
    complex dtype; ``new_state.mean`` is complex (a real stored mean turns
    complex), ``new_state.var`` real. Real inputs trace the same program as
    without complex support.

    Returns:
      ``(y, new_state)``: ``y`` has ``x``'s shape (dtype ``config.dtype`` or
      ``result_type(x, params)``); ``new_state`` has the population statistics
      updated with the (biased) batch moments by the configured estimator.
      Features without a valid element keep their state.

    With ``config.renorm`` (Batch Renormalization, see :class:`RenormConfig`)
    ``state`` must be a :class:`~bnjax.population.RenormStats`; the output is
    ``gamma (r xhat + d) + beta`` with ``r``, ``d`` from the batch and the
    running statistics before the update, and ``new_state.steps`` is
    ``state.steps + 1``.

    Raises:
      TypeError: integer input, non-boolean mask, complex parameters with a real
        input, or Batch Renorm on a complex input.
      ValueError: mismatched feature shapes, bad axis, bad mask shape, a real
        ``config.dtype`` for a complex input, a
        reduction of one element per feature, a virtual batch size that
        does not divide the batch, or (Batch Renorm) a state without a
        scalar integer ``steps`` counter.
    """
    x, faxes = _prepare(params, x, config, state)
    if config.renorm is not None:
        _check_steps(state)
        if _is_complex(x):
            raise TypeError(
                f"Batch Renorm (config.renorm) is defined for real inputs only, got a "
                f"{x.dtype} x of shape {tuple(x.shape)}: use batch norm (renorm=None) for "
                "complex inputs"
            )
    if mask is not None:
        mask = _stats.check_mask(mask, x.shape)
    red = tuple(i for i in range(x.ndim) if i not in faxes)
    shape = x.shape
    scale_b = _bcast(params.scale, shape, faxes)
    bias_b = _bcast(params.bias, shape, faxes)
    vbs = config.virtual_batch_size
    if vbs is not None:
        if 0 in faxes:
            raise ValueError("virtual_batch_size needs axis 0 (the batch axis) to be reduced")
        if shape[0] % vbs:
            raise ValueError(
                f"virtual_batch_size={vbs} does not divide the batch size {shape[0]} "
                f"(input shape {tuple(shape)})"
            )
        groups = shape[0] // vbs
        x_k = x.reshape((groups, vbs) + shape[1:])
        mask_k = None if mask is None else jnp.broadcast_to(mask, shape).reshape(x_k.shape)
        scale_k = None if scale_b is None else scale_b.reshape((1,) + scale_b.shape)
        bias_k = None if bias_b is None else bias_b.reshape((1,) + bias_b.shape)
        stat_axes = tuple(a + 1 for a in red)
        axis_name = None  # ghost batches are local; the running stats are pooled below
    else:
        x_k, mask_k, scale_k, bias_k = x, mask, scale_b, bias_b
        stat_axes = red
        axis_name = config.axis_name
    per_stat = math.prod(x_k.shape[a] for a in stat_axes)
    if mask is None and per_stat <= 1 and axis_name is None:
        raise ValueError(
            f"training batch norm on an input of shape {tuple(shape)} with axis={config.axis!r} "
            f"reduces over {'one element' if per_stat else 'no elements'} per feature: the batch "
            "statistics are degenerate and the output meaningless. Use a larger batch, or "
            "apply_eval / use_running_average for inference"
        )
    spec = _Spec(
        stat_axes=stat_axes,
        epsilon=float(config.epsilon),
        axis_name=axis_name,
        axis_index_groups=config.axis_index_groups if axis_name is not None else None,
        method=_stats.resolve_method(config.stats_method),  # masked: always two-pass
        out_dtype=_out_dtype(x, params, config),
    )
    # shard_map(check_vma=True): replicated gamma/beta enter the kernel cast to
    # "varying", so their gradients come back summed over devices (JAX's rule).
    scale_k, bias_k = _stats.match_varying(scale_k, bias_k, like=(x_k,))
    run = bounds = None
    if mask is not None or config.renorm is not None:
        # The running statistics: they normalize features without a valid element
        # (masks) and give Batch Renorm's r and d.
        dt = _stats.stats_dtype(x.dtype)
        run = (
            _bcast(state.mean.astype(dt), shape, faxes),
            _bcast(state.var.astype(_stats.real_dtype(dt)), shape, faxes),
        )
        if vbs is not None:
            run = (run[0][None], run[1][None])
    if config.renorm is not None:  # Batch Renorm: the bounds
        bounds = config.renorm.bounds(state.steps, dt)
    y, m = _KERNELS[config.grad](spec, x_k, mask_k, scale_k, bias_k, run, bounds)
    if vbs is not None:
        y = y.reshape(shape)
        m = _stats.merge_along(m, 0)
        m = _stats.all_reduce(m, config.axis_name, config.axis_index_groups)
    fshape = _feature_shape(shape, faxes)
    m = Moments(*(f.reshape(fshape) for f in m))
    if config.renorm is None:
        return y, _pop.update(state, m, estimator=config.population, momentum=config.momentum)
    # Batch Renorm: a feature whose batch moments are not finite keeps its state
    # (the running statistics enter later training outputs; see RenormConfig).
    ok = jnp.isfinite(m.mean) & jnp.isfinite(m.m2)
    m = Moments(*(jnp.where(ok, f, 0) for f in m))
    new = _pop.update(state, m, estimator=config.population, momentum=config.momentum)
    return y, RenormStats(*new, steps=state.steps + 1)


def _check_steps(state) -> None:
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


def inference_affine(
    params: BNParams, state: BatchStats, epsilon: float = 1e-5
) -> tuple[Array, Array]:
    """Algorithm 2's per-feature affine map ``y = a * x + b``.

    ``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``, computed in at
    least float32 whatever the parameter and state dtypes (``a = 0`` where
    ``var + eps = 0``: a constant feature with ``epsilon = 0`` maps to ``beta``).
    """
    dt = _stats.stats_dtype(state.var.dtype)
    a = _stats.safe_rsqrt(state.var.astype(dt) + jnp.asarray(epsilon, dt))

    def wide(v):  # dt, or its complex counterpart for a complex v (complex inputs)
        return _stats.stats_dtype(jnp.promote_types(dt, v.dtype)) if _is_complex(v) else dt

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
    """Algorithm 2: ``y = a * x + b`` with the frozen population statistics.

    Deterministic and per example (no batch statistics). ``a, b`` come from
    :func:`inference_affine`; the product is formed in at least float32 and cast
    to the output dtype.
    """
    x, faxes = _prepare(params, x, config, state)
    out_dtype = _out_dtype(x, params, config)
    a, b = inference_affine(params, state, config.epsilon)
    dt = a.dtype
    if _is_complex(x) or _is_complex(b):  # complex: x - mean, gamma or beta complex
        dt = jnp.promote_types(jnp.result_type(a, b), _stats.stats_dtype(x.dtype))
    y = x.astype(dt) * _bcast(a, x.shape, faxes) + _bcast(b, x.shape, faxes)
    return y.astype(out_dtype)


def apply(
    params: BNParams,
    state: BatchStats,
    x: Array,
    config: BatchNormConfig = BatchNormConfig(),
    *,
    train: bool,
    mask: Array | None = None,
) -> tuple[Array, BatchStats]:
    """:func:`apply_train` if ``train`` else (:func:`apply_eval`, unchanged state)."""
    if train:
        return apply_train(params, state, x, config, mask=mask)
    return apply_eval(params, state, x, config), state
