"""The smoke-test version of configs/shift.py (what ``bnjax-shift --quick`` runs)."""

from bnjax.experiments.shift import quick_config

__all__ = ["get_config"]


def get_config():
    return quick_config()
