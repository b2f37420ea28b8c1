"""Tests for bnjax.training: batching, the compiled seed-parallel loop, evaluation, orbax, resume.

References are independent: a hand-written SGD step on ``flax.linen.BatchNorm``,
NumPy argmax accuracy, per-seed runs without ``vmap``, an uninterrupted run.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import training as T
from bnjax.experiments.models import MLP
from bnjax.training._rng import data_key

N, D, C = 240, 12, 3  # a tiny synthetic problem: fast to compile and run


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (C, D)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int32)
    x = centers[y] + rng.normal(0, 1, (N, D)).astype(np.float32)
    return x, y


def small_mlp(use_bn=True, **kw):
    return MLP(hidden=(16, 16), num_classes=C, use_bn=use_bn, init_std=0.5, **kw)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb, strict=True)
    )


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("n,bs", [(60, 6), (50, 7)])
def test_epoch_batch_indices_are_shuffled_epochs(n, bs):
    spe = n // bs
    key = jax.random.PRNGKey(3)
    idx = np.asarray(T.epoch_batch_indices(key, 0, 3 * spe, n, bs))
    assert idx.shape == (3 * spe, bs) and idx.dtype == np.int32
    epochs = idx.reshape(3, spe * bs)
    for e in epochs:  # each epoch: distinct examples, all but the remainder n % bs
        assert len(set(e.tolist())) == spe * bs and e.min() >= 0 and e.max() < n
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_epoch_batch_indices_depend_only_on_step():
    key = jax.random.PRNGKey(0)
    whole = np.asarray(T.epoch_batch_indices(key, 0, 40, 60, 6))
    # Split anywhere (also across epoch boundaries, with a traced start): same batches.
    f = jax.jit(T.epoch_batch_indices, static_argnums=(2, 3, 4))
    parts = [f(key, 0, 7, 60, 6), f(key, 7, 20, 60, 6), f(key, 27, 13, 60, 6)]
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in parts]), whole)


def test_epoch_permutation_is_a_deterministic_uniform_shuffle():
    """Host-drawn epoch order: a permutation, a pure function of the key (typed or raw),
    the same under jit and vmap, and (chi-square) uniform in where an element lands."""
    n = 10
    key = jax.random.PRNGKey(1)
    p = np.asarray(T.epoch_permutation(key, n))
    assert sorted(p.tolist()) == list(range(n)) and p.dtype == np.int32
    jitted = jax.jit(T.epoch_permutation, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(jitted(key, n)), p)
    typed = jax.random.wrap_key_data(key)
    np.testing.assert_array_equal(np.asarray(T.epoch_permutation(typed, n)), p)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(2000))
    perms = np.asarray(jax.jit(jax.vmap(lambda k: T.epoch_permutation(k, n)))(keys))
    np.testing.assert_array_equal(perms[7], np.asarray(T.epoch_permutation(keys[7], n)))
    # Position of element 0 over 2000 draws: uniform over the 10 slots.
    counts = np.bincount(np.argmax(perms == 0, axis=1), minlength=n)
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum()
    assert chi2 < 27.9, counts  # 99.9% quantile of chi2 with 9 dof


def test_epoch_batch_indices_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        T.epoch_batch_indices(jax.random.PRNGKey(0), 0, 3, 10, 11)


# --------------------------------------------------------------------------- steps


def test_train_step_matches_flax_batchnorm_sgd(data):
    """One bnjax step == a hand-written SGD step of the same net with flax.linen.BatchNorm."""
    x, y = jnp.asarray(data[0][:32]), jnp.asarray(data[1][:32])

    class FlaxNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            init = nn.initializers.normal(0.5)
            for i in range(2):
                x = nn.Dense(16, use_bias=False, kernel_init=init, name=f"dense_{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x)
                x = nn.sigmoid(x)
            return nn.Dense(C, kernel_init=init, name="head")(x)

    model, tx = small_mlp(), optax.sgd(0.3)
    state = T.create_train_state(model, tx, jax.random.PRNGKey(1), x[:1])
    new, metrics = jax.jit(T.make_train_step(model, tx))(state, x, y)

    ref = FlaxNet()

    def loss(params):
        v = {"params": params, "batch_stats": state.batch_stats}
        logits, upd = ref.apply(v, x, train=True, mutable=["batch_stats"])
        return T.cross_entropy_loss(logits, y), upd

    (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
    params = jax.tree.map(lambda p, g: p - 0.3 * g, state.params, grads)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(new.batch_stats), jax.tree.leaves(upd["batch_stats"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_init_states_pair_models_by_seed(data):
    x = data[0][:1]
    tx = optax.sgd(0.1)
    a = T.create_train_states(small_mlp(True), tx, [5, 6], x)
    b = T.create_train_states(small_mlp(False), tx, [5, 6], x)
    assert a.step.shape == (2,)
    k = a.params["dense_0"]["kernel"]
    np.testing.assert_array_equal(k, b.params["dense_0"]["kernel"])  # same seed, same init
    assert not np.array_equal(k[0], k[1])  # different seeds differ
    assert b.batch_stats == {} and "bn_0" in a.batch_stats


def _probe(inter):
    return {"act_mean": inter["act_in_1"][0][:, 3].mean()}


@pytest.fixture(scope="module")
def setup(data):
    """One model and its compiled functions, shared so each compiles once (20-step chunks)."""
    model, tx = small_mlp(), optax.sgd(0.5)
    x, y = (jnp.asarray(a) for a in data)
    return dict(
        model=model,
        tx=tx,
        x=x,
        y=y,
        states=T.create_train_states(model, tx, [0, 1], x[:1]),
        loop=T.make_train_loop(model, tx, batch_size=20),
        loop1=T.make_train_loop(model, tx, batch_size=20, over_seeds=False),
        evaluate=T.make_eval_step(model, probe=_probe),
    )


def _seed(tree, k):
    return jax.tree.map(lambda a: a[k], tree)


def test_vmapped_loop_equals_each_seed_alone(setup):
    x, y, states = setup["x"], setup["y"], setup["states"]
    together, m = setup["loop"](states, x, y, num_steps=20)
    assert m["loss"].shape == (2,)
    for k in range(2):
        alone, _ = setup["loop1"](_seed(states, k), x, y, num_steps=20)
        got = _seed(together, k)
        assert int(got.step) == int(alone.step) == 20
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loop_is_the_step_repeated_on_the_sampled_batches(setup):
    """The scan-compiled loop == a Python loop of single jitted steps on the same batches."""
    x, y = setup["x"], setup["y"]
    state = _seed(setup["states"], 1)
    looped, _ = setup["loop1"](state, x, y, num_steps=20)
    step = jax.jit(T.make_train_step(setup["model"], setup["tx"]))
    idx = T.epoch_batch_indices(data_key(state.rng), 0, 20, N, 20)
    for i in np.asarray(idx):
        state, _ = step(state, x[i], y[i])
    for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_steps_per_call_gives_the_same_states_and_mean_metrics(setup):
    """Unrolled calls of 8 steps (the last one 4) == one rolled scan of 20 steps."""
    x, y, states = setup["x"], setup["y"], setup["states"]
    rolled, m = setup["loop"](states, x, y, num_steps=20)
    loop8 = T.make_train_loop(setup["model"], setup["tx"], batch_size=20, steps_per_call=8)
    chunked, m8 = loop8(states, x, y, num_steps=20)
    for a, b in zip(jax.tree.leaves(rolled), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in ("loss", "accuracy"):
        np.testing.assert_allclose(m8[k], m[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps_per_call"):
        T.make_train_loop(setup["model"], setup["tx"], batch_size=20, steps_per_call=0)


def test_training_reduces_loss(setup):
    x, y, states = setup["x"], setup["y"], setup["states"]
    before = setup["evaluate"](states, x, y)
    for _ in range(6):
        states, _ = setup["loop"](states, x, y, num_steps=20)
    after = setup["evaluate"](states, x, y)
    assert np.all(np.asarray(states.step) == 120)
    assert np.all(after["loss"] < 0.5 * before["loss"])
    assert np.all(after["accuracy"] > 0.9)


def test_loop_rejects_mismatched_data(setup):
    with pytest.raises(ValueError, match="images and labels"):
        setup["loop"](setup["states"], setup["x"], setup["y"][:-1], num_steps=2)


# --------------------------------------------------------------------------- eval


def test_eval_matches_numpy_and_chunks(setup):
    model, x, y = setup["model"], setup["x"], setup["y"]
    states, _ = setup["loop"](setup["states"], x, y, num_steps=20)
    whole = setup["evaluate"](states, x, y)
    chunked = T.make_eval_step(model, probe=_probe, batch_size=60)(states, x, y)
    for k in range(2):
        st = _seed(states, k)
        logits = np.asarray(model.apply(st.variables(), x, train=False), np.float64)
        acc = np.mean(logits.argmax(-1) == np.asarray(y))
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -logp[np.arange(N), np.asarray(y)].mean()
        _, aux = model.apply(st.variables(), x, train=False, mutable=["intermediates"])
        unit = np.asarray(aux["intermediates"]["act_in_1"][0][:, 3], np.float64)
        for m in (whole, chunked):
            assert float(m["accuracy"][k]) == pytest.approx(acc, abs=1e-6)
            assert float(m["loss"][k]) == pytest.approx(nll, rel=1e-4)
            assert float(m["act_mean"][k]) == pytest.approx(unit.mean(), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        T.make_eval_step(model, batch_size=70)(states, x, y)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip(tmp_path, setup):
    model, x = setup["model"], setup["x"]
    tx = optax.adam(1e-2)  # a non-empty optimizer state
    states = T.create_train_states(model, tx, [0, 1], x[:1])
    assert T.latest_checkpoint_step(tmp_path / "ck") is None
    T.save_checkpoint(tmp_path / "ck", 5, {"bn": states}, {"note": [1, 2]})
    assert T.latest_checkpoint_step(tmp_path / "ck") == 5
    fresh = {"bn": T.create_train_states(model, tx, [7, 8], x[:1])}
    assert not leaves_equal(fresh, {"bn": states})
    restored, meta = T.restore_checkpoint(tmp_path / "ck", fresh)
    assert meta == {"note": [1, 2]}
    assert isinstance(restored["bn"], T.TrainState)
    assert leaves_equal(restored, {"bn": states})
    with pytest.raises(FileNotFoundError):
        T.restore_checkpoint(tmp_path / "empty", fresh)


def test_fit_resume_equals_uninterrupted(tmp_path, setup, data):
    plain = small_mlp(False)
    runs = {
        "bn": T.Run(setup["states"], setup["loop"], setup["evaluate"]),
        "plain": T.Run(
            T.create_train_states(plain, setup["tx"], [0, 1], setup["x"][:1]),
            T.make_train_loop(plain, setup["tx"], batch_size=20),
            T.make_eval_step(plain),
        ),
    }
    kw = dict(eval_every=20, checkpoint_every=20, progress=False)
    whole = T.fit(runs, data, data, num_steps=60, checkpoint_dir=tmp_path / "a", **kw)
    first = T.fit(runs, data, data, num_steps=20, checkpoint_dir=tmp_path / "b", **kw)
    assert first.resumed_from is None
    rest = T.fit(runs, data, data, num_steps=60, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert rest.resumed_from == 20
    assert leaves_equal(rest.states, whole.states)  # bit-identical
    serial = T.fit(runs, data, data, num_steps=60, parallel=False, **kw)  # no threads
    assert leaves_equal(serial.states, whole.states) and serial.history == whole.history
    assert rest.history == whole.history
    assert [r["step"] for r in whole.history if r["run"] == "bn"] == [20, 40, 60]
    rec = [r for r in whole.history if r["run"] == "bn"][-1]
    assert set(rec) >= {
        "run",
        "step",
        "accuracy",
        "loss",
        "train_loss",
        "train_accuracy",
        "act_mean",
    }
    assert len(rec["accuracy"]) == 2
    assert T.latest_checkpoint_step(tmp_path / "a") == 60
    assert int(whole.states["bn"].step[0]) == 60


def test_train_step_axis_name_means_metrics_and_draws_dropout_per_device():
    """With ``axis_name`` the metrics are the mean over the mapped devices (equal on all) and
    each device draws its own dropout mask (the per-step key folded with its axis index)."""

    class DropNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(C, kernel_init=nn.initializers.normal(1.0))(x)

    model, tx = DropNet(), optax.sgd(0.1)
    x = jnp.ones((4, D), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32) % C
    state = T.create_train_state(model, tx, jax.random.PRNGKey(0), x[:1])
    step = T.make_train_step(model, tx, axis_name="dev")
    # Two "devices" holding the same shard: only the dropout masks can tell them apart.
    xs, ys = jnp.stack([x, x]), jnp.stack([y, y])
    _, metrics = jax.vmap(step, in_axes=(None, 0, 0), axis_name="dev")(state, xs, ys)
    np.testing.assert_array_equal(metrics["loss"][0], metrics["loss"][1])
    single = T.make_train_step(model, tx)
    per_device = []
    for i in range(2):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), i)
        logits = model.apply(state.variables(), x, train=True, rngs={"dropout": key})
        per_device.append(float(T.cross_entropy_loss(logits, y)))
    assert per_device[0] != per_device[1]  # different masks on the two devices
    np.testing.assert_allclose(metrics["loss"][0], np.mean(per_device), rtol=1e-6)
    # Without axis_name: one device, the unfolded key.
    _, m1 = jax.jit(single)(state, x, y)
    key = jax.random.fold_in(state.rng, state.step)
    logits = model.apply(state.variables(), x, train=True, rngs={"dropout": key})
    np.testing.assert_allclose(m1["loss"], T.cross_entropy_loss(logits, y), rtol=1e-6)
