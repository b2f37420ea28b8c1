"""The paper's experiments as command-line programs (and importable `run` functions).

* :mod:`bnjax.experiments.figure1`: MNIST, Figure 1 (`bnjax-figure1`).
* :mod:`bnjax.experiments.lr_tolerance`: learning-rate tolerance, the Figure 3
  table analogue (`bnjax-lr-tolerance`).

Shared command-line, config and output helpers live in :mod:`bnjax.experiments._common`.
"""

__all__: list[str] = []
