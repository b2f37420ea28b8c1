"""Figure 1, the other reference setting: plain SGD, lr 0.5, init N(0, 0.1^2).

PAPER.md's reference run (one seed) reaches no-BN 0.972 / 0.976 and BN 0.974 / 0.981 at
10k / 50k steps: both nets train well and BN's lead is smaller than with the default
(lr 1.0, N(0, 1)).

    bnjax-figure1 --config configs/figure1_lr05.py --workdir runs/figure1_lr05
"""

from bnjax.experiments import figure1


def get_config():
    config = figure1.get_config()
    config.learning_rate = 0.5
    config.init_std = 0.1
    return config
