"""Sharded vs unsharded batch-norm layers on 4 simulated CPU devices (a subprocess of
tests/test_transforms.py; XLA_FLAGS set by the caller). Prints one JSON line: the
worst absolute deviation per case (outputs, new statistics, gradients)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import whitening as W

LAYERS = {
    "bn": bnjax.BatchNormConfig(),
    "renorm": bnjax.BatchNormConfig(renorm=bnjax.RenormConfig(1.5, 0.5)),
    "act": bnjax.BatchNormConfig(activation="leaky_relu"),
    "whitening": W.WhiteningConfig(group_size=4),
}


def run(cfg, x, dy):
    init = W.init if isinstance(cfg, W.WhiteningConfig) else bnjax.init
    params, state = init(8, cfg)
    params = params._replace(scale=params.scale * 1.5, bias=params.bias + 0.25)
    kernel = cfg.kernel()

    def loss(p, x):
        y, new = kernel.apply_train(p, state, x, cfg)
        return jnp.sum(y * dy), (y, new)

    grads, (y, new) = jax.grad(loss, (0, 1), has_aux=True)(params, x)
    return y, new, grads


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, (8, 8)).astype(np.float32)
    dy = rng.normal(0, 1, (8, 8)).astype(np.float32)
    worst = {}
    for types in (AxisType.Explicit, AxisType.Auto):
        meshes = {
            "1d": (jax.make_mesh((4,), ("b",), axis_types=(types,)), P("b", None)),
            "2d": (jax.make_mesh((2, 2), ("b", "f"), axis_types=(types,) * 2), P("b", "f")),
        }
        for name, cfg in LAYERS.items():
            ref = jax.jit(lambda x, dy, cfg=cfg: run(cfg, x, dy))(x, dy)
            for mname, (mesh, spec) in meshes.items():
                with jax.set_mesh(mesh):
                    xs = jax.device_put(x, NamedSharding(mesh, spec))
                    dys = jax.device_put(dy, NamedSharding(mesh, spec))
                    got = jax.jit(lambda x, dy, cfg=cfg: run(cfg, x, dy))(xs, dys)
                dev = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                   got, jax.tree.map(np.asarray, ref))
                worst[f"{name}/{types.name}/{mname}"] = max(jax.tree.leaves(dev))
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
