"""Experiment 3 smoke test: the same pipeline, 100 steps, 2 seeds, every setting and method.

Equivalent to ``bnjax-small-batch --quick``.
"""

from bnjax.experiments import small_batch


def get_config():
    return small_batch.quick_config()
