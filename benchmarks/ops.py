"""Batch-norm op benchmark: bnjax against flax, haiku, equinox and PyTorch (CPU).

Times training forward, training forward+backward (gradients w.r.t. ``x``, scale
and bias, with the running statistics updated) and eval, for every installed
implementation, **interleaved in rounds in one process** (each round visits the
implementations in a fresh random order, so machine drift hits all of them
alike). Compilation is excluded (every function is compiled and run before the
first round); every call is followed by ``block_until_ready``. It reports per
cell the median time, its spread (interquartile range over rounds), the median
over rounds of the ratio to ``flax.linen.BatchNorm`` (default, fast variance)
*in the same round*, the time as a multiple of the memory-bandwidth floor and
XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``).

The floor. Batch norm is memory-bound: it must read ``x`` for the statistics,
read it again and write ``y`` (training forward: 2 reads + 1 write of ``N``
floats), read ``x`` and ``dy`` for the two backward reductions and again for
``dx`` (forward+backward: 5 reads + 1 write) and, in eval, read ``x`` and write
``y`` (1 + 1). Two reference kernels are timed in the same rounds on an input
of the same size: ``read`` (a jitted ``sum(x)``) and ``copy`` (a jitted
``x * 1.0001 + 0.5``, one read and one write, including the cost of a fresh
output buffer). The floors are ``copy`` (eval), ``copy + read`` (forward) and
``copy + 4 read`` (forward+backward).

Usage::

    python benchmarks/ops.py                      # all shapes, writes docs/benchmarks.md
    python benchmarks/ops.py --shapes 256x1024,32x64x32x32:nchw --rounds 9 --out -
    python benchmarks/ops.py --smoke --out /tmp/b.md   # tiny, for the test suite

A shape is ``AxBxC..``, features last (``NC`` / ``NHWC``, ``axis=-1``), or with
``:nchw`` for features on axis 1 (``axis=1``). Implementations that are not
installed (haiku, equinox, torch) are skipped; equinox has no NHWC layout (its
BatchNorm takes channel-first examples) and is skipped there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Case", "Impl", "build_impls", "main", "parse_shapes", "run_case", "write_section"]

MODES = ("train_fwd", "train_fwdbwd", "eval")
MODE_TITLES = {
    "train_fwd": "Training forward",
    "train_fwdbwd": "Training forward+backward",
    "eval": "Eval (population statistics)",
}
# Floors in units of (copy, read): eval = copy, fwd = copy + read, fwd+bwd = copy + 4 read.
FLOOR_READS = {"train_fwd": 1, "train_fwdbwd": 4, "eval": 0}
DEFAULT_SHAPES = "60x100,256x1024,32x32x32x64,32x64x32x32:nchw,64x56x56x64"
BASELINE = "flax.linen"
MOMENTUM = 0.99
EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked input: its shape and feature axis (``-1`` or ``1``)."""

    shape: tuple[int, ...]
    axis: int

    @property
    def features(self) -> int:
        return self.shape[self.axis]

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "NC"
        return "NCHW" if self.axis == 1 else "NHWC"

    @property
    def label(self) -> str:
        return f"{self.layout} {'x'.join(map(str, self.shape))}"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclasses.dataclass
class Impl:
    """A benchmarked implementation: one zero-argument blocking runner per mode.

    ``temp`` maps a mode to XLA's compiled temporary bytes (``None`` if not JAX).
    """

    name: str
    runners: dict[str, Callable[[], Any]]
    temp: dict[str, int | None]


def parse_shapes(spec: str) -> list[Case]:
    """``"60x100,32x64x32x32:nchw"`` -> ``[Case((60, 100), -1), Case((32, 64, 32, 32), 1)]``."""
    cases = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        dims, _, layout = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--shapes: cannot parse {item!r}; expected e.g. 32x32x32x64"
            ) from None
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"--shapes: {item!r} needs at least 2 positive dimensions")
        layout = layout.lower() or "last"
        if layout not in ("last", "nhwc", "nc", "nchw"):
            raise ValueError(f"--shapes: unknown layout {layout!r} in {item!r} (use :nchw)")
        cases.append(Case(shape, 1 if layout == "nchw" else -1))
    return cases


# --------------------------------------------------------------------------- JAX helpers


def _jax_impl(name: str, fns: dict[str, tuple[Callable, tuple]]) -> Impl:
    runners, temp = {}, {}
    for mode, (fn, args) in fns.items():
        jitted = jax.jit(fn)
        compiled = jitted.lower(*args).compile()
        mem = compiled.memory_analysis()
        temp[mode] = None if mem is None else int(mem.temp_size_in_bytes)
        runners[mode] = _blocking(jitted, args)  # the usual jit dispatch path
    return Impl(name, runners, temp)


def _blocking(fn: Callable, args: tuple) -> Callable[[], Any]:
    def run():
        return jax.block_until_ready(fn(*args))

    return run


def _vjp_grads(apply: Callable, x, params, dy):
    """``((dx, dparams), aux)`` of ``apply(x, params) -> (y, aux)`` against cotangent ``dy``."""
    _, pullback, aux = jax.vjp(apply, x, params, has_aux=True)
    return pullback(dy), aux


# --------------------------------------------------------------------------- implementations


def _functional(name: str, module, cfg, features: int, x, dy) -> Impl:
    """The train forward, forward+backward and eval rows of a functional-core layer
    (``module`` is :mod:`bnjax.functional` or :mod:`bnjax.whitening`, with its ``cfg``)."""
    params, state = module.init(features, cfg)

    def fwd(params, state, x):
        return module.apply_train(params, state, x, cfg)

    def fwdbwd(params, state, x, dy):
        return _vjp_grads(lambda x, p: module.apply_train(p, state, x, cfg), x, params, dy)

    def ev(params, state, x):
        return module.apply_eval(params, state, x, cfg)

    return _jax_impl(
        name,
        {
            "train_fwd": (fwd, (params, state, x)),
            "train_fwdbwd": (fwdbwd, (params, state, x, dy)),
            "eval": (ev, (params, state, x)),
        },
    )


def _bnjax(case: Case, x, dy, *, name: str = "bnjax", **kw) -> Impl:
    import bnjax.functional as F

    cfg = F.BatchNormConfig(axis=case.axis, momentum=MOMENTUM, epsilon=EPS, **kw)
    return _functional(name, F, cfg, case.features, x, dy)


def _linen(name: str, module_cls, case: Case, x, dy, **kw) -> Impl:
    module = module_cls(axis=case.axis, momentum=MOMENTUM, epsilon=EPS, **kw)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    params, stats = variables["params"], variables["batch_stats"]

    def apply(x, params, stats):
        y, upd = module.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return y, upd["batch_stats"]

    def fwd(params, stats, x):
        return apply(x, params, stats)

    def fwdbwd(params, stats, x, dy):
        return _vjp_grads(lambda x, p: apply(x, p, stats), x, params, dy)

    def ev(params, stats, x):
        return module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)

    return _jax_impl(
        name,
        {
            "train_fwd": (fwd, (params, stats, x)),
            "train_fwdbwd": (fwdbwd, (params, stats, x, dy)),
            "eval": (ev, (params, stats, x)),
        },
    )


def _bnjax_linen(case: Case, x, dy) -> Impl:
    import bnjax.linen

    return _linen("bnjax.linen", bnjax.linen.BatchNorm, case, x, dy)


def _bnjax_renorm(case: Case, x, dy) -> Impl:
    """Batch Renorm (``RenormConfig(r_max=3, d_max=5)``, no warm-up: ``r``, ``d`` live)
    in the same kernel as the ``bnjax`` row; the state is a ``RenormStats``."""
    import bnjax.functional as F

    return _bnjax(case, x, dy, name="bnjax renorm", renorm=F.RenormConfig(3.0, 5.0))


def _bnjax_linen_renorm(case: Case, x, dy) -> Impl:
    import bnjax.linen

    return _linen("bnjax.linen renorm", bnjax.linen.BatchRenorm, case, x, dy)


# Batch Renorm rows -> the batch-norm row they are compared with, round by round.
RENORM_PAIRS = {"bnjax renorm": "bnjax", "bnjax.linen renorm": "bnjax.linen"}


def _flax_linen(case: Case, x, dy) -> Impl:
    import flax.linen as nn

    return _linen(BASELINE, nn.BatchNorm, case, x, dy)


def _flax_linen_exact(case: Case, x, dy) -> Impl:
    import flax.linen as nn

    return _linen("flax.linen exact", nn.BatchNorm, case, x, dy, use_fast_variance=False)


def _flax_nnx(case: Case, x, dy) -> Impl:
    from flax import nnx

    bn = nnx.BatchNorm(
        case.features, axis=case.axis, momentum=MOMENTUM, epsilon=EPS, rngs=nnx.Rngs(0)
    )
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def apply(x, params, stats, use_running_average):
        m = nnx.merge(graphdef, params, stats)
        y = m(x, use_running_average=use_running_average)
        return y, nnx.state(m, nnx.BatchStat)

    def fwd(params, stats, x):
        return apply(x, params, stats, False)

    def fwdbwd(params, stats, x, dy):
        # nnx refuses to mutate a BatchStat made outside the differentiated
        # function, so the statistics go in as a (zero-cotangent) primal.
        _, pullback, new_stats = jax.vjp(
            lambda x, p, s: apply(x, p, s, False), x, params, stats, has_aux=True
        )
        dx, dp, _ = pullback(dy)
        return (dx, dp), new_stats

    def ev(params, stats, x):
        return apply(x, params, stats, True)[0]

    return _jax_impl(
        "flax.nnx",
        {
            "train_fwd": (fwd, (params, stats, x)),
            "train_fwdbwd": (fwdbwd, (params, stats, x, dy)),
            "eval": (ev, (params, stats, x)),
        },
    )


def _haiku(case: Case, x, dy) -> Impl:
    import haiku as hk

    fmt = "channels_first" if case.axis == 1 else "channels_last"

    def net(x, is_training):
        bn = hk.BatchNorm(True, True, MOMENTUM, eps=EPS, data_format=fmt)
        return bn(x, is_training=is_training)

    t = hk.without_apply_rng(hk.transform_with_state(net))
    params, state = t.init(None, x, True)

    def fwd(params, state, x):
        return t.apply(params, state, x, True)

    def fwdbwd(params, state, x, dy):
        return _vjp_grads(lambda x, p: t.apply(p, state, x, True), x, params, dy)

    def ev(params, state, x):
        return t.apply(params, state, x, False)[0]

    return _jax_impl(
        "haiku",
        {
            "train_fwd": (fwd, (params, state, x)),
            "train_fwdbwd": (fwdbwd, (params, state, x, dy)),
            "eval": (ev, (params, state, x)),
        },
    )


def _equinox(case: Case, x, dy) -> Impl | None:
    import equinox as eqx

    if case.axis != 1 and len(case.shape) > 2:  # per-example input is channel-first: (C, H, W)
        return None
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        case.features, axis_name="batch", eps=EPS, momentum=MOMENTUM, mode="ema"
    )

    def apply(x, wb, state, inference):
        m = eqx.tree_at(lambda m: (m.weight, m.bias), bn, wb)
        return jax.vmap(
            lambda xi, s: m(xi, s, inference=inference),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)

    wb = (bn.weight, bn.bias)

    def fwd(wb, state, x):
        return apply(x, wb, state, False)

    def fwdbwd(wb, state, x, dy):
        return _vjp_grads(lambda x, p: apply(x, p, state, False), x, wb, dy)

    def ev(wb, state, x):
        return apply(x, wb, state, True)[0]

    return _jax_impl(
        "equinox",
        {
            "train_fwd": (fwd, (wb, state, x)),
            "train_fwdbwd": (fwdbwd, (wb, state, x, dy)),
            "eval": (ev, (wb, state, x)),
        },
    )


def _whitening(case: Case, x, dy, *, method: str, group_size: int) -> Impl | None:
    """bnjax.whitening (DBN / IterNorm) with groups of ``group_size``; ``None`` (skipped)
    where that does not divide the features. ``allow_singular``: a timing, whatever the
    batch (the cost does not depend on it)."""
    from bnjax import whitening as W

    if case.features % group_size:
        return None
    cfg = W.WhiteningConfig(
        group_size=group_size, method=method, axis=case.axis, momentum=MOMENTUM, epsilon=EPS,
        allow_singular=True,
    )
    return _functional(f"bnjax whitening {method} G={group_size}", W, cfg, case.features, x, dy)


WHITENING_ROWS = {
    f"bnjax whitening {m} G={g}": (
        lambda c, x, dy, m=m, g=g: _whitening(c, x, dy, method=m, group_size=g),
        "bnjax",
    )
    for g in (16, 64, 256)
    for m in ("zca", "iternorm")
}


def _torch(case: Case, x, dy) -> Impl:
    import torch

    xn, dyn = np.asarray(x), np.asarray(dy)
    if case.axis == -1 and xn.ndim > 2:
        # NHWC: torch's logical layout is NCHW; channels_last keeps NHWC in memory.
        perm = (0, xn.ndim - 1) + tuple(range(1, xn.ndim - 1))
        tx = torch.from_numpy(np.ascontiguousarray(xn.transpose(perm)))
        tdy = torch.from_numpy(np.ascontiguousarray(dyn.transpose(perm)))
        fmt = torch.channels_last if xn.ndim == 4 else torch.contiguous_format
        tx, tdy = tx.contiguous(memory_format=fmt), tdy.contiguous(memory_format=fmt)
    else:
        tx, tdy = torch.from_numpy(xn.copy()), torch.from_numpy(dyn.copy())
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}.get(
        xn.ndim, torch.nn.BatchNorm3d
    )
    bn = cls(case.features, eps=EPS, momentum=1 - MOMENTUM)
    txg = tx.detach().clone().requires_grad_(True)

    def fwd():
        bn.train()
        with torch.no_grad():
            return bn(tx)

    def fwdbwd():
        bn.train()
        y = bn(txg)
        return torch.autograd.grad(y, (txg, bn.weight, bn.bias), tdy)

    def ev():
        bn.eval()
        with torch.no_grad():
            return bn(tx)

    return Impl(
        "torch",  # the version is in the report's header (_versions)
        {"train_fwd": fwd, "train_fwdbwd": fwdbwd, "eval": ev},
        dict.fromkeys(MODES),
    )


# name -> (builder, module that must be importable)
BUILDERS: dict[str, tuple[Callable[[Case, Any, Any], Impl | None], str]] = {
    "bnjax": (_bnjax, "bnjax"),
    "bnjax two_pass": (
        lambda c, x, dy: _bnjax(c, x, dy, name="bnjax two_pass", stats_method="two_pass"),
        "bnjax",
    ),
    "bnjax shifted": (
        lambda c, x, dy: _bnjax(c, x, dy, name="bnjax shifted", stats_method="shifted"),
        "bnjax",
    ),
    "bnjax.linen": (_bnjax_linen, "bnjax"),
    "bnjax renorm": (_bnjax_renorm, "bnjax"),
    "bnjax.linen renorm": (_bnjax_linen_renorm, "bnjax"),
    "flax.linen": (_flax_linen, "flax"),
    "flax.linen exact": (_flax_linen_exact, "flax"),
    "flax.nnx": (_flax_nnx, "flax"),
    "haiku": (_haiku, "haiku"),
    "equinox": (_equinox, "equinox"),
    "torch": (_torch, "torch"),
    **WHITENING_ROWS,  # opt-in (--impls), not in the default run: not batch norm
    **{
        # opt-in: batch norm fused with leaky ReLU (In-Place ABN; the output alone is kept
        # for the backward pass); compare with `bnjax` (no activation) in the same run
        "bnjax act": (
            lambda c, x, dy: _bnjax(c, x, dy, name="bnjax act", activation="leaky_relu"),
            "bnjax",
        ),
    },
}


def available(names: Sequence[str]) -> list[str]:
    """The names in ``names`` whose library is importable (others are skipped)."""
    out = []
    for name in names:
        if name not in BUILDERS:
            raise ValueError(f"--impls: unknown implementation {name!r}; known: {list(BUILDERS)}")
        try:
            importlib.import_module(BUILDERS[name][1])
        except ImportError:
            print(f"[skip] {name}: {BUILDERS[name][1]} is not installed", file=sys.stderr)
            continue
        out.append(name)
    return out


def build_impls(case: Case, names: Sequence[str], x, dy) -> list[Impl]:
    """Builds and compiles (and runs once) every available implementation for ``case``."""
    impls = []
    for name in names:
        impl = BUILDERS[name][0](case, x, dy)
        if impl is None:
            continue
        for run in impl.runners.values():
            run()  # compile / warm up outside the timed rounds
        impls.append(impl)
    return impls


def _floor_refs(x) -> dict[str, Callable[[], Any]]:
    read = jax.jit(lambda x: jnp.sum(x))
    copy = jax.jit(lambda x: x * 1.0001 + 0.5)
    return {"read": _blocking(read, (x,)), "copy": _blocking(copy, (x,))}


# --------------------------------------------------------------------------- timing


# The clock: wall time (the default), or the process's CPU time summed over its
# threads (``--clock cpu``), which is less disturbed by other processes competing
# for the cores on a shared machine but counts the work of every thread.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _time(run: Callable[[], Any], reps: int) -> float:
    t = _clock()
    for _ in range(reps):
        run()
    return (_clock() - t) / reps


def interleaved_medians(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median wall seconds per call of each function, after two warm-up calls (compile),
    the functions called round-robin so machine noise hits all of them alike. Each call's
    result is waited for (`jax.block_until_ready`)."""
    import jax

    for f in fns.values():
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _reps(run: Callable[[], Any], target_s: float) -> int:
    t = _time(run, 1)
    t = min(t, _time(run, 1))
    return max(1, min(10_000, int(target_s / max(t, 1e-7))))


@dataclasses.dataclass
class Result:
    """Per (implementation or reference, mode): the seconds of each round."""

    times: dict[tuple[str, str], list[float]]


def run_case(
    case: Case, names: Sequence[str], rounds: int, target_s: float, seed: int = 0
) -> tuple[list[Impl], Result]:
    """Interleaved timing of every implementation and the two floor kernels on ``case``."""
    kx, kdy = jax.random.split(jax.random.key(seed))
    x = 1.0 + 2.0 * jax.random.normal(kx, case.shape, jnp.float32)
    dy = jax.random.normal(kdy, case.shape, jnp.float32)
    impls = build_impls(case, names, x, dy)
    refs = _floor_refs(x)
    for r in refs.values():
        r()
    slots: list[tuple[str, str, Callable[[], Any]]] = [
        (impl.name, mode, run) for impl in impls for mode, run in impl.runners.items()
    ] + [(name, "ref", run) for name, run in refs.items()]
    reps = {(n, m): _reps(run, target_s) for n, m, run in slots}
    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n, m, _ in slots}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(slots)
        rng.shuffle(order)
        for n, m, run in order:
            times[(n, m)].append(_time(run, reps[(n, m)]))
    return impls, Result(times)


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Cell:
    median: float
    spread: float  # interquartile range / median
    ratio: float | None  # median over rounds of t / t(flax.linen) in the same round
    floor: float | None  # median / floor
    ratio_bn: float | None = None  # Batch Renorm rows: the same ratio to their BN row


def summarize(impls: list[Impl], res: Result) -> tuple[dict[tuple[str, str], Cell], dict]:
    """Cells per (implementation, mode) and the floor summary of one case."""
    t_read = np.asarray(res.times[("read", "ref")])
    t_copy = np.asarray(res.times[("copy", "ref")])
    floors = {m: float(np.median(t_copy + k * t_read)) for m, k in FLOOR_READS.items()}
    cells = {}
    for impl in impls:
        for mode in impl.runners:
            t = np.asarray(res.times[(impl.name, mode)])
            base = res.times.get((BASELINE, mode))
            ratio = None if base is None else float(np.median(t / np.asarray(base)))
            q25, med, q75 = np.percentile(t, [25, 50, 75])
            bn = res.times.get((RENORM_PAIRS.get(impl.name), mode))
            ratio_bn = None if bn is None else float(np.median(t / np.asarray(bn)))
            cells[(impl.name, mode)] = Cell(
                float(med), float((q75 - q25) / med), ratio, float(med / floors[mode]), ratio_bn
            )
    return cells, {
        "read_s": float(np.median(t_read)),
        "copy_s": float(np.median(t_copy)),
        "floors": floors,
    }


def _fmt_t(s: float) -> str:
    us = s * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    if b < 1024:
        return f"{b} B"
    if b < 1024**2:
        return f"{b / 1024:.1f} KiB"
    return f"{b / 1024**2:.1f} MiB"


def measure_bandwidth(n: int, rounds: int = 7) -> dict[str, float]:
    """Read (``sum(x)``) and copy (``x * a + b``) bandwidth in GB/s on ``n`` float32s."""
    x = jnp.ones((n,), jnp.float32)
    refs = _floor_refs(x)
    for r in refs.values():
        r()
    ts = {k: [] for k in refs}
    for _ in range(rounds):
        for k, r in refs.items():
            ts[k].append(_time(r, 1))
    read, copy = (float(np.median(ts[k])) for k in ("read", "copy"))
    return {"n": n, "read_gbs": 4 * n / read / 1e9, "copy_gbs": 8 * n / copy / 1e9}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    if jax.default_backend() != "cpu":
        out += f"; device: {jax.devices()[0].device_kind} ({jax.default_backend()})"
    return out


def _versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for mod in ("jax", "jaxlib", "flax", "haiku", "equinox", "torch", "numpy"):
        try:
            parts.append(f"{mod} {importlib.import_module(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} (not installed)")
    return ", ".join(parts)


def render(
    results: list[tuple[Case, list[Impl], dict, dict]],
    names: list[str],
    *,
    rounds: int,
    bandwidth: dict[str, float],
    load: tuple[str, str],
    elapsed: float,
    clock: str = "wall",
) -> str:
    """The Markdown report."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks: batch norm ops"
        + ("" if clock == "wall" else f" ({clock} time)")
        + ("" if jax.default_backend() == "cpu" else f" on {jax.default_backend().upper()}"),
        "",
        "Generated by `python benchmarks/ops.py` (see its docstring for the method). "
        "Do not edit by hand.",
        "",
        f"- date: {now}; {rounds} interleaved rounds; clock: {clock}; run took {elapsed:.0f} s",
        f"- machine: {_machine()}; load average {load[0]} (start) / {load[1]} (end)",
        f"- versions: {_versions()}",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}` (default XLA:CPU settings if empty)",
        f"- bandwidth on {bandwidth['n'] * 4 / 2**20:.0f} MiB (float32): read (`sum(x)`) "
        f"{bandwidth['read_gbs']:.1f} GB/s, copy (`x * a + b`, read + write) "
        f"{bandwidth['copy_gbs']:.1f} GB/s",
        "",
        "Cells: median time in µs, ±interquartile range over rounds (% of the median), "
        f"median ratio to `{BASELINE}` in the same round, and the time as a multiple of "
        "the floor (F). The floor per shape is measured in the same rounds: `copy` (eval), "
        "`copy + read` (forward: 2 reads + 1 write), `copy + 4 read` (forward+backward: "
        "5 reads + 1 write). `flax.linen` is `flax.linen.BatchNorm()` (fast, inexact "
        "variance E[x²]-E[x]²); `flax.linen exact` sets `use_fast_variance=False`. "
        "`bnjax` is the functional core, `bnjax.linen` its flax module; the `renorm` rows "
        "are Batch Renorm (r_max 3, d_max 5, no warm-up) in the same kernel and module. "
        "Training modes "
        "update the running statistics; forward+backward returns the gradients w.r.t. x, "
        "scale and bias (not y).",
        "",
    ]
    present = [n for n in names if any(n == i.name for _, imps, _, _ in results for i in imps)]
    for mode in MODES:
        out += [f"## {MODE_TITLES[mode]}", ""]
        heads = ["shape", "floor µs"] + [f"`{n}`" for n in present]
        out += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for case, impls, cells, summ in results:
            row = [case.label, _fmt_t(summ["floors"][mode])]
            by = {i.name: i for i in impls}
            for n in present:
                impl = by.get(n)
                c = None if impl is None else cells.get((impl.name, mode))
                if c is None:
                    row.append("—")
                    continue
                ratio = "" if c.ratio is None else f" · **{c.ratio:.2f}×**"
                row.append(f"{_fmt_t(c.median)} ±{100 * c.spread:.0f}%{ratio} · {c.floor:.2f} F")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    pairs = [(r, b) for r, b in RENORM_PAIRS.items() if r in present and b in present]
    if pairs:
        out += [
            "## Batch Renorm / batch norm",
            "",
            "Median over rounds of the time of a Batch Renorm row over its batch-norm row "
            "in the same round (target: forward+backward <= 1.1x, eval 1.0x).",
            "",
        ]
        heads = ["shape", "rows"] + [MODE_TITLES[m] for m in MODES]
        out += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for case, _impls, cells, _ in results:
            for r, b in pairs:
                row = [case.label, f"`{r}` / `{b}`"]
                for m in MODES:
                    c = cells.get((r, m))
                    ok = c is not None and c.ratio_bn is not None
                    row.append(f"{c.ratio_bn:.2f}×" if ok else "—")
                out.append("| " + " | ".join(row) + " |")
        out.append("")
    out += ["## Compiled temporary memory (XLA `memory_analysis().temp_size_in_bytes`)", ""]
    heads = ["shape", "mode"] + [f"`{n}`" for n in present if n != "torch"]
    out += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for case, impls, _, _ in results:
        by = {i.name: i for i in impls}
        for mode in MODES:
            row = [case.label, mode]
            for n in present:
                if n == "torch":
                    continue
                impl = by.get(n)
                row.append("—" if impl is None else _fmt_bytes(impl.temp.get(mode)))
            out.append("| " + " | ".join(row) + " |")
    out.append("")
    return "\n".join(out)


def write_section(path: str, name: str, text: str) -> None:
    """Writes ``text`` into ``path`` between ``<!-- name:begin -->`` / ``<!-- name:end -->``.

    The rest of the file (other scripts' sections) is kept; a missing section is appended.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(new)


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help=f"comma-separated (default {DEFAULT_SHAPES})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    p.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated subset (known: {', '.join(BUILDERS)}; default: all but the "
        "bnjax row that equals plain `bnjax` on this backend)",
    )
    p.add_argument("--target-ms", type=float, default=None, help="time per sample (default 25)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="default wall")
    p.add_argument("--smoke", action="store_true", help="smallest shape, 2 rounds, tiny samples")
    p.add_argument(
        "--out",
        default=None,
        help="Markdown output path, '-' for stdout "
        "(default docs/benchmarks.md; stdout with --smoke)",
    )
    args = p.parse_args(argv)
    shapes = args.shapes or ("60x100" if args.smoke else DEFAULT_SHAPES)
    rounds = args.rounds or (2 if args.smoke else 15)
    target_s = (args.target_ms or (1.0 if args.smoke else 25.0)) / 1e3
    out_path = args.out or ("-" if args.smoke else "docs/benchmarks.md")
    if rounds < 1:
        p.error("--rounds must be >= 1")
    global _clock
    _clock = CLOCKS[args.clock]
    cases = parse_shapes(shapes)
    if args.impls is None:
        from bnjax.stats import resolve_algorithm

        skip = {f"bnjax {resolve_algorithm('auto')}"}  # the row that plain `bnjax` already is
        if jax.default_backend() != "cpu":
            skip.add("torch")  # a CPU build: not comparable with an accelerator
        skip |= set(WHITENING_ROWS) | {"bnjax act"}
        args.impls = ",".join(n for n in BUILDERS if n not in skip)
    names = available([n.strip() for n in args.impls.split(",") if n.strip()])
    if BASELINE not in names:
        p.error(f"--impls must include the baseline {BASELINE!r} (ratios are relative to it)")
    t0 = time.perf_counter()
    load0 = _loadavg()
    bw = measure_bandwidth(1 << 18 if args.smoke else 1 << 25, rounds=3 if args.smoke else 7)
    print(f"bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s", flush=True)
    results = []
    for case in cases:
        impls, res = run_case(case, names, rounds, target_s)
        cells, summ = summarize(impls, res)
        results.append((case, impls, cells, summ))
        for mode in MODES:
            line = [f"{case.label:>22} {mode:<13} floor {_fmt_t(summ['floors'][mode]):>6}"]
            for impl in impls:
                c = cells.get((impl.name, mode))
                if c is not None:
                    line.append(f"{impl.name} {_fmt_t(c.median)} ({c.ratio or 0:.2f}x)")
            print(" | ".join(line), flush=True)
    text = render(
        results,
        names,
        rounds=rounds,
        bandwidth=bw,
        load=(load0, _loadavg()),
        elapsed=time.perf_counter() - t0,
        clock=args.clock,
    )
    if out_path == "-":
        print(text)
    else:
        section = "ops" if args.clock == "wall" else f"ops-{args.clock}"
        if jax.default_backend() != "cpu":  # e.g. ops-gpu: the CPU tables stay
            section += f"-{jax.default_backend()}"
        write_section(out_path, section, text)
        print(f"wrote the {section} section of {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
