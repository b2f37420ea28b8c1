"""Test-time adaptation under distribution shift (bnjax.adapt on MNIST-C), the default.

    bnjax-shift --config configs/shift.py [--config.<field>=<value> ...]

The defaults and the reasons for them live in ``bnjax.experiments.shift.get_config``
(one source of truth, also used when ``--config`` is not given).
"""

from bnjax.experiments.shift import get_config

__all__ = ["get_config"]
