"""bnjax: Batch Normalization (Ioffe & Szegedy, 2015) for JAX and Flax.

The library's data path, bottom up (each module imports only from those before it):
:mod:`bnjax.stats` (moments) -> :mod:`bnjax.population` (EMA / the paper's
average) -> :mod:`bnjax.functional` (Algorithms 1 and 2, the paper's gradient;
Batch Renorm as an option) and :mod:`bnjax.whitening` (DBN / IterNorm) ->
:mod:`bnjax.linen` / :mod:`bnjax.nnx` (Flax drop-ins) -> :mod:`bnjax.folding`,
:mod:`bnjax.recalibration` (PreciseBN), :mod:`bnjax.diagnostics` ->
:mod:`bnjax.training` (compiled train / eval steps and loops, checkpoints, data
parallel on N devices and N processes).

The lab (data, reference models, training-dynamics probes, the paper's
experiments) is :mod:`bnjax.experiments`; it uses only this package's public
names, and `import bnjax` loads none of it (nor :mod:`bnjax.training`).

Batch norm fused with an invertible activation (In-Place Activated BN:
`BatchNormConfig(activation=...)`, :mod:`bnjax.activations`, the modules
`bnjax.linen.BatchNormAct` / `bnjax.nnx.BatchNormAct`) is another option of
the kernel, as is Batch Renormalization (Ioffe 2017)
(:class:`~bnjax.RenormConfig`, :func:`~bnjax.renorm_schedule`,
:class:`~bnjax.RenormStats`) with the modules `bnjax.linen.BatchRenorm` and
`bnjax.nnx.BatchRenorm`.

PyTorch's conventions (unbiased running variance, the cumulative average of
`momentum=None`, `track_running_stats=False`) are options of the same layers,
and :mod:`bnjax.interop` converts torch models' weights both ways.
:mod:`bnjax.adapt` re-estimates the statistics on test data under distribution
shift (prediction-time BN, prior-weighted statistics, TENT, robust BN).
"""

from bnjax import (
    activations,
    adapt,
    compat,
    diagnostics,
    folding,
    interop,
    linen,
    nnx,
    recalibration,
    stats,
    whitening,
)
from bnjax.diagnostics import consistency, consistency_nnx, format_table
from bnjax.folding import affine, find_pairs, fold, fold_linear, fold_sequential
from bnjax.functional import (
    BatchNormConfig,
    BNParams,
    Kernel,
    RenormConfig,
    apply,
    apply_eval,
    apply_train,
    batch_moments,
    effective_params,
    inference_affine,
    init,
    renorm_schedule,
)
from bnjax.population import (
    BatchStats,
    RenormStats,
    init_stats,
    renorm_stats,
    reset_population,
)
from bnjax.recalibration import recalibrate, recalibrate_nnx
from bnjax.stats import Moments, merge, moments
from bnjax.whitening import WhiteningConfig, WhiteningStats

__version__ = "0.1.0"

__all__ = [
    "BNParams",
    "BatchNormConfig",
    "BatchStats",
    "Kernel",
    "Moments",
    "RenormConfig",
    "RenormStats",
    "WhiteningConfig",
    "WhiteningStats",
    "activations",
    "adapt",
    "affine",
    "compat",
    "apply",
    "apply_eval",
    "apply_train",
    "batch_moments",
    "consistency",
    "consistency_nnx",
    "diagnostics",
    "effective_params",
    "find_pairs",
    "fold",
    "fold_linear",
    "fold_sequential",
    "folding",
    "format_table",
    "inference_affine",
    "init",
    "init_stats",
    "interop",
    "linen",
    "merge",
    "moments",
    "nnx",
    "recalibrate",
    "recalibrate_nnx",
    "recalibration",
    "renorm_schedule",
    "renorm_stats",
    "reset_population",
    "stats",
    "whitening",
]
