"""Experiment 2 smoke test: the same pipeline, 200 steps, 1 seed, every variant.

Equivalent to ``bnjax-lr-tolerance --quick``.
"""

from bnjax.experiments import lr_tolerance


def get_config():
    return lr_tolerance.quick_config()
