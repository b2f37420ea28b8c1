"""Figure 1 smoke test (the same pipeline, 600 steps, 2 seeds; under a minute).

Equivalent to ``bnjax-figure1 --quick``.
"""

from bnjax.experiments import figure1


def get_config():
    return figure1.quick_config()
