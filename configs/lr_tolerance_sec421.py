"""Experiment 2 with the paper's Sec. 4.2.1 changes: the reference and accelerated variants
(no BN, no BN x5, BN, BN-x5, BN-x10, BN-x30) at a constant rate and with the Sec. 4.2.1
changes (``*_421``: Inception-style rate decay, 6x faster for the accelerated nets, L2 weight
decay, 1/5 of it for the accelerated nets), plus two labelled variants beyond the paper
(BN-x30 with a warm-up, BN-x30 with gradient clipping).

    bnjax-lr-tolerance --config configs/lr_tolerance_sec421.py --workdir runs/lr_sec421

The settings and their reasons: ``bnjax.experiments.lr_tolerance.sec421_config``.
"""

from bnjax.experiments.lr_tolerance import sec421_config


def get_config():
    return sec421_config()
