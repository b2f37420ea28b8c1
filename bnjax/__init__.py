"""bnjax: Batch Normalization (Ioffe & Szegedy, 2015) for JAX and Flax."""

from bnjax.functional import (
    BatchNormConfig,
    BNParams,
    apply,
    apply_eval,
    apply_train,
    batch_moments,
    inference_affine,
    init,
    init_state,
)
from bnjax.population import BatchStats, reset_population
from bnjax.stats import Moments, merge, moments

__version__ = "0.1.0"

__all__ = [
    "BatchNormConfig",
    "BNParams",
    "BatchStats",
    "Moments",
    "apply",
    "apply_eval",
    "apply_train",
    "batch_moments",
    "inference_affine",
    "init",
    "init_state",
    "merge",
    "moments",
    "reset_population",
]
