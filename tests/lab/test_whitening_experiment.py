"""bnjax-whitening's bookkeeping (no training: the notebook test runs the pipeline)."""

from __future__ import annotations

import math

import pytest

from bnjax.experiments import whitening as E


def test_parse_net():
    assert E.parse_net("dbn4:zca:4") == ("dbn4", "zca", 4)
    assert E.parse_net("bn:bn") == ("bn", "bn", None)
    with pytest.raises(ValueError, match="name:kind"):
        E.parse_net("pca:pca:4")


def test_divisor_stands_in_for_group_sizes_that_do_not_divide():
    assert E._divisor(100, 16) == 20  # |20 - 16| = 4 < |10 - 16|
    assert E._divisor(100, 64) == 50
    assert E._divisor(256, 64) == 64
    assert E._divisor(100, 0) == 100 and E._divisor(100, 400) == 100  # 0 / too large: all


def test_full_whitening_of_a_small_batch_is_an_explicit_opt_in():
    config = E.get_config()
    nets, _ = E.build(config)
    opts = dict(nets["dbn100"].bn)
    assert opts["allow_singular"] is True and opts["group_size"] == 100  # 60 <= 100
    assert dict(nets["dbn20"].bn)["allow_singular"] is False  # 60 > 20


def test_summary_steps_to_threshold_and_nan_loss():
    config = E.quick_config()
    config.nets = ("a:bn", "b:zca:20")
    config.thresholds = (0.9,)
    nan = float("nan")
    history = [
        {"run": "a", "step": 100, "accuracy": [0.85, 0.91], "loss": [0.5, 0.4]},
        {"run": "a", "step": 200, "accuracy": [0.92, 0.93], "loss": [0.3, 0.3]},
        {"run": "b", "step": 100, "accuracy": [0.1, 0.1], "loss": [nan, nan]},
        {"run": "b", "step": 200, "accuracy": [0.1, 0.1], "loss": [nan, nan]},
    ]
    s = E.summarize(history, config)
    assert s["a"]["steps_to"]["0.9"]["per_seed"] == [200, 100]
    assert s["a"]["steps_to"]["0.9"]["mean_curve"] == 200  # mean 0.88 at 100
    assert math.isclose(s["a"]["final_accuracy_mean"], 0.925)
    assert not s["a"]["nan"]
    assert s["b"]["nan"] and s["b"]["steps_to"]["0.9"]["per_seed"] == [None, None]
    table = E.results_markdown(config, s, [], {}, None)
    assert "NaN loss" in table and "never (never, never)" in table
