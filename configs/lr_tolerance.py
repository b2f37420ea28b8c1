"""Experiment 2 (learning-rate tolerance), the default setting.

    bnjax-lr-tolerance --config configs/lr_tolerance.py [--config.<field>=<value> ...]

The defaults and the reasons for them live in
``bnjax.experiments.lr_tolerance.get_config`` (one source of truth, also used
when ``--config`` is not given).
"""

from bnjax.experiments.lr_tolerance import get_config

__all__ = ["get_config"]
