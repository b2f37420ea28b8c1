"""Shared pytest configuration for bnjax's tests.

* Hypothesis runs a small, *derandomized* number of examples by default (profile
  ``"bnjax"``), so the suite is fast and deterministic; ``HYPOTHESIS_PROFILE=thorough``
  runs many more random examples.
* ``data_dir``: the MNIST / Fashion-MNIST directory from ``BNJAX_DATA_DIR`` (tests
  that need it are skipped when it is missing; data is never committed).
* ``x64``: a fixture that turns on float64 for one test only (``jax.enable_x64``
  is a context manager that restores the previous setting, so nothing leaks into
  other tests; tests that need float64 inside a hypothesis example use the context
  manager directly).
* ``rng``: a seeded NumPy generator, fresh per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The README/CI give BNJAX_DATA_DIR relative to the repository (../shared/data). Make it
# absolute once, so that notebook kernels and helpers running in other folders see it too.
if os.environ.get("BNJAX_DATA_DIR"):
    os.environ["BNJAX_DATA_DIR"] = str(Path(os.environ["BNJAX_DATA_DIR"]).expanduser().resolve())

settings.register_profile(
    "bnjax",
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bnjax"))


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator (independent of test order)."""
    return np.random.default_rng(1502_03167)


@pytest.fixture
def x64():
    """Enables float64 in JAX for the duration of one test, then restores the setting."""
    before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        yield
    assert jax.config.jax_enable_x64 == before, "the x64 setting leaked out of the fixture"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data directory (``$BNJAX_DATA_DIR``); skips the test if it is not there."""
    d = os.environ.get("BNJAX_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("BNJAX_DATA_DIR is not set or does not exist")
    return Path(d)
