"""bnjax: Batch Normalization (Ioffe & Szegedy, 2015) for JAX and Flax.

The data path, bottom up: :mod:`bnjax.stats` (moments) -> :mod:`bnjax.population`
(EMA / the paper's average) -> :mod:`bnjax.functional` (Algorithms 1 and 2, the
paper's gradient) -> :mod:`bnjax.fold` -> :mod:`bnjax.linen` / :mod:`bnjax.nnx`
(Flax drop-ins) -> :mod:`bnjax.recalibrate` (PreciseBN), :mod:`bnjax.diagnostics`
-> :mod:`bnjax.training`, :mod:`bnjax.parallel` (need the ``examples`` extra) ->
:mod:`bnjax.experiments`.

Batch Renormalization (Ioffe 2017) is an option of the same kernel
(:class:`~bnjax.RenormConfig`, :func:`~bnjax.renorm_schedule`,
:class:`~bnjax.RenormStats`) with the modules ``bnjax.linen.BatchRenorm`` and
``bnjax.nnx.BatchRenorm`` (in their submodules, as ``BatchNorm`` is).

The submodules ``fold`` and ``recalibrate`` stay modules (``bnjax.fold.fold``,
``bnjax.recalibrate.recalibrate``); their other public functions are re-exported here.
"""

from bnjax import diagnostics, dynamics, fold, linen, nnx, recalibrate, whitening
from bnjax.diagnostics import consistency, consistency_nnx, format_table
from bnjax.fold import affine, find_pairs, fold_linear, fold_sequential
from bnjax.functional import (
    BatchNormConfig,
    BNParams,
    RenormConfig,
    apply,
    apply_eval,
    apply_train,
    batch_moments,
    inference_affine,
    init,
    init_state,
    renorm_schedule,
)
from bnjax.population import BatchStats, RenormStats, renorm_stats, reset_population
from bnjax.recalibrate import recalibrate_nnx
from bnjax.stats import Moments, merge, moments
from bnjax.whitening import WhiteningConfig, WhiteningStats

__version__ = "0.1.0"

__all__ = [
    "BatchNormConfig",
    "BNParams",
    "BatchStats",
    "Moments",
    "affine",
    "apply",
    "apply_eval",
    "apply_train",
    "batch_moments",
    "consistency",
    "consistency_nnx",
    "diagnostics",
    "dynamics",
    "find_pairs",
    "fold",
    "fold_linear",
    "fold_sequential",
    "format_table",
    "inference_affine",
    "init",
    "init_state",
    "linen",
    "merge",
    "moments",
    "nnx",
    "recalibrate",
    "recalibrate_nnx",
    "reset_population",
    "RenormConfig",
    "RenormStats",
    "renorm_schedule",
    "renorm_stats",
    "whitening",
    "WhiteningConfig",
    "WhiteningStats",
]
