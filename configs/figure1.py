"""Figure 1 (MNIST), the default setting: plain SGD, lr 1.0, init N(0, 1), 3 seeds, 50k steps.

    bnjax-figure1 --config configs/figure1.py [--config.<field>=<value> ...]

The defaults and the reasons for them live in ``bnjax.experiments.figure1.get_config``
(one source of truth, also used when ``--config`` is not given).
"""

from bnjax.experiments.figure1 import get_config

__all__ = ["get_config"]
