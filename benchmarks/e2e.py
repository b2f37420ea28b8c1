"""End-to-end benchmark: training-step throughput and the full Figure 1 job.

Two measurements, each against the *idiomatic* flax way of writing the same
training: a ``flax.linen`` model with ``nn.BatchNorm``, ``optax``, one jitted
train step per Python iteration and mini-batches cut on the host from a
shuffled NumPy permutation per epoch (the pattern of the flax examples).

1. **Steps/s** of one SGD step (batch 60) of the paper's MNIST MLP
   (784-100-100-100-10, sigmoid, BN before each nonlinearity) and of a small
   NHWC convnet (:class:`bnjax.experiments.models.ConvNet`: two 3x3 conv blocks of 32 and 64
   channels with BN and max-pooling, a 128-unit dense layer). Rows: the
   idiomatic loop with ``flax.linen.BatchNorm`` (the baseline), the same loop
   with ``bnjax.linen.BatchNorm`` swapped in (isolates the layer), and
   :func:`bnjax.training.make_train_loop` (steps compiled into a ``lax.scan``,
   batches gathered on the device; one seed, and three seeds ``vmap``-ed,
   counted as 3 steps per step; for the convnet also ``steps_per_call=10``:
   jitted calls of 10 unrolled steps, since XLA:CPU runs convolutions inside a
   ``while`` loop several times slower). Interleaved rounds, medians, ratio to
   the baseline within each round.
2. **The full default Figure 1 job** (2 nets x 3 seeds x 50k steps, test-set
   evaluation with the sigmoid-input percentile probe every 500 steps), with
   :func:`bnjax.training.fit` vs the idiomatic loop doing the same work
   (per net and seed: 50k Python-loop steps and 100 jitted evaluations).
   Both are **extrapolated from a measured fraction** (``--fig1-steps`` steps of
   each), compile time measured once and added once.

Usage::

    python benchmarks/e2e.py                  # writes its section of docs/benchmarks.md
    python benchmarks/e2e.py --smoke --out -  # tiny, prints
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402  (the sibling benchmark: machine/version info, section writer)

import bnjax.linen  # noqa: E402
from bnjax import training  # noqa: E402
from bnjax.experiments.models import MLP, ConvNet  # noqa: E402

__all__ = ["IdiomaticMLP", "IdiomaticConvNet", "main"]

BATCH = 60
CONV_CALL = 10  # make_train_loop(steps_per_call=...) for the convnet (no conv in a while loop)
PERCENTILES = (15.0, 50.0, 85.0)


# --------------------------------------------------------------------------- idiomatic flax


class IdiomaticMLP(nn.Module):
    """The paper's MLP written the plain flax way; ``bn`` is the BatchNorm class."""

    bn: Any = nn.BatchNorm
    use_bn: bool = True
    hidden: Sequence[int] = (100, 100, 100)

    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.normal(1.0)
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.hidden):
            x = nn.Dense(w, use_bias=not self.use_bn, kernel_init=init)(x)
            if self.use_bn:
                x = self.bn(use_running_average=not train, momentum=0.99, epsilon=1e-5)(x)
            if i == len(self.hidden) - 1:
                self.sow("intermediates", "probe", x)
            x = nn.sigmoid(x)
        return nn.Dense(10, kernel_init=init)(x)


class IdiomaticConvNet(nn.Module):
    """:class:`bnjax.experiments.models.ConvNet`'s architecture written the plain flax way."""

    bn: Any = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = x[..., None] if x.ndim == 3 else x
        for c in (32, 64):
            x = nn.Conv(c, (3, 3), use_bias=False)(x)
            x = self.bn(use_running_average=not train, momentum=0.99, epsilon=1e-5)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Dense(128, use_bias=False)(x.reshape((x.shape[0], -1)))
        x = nn.relu(self.bn(use_running_average=not train, momentum=0.99, epsilon=1e-5)(x))
        return nn.Dense(10)(x)


def idiomatic_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    """The usual jitted ``train_step(params, batch_stats, opt_state, x, y)``."""

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return train_step


def idiomatic_eval(model: nn.Module) -> Callable:
    """Jitted test accuracy plus the percentiles of the probed unit (Figure 1's evaluation)."""

    @jax.jit
    def evaluate(params, batch_stats, x, y):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, inter = model.apply(variables, x, train=False, mutable=["intermediates"])
        probe = inter["intermediates"]["probe"][0]
        return {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "pct": jnp.percentile(probe[:, :10], jnp.asarray(PERCENTILES), axis=0),
        }

    return evaluate


class IdiomaticRun:
    """One model trained the idiomatic way: host-side shuffled batches, a jitted step each."""

    def __init__(self, model, tx, x, y, seed: int = 0):
        self.model, self.x, self.y = model, x, y
        variables = model.init(jax.random.PRNGKey(seed), x[:1], train=False)
        self.params = variables["params"]
        self.batch_stats = variables.get("batch_stats", {})
        self.opt_state = tx.init(self.params)
        self.step_fn = idiomatic_step(model, tx)
        self.rng = np.random.default_rng(seed)
        self.perm, self.pos = self.rng.permutation(len(x)), 0

    def batch(self):
        if self.pos + BATCH > len(self.perm):
            self.perm, self.pos = self.rng.permutation(len(self.x)), 0
        idx = self.perm[self.pos : self.pos + BATCH]
        self.pos += BATCH
        return self.x[idx], self.y[idx]

    def steps(self, n: int) -> None:
        for _ in range(n):
            xb, yb = self.batch()
            self.params, self.batch_stats, self.opt_state, loss = self.step_fn(
                self.params, self.batch_stats, self.opt_state, xb, yb
            )
        jax.block_until_ready(loss)


# --------------------------------------------------------------------------- step throughput


def _bnjax_loop(model, tx, x, y, seeds: int, steps_per_call: int | None = None):
    loop = training.make_train_loop(
        model, tx, batch_size=BATCH, over_seeds=seeds > 1, steps_per_call=steps_per_call
    )
    if seeds > 1:
        state = training.create_train_states(model, tx, list(range(seeds)), x[:1])
    else:
        state = training.create_train_state(model, tx, jax.random.PRNGKey(0), x[:1])
    xd, yd = jax.device_put(x), jax.device_put(y)
    return loop, state, xd, yd


def step_throughput(
    models: dict[str, tuple[nn.Module, nn.Module, nn.Module]],
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    steps: dict[str, int],
    rounds: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {method: {"median": steps/s, "ratio": median ratio to the flax loop}}}``."""
    tx = optax.sgd(0.1)
    out = {}
    for mname, (flax_model, bnjax_model, lib_model) in models.items():
        x, y = data[mname]
        n_steps = steps[mname]
        runs: dict[str, tuple[Callable[[], None], int]] = {}
        for label, model in (("flax.linen loop", flax_model), ("bnjax.linen loop", bnjax_model)):
            r = IdiomaticRun(model, tx, x, y)
            r.steps(2)  # compile
            runs[label] = (lambda r=r, n=n_steps: r.steps(n), n_steps)
        variants = [(1, None), (3, None)] if mname == "MLP" else [(1, None), (1, CONV_CALL)]
        for seeds, per_call in variants:
            loop, state, xd, yd = _bnjax_loop(lib_model, tx, x, y, seeds, per_call)
            holder = {"s": state}
            jax.block_until_ready(loop(state, xd, yd, num_steps=n_steps))  # compile

            def run(loop=loop, holder=holder, xd=xd, yd=yd, n=n_steps):
                holder["s"], m = loop(holder["s"], xd, yd, num_steps=n)
                jax.block_until_ready(m)

            label = "bnjax.training scan" + (f" x{seeds} seeds" if seeds > 1 else "")
            if per_call:
                label = f"bnjax.training unrolled, {per_call} steps per call"
            runs[label] = (run, n_steps * seeds)
        times = {k: [] for k in runs}
        for _ in range(rounds):
            for k, (fn, n) in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(n / (time.perf_counter() - t))
        base = np.asarray(times["flax.linen loop"])
        out[mname] = {
            k: {
                "median": float(np.median(v)),
                "spread": float(np.subtract(*np.percentile(v, [75, 25])) / np.median(v)),
                "ratio": float(np.median(np.asarray(v) / base)),
            }
            for k, v in times.items()
        }
        for k, v in out[mname].items():
            print(f"{mname:>8} {k:<28} {v['median']:8.0f} steps/s ({v['ratio']:.2f}x)", flush=True)
    return out


# --------------------------------------------------------------------------- Figure 1 job


def figure1_job(
    train, test, *, steps: int, seeds: int, total_steps: int, eval_every: int, rounds: int = 3
):
    """Measured fraction of the Figure 1 job both ways, extrapolated to ``total_steps``."""
    from bnjax.experiments import figure1

    cfg = figure1.get_config()
    cfg.num_seeds = seeds
    models, tx = figure1.build(cfg)
    probe = figure1.make_probe(cfg)
    (tx_, ty_), (vx, vy) = train, test

    # bnjax: fit() with the experiment's runs (compiled chunks, vmapped seeds). The
    # jitted loops are made once, so the timed fit reuses the warm-up's compilation.
    loops = {
        net: (
            training.make_train_loop(m, tx, batch_size=cfg.batch_size),
            training.make_eval_step(m, probe=probe),
        )
        for net, m in models.items()
    }

    def make_runs():
        return {
            net: training.Run(
                state=training.create_train_states(m, tx, list(range(seeds)), tx_[:1]),
                train_loop=loops[net][0],
                evaluate=loops[net][1],
            )
            for net, m in models.items()
        }

    # On the device once (fit's own device_put is then free), states made outside the timer.
    train_d, test_d = jax.device_put(train), jax.device_put(test)
    runs = make_runs()
    t = time.perf_counter()
    training.fit(runs, train_d, test_d, num_steps=eval_every, eval_every=eval_every, progress=False)
    bnjax_first = time.perf_counter() - t

    # Idiomatic: per net and seed, a Python loop of jitted steps, jitted eval every eval_every.
    idio = {}
    idio_compile = 0.0
    for use_bn in (False, True):
        model = IdiomaticMLP(use_bn=use_bn)
        r = IdiomaticRun(model, tx, tx_, ty_, seed=0)
        ev = idiomatic_eval(model)
        t = time.perf_counter()
        r.steps(1)
        jax.block_until_ready(ev(r.params, r.batch_stats, vx, vy))
        idio_compile += time.perf_counter() - t
        idio[use_bn] = (r, ev)

    def bnjax_fraction():
        runs = make_runs()
        t = time.perf_counter()
        training.fit(runs, train_d, test_d, num_steps=steps, eval_every=eval_every, progress=False)
        return time.perf_counter() - t

    def idiomatic_fraction():
        t = time.perf_counter()
        for r, ev in idio.values():
            for _ in range(steps // eval_every):
                r.steps(eval_every)
                jax.block_until_ready(ev(r.params, r.batch_stats, vx, vy))
        return time.perf_counter() - t

    # Interleaved rounds (machine drift hits both alike); medians, and the median of
    # the per-round ratios.
    b_times, i_times = [], []
    for k in range(rounds):
        pair = (bnjax_fraction, idiomatic_fraction) if k % 2 == 0 else (
            idiomatic_fraction, bnjax_fraction)
        for f in pair:
            (b_times if f is bnjax_fraction else i_times).append(f())
    bnjax_frac, idio_frac = float(np.median(b_times)), float(np.median(i_times))
    round_speedup = float(np.median(np.asarray(i_times) * seeds / np.asarray(b_times)))
    bnjax_compile = max(bnjax_first - bnjax_frac * eval_every / steps, 0.0)
    scale = total_steps / steps
    bnjax_total = bnjax_frac * scale + bnjax_compile
    idio_total = idio_frac * seeds * scale + idio_compile
    res = {
        "measured_steps": steps,
        "bnjax_fraction_s": bnjax_frac,
        "idiomatic_fraction_s": idio_frac,
        "bnjax_compile_s": bnjax_compile,
        "idiomatic_compile_s": idio_compile,
        "bnjax_total_s": bnjax_total,
        "idiomatic_total_s": idio_total,
        "speedup": idio_total / bnjax_total,
        "rounds": rounds,
        "round_speedup_median": round_speedup,
        "round_speedups": [float(i * seeds / b) for i, b in zip(i_times, b_times, strict=True)],
    }
    print(
        f"figure1 job ({2} nets x {seeds} seeds x {total_steps} steps, extrapolated from "
        f"{steps}): bnjax {bnjax_total:.0f} s, idiomatic {idio_total:.0f} s, "
        f"speedup {res['speedup']:.2f}x (median of {rounds} interleaved rounds; per round: "
        f"{', '.join(f'{v:.2f}x' for v in res['round_speedups'])})",
        flush=True,
    )
    return res


# --------------------------------------------------------------------------- report


def render(tp, fig, *, args, elapsed: float, load) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks: end to end",
        "",
        "Generated by `python benchmarks/e2e.py` (see its docstring). Do not edit by hand.",
        "",
        f"- date: {now}; run took {elapsed:.0f} s",
        f"- machine: {ops._machine()}; load average {load[0]} (start) / {load[1]} (end)",
        f"- versions: {ops._versions()}",
        "",
        f"## Training steps per second (batch {BATCH}, SGD)",
        "",
        f"{args.rounds} interleaved rounds of {args.steps} (MLP) / {args.conv_steps} (ConvNet) "
        "steps per sample (for the scanned loop: one compiled chunk); median steps/s "
        "(±interquartile range), median ratio to the idiomatic flax loop in the same round. "
        "Multi-seed rows count every seed's step.",
        "",
        "| model | method | steps/s | ratio to flax loop |",
        "|---|---|---|---|",
    ]
    for mname, rows in tp.items():
        for k, v in rows.items():
            out.append(
                f"| {mname} | {k} | {v['median']:.0f} ±{100 * v['spread']:.0f}% | "
                f"**{v['ratio']:.2f}×** |"
            )
    out.append("")
    if fig is not None:
        out += [
            "## The full default Figure 1 job",
            "",
            f"2 nets (no BN, BN) x {args.seeds} seeds x {args.fig1_total:,} steps of batch "
            f"{BATCH}, test-set evaluation (accuracy and the sigmoid-input percentiles) every "
            f"{args.eval_every} steps. **Extrapolated** from {fig['measured_steps']:,} measured "
            f"steps per net ({args.seeds} seeds together for bnjax, one seed for the idiomatic "
            "loop, times the number of seeds), plus the compile time once; the two ways are "
            f"timed in {fig['rounds']} interleaved rounds (medians).",
            "",
            "| way | measured fraction s | compile s | full job s (extrapolated) |",
            "|---|---|---|---|",
            f"| bnjax (`training.fit`: scanned chunks, vmapped seeds) | "
            f"{fig['bnjax_fraction_s']:.1f} | {fig['bnjax_compile_s']:.1f} | "
            f"{fig['bnjax_total_s']:.0f} |",
            f"| idiomatic flax loop (`nn.BatchNorm`, jit per step) | "
            f"{fig['idiomatic_fraction_s']:.1f} | {fig['idiomatic_compile_s']:.1f} | "
            f"{fig['idiomatic_total_s']:.0f} |",
            "",
            f"Speed-up of the full job: **{fig['speedup']:.2f}×** (ratio of the extrapolated "
            f"totals); median of the per-round ratios {fig['round_speedup_median']:.2f}× "
            f"(rounds: {', '.join(f'{v:.2f}×' for v in fig['round_speedups'])}).",
            "",
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="MLP steps per timed sample (500)")
    p.add_argument("--conv-steps", type=int, default=None, help="convnet steps per sample (50)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    p.add_argument("--fig1-steps", type=int, default=None, help="measured steps per net (1000)")
    p.add_argument("--fig1-total", type=int, default=50_000, help="steps of the full job")
    p.add_argument("--fig1-rounds", type=int, default=None, help="interleaved rounds (3)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--no-figure1", action="store_true", help="skip the Figure 1 job")
    p.add_argument("--data-dir", default=None, help="MNIST root (else $BNJAX_DATA_DIR)")
    p.add_argument("--smoke", action="store_true", help="tiny: 20 steps, 2 rounds")
    p.add_argument("--out", default=None, help="path, '-' for stdout (default docs/benchmarks.md)")
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.smoke else 500)
    args.conv_steps = args.conv_steps or (5 if args.smoke else 50)
    args.rounds = args.rounds or (2 if args.smoke else 3)
    args.fig1_rounds = args.fig1_rounds or (1 if args.smoke else 3)
    if args.smoke:
        args.eval_every = min(args.eval_every, 20)
    args.fig1_steps = args.fig1_steps or (2 * args.eval_every if args.smoke else 1000)
    if args.fig1_steps % args.eval_every:
        p.error("--fig1-steps must be a multiple of --eval-every")
    out_path = args.out or ("-" if args.smoke else "docs/benchmarks.md")

    from bnjax.experiments.data import load_dataset

    t0, load0 = time.perf_counter(), ops._loadavg()
    ds = load_dataset("mnist", data_dir=args.data_dir, flatten=False)
    train_x, train_y = ds.train_images, ds.train_labels
    flat = train_x.reshape(len(train_x), -1)
    models = {
        "MLP": (IdiomaticMLP(bn=nn.BatchNorm), IdiomaticMLP(bn=bnjax.linen.BatchNorm), MLP()),
        "ConvNet": (
            IdiomaticConvNet(bn=nn.BatchNorm),
            IdiomaticConvNet(bn=bnjax.linen.BatchNorm),
            ConvNet(),
        ),
    }
    tp = step_throughput(
        models,
        {"MLP": (flat, train_y), "ConvNet": (train_x, train_y)},
        steps={"MLP": args.steps, "ConvNet": args.conv_steps},
        rounds=args.rounds,
    )
    fig = None
    if not args.no_figure1:
        test = (ds.test_images.reshape(len(ds.test_images), -1), ds.test_labels)
        fig = figure1_job(
            (flat, train_y),
            test,
            steps=args.fig1_steps,
            seeds=args.seeds,
            total_steps=args.fig1_total,
            eval_every=args.eval_every,
            rounds=args.fig1_rounds,
        )
    text = render(
        tp, fig, args=args, elapsed=time.perf_counter() - t0, load=(load0, ops._loadavg())
    )
    if out_path == "-":
        print(text)
    else:
        ops.write_section(out_path, "e2e", text)
        print(f"wrote the e2e section of {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
