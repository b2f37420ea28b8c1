"""Several processes, one program: JAX's multi-controller runtime (`jax.distributed`).

On several hosts (or several processes on one host) every process runs the same
program on its local devices, and :func:`jax.devices` lists the devices of all
of them. This module is the small layer bnjax puts around that runtime:

* :func:`initialize`: `jax.distributed.initialize` with the coordinator
  address, process count and process id taken from the arguments, else from
  the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`), else (`auto=True`) from JAX's cluster auto-detection
  (SLURM, Open MPI, Kubernetes, Cloud TPU); CPU collectives through gloo, so
  it runs on CPU clusters and in CI; bounded start-up and failure detection
  (`initialization_timeout`, `heartbeat_timeout`).
* :func:`is_main_process` / :func:`main_print`: logging, progress bars and
  output files come from process 0 only.
* :func:`process_rows`: the rows of a global batch that this process feeds.
* :func:`launch_local`: starts `N` processes of a command on this machine
  (free port on 127.0.0.1, the environment above set), and ends them all with
  a clear error as soon as one fails: a watchdog for tests and for trying
  multi-process runs on one machine.

Failure behaviour (measured with jax 0.10.2): a process that never arrives
makes the others abort after `initialization_timeout` seconds
(`DEADLINE_EXCEEDED ... RegisterTask`); a process that dies later stops
sending heartbeats and the others abort within about `heartbeat_timeout`
seconds ("The following tasks are unhealthy (stopped sending heartbeats)").
These aborts come from JAX's runtime (a fatal error, not a Python exception);
:func:`launch_local` reports them as :class:`ProcessGroupError`.

Start-up under load: XLA's gloo CPU collectives create the communicator of a
device group at the first collective over it and give the processes a fixed
30 s (not configurable in jax 0.10) to meet there; a process that arrives later
fails with `Gloo context initialization failed: DEADLINE_EXCEEDED:
GetKeyValue() timed out with key: cpu:gloo/...`. On a loaded machine the
processes can reach their first training step more than 30 s apart (one
compiles slower). :func:`initialize` therefore opens the communicator of all
devices at once, with the processes lined up by a coordination-service barrier
(`initialization_timeout`); later collectives over the same devices reuse it
and wait for a slow process without that limit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import jax

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "LaunchResult",
    "ProcessGroupError",
    "initialize",
    "is_main_process",
    "main_print",
    "process_rows",
    "free_port",
    "launch_local",
]

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    cpu_collectives: str = "gloo",
    warm_up: bool = True,
    verbose: bool = True,
) -> bool:
    """Joins the multi-process runtime if this is a multi-process run; returns whether it is.

    Each setting is taken from the argument, else from the environment
    (:data:`ENV_COORDINATOR`, :data:`ENV_NUM_PROCESSES`, :data:`ENV_PROCESS_ID`;
    JAX itself reads `JAX_COORDINATOR_ADDRESS`). With none of them set and
    `auto=False` this is a single-process run: nothing is done and `False`
    is returned, so programs can call it unconditionally. `auto=True` with
    settings missing lets `jax.distributed.initialize` detect them from the
    cluster environment (SLURM's `srun`, Open MPI's `mpirun`, Kubernetes,
    Cloud TPU). `num_processes=1` is a single-process run too.

    Must run before anything touches a JAX device (the backends are created
    with the distributed client); `jax.distributed.is_initialized()` already
    true is accepted (returns `True`).

    Args:
      coordinator_address: `host:port` of process 0, reachable by every process.
      num_processes: the number of processes.
      process_id: this process, `0 <= process_id < num_processes`.
      auto: fall back to JAX's cluster auto-detection for missing settings.
      initialization_timeout: seconds to wait for all processes to join (a
        process that never arrives ends the others after this long).
      heartbeat_timeout: seconds without a heartbeat after which a process is
        declared dead and the others end.
      cpu_collectives: the CPU collectives implementation
        (`jax_cpu_collectives_implementation`: `"gloo"` or `"mpi"`).
      warm_up: with gloo on CPU, open the all-device communicator now, every
        process at a barrier (see the module docstring): a loaded machine then
        cannot fail the first training step on gloo's fixed 30 s rendezvous.
      verbose: print one line to stderr before and after joining.

    Raises:
      ValueError: only some of the settings are given (and not `auto`), a
        setting is malformed, or `process_id` is out of range.
    """
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    n = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": address, "num_processes": n, "process_id": pid}
    if n == 1 or (not auto and all(v is None for v in given.values())):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing and not auto:
        raise ValueError(
            f"multi-process run: {missing} not given (arguments or ${ENV_COORDINATOR}, "
            f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); got {given}. Pass all three, or "
            "auto=True (--distributed=auto) to let JAX detect them from the cluster"
        )
    if n is not None and n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"process_id must be in [0, num_processes={n}), got {pid}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if verbose:
        print(
            f"bnjax: process {pid if pid is not None else '?'} of {n or '?'} joining the "
            f"coordinator at {address or '(auto-detected)'} (waiting up to "
            f"{initialization_timeout} s for every process)",
            file=sys.stderr,
            flush=True,
        )
    jax.distributed.initialize(
        address,
        n,
        pid,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    if warm_up and cpu_collectives == "gloo" and jax.default_backend() == "cpu":
        _warm_up_collectives(initialization_timeout)
    if verbose:
        print(
            f"bnjax: process {jax.process_index()} of {jax.process_count()} joined: "
            f"{jax.local_device_count()} local of {jax.device_count()} devices",
            file=sys.stderr,
            flush=True,
        )
    return True


def _warm_up_collectives(timeout_s: int) -> None:
    """Runs one all-device sum with every process lined up first (see the module docstring).

    Compiled first, then a coordination-service barrier (`timeout_s`, the
    start-up timeout: a process that never arrives fails here, as at joining),
    then run: the processes reach gloo's rendezvous within milliseconds.
    """
    import numpy as np
    from jax._src import distributed as _jd
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("all",))
    ones = np.ones((jax.local_device_count(),), np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), ones)
    total = jax.jit(jax.numpy.sum, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    _jd.global_state.client.wait_at_barrier("bnjax_gloo_warm_up", timeout_s * 1000)
    got = float(total(x).addressable_data(0))
    if got != jax.device_count():  # pragma: no cover - a broken runtime
        raise RuntimeError(f"all-device warm-up sum gave {got}, expected {jax.device_count()}")


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that logs and writes files."""
    return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
    """`print` in process 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def process_rows(
    sharding: jax.sharding.Sharding, global_shape: Sequence[int], axis: int = 0
) -> slice:
    """The rows (along `axis`) of a global array of `global_shape` that this process holds.

    With a batch sharding such as `NamedSharding(mesh, P("data"))` every
    process feeds a contiguous block of the global batch; this is that block,
    as `jax.make_array_from_process_local_data(sharding, local, global_shape)`
    expects it. On one process: all rows.

    Raises:
      ValueError: this process's rows are not one contiguous block (a mesh
        whose devices interleave the processes along the batch axis).
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows: set[int] = set()
    for idx in index_map.values():
        r = idx[axis] if idx else slice(None)
        start, stop, _ = r.indices(global_shape[axis])
        rows.update(range(start, stop))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds rows {sorted(rows)} of a global batch of "
            f"{global_shape[axis]}: not one contiguous block; build the mesh with the devices "
            "in process order (jax.make_mesh does)"
        )
    return slice(lo, hi)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a local coordinator)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessGroupError(RuntimeError):
    """A process of a :func:`launch_local` group failed or the group ran out of time."""


@dataclasses.dataclass
class LaunchResult:
    """What :func:`launch_local` returns: per process, exit code and captured output."""

    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]
    seconds: float


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    env: Mapping[str, str] | None = None,
    per_process_env: Sequence[Mapping[str, str]] | None = None,
    timeout: float = 600.0,
    grace: float = 5.0,
    only: Sequence[int] | None = None,
    port: int | None = None,
    cwd: str | None = None,
) -> LaunchResult:
    """Runs `argv` as `num_processes` processes of one multi-process job on this machine.

    Each process gets `JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (read by :func:`initialize`)
    on top of `env` (default: this process's environment) and its entry of
    `per_process_env`. Output is captured (to temporary files, so a chatty
    process never blocks on a full pipe).

    Watchdog: when a process exits with a non-zero status, the others get
    `grace` seconds to end by themselves (JAX's runtime ends them when it
    notices) and are then killed; past `timeout` seconds all are killed. In
    both cases :class:`ProcessGroupError` names the process, its status and the
    tail of its error output.

    Args:
      argv: the command, e.g. `[sys.executable, "-m", "bnjax.experiments.data_parallel", ...]`.
      num_processes: `N`.
      only: start only these process ids (the others "never arrive"; for tests).
      port: the coordinator port (default: a free one).
    """
    import tempfile

    port = port or free_port()
    base = dict(os.environ if env is None else env)
    base[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    ids = list(range(num_processes)) if only is None else list(only)
    t0 = time.monotonic()
    procs, files = {}, {}
    try:
        for i in ids:
            e = dict(base, **(per_process_env[i] if per_process_env else {}))
            e[ENV_PROCESS_ID] = str(i)
            out = tempfile.TemporaryFile("w+")
            err = tempfile.TemporaryFile("w+")
            files[i] = (out, err)
            procs[i] = subprocess.Popen(
                list(argv), env=e, stdout=out, stderr=err, cwd=cwd, start_new_session=True
            )
        failure = _watch(procs, t0, num_processes, timeout=timeout, grace=grace)
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs.values():
            p.wait()
        seconds = time.monotonic() - t0
        texts = {}
        for i, (out, err) in files.items():
            out.seek(0)
            err.seek(0)
            texts[i] = (out.read(), err.read())
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for out, err in files.values():
            out.close()
            err.close()
    result = LaunchResult(
        returncodes=[procs[i].returncode for i in ids],
        stdout=[texts[i][0] for i in ids],
        stderr=[texts[i][1] for i in ids],
        seconds=seconds,
    )
    if failure is None and any(result.returncodes):
        failure = f"process exit statuses {result.returncodes}"
    if failure is not None:
        tails = "\n".join(
            f"--- process {i} (status {procs[i].returncode}), last lines of stderr:\n"
            + "\n".join(_interesting(texts[i][1])[-8:])
            for i in ids
        )
        err = ProcessGroupError(f"{failure} after {seconds:.1f} s; stopped the others.\n{tails}")
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _watch(procs: dict, t0: float, num_processes: int, *, timeout: float, grace: float):
    """Polls the processes until all exit, one fails (then `grace` s more for the
    others to report) or `timeout` passes; the failure's description, or None."""
    failed_at: float | None = None
    failure: str | None = None
    while True:
        codes = {i: p.poll() for i, p in procs.items()}
        now = time.monotonic() - t0
        bad = [i for i, c in codes.items() if c not in (None, 0)]
        if bad and failed_at is None:
            failed_at = now
            i = bad[0]
            failure = f"process {i} of {num_processes} exited with status {codes[i]}"
        if all(c is not None for c in codes.values()):
            return failure
        if failed_at is not None and now - failed_at > grace:
            return failure
        if now > timeout:
            return failure or f"the {len(procs)} processes did not finish within {timeout} s"
        time.sleep(0.1)


def _interesting(stderr: str) -> list[str]:
    """stderr lines without JAX's native stack-trace frames and info/warning log lines."""
    keep = []
    for line in stderr.splitlines():
        s = line.strip()
        if not s or s.startswith("@ ") or line[:1] in ("I", "W") and line[1:5].isdigit():
            continue
        keep.append(line)
    return keep
