"""Whitening smoke test (the same pipeline, a few hundred steps; equivalent to ``--quick``)."""

from bnjax.experiments import whitening


def get_config():
    return whitening.quick_config()
