"""The one seam between the functional layers and the Flax modules (private).

Every bnjax layer (BatchNorm, BatchRenorm, BatchWhitening, and those to come)
is described once by a :class:`Layer`: how to build its functional config from
a module's attributes, which statistics it stores, how to build its fresh
state and read a stored one. :mod:`bnjax.linen` and :mod:`bnjax.nnx` each have
one call path (resolve the train/eval switch, read the parameters and the
statistics, call the layer's kernel, write the statistics back) driven by that
description, so a layer is a few lines in each. :mod:`bnjax.recalibration`,
:mod:`bnjax.diagnostics` and :mod:`bnjax.folding` read modules through it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax import functional as F
from bnjax import whitening as W
from bnjax._checks import check_input
from bnjax.population import BatchStats, RenormStats, init_stats, renorm_stats

Array = jax.Array


def resolve_use_running_average(
    use_running_average: Any,
    train: bool | None,
    *,
    default: Any = None,
    missing: str,
    hint: str = "",
) -> Any:
    """The `use_running_average` that one call of a layer runs with.

    Args:
      use_running_average: the value given for this call, or `None`.
      train: bnjax's explicit switch, `train = not use_running_average`, or
        `None`; it overrides `default`, and contradicting
        `use_running_average` is an error.
      default: used when neither switch is given (the module's attribute).
      missing: the error message when no switch is given at all.
      hint: appended to the message of the contradiction error.

    Returns:
      `not train` if `train` is given, else `use_running_average` if given,
      else `default`.

    Raises:
      ValueError: `train` and `use_running_average` contradict each other,
        or the result is `None` (message `missing`).
    """
    if train is not None:
        if use_running_average is not None and use_running_average == bool(train):
            raise ValueError(
                f"contradictory switches: train={train} and "
                f"use_running_average={use_running_average}; give one of them{hint}"
            )
        use_running_average = not train
    if use_running_average is None:
        use_running_average = default
    if use_running_average is None:
        raise ValueError(missing)
    return use_running_average


def config_from(module: Any, config_type: type, *, local: bool = False, **extra: Any) -> Any:
    """`config_type` (a frozen config dataclass) from the module's attributes of the same
    names, plus `extra` fields; `local=True` leaves out `axis_name` and
    `axis_index_groups` (statistics of this device only, e.g. at `init`).

    Works for bnjax's modules and for `flax.linen.BatchNorm` / `flax.nnx.BatchNorm`,
    whose shared attributes (`axis`, `epsilon`, `momentum`, `use_scale`, ...)
    have the config's names. The config validates the values.
    """
    names = {f.name for f in dataclasses.fields(config_type)} - set(extra)
    values = {n: getattr(module, n) for n in names if hasattr(module, n)}
    if isinstance(values.get("axis"), list):
        values["axis"] = tuple(values["axis"])
    if local:
        values.update(axis_name=None, axis_index_groups=None)
    return config_type(**values, **extra)


def batch_stats(stored: Mapping[str, Array], renorm: bool = False) -> BatchStats | RenormStats:
    """Stored batch-norm statistics `{name: array}` as a :class:`~bnjax.BatchStats`.

    `mean` and `var` must be present; `count` and `batches` that are not
    stored (`population="ema"`, or flax variables) are zeros like `mean`.
    With `renorm=True` a :class:`~bnjax.RenormStats`, whose `steps` is the
    stored one or 0 where none is stored (a batch-norm checkpoint); a stored
    `steps` that is not an integer scalar is a `ValueError`.
    """
    zeros = jnp.zeros_like(stored["mean"])
    st = BatchStats(
        stored["mean"], stored["var"], stored.get("count", zeros), stored.get("batches", zeros)
    )
    if not renorm:
        return st
    try:
        return renorm_stats(st, stored.get("steps", 0))
    except ValueError as e:
        raise ValueError(f"batch_stats/steps: {e}") from None


@dataclasses.dataclass(frozen=True)
class Layer:
    """What the Flax modules need to know about one kind of layer.

    Attributes:
      config: `(module, local) -> config`: the functional config a module runs
        (`local=True`: without `axis_name`, as at `init`).
      stat_names: `(config, module) -> names` of the stored statistics
        (`batch_stats`); empty for a layer that keeps none
        (`track_running_stats=False`: batch statistics always).
      eval_stats: the statistics inference reads; the others may be missing
        from a checkpoint (their fresh values are used).
      feature_shape: `(x, config) -> shape` of `scale` / `bias` for input `x`
        (validates the input's layout).
      fresh: `(feature_shape, config, dtype) -> state`: fresh statistics for
        inputs of `dtype` (`None`: real float32).
      state: `(stored, fresh) -> state`: stored statistics `{name: array}`
        as the functional state.
      degenerate: `(x, feature_shape, config) -> bool`: the batch is too small
        for batch statistics (`init` on it evaluates instead).
      check_input: `x -> None`, raising on a bad dtype.
      intercepted: calls go through :func:`bnjax.nnx.intercept` (batch norm).
    """

    config: Callable[[Any, bool], Any]
    stat_names: Callable[[Any, Any], tuple[str, ...]]
    eval_stats: tuple[str, ...]
    feature_shape: Callable[[Array, Any], tuple[int, ...]]
    fresh: Callable[[tuple[int, ...], Any, Any], Any]
    state: Callable[[Mapping[str, Array], Any], Any]
    degenerate: Callable[[Array, tuple[int, ...], Any], bool]
    check_input: Callable[[Array], None]
    intercepted: bool = False


# --------------------------------------------------------------------------- batch norm


def tracks_running_stats(module: Any) -> bool:
    """False for a layer built with `track_running_stats=False` (PyTorch's option:
    no stored statistics, batch statistics in training and at inference)."""
    return getattr(module, "track_running_stats", True)


def _bn_stat_names(cfg: F.BatchNormConfig, module: Any) -> tuple[str, ...]:
    """`mean`, `var`; with `population="average"` also `count` and `batches`;
    with `"cumulative"` or `count_batches=True` also `batches` (PyTorch's
    `num_batches_tracked`); with Batch Renorm the step counter `steps`; nothing
    with `track_running_stats=False`."""
    if not tracks_running_stats(module):
        return ()
    names = ("mean", "var")
    if cfg.population == "average":
        names += ("count", "batches")
    elif cfg.population == "cumulative" or getattr(module, "count_batches", False):
        names += ("batches",)
    return names + (("steps",) if cfg.renorm is not None else ())


def _bn_fresh(fshape, cfg: F.BatchNormConfig, dtype) -> BatchStats | RenormStats:
    fresh = init_stats(fshape, jnp.float32)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        # flax's convention for complex inputs: complex mean, real var. flax makes
        # the mean float32 and it turns complex64 at the first update; bnjax makes
        # it complex from the start, so its type never changes (jit/scan carries).
        fresh = fresh._replace(mean=fresh.mean.astype(jnp.promote_types(dtype, jnp.float32)))
    return fresh if cfg.renorm is None else renorm_stats(fresh)


def _bn_feature_shape(x: Array, cfg: F.BatchNormConfig) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in F.feature_axes(x.ndim, cfg.axis))


def _bn_config(module: Any, local: bool) -> F.BatchNormConfig:
    return config_from(module, F.BatchNormConfig, local=local)


def _renorm_config(module: Any, local: bool) -> F.BatchNormConfig:
    renorm = F.RenormConfig(
        r_max=module.r_max, d_max=module.d_max, warmup_steps=module.warmup_steps
    )
    return config_from(module, F.BatchNormConfig, local=local, renorm=renorm)


BATCH_NORM = Layer(
    config=_bn_config,
    stat_names=_bn_stat_names,
    eval_stats=("mean", "var"),
    feature_shape=_bn_feature_shape,
    fresh=_bn_fresh,
    state=lambda stored, fresh: (
        batch_stats(stored, renorm=isinstance(fresh, RenormStats)) if stored else fresh
    ),
    degenerate=lambda x, fshape, cfg: x.size == math.prod(fshape),
    check_input=check_input,
    intercepted=True,
)
BATCH_RENORM = dataclasses.replace(BATCH_NORM, config=_renorm_config)


# --------------------------------------------------------------------------- whitening


def _whitening_stat_names(cfg: W.WhiteningConfig, module: Any = None) -> tuple[str, ...]:
    """`mean` and `whitening` (the inference map), and with `population="average"`
    also `cov`, `count` and `batches` (the exact running average)."""
    extra = ("cov", "count", "batches") if cfg.population == "average" else ()
    return ("mean", "whitening") + extra


def _whitening_degenerate(x: Array, fshape, cfg: W.WhiteningConfig) -> bool:
    (d,) = fshape
    return x.size // d <= cfg.groups(d)[1]


BATCH_WHITENING = Layer(
    config=lambda module, local: config_from(module, W.WhiteningConfig, local=local),
    stat_names=_whitening_stat_names,
    eval_stats=("mean", "whitening"),
    feature_shape=lambda x, cfg: (W.feature_layout(x, cfg)[1],),
    fresh=lambda fshape, cfg, dtype: W.init_stats(fshape[0], cfg),
    state=lambda stored, fresh: fresh._replace(**stored),
    degenerate=_whitening_degenerate,
    check_input=lambda x: check_input(x, "batch whitening", complex_ok=False),
)
