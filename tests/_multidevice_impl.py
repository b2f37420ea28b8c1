"""Multi-device checks for bnjax, run in ONE subprocess with 8 simulated CPU devices.

``tests/test_multidevice.py`` launches ``python tests/_multidevice_impl.py OUT.json [--quick]``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX is imported, and pytest workers have already imported it). Every check
computes a measurement (a normwise relative deviation, an op count, an error
message) and stores it in a JSON dict; the pytest module asserts on it. Nothing
here asserts, so one failing check does not hide the others.

Deviation of ``a`` from the reference ``b`` (per pytree): the max over leaves of
``max|a - b| / max|b|`` (``max|a - b|`` where ``b`` is all zeros); ``inf`` when either
holds a non-finite value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import traceback

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# benchmarks/_mesh.py: the mesh helper and the data-parallel MLP, shared with
# benchmarks/multidevice_step.py (benchmarks/ is not a package).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import _mesh  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
import bnjax.functional as F  # noqa: E402
import bnjax.linen as bl  # noqa: E402
from bnjax import training  # noqa: E402
from bnjax.training import parallel  # noqa: E402

NDEV = 8
AX = "d"
ALL_MASKINGS = ("none", "unequal", "empty_device", "all_empty")
MODES = ("shard_map", "shard_map_novma", "pmap")
QUICK = False  # --quick: the subset that CI runs (see tests/test_multidevice.py)
RESULTS: dict[str, dict] = {}


# --------------------------------------------------------------------------- helpers


def dev(a, b) -> float:
    """Normwise relative deviation of pytree ``a`` from reference ``b``."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    worst = 0.0
    for u, v in zip(la, lb, strict=True):
        u = np.asarray(u, np.float64)
        v = np.asarray(v, np.float64)
        assert u.shape == v.shape, (u.shape, v.shape)
        # A non-finite value in either is infinite deviation: max(0.0, nan) == 0.0, so a
        # NaN reference would otherwise read as a perfect match.
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
            return float("inf")
        scale = np.max(np.abs(v)) if v.size else 0.0
        err = np.max(np.abs(u - v)) if v.size else 0.0
        worst = max(worst, float(err / scale if scale > 0 else err))
    return worst


def record(name: str, fn) -> None:
    """Runs ``fn() -> dict`` and stores its result (or the exception) under ``name``."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - reported to pytest, which fails on it
        out = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["cpu_seconds"] = round(time.process_time() - c0, 3)
    RESULTS[name] = out


def breakdown(got, ref) -> dict:
    """Deviations per output group plus their max (``err``)."""
    out = {k: dev(got[k], ref[k]) for k in ref}
    out["err"] = max(out.values())
    return out


@functools.cache
def mesh1d(n=NDEV, name=AX, axis_type=AxisType.Explicit):
    return _mesh.mesh1d(n, name, axis_type)


def inputs(kind: str, masking: str, seed: int = 0):
    """Batch, per-example mask (or None) and cotangent weights for one configuration."""
    rng = np.random.default_rng(seed)
    shape = (64, 16) if kind == "mlp" else (32, 5, 5, 6)
    c = shape[-1]
    x = (3.0 + 2.0 * rng.standard_normal(shape) * rng.uniform(0.5, 2, c)).astype(np.float32)
    cot = rng.standard_normal(shape).astype(np.float32)
    wd = rng.standard_normal(c).astype(np.float32)
    we = rng.standard_normal(c).astype(np.float32)
    per = shape[0] // NDEV
    mshape = (shape[0],) + (1,) * (len(shape) - 1)
    if masking == "none":
        mask = None
    elif masking == "all_empty":
        mask = np.zeros(mshape, bool)
    else:
        # unequal valid counts per device, e.g. [8, 3, 5, 1, 8, 2, 7, 4] of 8;
        # "empty_device": device 2 has none.
        counts = [per, 3 * per // 8, 5 * per // 8, 1, per, 2 * per // 8, 7 * per // 8, per // 2]
        counts = [max(1, k) for k in counts]
        if masking == "empty_device":
            counts[2] = 0
        m = np.zeros((NDEV, per), bool)
        for i, k in enumerate(counts):
            m[i, rng.permutation(per)[:k]] = True
        mask = m.reshape(mshape)
    params = F.BNParams(
        scale=jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32)),
        bias=jnp.asarray(rng.standard_normal(c).astype(np.float32)),
    )
    state = bnjax.init_stats(c)._replace(
        mean=jnp.asarray(rng.standard_normal(c).astype(np.float32)),
        var=jnp.asarray(rng.uniform(0.5, 2, c).astype(np.float32)),
    )
    return x, mask, cot, wd, we, params, state


def make_loss(cfg, share: float):
    """``sum(y * cot) + share * (sum(new_mean * wd) + sum(new_var * we))`` and outputs.

    ``share = 1/N`` on each of N devices, so the sum over devices of the
    per-device losses is the single-device loss; the state terms exercise the
    gradient through the pooled statistics.
    """

    def loss(params, x, mask, cot, state, wd, we):
        y, ns = F.apply_train(params, state, x, cfg, mask=mask)
        extra = jnp.sum(ns.mean * wd) + jnp.sum(ns.var * we)
        return jnp.sum(y * cot) + share * extra, (y, ns)

    return loss


def _vg(loss):
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@functools.cache
def _single_fn(cfg):
    return jax.jit(_vg(make_loss(cfg, 1.0)))


def single_device(cfg, x, mask, cot, wd, we, params, state):
    cfg = dataclasses.replace(cfg, axis_name=None, axis_index_groups=None)
    (_, (y, ns)), (gp, gx) = _single_fn(cfg)(params, x, mask, cot, state, wd, we)
    return {"y": y, "state": ns, "dparams": gp, "dx": gx}


@functools.cache
def _shard_map_fn(cfg, check_vma, mesh, has_mask):
    loss = make_loss(cfg, 1.0 / mesh.size)

    def body(params, x, mask, cot, state, wd, we):
        (_, (y, ns)), (gp, gx) = _vg(loss)(params, x, mask, cot, state, wd, we)
        if not check_vma:  # untyped: per-device parameter gradients, sum them
            gp = lax.psum(gp, AX)
        return y, ns, gp, gx

    mspec = P(AX) if has_mask else None
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(AX), mspec, P(AX), P(), P(), P()),
            out_specs=(P(AX), P(), P(), P(AX)),
            check_vma=check_vma,
        )
    )


def run_shard_map(cfg, x, mask, cot, wd, we, params, state, *, check_vma=True, mesh=None):
    mesh = mesh or mesh1d()
    f = _shard_map_fn(cfg, check_vma, mesh, mask is not None)
    put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P(AX)))
    y, ns, gp, gx = f(params, put(x), put(mask), put(cot), state, wd, we)
    return {"y": y, "state": ns, "dparams": gp, "dx": gx}


@functools.cache
def _pmap_fn(cfg, devices, groups, share):
    loss = make_loss(cfg, share)

    def body(params, x, mask, cot, state, wd, we):
        (_, (y, ns)), (gp, gx) = _vg(loss)(params, x, mask, cot, state, wd, we)
        return y, ns, lax.psum(gp, AX, axis_index_groups=groups), gx

    return jax.pmap(body, axis_name=AX, in_axes=(0, 0, 0, 0, None, None, None), devices=devices)


def run_pmap(cfg, x, mask, cot, wd, we, params, state, *, devices=None, groups=None):
    devices = tuple(devices or jax.devices())
    n = len(devices)
    share = 1.0 / (n if groups is None else len(groups[0]))
    split = lambda a: None if a is None else a.reshape((n, -1) + a.shape[1:])
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), params)
    f = _pmap_fn(cfg, devices, groups, share)
    y, ns, gp, gx = f(rep, split(x), split(mask), split(cot), state, wd, we)
    merge = lambda a: a.reshape((-1,) + a.shape[2:])
    out = {"y": merge(y), "state": first(ns), "dparams": first(gp), "dx": merge(gx)}
    return out, (y, ns, gp, gx)


def first(tree):
    return jax.tree.map(lambda a: a[0], tree)


# --------------------------------------------------------------------------- checks


def check_exact_pooling():
    """shard_map (typed / untyped) and pmap vs the single-device full batch.

    One compiled function per (input kind, gradient mode, estimator, mode, has
    mask) is reused for all masks of the same shape (fast: few compilations).
    """
    plan = [  # (kind, grad, population, maskings, modes)
        ("mlp", "vjp", "ema", ALL_MASKINGS, ("shard_map", "pmap")),
        ("conv", "vjp", "ema", ALL_MASKINGS, ("shard_map",)),
    ] if QUICK else [
        ("mlp", "vjp", "ema", ALL_MASKINGS, MODES),
        ("conv", "vjp", "ema", ALL_MASKINGS, MODES),
        ("mlp", "jvp", "ema", ("unequal",), ("shard_map", "pmap")),
        ("mlp", "autodiff", "ema", ("unequal",), ("shard_map", "pmap")),
        ("conv", "vjp", "average", ("empty_device",), ("shard_map",)),
    ]
    for kind, grad, pop, maskings, modes in plan:
        cfg = F.BatchNormConfig(axis_name=AX, momentum=0.9, grad=grad, population=pop)
        for masking in maskings:
            data = inputs(kind, masking)

            def one(cfg=cfg, data=data, masking=masking, modes=modes):
                ref = single_device(cfg, *data)
                out = {}
                for mode in modes:
                    if mode == "pmap":
                        got = run_pmap(cfg, *data)[0]
                    else:
                        got = run_shard_map(cfg, *data, check_vma=mode == "shard_map")
                    out[mode] = breakdown(got, ref)
                out["err"] = max(v["err"] for v in out.values())
                if masking == "all_empty":
                    st = data[-1]
                    out["state_unchanged"] = bool(
                        np.array_equal(ref["state"].mean, st.mean)
                        and np.array_equal(ref["state"].var, st.var)
                    )
                    out["finite"] = all(
                        bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(ref)
                    )
                return out

            record(f"pool/{kind}/{masking}/{grad}/{pop}", one)


def check_groups():
    """axis_index_groups=((0..3), (4..7)) equals two separate 4-device runs."""
    groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    data = inputs("mlp", "unequal", seed=1)
    x, mask, cot, wd, we, params, state = data
    cfg = F.BatchNormConfig(axis_name=AX, axis_index_groups=groups, momentum=0.9)
    cfg4 = F.BatchNormConfig(axis_name=AX, momentum=0.9)

    def one():
        _, (y, ns, gp, gx) = run_pmap(cfg, *data, groups=groups)
        out = {}
        for g, half in enumerate((slice(0, 32), slice(32, 64))):
            part = (x[half], mask[half], cot[half], wd, we, params, state)
            ref4, _ = run_pmap(cfg4, *part, devices=jax.devices()[4 * g : 4 * g + 4])
            got = {
                "y": y[4 * g : 4 * g + 4].reshape(32, -1),
                "state": jax.tree.map(lambda a, g=g: a[4 * g], ns),
                "dparams": jax.tree.map(lambda a, g=g: a[4 * g], gp),
                "dx": gx[4 * g : 4 * g + 4].reshape(32, -1),
            }
            out[f"group{g}_vs_4dev_pmap"] = breakdown(got, ref4)
            out[f"group{g}_vs_single"] = breakdown(got, single_device(cfg4, *part))
        out["err"] = max(v["err"] for v in out.values())
        return out

    record("groups/pmap", one)


def _count_ops(hlo: str) -> dict:
    lines = [ln for ln in hlo.splitlines() if "=" in ln]
    count = lambda op: sum(
        1 for ln in lines if f" {op}(" in ln or f" {op}-start(" in ln
    )
    return {op: count(op) for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")}


def check_hlo():
    """Compiled HLO: forward = 1 all-gather; backward adds exactly 1 all-reduce."""
    x, mask, cot, wd, we, params, state = inputs("mlp", "unequal")
    mesh = mesh1d()
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AX)))
    for masked in (True,) if QUICK else (False, True):
        m = mask if masked else None
        mspec = P(AX) if masked else None
        cfg = F.BatchNormConfig(axis_name=AX, momentum=0.9)

        def fwd(params, x, m, cfg=cfg):
            return F.apply_train(params, state, x, cfg, mask=m)

        def bwd(params, x, m, cot, cfg=cfg):
            # x-gradient of a loss through y and the new running statistics.
            def loss(x):
                y, ns = F.apply_train(params, state, x, cfg, mask=m)
                return jnp.sum(y * cot) + jnp.sum(ns.mean * wd) / NDEV
            return jax.grad(loss)(x)

        def pmap_bwd(params, x, m, cot, cfg=cfg):
            # x- and (per-device) parameter gradients, as under pmap.
            def loss(params, x):
                y, ns = F.apply_train(params, state, x, cfg, mask=m)
                return jnp.sum(y * cot) + jnp.sum(ns.var * we) / NDEV
            return jax.grad(loss, argnums=(0, 1))(params, x)

        def one(fwd=fwd, bwd=bwd, pmap_bwd=pmap_bwd, m=m, mspec=mspec):
            args = (params, put(x), None if m is None else put(m))
            f = jax.jit(jax.shard_map(fwd, mesh=mesh, in_specs=(P(), P(AX), mspec),
                                      out_specs=(P(AX), P())))
            g = jax.jit(jax.shard_map(bwd, mesh=mesh, in_specs=(P(), P(AX), mspec, P(AX)),
                                      out_specs=P(AX)))
            h = jax.jit(jax.shard_map(pmap_bwd, mesh=mesh, check_vma=False,
                                      in_specs=(P(), P(AX), mspec, P(AX)),
                                      out_specs=(P(AX), P(AX))))
            return {
                "forward": _count_ops(f.lower(*args).compile().as_text()),
                "forward_and_x_grad": _count_ops(g.lower(*args, put(cot)).compile().as_text()),
                "untyped_x_and_param_grad": _count_ops(
                    h.lower(*args, put(cot)).compile().as_text()
                ),
            }

        record(f"hlo/{'masked' if masked else 'unmasked'}", one)


@functools.cache
def _spmd_fn(cfg):
    return jax.jit(_vg(make_loss(cfg, 1.0)))


def check_spmd():
    """jit with the batch (and features) sharded and axis_name=None = single device."""
    plan = [("mlp", "1d"), ("mlp", "2d_auto"), ("mlp", "2d"), ("conv", "1d_auto"),
            ("conv", "2d_auto")]
    if QUICK:
        plan = [("mlp", "1d"), ("mlp", "2d"), ("conv", "2d_auto")]
    cfg = F.BatchNormConfig(momentum=0.9)
    for kind, layout in plan:
        data = inputs(kind, "unequal")

        def one(data=data, layout=layout):
            x, mask, cot, wd, we, params, state = data
            at = AxisType.Auto if layout.endswith("auto") else AxisType.Explicit
            if layout.startswith("1d"):
                mesh = mesh1d(axis_type=at)
                bspec, fspec = P(AX), P()
            else:
                mesh = jax.make_mesh((4, 2), (AX, "model"), axis_types=(at, at))
                bspec, fspec = P(AX, *(None,) * (x.ndim - 2), "model"), P("model")
            put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
            # per-feature arrays (params and running statistics) split like the features
            feat = lambda t: jax.tree.map(lambda a: put(a, fspec), t)
            xs = put(x, bspec)
            out = {}
            for masking, m in (("none", None), ("masked", mask)):
                ref = single_device(cfg, x, m, *data[2:])
                ms = None if m is None else put(m, P(AX))
                (_, (y, ns)), (gp, gx) = _spmd_fn(cfg)(
                    feat(params), xs, ms, put(cot, bspec), feat(state), wd, we
                )
                out[masking] = breakdown({"y": y, "state": ns, "dparams": gp, "dx": gx}, ref)
            out["x_sharding"] = str(xs.sharding.spec)
            out["y_sharding"] = str(getattr(y.sharding, "spec", y.sharding))
            out["err"] = max(out["none"]["err"], out["masked"]["err"])
            return out

        record(f"spmd/{kind}/{layout}", one)


def check_multi_axis():
    """axis_name=(data, model) on a 2-D mesh pools over all 8 devices."""
    if QUICK:
        return
    data = inputs("conv", "empty_device")
    cfg = F.BatchNormConfig(axis_name=(AX, "model"), momentum=0.9)

    def one():
        x, mask, cot, wd, we, params, state = data
        ref = single_device(cfg, *data)
        mesh = jax.make_mesh((4, 2), (AX, "model"), axis_types=(AxisType.Explicit,) * 2)
        loss = make_loss(cfg, 1.0 / 8)

        def body(*args):
            (_, (y, ns)), (gp, gx) = _vg(loss)(*args)
            return y, ns, gp, gx

        spec = P((AX, "model"))
        f = jax.jit(jax.shard_map(body, mesh=mesh,
                                  in_specs=(P(), spec, spec, spec, P(), P(), P()),
                                  out_specs=(spec, P(), P(), spec)))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))
        y, ns, gp, gx = f(params, put(x), put(mask), put(cot), state, wd, we)
        return breakdown({"y": y, "state": ns, "dparams": gp, "dx": gx}, ref)

    record("multi_axis/shard_map_2d", one)


def check_vmap():
    rng = np.random.default_rng(3)
    e, b, c = 3, 32, 8
    x = jnp.asarray((1 + rng.standard_normal((e, b, c)) * rng.uniform(0.5, 3, (e, 1, c)))
                    .astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((e, b, c)).astype(np.float32))
    params = F.BNParams(jnp.asarray(rng.uniform(0.5, 1.5, (e, c)).astype(np.float32)),
                        jnp.asarray(rng.standard_normal((e, c)).astype(np.float32)))
    state = jax.vmap(lambda _: bnjax.init_stats(c))(jnp.arange(e))
    cfg = F.BatchNormConfig(momentum=0.9)

    def member(params, state, x, cot):
        def loss(params, x):
            y, ns = F.apply_train(params, state, x, cfg)
            return jnp.sum(y * cot), (y, ns)
        (_, (y, ns)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return {"y": y, "state": ns, "dparams": gp, "dx": gx}

    def independent():
        got = jax.jit(jax.vmap(member))(params, state, x, cot)
        loop = [jax.jit(member)(*(jax.tree.map(lambda a, i=i: a[i], t)
                                  for t in (params, state, x, cot))) for i in range(e)]
        ref = jax.tree.map(lambda *a: jnp.stack(a), *loop)
        out = breakdown(got, ref)
        # and NOT the statistics of the pooled (e * b) batch:
        pooled = F.apply_train(first(params), first(state), x.reshape(e * b, c), cfg)[0]
        out["differs_from_pooled"] = dev(got["y"][0], pooled[:b])
        return out

    if not QUICK:  # (tests/test_multidevice.py also checks this in-process)
        record("vmap/no_axis_name_is_per_slice", independent)

    data = inputs("mlp", "unequal", seed=4)
    x2, mask2, cot2, wd, we, p2, s2 = data
    cfg_ax = F.BatchNormConfig(axis_name="batch", momentum=0.9)

    def named(split: int):
        def slice_fn(params, x, mask):
            return F.apply_train(params, s2, x, cfg_ax, mask=mask)

        def loss(params, x):
            xs = x.reshape((split, -1) + x.shape[1:])
            ms = mask2.reshape((split, -1) + mask2.shape[1:])
            y, ns = jax.vmap(slice_fn, in_axes=(None, 0, 0), axis_name="batch")(params, xs, ms)
            ns = first(ns)
            y = y.reshape(x.shape)
            return jnp.sum(y * cot2) + jnp.sum(ns.mean * wd) + jnp.sum(ns.var * we), (y, ns)

        def run():
            f = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
            (_, (y, ns)), (gp, gx) = f(p2, x2)
            return breakdown({"y": y, "state": ns, "dparams": gp, "dx": gx},
                             single_device(cfg_ax, *data))

        return run

    record("vmap/axis_name_slices_of_8", named(8))
    record("vmap/axis_name_per_example", named(64))


def check_ghost():
    """virtual_batch_size: a loop over sub-batches; independent of the device count."""
    vbs = 8
    plan = (("mlp", "unequal", (4, 8)), ("conv", "none", (2, 4)))
    for kind, masking, ndevs in plan[:1] if QUICK else plan:
        data = inputs(kind, masking, seed=5)
        x, mask, cot, wd, we, params, state = data
        cfg = F.BatchNormConfig(momentum=0.9, virtual_batch_size=vbs)
        plain = F.BatchNormConfig(momentum=0.9)

        def loop_ref(data=data, cfg=cfg, plain=plain):
            x, mask, cot, wd, we, params, state = data

            def loss(params, x):
                # a sequential loop (lax.map) over the sub-batches, each normalized alone
                sub = lambda a: a.reshape((-1, vbs) + a.shape[1:])
                if mask is None:
                    ys = lax.map(lambda xi: F.apply_train(params, state, xi, plain)[0], sub(x))
                else:
                    ys = lax.map(
                        lambda a: F.apply_train(params, state, a[0], plain, mask=a[1])[0],
                        (sub(x), sub(mask)),
                    )
                y = ys.reshape(x.shape)
                # running statistics: from the exact pooled moments of the whole batch
                ns = F.apply_train(params, state, x, plain, mask=mask)[1]
                ns = jax.lax.stop_gradient(ns)
                return jnp.sum(y * cot), (y, ns)

            (_, (y, ns)), (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
                params, x
            )
            return {"y": y, "state": ns, "dparams": gp, "dx": gx}

        def one(data=data, cfg=cfg, plain=plain, ndevs=ndevs, loop_ref=loop_ref):
            ref = loop_ref()
            # state terms weigh 0 here: the loop reference stops their gradient
            d0 = data[:3] + (data[3] * 0, data[4] * 0) + data[5:]
            out = {"single": breakdown(single_device(cfg, *d0), ref)}
            for n in ndevs:
                cfg_n = dataclasses.replace(cfg, axis_name=AX)
                got = run_shard_map(cfg_n, *d0, mesh=mesh1d(n))
                out[f"shard_map_{n}dev"] = breakdown(got, ref)
            out["err"] = max(v["err"] for v in out.values())
            # without ghost batches the output differs (the check is not vacuous)
            out["differs_from_full_batch"] = dev(single_device(plain, *d0)["y"], ref["y"])
            return out

        record(f"ghost/{kind}/{masking}", one)


class _Net(nn.Module):
    bn: type
    axis_name: str | None = AX

    @nn.compact
    def __call__(self, x, mask=None):
        kw = {} if mask is None else {"mask": mask}
        return self.bn(use_running_average=False, momentum=0.9, axis_name=self.axis_name)(x, **kw)


def check_flax():
    """flax.linen.BatchNorm(axis_name) vs bnjax.linen.BatchNorm: equal, then unequal counts."""
    for masking in ("none", "unequal"):
        data = inputs("mlp", masking, seed=6)
        x, mask, cot = data[:3]

        def one(x=x, mask=mask):
            mesh = mesh1d()
            out = {}
            bnj = _Net(bl.BatchNorm, None)
            variables = bnj.init(jax.random.key(0), x[:8])
            mask_full = None if mask is None else np.broadcast_to(mask, x.shape)
            ref_y, ref_up = bnj.apply(variables, x, mask_full, mutable=["batch_stats"])
            for name, bn in (("flax", nn.BatchNorm), ("bnjax", bl.BatchNorm)):
                net = _Net(bn)

                def body(v, x, m, net=net):
                    return net.apply(v, x, m, mutable=["batch_stats"])

                mspec = None if mask is None else P(AX)
                f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AX), mspec),
                                          out_specs=(P(AX), P()), check_vma=False))
                put = lambda a: None if a is None else jax.device_put(
                    a, NamedSharding(mesh, P(AX)))
                y, up = f(variables, put(x), put(mask_full))
                out[name] = breakdown({"y": y, "state": up}, {"y": ref_y, "state": ref_up})
            return out

        record(f"flax/{masking}", one)


# Two hidden layers, BN momentum 0.9, flax's default (LeCun normal) head weights.
_MLP = functools.partial(_mesh.MLP, layers=2, momentum=0.9)


def check_data_parallel():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.uniform(0, 1, (3, 64, 784)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, (3, 64)))
    tx = optax.sgd(0.5)
    key = jax.random.key(0)
    s0 = training.state_from_variables(_MLP().init(key, x[0, :2], train=False), tx, key)

    def train(step):
        s = s0
        for i in range(x.shape[0]):
            s, metrics = step(s, x[i], y[i])
        return {"state": s.replace(step=s.step.astype(jnp.float32)), "metrics": metrics}

    def one():
        ref = train(jax.jit(training.make_train_step(_MLP(None), tx)))
        out = {}
        for n, at in ((8, AxisType.Explicit),) if QUICK else ((1, AxisType.Explicit),
                                                                (8, AxisType.Explicit)):
            mesh = mesh1d(n, "data", at)
            step = training.make_train_step(_MLP(), tx, axis_name="data")
            got = train(parallel.data_parallel(step, mesh))
            out[f"{n}dev_{at.name}"] = breakdown(got, ref)
        out["err"] = max(v["err"] for v in out.values())
        try:
            parallel.data_parallel(
                training.make_train_step(_MLP(), tx, axis_name="data"), mesh1d(8, "data")
            )(
                s0, x[0, :60], y[0, :60])
            out["indivisible_error"] = None
        except ValueError as e:
            out["indivisible_error"] = str(e)
        return out

    record("data_parallel/mlp_3_steps", one)


def check_bad_input():
    x, *_ , params, state = inputs("mlp", "none")
    cfg = F.BatchNormConfig(axis_name="nope")

    def unbound_in_shard_map():
        mesh = mesh1d()
        f = jax.shard_map(lambda x: F.apply_train(params, state, x, cfg)[0], mesh=mesh,
                          in_specs=P(AX), out_specs=P(AX))
        try:
            jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P(AX))))
            return {"error": None}
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}

    record("bad/unbound_axis_in_shard_map", unbound_in_shard_map)


def main(path: str, quick: bool = False) -> None:
    global QUICK
    QUICK = quick
    t0 = time.perf_counter()
    for check in (check_exact_pooling, check_groups, check_hlo, check_spmd, check_multi_axis,
                  check_vmap, check_ghost, check_flax, check_data_parallel, check_bad_input):
        check()
    RESULTS["_meta"] = {
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time(), 2),
    }
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], quick="--quick" in sys.argv[2:])
