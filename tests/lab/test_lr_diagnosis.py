"""Tests of the BN-x30 diagnosis (bnjax.experiments.lr_diagnosis): cases, events, CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from bnjax.experiments import lr_diagnosis as ld
from bnjax.experiments import lr_tolerance as lt
from tests.lab.test_lr_tolerance import needs_data


def test_cases_and_settings():
    c = ld.get_config()
    assert ld.case_names(c) == list(ld.CASES)
    assert all(case.variant in lt.VARIANTS for case in ld.CASES.values())
    s = ld.case_settings(c, "bn_x30")
    assert s == pytest.approx({"lr": 1.5, "momentum": 0.9, "effective_lr": 15.0})
    assert ld.case_settings(c, "bn_x30_m0") == pytest.approx(
        {"lr": 1.5, "momentum": 0.0, "effective_lr": 1.5}
    )
    # lr 15 without momentum has BN-x30's effective step lr / (1 - m)
    assert ld.case_settings(c, "bn_x300_m0")["effective_lr"] == pytest.approx(s["effective_lr"])
    with c.unlocked():
        c.cases = "bn_x30,nope"
    with pytest.raises(ValueError, match="unknown cases"):
        ld.case_names(c)


def test_events_first_dead_step_and_loss_collapse():
    steps = 60
    dead = np.zeros((2, steps))
    dead[0, 25:] = 0.5  # seed 0: half the units dead from step 25
    dead[1, 40:] = 0.49  # seed 1: never half
    loss = np.full((2, steps), 0.5)
    loss[0, 30:] = 2.3  # the 20-step mean passes 2.0 at step 30 + 17 = 47
    rec = {"act_in_0/dead": np.zeros((2, steps)), "act_in_1/dead": dead, "loss": loss}
    ev = ld.events(rec)
    assert ev["act_in_0"] == [None, None]
    assert ev["act_in_1"] == [25, None]
    # mean of the last 20 steps at step t: (0.5 * (49 - t) + 2.3 * (t - 29)) / 20 > 2.0 first
    # at t = 46 (0.5 * 3 + 2.3 * 17 = 40.6 > 40)
    assert ev["loss"] == [46, None]
    loss[1, 3] = np.nan  # a non-finite loss counts as a collapse where it enters the window
    assert ld.events(rec)["loss"][1] == 20


@needs_data
def test_cli_tiny(tmp_path):
    work = tmp_path / "diag"
    ld.main(
        [
            "--quick",
            "--noprogress",
            f"--workdir={work}",
            "--config.features=(4,)",
            "--config.dense=8",
            "--config.diag_steps=6",
            "--config.steps_per_call=3",
            "--config.csv_every=2",
        ]
    )
    rows = list(csv.DictReader((work / "diagnosis.csv").open()))
    for f in ("diagnosis.png", "diagnosis.md", "diagnosis.csv", "events.json", "records.npz"):
        assert (work / f).stat().st_size > 0, f
    npz = np.load(work / "records.npz")
    assert npz["bn_x30:loss"].shape == (1, 6)
    np.testing.assert_allclose(
        npz["bn_x30_m0:w_norm/head/kernel"][0, ::2],
        [float(r["w_norm/head/kernel"]) for r in rows if r["case"] == "bn_x30_m0"],
        rtol=1e-4,
    )
    assert [(r["case"], r["step"]) for r in rows] == [
        (case, str(t)) for case in ("bn_x30", "bn_x30_m0") for t in (0, 2, 4)
    ]
    assert float(rows[0]["w_norm/head/kernel"]) > 0 and "act_in_1/dead" in rows[0]
    md = (work / "diagnosis.md").read_text()
    assert "| BN-x30: lr 1.5, momentum 0.9 | 1.5 | 0.9 | 15 |" in md
    assert "## BN-x30 layer by layer" in md
