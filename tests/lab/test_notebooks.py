"""Executes the notebooks end to end (short settings) in a fresh kernel of this interpreter.

``BNJAX_NOTEBOOK_QUICK=1`` selects the notebooks' short settings and
``BNJAX_NOTEBOOK_OUT`` a temporary output folder, so nothing is written into the
repository. The kernel is the ``python3`` kernel spec; ``jupyter_client`` runs a
spec whose command is ``python`` with the current interpreter (``sys.executable``),
and ipykernel ships such a default spec, so in a fresh virtual environment the
notebooks run with the environment's own Python and packages.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
TORCHVISION_SHIM = """import torch
_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""


def _pin_python3_kernel(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the kernel spec ``python3`` start this interpreter, whatever else is installed.

    In a fresh virtual environment ipykernel's own ``python3`` spec (command
    ``python``, which jupyter_client replaces by ``sys.executable``) already
    does; a user- or system-wide ``python3`` spec with an absolute path could
    shadow it, so the tests put one first on ``JUPYTER_PATH``.
    """
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv(
        "JUPYTER_PATH", os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")])
    )


def test_default_python3_kernel_resolves_to_this_interpreter():
    """Without the pin, ``python3`` (as jupyter_client resolves it) is this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    exe = KernelSpecManager().get_kernel_spec("python3").argv[0]
    if exe in {
        "python",
        f"python{sys.version_info[0]}",
        f"python{sys.version_info[0]}.{sys.version_info[1]}",
    }:
        exe = sys.executable  # jupyter_client's substitution when it launches the kernel
    if Path(exe).absolute() != Path(sys.executable).absolute():
        pytest.skip(
            f"a python3 kernel spec for {exe} shadows this venv's (the tests pin their own)"
        )


def _data_available() -> bool:
    try:
        from bnjax.experiments.data import load_dataset

        load_dataset("mnist")
    except Exception:
        return False
    return True


@pytest.mark.parametrize(
    ("name", "figures"),
    [
        ("quickstart.ipynb", 2),
        ("figure1.ipynb", 2),
        ("whitening.ipynb", 2),
        ("small_batch.ipynb", 2),
        ("porting.ipynb", 2),
        ("shift.ipynb", 2),
    ],
)
def test_notebook_runs(name, figures, tmp_path, monkeypatch):
    path = NOTEBOOKS / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    if not _data_available():
        pytest.skip("MNIST not found: set BNJAX_DATA_DIR to a folder holding mnist/")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} is stored with outputs; clear them before committing"
    )
    if name == "porting.ipynb":
        pytest.importorskip("torch", reason="porting.ipynb needs the torch extra")
        # torchvision's CPU-torch import shim (tests only; see tests/test_torch.py)
        nb.cells.insert(0, nbformat.v4.new_code_cell(TORCHVISION_SHIM))
    out = tmp_path / "out"
    _pin_python3_kernel(tmp_path / "jupyter", monkeypatch)
    monkeypatch.setenv("BNJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("BNJAX_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= figures, f"{name} showed {len(images)} figures, expected {figures}"
    assert any(out.iterdir()), f"{name} wrote nothing to BNJAX_NOTEBOOK_OUT"
    assert not list(tmp_path.glob("runs")), "notebook wrote into its working directory"
    print(f"{name}: {seconds:.1f} s")
