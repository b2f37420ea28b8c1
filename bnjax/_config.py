"""The option checks every layer config shares (private): one place, one message each."""

from __future__ import annotations

from typing import Any

from bnjax.population import POPULATIONS


def check_common(config: Any) -> None:
    """Validates (and normalizes) the fields that every bnjax layer config has.

    `population` in :data:`bnjax.population.POPULATIONS`, `epsilon >= 0`,
    `momentum` in `[0, 1]`; `axis_index_groups` becomes a tuple of tuples
    of ints (hashable). `config` is a frozen dataclass, set through
    `object.__setattr__` from its `__post_init__`.

    Raises:
      ValueError: naming the field and its value.
    """
    if config.population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {config.population!r}")
    if not config.epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {config.epsilon}")
    if not 0 <= config.momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {config.momentum}")
    if config.axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in config.axis_index_groups)
        object.__setattr__(config, "axis_index_groups", groups)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """`value` is one of `choices`; else a `ValueError` naming `name`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
