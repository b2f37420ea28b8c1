"""Experiment 3 (small / non-i.i.d. mini-batches: BN, PreciseBN, Batch Renorm), the default.

    bnjax-small-batch --config configs/small_batch.py [--config.<field>=<value> ...]

The defaults and the reasons for them live in ``bnjax.experiments.small_batch.get_config``
(one source of truth, also used when ``--config`` is not given).
"""

from bnjax.experiments.small_batch import get_config

__all__ = ["get_config"]
