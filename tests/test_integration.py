"""The integration matrix: Flax/JAX transforms x bnjax layers, each against a reference.

Every case runs the same tiny model twice, once with a bnjax layer and once with a
reference layer, and compares the training outputs, the updated statistics, the
gradients and the eval outputs after two SGD steps:

* ``BatchNorm``: the reference is flax's own ``BatchNorm(use_fast_variance=False)``;
* ``BatchRenorm`` (past warm-up: ``r`` and ``d`` clipped) and ``BatchWhitening``:
  flax has none, so the reference is a minimal linen / NNX module that holds plain
  variables and calls bnjax's functional core directly (tested on its own against
  float64 NumPy): the comparison isolates the module seam under each transform.

Linen cases: ``nn.scan`` over blocks, ``nn.remat`` (three policies, one offloading), an ``nn.vmap``
ensemble, ``nn.jit``, flax's ``TrainState`` with ``batch_stats``, ``optax.MultiSteps``,
bf16 inputs. NNX cases: ``nnx.jit`` + ``nnx.Optimizer``, ``nnx.vmap``, ``nnx.scan``,
``nnx.remat``, ``nnx.state`` + orbax, ``flax.nnx.bridge.ToLinen``. The sharded, export,
fold, tabulate, checkpoint and ResNet cases live in test_transforms.py,
test_export.py, test_multidevice.py and test_folding.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import bnjax
from bnjax import whitening as W

MOM = 0.8
RENORM = dict(r_max=1.2, d_max=0.2)  # tight bounds, no warm-up: r and d clip at once
F = 4  # features


# --------------------------------------------------------------------------- references


class _LinenRef(nn.Module):
    """A linen layer on plain variables around bnjax's functional core."""

    kind: str  # "renorm" | "whitening"

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        if self.kind == "renorm":
            cfg = bnjax.BatchNormConfig(momentum=MOM, renorm=bnjax.RenormConfig(**RENORM))
            params0, state0 = bnjax.init(F, cfg)
        else:
            cfg = W.WhiteningConfig(group_size=2, momentum=MOM)
            params0, state0 = W.init(F, cfg)
        scale = self.param("scale", lambda k: params0.scale)
        bias = self.param("bias", lambda k: params0.bias)
        names = ("mean", "var", "steps") if self.kind == "renorm" else ("mean", "whitening")
        stats = {k: self.variable("batch_stats", k, lambda k=k: getattr(state0, k)) for k in names}
        state = state0._replace(**{k: v.value for k, v in stats.items()})
        params = bnjax.BNParams(scale, bias)
        if use_running_average:
            return cfg.kernel().apply_eval(params, state, x, cfg)
        y, new = cfg.kernel().apply_train(params, state, x, cfg)
        if not self.is_initializing():
            for k, v in stats.items():
                v.value = getattr(new, k)
        return y


LINEN = {
    "BatchNorm": (
        lambda: bnjax.linen.BatchNorm(momentum=MOM),
        lambda: nn.BatchNorm(momentum=MOM, use_fast_variance=False),
    ),
    "BatchRenorm": (
        lambda: bnjax.linen.BatchRenorm(momentum=MOM, **RENORM),
        lambda: _LinenRef("renorm"),
    ),
    "BatchWhitening": (
        lambda: bnjax.linen.BatchWhitening(group_size=2, momentum=MOM),
        lambda: _LinenRef("whitening"),
    ),
}


class _Block(nn.Module):
    norm: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(F, use_bias=False)(x)
        return jnp.tanh(self.norm()(x, use_running_average=not train))


def _canon(tree):
    """Flattened ``{path: leaf}`` with the norm layers' names made alike."""
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)), sep="/")
    return {re.sub(r"(BatchNorm|BatchRenorm|BatchWhitening|_LinenRef)_(\d+)", r"NORM_\2", k): v
            for k, v in flat.items()}


def _compare(got, want, tol=2e-5):
    g, w = _canon(got), _canon(want)
    assert sorted(g) == sorted(w)
    worst = max(float(np.max(np.abs(g[k].astype(np.float64) - w[k]))) for k in g)
    scale = max(float(np.max(np.abs(w[k]))) for k in w) or 1.0
    assert worst <= tol * max(scale, 1.0), worst
    return worst


def _x(shape=(8, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(1.0, 2.0, shape), jnp.float32)


def _sgd_run(model, x, dtype=jnp.float32, **apply_kw):
    """Two SGD steps; returns training output, statistics, step-1 gradients, eval output."""
    v = model.init(jax.random.key(0), x, train=False)
    params, stats = v["params"], v["batch_stats"]

    def loss(p, stats, x):
        y, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"], **apply_kw)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, upd["batch_stats"])

    out = {}
    for step in range(2):
        (_, (y, stats)), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x.astype(dtype))
        if step == 0:
            out["grads"], out["y"] = g, y
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
    out["stats"] = stats
    out["eval"] = model.apply({"params": params, "batch_stats": stats}, x.astype(dtype),
                              train=False, **apply_kw)
    return out


def _cases():
    def scan(norm):
        class Body(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return _Block(norm)(x, self.train), None

            train: bool = True

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                x = nn.Dense(F)(x)
                scanned = nn.scan(Body, variable_axes={"params": 0, "batch_stats": 0},
                                  split_rngs={"params": True}, length=2)
                return scanned(train=train)(x, None)[0]

        return _sgd_run(Net(), _x())

    def remat(policy):
        def case(norm):
            class Net(nn.Module):
                @nn.compact
                def __call__(self, x, train: bool):
                    block = nn.remat(_Block, static_argnums=(2,), policy=policy)
                    return block(norm)(block(norm)(x, train), train)

            return _sgd_run(Net(), _x())

        return case

    def vmap(norm):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                ens = nn.vmap(_Block, variable_axes={"params": 0, "batch_stats": 0},
                              split_rngs={"params": True}, in_axes=(0, None), axis_size=3)
                return ens(norm)(x, train)

        return _sgd_run(Net(), _x((3, 8, 3)))

    def jit(norm):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                return nn.jit(_Block, static_argnums=(2,))(norm)(x, train)

        return _sgd_run(Net(), _x())

    def train_state(norm):
        from flax.training import train_state as ts

        class State(ts.TrainState):
            batch_stats: dict

        model = _Block(norm)
        x = _x()
        v = model.init(jax.random.key(0), x, train=False)
        state = State.create(apply_fn=model.apply, params=v["params"], tx=optax.sgd(0.1),
                             batch_stats=v["batch_stats"])

        @jax.jit
        def step(state, x):
            def loss(p):
                y, upd = state.apply_fn({"params": p, "batch_stats": state.batch_stats}, x,
                                        train=True, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(y)), (y, upd)

            (_, (y, upd)), g = jax.value_and_grad(loss, has_aux=True)(state.params)
            return state.apply_gradients(grads=g, batch_stats=upd["batch_stats"]), y, g

        state, y, g = step(state, x)
        state, _, _ = step(state, x)
        ev = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
        return {"y": y, "grads": g, "stats": state.batch_stats, "eval": ev}

    def multisteps(norm):
        model, x = _Block(norm), _x()
        v = model.init(jax.random.key(0), x, train=False)
        tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
        params, stats, opt = v["params"], v["batch_stats"], tx.init(v["params"])
        for k in range(4):
            def loss(p, stats=stats, k=k):
                y, upd = model.apply({"params": p, "batch_stats": stats}, x + k, train=True,
                                     mutable=["batch_stats"])
                return jnp.sum(jnp.sin(y)), upd["batch_stats"]

            g, stats = jax.grad(loss, has_aux=True)(params)
            delta, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, delta)
        ev = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        return {"params": params, "stats": stats, "eval": ev}

    def bf16(norm):
        return _sgd_run(_Block(norm), _x(), dtype=jnp.bfloat16)

    return {
        "nn.scan": scan,
        "nn.remat dots_saveable": remat(jax.checkpoint_policies.dots_saveable),
        "nn.remat nothing_saveable": remat(jax.checkpoint_policies.nothing_saveable),
        "nn.remat offload to host": remat(
            jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        ),
        "nn.vmap ensemble": vmap,
        "nn.jit": jit,
        "TrainState": train_state,
        "optax.MultiSteps": multisteps,
        "bf16 input": bf16,
    }


CASES = _cases()


@pytest.mark.parametrize("layer", list(LINEN))
@pytest.mark.parametrize("case", list(CASES))
def test_linen_case_matches_reference(case, layer):
    ours, ref = LINEN[layer]
    tol = 2e-2 if case == "bf16 input" else 2e-5
    _compare(CASES[case](ours), CASES[case](ref), tol)


# --------------------------------------------------------------------------- NNX


class _NNXRef(nnx.Module):
    """An NNX layer on plain variables around bnjax's functional core."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "renorm":
            self.cfg = bnjax.BatchNormConfig(momentum=MOM, renorm=bnjax.RenormConfig(**RENORM))
            params, state = bnjax.init(F, self.cfg)
            names = ("mean", "var", "steps")
        else:
            self.cfg = W.WhiteningConfig(group_size=2, momentum=MOM)
            params, state = W.init(F, self.cfg)
            names = ("mean", "whitening")
        self.scale, self.bias = nnx.Param(params.scale), nnx.Param(params.bias)
        self.names = names
        for k in names:
            setattr(self, k, nnx.BatchStat(getattr(state, k)))
        self.use_running_average = False

    def __call__(self, x):
        fresh = (bnjax.init if self.kind == "renorm" else W.init)(F, self.cfg)[1]
        state = fresh._replace(**{k: getattr(self, k)[...] for k in self.names})
        params = bnjax.BNParams(self.scale[...], self.bias[...])
        kernel = self.cfg.kernel()
        if self.use_running_average:
            return kernel.apply_eval(params, state, x, self.cfg)
        y, new = kernel.apply_train(params, state, x, self.cfg)
        for k in self.names:
            getattr(self, k)[...] = jax.lax.stop_gradient(getattr(new, k))
        return y


NNX = {
    "BatchNorm": (lambda: bnjax.nnx.BatchNorm(F, momentum=MOM),
                  lambda: nnx.BatchNorm(F, momentum=MOM, use_fast_variance=False,
                                        rngs=nnx.Rngs(0))),
    "BatchRenorm": (lambda: bnjax.nnx.BatchRenorm(F, momentum=MOM, **RENORM),
                    lambda: _NNXRef("renorm")),
    "BatchWhitening": (lambda: bnjax.nnx.BatchWhitening(F, group_size=2, momentum=MOM),
                       lambda: _NNXRef("whitening")),
}


class _NBlock(nnx.Module):
    def __init__(self, norm, rngs):
        self.lin = nnx.Linear(F, F, use_bias=False, rngs=rngs)
        self.norm = norm()

    def __call__(self, x):
        return jnp.tanh(self.norm(self.lin(x)))


def _nnx_state(model):
    """The model's params and statistics as a flat dict (norm attribute names alike)."""
    st = nnx.state(model, nnx.Param, nnx.BatchStat)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.merge_state(*st) if isinstance(st, tuple) else st)), sep="/")
    return flat


def _nnx_train(model, x, steps=2):
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        def loss(model):
            return jnp.sum(jnp.sin(model(x)))

        g = nnx.grad(loss)(model)
        opt.update(model, g)
        return g

    grads = step(model, opt, x)
    for _ in range(steps - 1):
        step(model, opt, x)
    model.eval()
    out = {"state": _nnx_state(model), "eval": model(x)}
    out["grads"] = traverse_util.flatten_dict(nnx.to_pure_dict(grads), sep="/")
    return out


def _nnx_cases():
    def jit_optimizer(norm):
        return _nnx_train(_NBlock(norm, nnx.Rngs(0)), _x((8, F)))

    def vmap(norm):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _NBlock(norm, rngs)

        ens = make(nnx.Rngs(0))

        @nnx.vmap(in_axes=(0, None))
        def apply(m, x):
            return m(x)

        class Ens(nnx.Module):
            def __init__(self, m):
                self.m = m

            def __call__(self, x):
                return apply(self.m, x)

        return _nnx_train(Ens(ens), _x((8, F)))

    def scan(norm):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _NBlock(norm, rngs)

        class Stack(nnx.Module):
            def __init__(self):
                self.blocks = make(nnx.Rngs(0))

            def __call__(self, x):
                @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
                def body(block, x):
                    return block(x)

                return body(self.blocks, x)

        return _nnx_train(Stack(), _x((8, F)))

    def remat(norm):
        class Net(nnx.Module):
            def __init__(self):
                self.a, self.b = _NBlock(norm, nnx.Rngs(0)), _NBlock(norm, nnx.Rngs(1))

            def __call__(self, x):
                f = nnx.remat(lambda m, x: m(x))
                return f(self.b, f(self.a, x))

        return _nnx_train(Net(), _x((8, F)))

    def orbax(norm):
        pytest.importorskip("orbax.checkpoint")
        import tempfile

        from bnjax import training

        model = _NBlock(norm, nnx.Rngs(0))
        out = _nnx_train(model, _x((8, F)))
        with tempfile.TemporaryDirectory() as d:
            _, state = nnx.split(model)
            training.save_checkpoint(d, 0, nnx.to_pure_dict(state))
            fresh = _NBlock(norm, nnx.Rngs(5))
            g2, s2 = nnx.split(fresh)
            restored, _ = training.restore_checkpoint(d, like=nnx.to_pure_dict(s2))
            nnx.replace_by_pure_dict(s2, restored)
            back = nnx.merge(g2, s2)
        back.eval()
        out["restored_eval"] = back(_x((8, F)))
        return out

    def bridge(norm):
        class Wrapped(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                y = nnx.bridge.ToLinen(_NBlock, args=(norm,), kwargs={})(x)
                return y

        model, x = Wrapped(), _x((8, F))
        v = model.init(jax.random.key(0), x, train=True)
        y, upd = model.apply(v, x, train=True, mutable=True)
        return {"y": y, "vars": jax.tree.map(np.asarray, nnx.to_pure_dict(upd)
                                            if not isinstance(upd, dict) else upd)}

    return {"nnx.jit + Optimizer": jit_optimizer, "nnx.vmap": vmap, "nnx.scan": scan,
            "nnx.remat": remat, "nnx.state + orbax": orbax, "nnx.bridge.ToLinen": bridge}


NNX_CASES = _nnx_cases()


def _nnx_canon(tree):
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)), sep="/") \
        if isinstance(tree, dict) else {"": np.asarray(tree)}
    out = {}
    for k, v in flat.items():
        k = re.sub(r"(BatchNorm|BatchRenorm|BatchWhitening|_NNXRef)_?\d*", "NORM", k)
        out[k] = v
    return out


@pytest.mark.parametrize("layer", list(NNX))
@pytest.mark.parametrize("case", list(NNX_CASES))
def test_nnx_case_matches_reference(case, layer):
    ours, ref = NNX[layer]
    got, want = NNX_CASES[case](ours), NNX_CASES[case](ref)
    for key in want:
        g, w = _nnx_canon(got[key]), _nnx_canon(want[key])
        common = set(g) & set(w)
        assert common, (key, sorted(g), sorted(w))
        for k in common:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=2e-5, err_msg=f"{key}/{k}")

