"""What :mod:`bnjax.linen` and :mod:`bnjax.nnx` share: the train/eval switch and
the mapping between a module's attributes and variables and the functional
:class:`~bnjax.BatchNormConfig` / :class:`~bnjax.BatchStats`.

Private: the two modules (and :mod:`bnjax.recalibrate`) are its only users.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax import functional as F
from bnjax import whitening as W
from bnjax.population import RenormStats, renorm_stats

Array = jax.Array


def resolve_use_running_average(
    use_running_average: Any,
    train: bool | None,
    *,
    default: Any = None,
    missing: str,
    hint: str = "",
) -> Any:
    """The ``use_running_average`` that one call of a batch-norm module runs with.

    Args:
      use_running_average: the value given for this call, or ``None``.
      train: bnjax's explicit switch, ``train = not use_running_average``, or
        ``None``; it overrides ``default``, and contradicting
        ``use_running_average`` is an error.
      default: used when neither switch is given (the module's attribute).
      missing: the error message when no switch is given at all.
      hint: appended to the message of the contradiction error.

    Returns:
      ``not train`` if ``train`` is given, else ``use_running_average`` if given,
      else ``default``.

    Raises:
      ValueError: ``train`` and ``use_running_average`` contradict each other,
        or the result is ``None`` (message ``missing``).
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


def config_of(module: Any, *, local: bool = False, **options: Any) -> F.BatchNormConfig:
    """The functional config of a flax-style batch-norm module.

    Reads the attributes that ``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm`` and
    bnjax's modules share (``axis``, ``epsilon``, ``momentum``, ``use_scale``,
    ``use_bias``, ``dtype``, ``param_dtype``, ``axis_name``, ``axis_index_groups``);
    ``options`` are further :class:`~bnjax.BatchNormConfig` fields (bnjax's
    ``population``, ``virtual_batch_size``, ``grad``). ``local=True`` leaves out
    ``axis_name`` and ``axis_index_groups`` (statistics of this device only).
    """
    axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
    return F.BatchNormConfig(
        axis=axis,
        epsilon=module.epsilon,
        momentum=module.momentum,
        use_scale=module.use_scale,
        use_bias=module.use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        axis_name=None if local else module.axis_name,
        axis_index_groups=None if local else module.axis_index_groups,
        **options,
    )


def stat_names(population: str, renorm: bool = False) -> tuple[str, ...]:
    """The statistics a module stores: ``mean``, ``var``, with
    ``population="average"`` also ``count`` and ``batches``, and with Batch
    Renorm (``renorm=True``) the step counter ``steps``."""
    names = ("mean", "var") + (("count", "batches") if population == "average" else ())
    return names + (("steps",) if renorm else ())


def batch_stats(
    stored: Mapping[str, Array], renorm: bool = False
) -> F.BatchStats | RenormStats:
    """The stored statistics ``{name: array}`` as a :class:`~bnjax.BatchStats`.

    ``mean`` and ``var`` must be present; ``count`` and ``batches`` that are not
    stored (``population="ema"``, or flax variables) are zeros like ``mean``.
    With ``renorm=True`` a :class:`~bnjax.RenormStats`, whose ``steps`` is the
    stored one or 0 where none is stored (a batch-norm checkpoint); a stored
    ``steps`` that is not an integer scalar is a ``ValueError``.
    """
    zeros = jnp.zeros_like(stored["mean"])
    st = F.BatchStats(
        stored["mean"],
        stored["var"],
        stored.get("count", zeros),
        stored.get("batches", zeros),
    )
    if not renorm:
        return st
    try:
        return renorm_stats(st, stored.get("steps", 0))
    except ValueError as e:
        raise ValueError(f"batch_stats/steps: {e}") from None


def renorm_config_of(module: Any) -> F.RenormConfig:
    """The :class:`~bnjax.RenormConfig` of a ``BatchRenorm`` module (linen or NNX):
    its ``r_max``, ``d_max`` and ``warmup_steps`` (validated there)."""
    return F.RenormConfig(
        r_max=module.r_max, d_max=module.d_max, warmup_steps=module.warmup_steps
    )


def whitening_config_of(module: Any, *, local: bool = False) -> W.WhiteningConfig:
    """The functional :class:`~bnjax.whitening.WhiteningConfig` of a ``BatchWhitening``
    module (linen or NNX); ``local=True`` leaves out ``axis_name`` and ``axis_index_groups``."""
    return W.WhiteningConfig(
        group_size=module.group_size,
        method=module.method,
        iterations=module.iterations,
        axis=module.axis,
        epsilon=module.epsilon,
        momentum=module.momentum,
        use_scale=module.use_scale,
        use_bias=module.use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        population=module.population,
        axis_name=None if local else module.axis_name,
        axis_index_groups=None if local else module.axis_index_groups,
        allow_singular=module.allow_singular,
    )


def whitening_stat_names(population: str) -> tuple[str, ...]:
    """What a ``BatchWhitening`` module stores: ``mean`` and ``whitening`` (the
    inference map), and with ``population="average"`` also ``cov``, ``count`` and
    ``batches`` (the exact running average)."""
    return ("mean", "whitening") + (("cov", "count", "batches") if population == "average" else ())


def whitening_stats(stored: Mapping[str, Array], fresh: W.WhiteningStats) -> W.WhiteningStats:
    """The stored statistics ``{name: array}`` as :class:`~bnjax.whitening.WhiteningStats`,
    the fields not stored taken from ``fresh`` (:func:`bnjax.whitening.init_state`)."""
    return fresh._replace(**stored)
