"""The paper's experiments as command-line programs (and importable ``run`` functions).

* :mod:`bnjax.experiments.figure1`: MNIST, Figure 1 (``bnjax-figure1``).

Shared command-line, config and output helpers live in :mod:`bnjax.experiments._common`.
"""

__all__: list[str] = []
