"""Several processes (``jax.distributed``, gloo CPU collectives) train like one process.

The subprocess tests start real multi-process jobs on 127.0.0.1 (free ports)
with :func:`bnjax.training.distributed.launch_local`, 2 processes x 2 simulated CPU
devices each, and compare with one process of 4 devices:

* ``bnjax-data-parallel`` (Figure 1's BN net on MNIST, global batch 60): the
  2-process run to step 20, then resumed from its orbax checkpoint to step 40,
  ends with the parameters and batch statistics of the uninterrupted
  single-process 4-device run within ``TOL`` (normwise relative, per leaf;
  measured 6e-7: the gradient all-reduce sums over processes through gloo, in
  another order than XLA's in-process all-reduce; the batch-norm statistics
  are pooled exactly). Evaluation metrics agree; only process 0 prints the
  result, shows the progress bar and writes the outputs.
* a process that never arrives: the others end after ``--init-timeout``;
* a process that dies after start-up: the others end after about
  ``heartbeat_timeout`` (JAX's runtime), never a hang, and
  :class:`bnjax.training.distributed.ProcessGroupError` names the process.

The in-process tests check the pieces on one device: the multi-process loop
draws the single-process loop's batches and computes its step.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bnjax import training
from bnjax.experiments.models import MLP
from bnjax.training import distributed, parallel

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("BNJAX_DATA_DIR")
TOL = 1e-6
# Bounds for a hang only (a run takes ~25 s alone, 90-120 s on a loaded 2-core machine);
# generous, so that load never fails a healthy run.
RUN_TIMEOUT = 480
needs_data = pytest.mark.skipif(
    not DATA or not Path(DATA).is_dir(), reason="BNJAX_DATA_DIR is not set or does not exist"
)


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["BNJAX_DATA_DIR"] = str(Path(DATA).resolve()) if DATA else ""
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _cli(workdir: Path, num_steps: int, *extra: str, init_timeout: int = 180) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bnjax.experiments.data_parallel",
        "--quick",
        f"--config.num_steps={num_steps}",
        "--config.eval_every=20",
        "--config.checkpoint_every=20",
        "--workdir",
        str(workdir),
        "--init-timeout",
        str(init_timeout),
        *extra,
    ]


def _deviation(a, b) -> tuple[float, float]:
    """(max abs difference, max over leaves of max|a - b| / max|b|)."""
    worst_abs = worst_rel = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        assert u.shape == v.shape and np.all(np.isfinite(u)) and np.all(np.isfinite(v))
        err = float(np.max(np.abs(u - v)))
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.max(np.abs(v))), 1e-30))
    return worst_abs, worst_rel


@needs_data
@pytest.mark.multidevice
def test_two_processes_train_like_one_process_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    results: dict[str, object] = {}

    def reference():  # 1 process x 4 devices, uninterrupted
        try:
            results["ref"] = distributed.launch_local(
                _cli(one, 40, "--noprogress"), 1, env=_env(4), timeout=RUN_TIMEOUT
            )
        except Exception as e:  # noqa: BLE001 - re-raised below
            results["ref"] = e

    t0 = time.perf_counter()
    thread = threading.Thread(target=reference)
    thread.start()
    first = distributed.launch_local(_cli(two, 20), 2, env=_env(2), timeout=RUN_TIMEOUT)
    t1 = time.perf_counter()
    resumed = distributed.launch_local(
        _cli(two, 40, "--resume"), 2, env=_env(2), timeout=RUN_TIMEOUT
    )
    t2 = time.perf_counter()
    thread.join()
    if isinstance(results["ref"], Exception):
        raise results["ref"]

    # Outputs, prints and the progress bar from process 0 only.
    for run in (first, resumed):
        assert "final test accuracy" in run.stdout[0]
        assert "final test accuracy" not in run.stdout[1]
        assert "data-parallel (2 proc x 2 dev)" in run.stderr[0]
        assert "data-parallel (" not in run.stderr[1]
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["summary"]["processes"] == 2 and metrics["summary"]["devices"] == 4
    assert metrics["resumed_from"] == 20
    ref_metrics = json.loads((one / "metrics.json").read_text())
    assert ref_metrics["summary"]["processes"] == 1 and ref_metrics["summary"]["devices"] == 4

    # The final states: the multi-process checkpoint restores on one device.
    from bnjax.experiments import data_parallel as dp

    config = ml_collections.ConfigDict(json.loads((two / "config.json").read_text()))
    model, tx = dp.build(config)
    key = jax.random.PRNGKey(0)
    like = {"bn": training.create_train_state(model, tx, key, jnp.zeros((1, 784)))}
    got, meta = training.restore_checkpoint(two / "checkpoints", like)
    ref, ref_meta = training.restore_checkpoint(one / "checkpoints", like)
    assert meta["step"] == ref_meta["step"] == 40
    assert int(got["bn"].step) == int(ref["bn"].step) == 40
    dev_abs, dev_rel = _deviation(
        (got["bn"].params, got["bn"].batch_stats), (ref["bn"].params, ref["bn"].batch_stats)
    )
    print(
        f"\n2 processes x 2 devices (resumed at 20) vs 1 process x 4 devices after 40 steps: "
        f"max abs {dev_abs:.3g}, max rel {dev_rel:.3g}; wall: 2-process runs "
        f"{t1 - t0:.1f} s + {t2 - t1:.1f} s (reference concurrently)"
    )
    assert dev_rel <= TOL, (dev_abs, dev_rel)
    assert not np.array_equal(  # a real training run: the parameters moved
        np.asarray(got["bn"].params["dense_0"]["kernel"]),
        np.asarray(like["bn"].params["dense_0"]["kernel"]),
    )
    # Evaluation gathered over all processes: the single-process numbers.
    assert [r["step"] for r in meta["history"]] == [20, 40]
    for a, b in zip(meta["history"], ref_meta["history"], strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-4)  # <= 2 of 10,000 flip
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@needs_data
@pytest.mark.multidevice
def test_missing_process_ends_the_run_with_a_clear_error(tmp_path):
    """Process 1 never starts: process 0 ends after --init-timeout, not a hang."""
    argv = _cli(tmp_path / "w", 20, "--noprogress", init_timeout=5)
    with pytest.raises(distributed.ProcessGroupError, match="process 0 of 2 exited") as info:
        distributed.launch_local(argv, 2, env=_env(2), only=[0], grace=60, timeout=120)
    res = info.value.result
    assert res.returncodes[0] != 0 and res.returncodes[0] != -9  # ended by itself
    assert "joining the coordinator" in res.stderr[0]
    assert "RegisterTask" in res.stderr[0] and "DEADLINE_EXCEEDED" in res.stderr[0]
    assert res.seconds < 5 + 40, res.seconds  # start-up + timeout, with a loaded machine's slack


@pytest.mark.multidevice
def test_dead_process_ends_the_run_within_the_heartbeat_timeout():
    """Process 1 dies after start-up; JAX's runtime ends process 0 (heartbeat_timeout=3 s)."""
    argv = [sys.executable, str(ROOT / "tests" / "_multiprocess_impl.py"), "3"]
    with pytest.raises(distributed.ProcessGroupError, match="process 1 of 2 exited with status 3"):
        try:
            distributed.launch_local(argv, 2, env=_env(2), grace=60, timeout=150)
        except distributed.ProcessGroupError as e:
            res = e.result  # type: ignore[attr-defined]
            assert "dying at" in res.stdout[1]
            # initialize() opened the all-device gloo communicator (warm-up), not the
            # first collective after it (gloo's fixed 30 s rendezvous, see
            # bnjax.training.distributed)
            for out in res.stdout:
                assert -1 < out.find("[Gloo] Rank") < out.find("initialized"), out
            died = float(res.stdout[1].split("dying at")[1].split()[0])
            assert res.returncodes[0] not in (0, -9)  # ended by JAX's runtime, not the watchdog
            assert "stopped sending heartbeats" in res.stderr[0]
            assert "still running" not in res.stdout[0]
            assert res.seconds < 120
            print(f"\nprocess 0 ended {time.time() - died:.1f} s after process 1 died (at most)")
            raise


@pytest.mark.slow
@pytest.mark.multidevice
def test_first_collective_waits_for_a_late_process():
    """Process 1 reaches the first collective 40 s after process 0 (a loaded machine):
    the run completes (without initialize's warm-up: 'Gloo context initialization
    failed: DEADLINE_EXCEEDED', gloo's fixed 30 s)."""
    argv = [sys.executable, str(ROOT / "tests" / "_multiprocess_impl.py"), "100", "40"]
    res = distributed.launch_local(argv, 2, env=_env(2), grace=5, timeout=240)
    assert all("collective 24.0" in out for out in res.stdout), res.stdout


# --------------------------------------------------------------------------- in one process


def test_initialize_reads_arguments_then_environment(monkeypatch):
    names = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)
    for k in names:
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False  # nothing set: a single-process run
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match=r"\['process_id'\] not given"):
        distributed.initialize("127.0.0.1:1234", 2)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"\['process_id'\] not given"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        distributed.initialize(process_id=2)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        distributed.initialize()
    assert not jax.distributed.is_initialized()


def test_parallel_loop_draws_the_training_loops_batches_and_steps():
    """On one device the multi-process loop (host-drawn batches, global arrays, shard_map)
    equals bnjax.training's loop of the same step, and its evaluation the single-device one."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12)).astype(np.float32)
    y = rng.integers(0, 3, 120).astype(np.int32)
    kw = dict(hidden=(16,), num_classes=3, init_std=0.5, use_bn=True)
    model, pooled = MLP(**kw), MLP(**kw, bn=(("axis_name", "data"),))
    tx = optax.sgd(0.3)
    state = training.create_train_state(model, tx, jax.random.PRNGKey(3), x[:1])
    ref_loop = training.make_train_loop(model, tx, batch_size=20, over_seeds=False)
    mesh = jax.make_mesh((1,), ("data",))
    loop = parallel.make_sharded_train_loop(pooled, tx, mesh, batch_size=20, steps_per_call=5)
    ref, got = state, parallel.replicate(state, mesh)
    for n in (8, 5):  # 120 / 20 = 6 steps per epoch: the chunks cross epoch boundaries
        ref, ref_m = ref_loop(ref, x, y, num_steps=n)
        got, m = loop(got, x, y, num_steps=n)
        assert _deviation(got, ref)[1] <= 1e-6
        for k in ("loss", "accuracy"):
            assert float(m[k]) == pytest.approx(float(ref_m[k]), rel=1e-5, abs=1e-6)
    assert int(got.step) == 13
    ev = parallel.make_sharded_eval_step(pooled, mesh)(got, x, y)
    ev_ref = training.make_eval_step(model, over_seeds=False)(ref, x, y)
    assert float(ev["accuracy"]) == pytest.approx(float(ev_ref["accuracy"]), abs=1e-6)
    assert float(ev["loss"]) == pytest.approx(float(ev_ref["loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis"):
        parallel.make_sharded_train_loop(pooled, tx, mesh, batch_size=20, axis_name="batch")


@needs_data
@pytest.mark.slow
@pytest.mark.multidevice
def test_two_process_resume_is_bit_identical(tmp_path):
    """2 processes: 20 steps + resume to 40 == 40 uninterrupted steps, bit for bit (~60 s)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for workdir, steps, extra in ((whole, 40, ()), (parts, 20, ()), (parts, 40, ("--resume",))):
        argv = _cli(workdir, steps, "--noprogress", *extra)
        distributed.launch_local(argv, 2, env=_env(2), timeout=RUN_TIMEOUT)
    from bnjax.experiments import data_parallel as dp

    config = ml_collections.ConfigDict(json.loads((whole / "config.json").read_text()))
    model, tx = dp.build(config)
    key = jax.random.PRNGKey(0)
    like = {"bn": training.create_train_state(model, tx, key, jnp.zeros((1, 784)))}
    a, meta_a = training.restore_checkpoint(whole / "checkpoints", like)
    b, meta_b = training.restore_checkpoint(parts / "checkpoints", like)
    assert meta_a["history"] == meta_b["history"]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
