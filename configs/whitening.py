"""Whitening vs BN (issue 11): convergence, cost, singularity; the defaults (5,000 steps).

    bnjax-whitening --config configs/whitening.py [--config.<field>=<value> ...]
    bnjax-whitening --config configs/whitening.py --config.num_steps=50000   # the full schedule

The defaults and the reasons for them live in ``bnjax.experiments.whitening.get_config``.
"""

from bnjax.experiments.whitening import get_config

__all__ = ["get_config"]
