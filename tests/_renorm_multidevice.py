"""Batch Renorm on 4 simulated CPU devices vs one device (run by tests/test_renorm.py).

``python tests/_renorm_multidevice.py`` prints one JSON dict ``{check: deviation}``
(normwise relative, ``max|a - b| / max|b|`` over every leaf of outputs, new
state, and gradients w.r.t. x, gamma and beta through y and the new statistics).
Also ghost batches (``virtual_batch_size=4``) with ``axis_name``. The batch of 32
is split over 4 devices with unequal valid counts (8, 3, 0, 5: device 2 holds no
valid example). ``XLA_FLAGS`` must give >= 4 host devices.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax.functional as F  # noqa: E402

NDEV, AX = 4, "d"


def dev(a, b) -> float:
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if not (np.isfinite(u).all() and np.isfinite(v).all()):
            return float("inf")
        scale = np.abs(v).max()
        err = np.abs(u - v).max()
        worst = max(worst, float(err / scale if scale > 0 else err))
    return worst


def data(seed=0, n=32, c=6):
    rng = np.random.default_rng(seed)
    x = (1.0 + rng.uniform(0.5, 3, c) * rng.standard_normal((n, c))).astype(np.float32)
    mask = np.zeros((n, 1), bool)
    per = n // NDEV
    for i, k in enumerate((8, 3, 0, 5)):
        mask[i * per + rng.permutation(per)[:k]] = True
    cot = rng.standard_normal((n, c)).astype(np.float32)
    w = rng.standard_normal((2, c)).astype(np.float32)
    params = F.BNParams(
        jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
        jnp.asarray(rng.normal(size=c), jnp.float32),
    )
    state = F.init(c, F.BatchNormConfig(renorm=F.RenormConfig()))[1]
    state = state._replace(
        mean=jnp.asarray(rng.normal(size=c), jnp.float32),
        var=jnp.asarray(rng.uniform(0.3, 3, c), jnp.float32),
        steps=jnp.asarray(7, jnp.int32),
    )
    return params, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(cot), jnp.asarray(w), state


def loss_fn(cfg, share):
    def loss(params, x, mask, cot, w, state):
        y, ns = F.apply_train(params, state, x, cfg, mask=mask)
        return jnp.sum(y * cot) + share * (jnp.sum(ns.mean * w[0]) + jnp.sum(ns.var * w[1])), (
            y,
            ns,
        )

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def single(cfg, params, x, mask, cot, w, state):
    cfg1 = F.BatchNormConfig(**{**cfg.__dict__, "axis_name": None})
    (_, (y, ns)), (gp, gx) = jax.jit(loss_fn(cfg1, 1.0))(params, x, mask, cot, w, state)
    return {"y": y, "state": ns, "dparams": gp, "dx": gx}


def sharded(cfg, params, x, mask, cot, w, state, check_vma):
    mesh = jax.make_mesh((NDEV,), (AX,), devices=jax.devices()[:NDEV])
    vg = loss_fn(cfg, 1.0 / NDEV)

    def body(params, x, mask, cot, w, state):
        (_, (y, ns)), (gp, gx) = vg(params, x, mask, cot, w, state)
        if not check_vma:
            gp = lax.psum(gp, AX)
        return y, ns, gp, gx

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(AX), P(AX), P(AX), P(), P()),
            out_specs=(P(AX), P(), P(), P(AX)),
            check_vma=check_vma,
        )
    )
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AX)))
    y, ns, gp, gx = f(params, put(x), put(mask), put(cot), w, state)
    return {"y": y, "state": ns, "dparams": gp, "dx": gx}


def pmapped(cfg, params, x, mask, cot, w, state):
    vg = loss_fn(cfg, 1.0 / NDEV)

    def body(params, x, mask, cot, w, state):
        (_, (y, ns)), (gp, gx) = vg(params, x, mask, cot, w, state)
        return y, ns, lax.psum(gp, AX), gx

    split = lambda a: a.reshape((NDEV, -1) + a.shape[1:])
    f = jax.pmap(body, axis_name=AX, in_axes=(None, 0, 0, 0, None, None))
    y, ns, gp, gx = f(params, split(x), split(mask), split(cot), w, state)
    first = lambda t: jax.tree.map(lambda a: a[0], t)
    merge = lambda a: a.reshape((-1,) + a.shape[2:])
    return {"y": merge(y), "state": first(ns), "dparams": first(gp), "dx": merge(gx)}


def main():
    assert len(jax.devices()) >= NDEV, jax.devices()
    args = data()
    out = {}
    for grad in ("vjp", "jvp", "autodiff"):
        # r_max / d_max moderate: some features clipped, some not.
        cfg = F.BatchNormConfig(
            axis_name=AX, momentum=0.9, grad=grad, renorm=F.RenormConfig(1.5, 0.5)
        )
        ref = single(cfg, *args)
        out[f"shard_map/{grad}"] = dev(sharded(cfg, *args, check_vma=True), ref)
        if grad == "vjp":
            out["shard_map_novma/vjp"] = dev(sharded(cfg, *args, check_vma=False), ref)
            out["pmap/vjp"] = dev(pmapped(cfg, *args), ref)
            out["steps"] = int(ref["state"].steps)
            y_bn = single(F.BatchNormConfig(axis_name=AX, momentum=0.9), *args)["y"]
            out["renorm_vs_bn"] = dev(ref["y"], y_bn)  # not vacuous: renorm differs from BN
    # Ghost batches of 4 (2 per device): local r, d per ghost batch, pooled running stats.
    cfg = F.BatchNormConfig(
        axis_name=AX, momentum=0.9, virtual_batch_size=4, renorm=F.RenormConfig(1.5, 0.5)
    )
    out["ghost/shard_map/vjp"] = dev(sharded(cfg, *args, check_vma=True), single(cfg, *args))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
