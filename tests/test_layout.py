"""The house rules of bnjax's layout, checked on the source with ``ast``.

* The library (everything under ``bnjax/`` but ``bnjax/experiments/``) never
  imports the lab (``bnjax.experiments``).
* The lab uses only public names of the library: no private module, no
  ``_name`` imported or reached through a module alias.
* Every library module imports only modules that stand *below* it in the data
  path (``ORDER``: the order of the README's architecture table), lazily
  inside a function too; so there is no cycle and no arrow running back up.
* No private reach-ins between library modules (``other._name``): shared
  internals live in private modules (``bnjax/_*.py``) under public names.
* ``import bnjax`` loads no lab module (checked in a fresh interpreter).
* The README's architecture table names every module that exists (its path in backticks).

Each checker is also run on a small synthetic package that breaks its rule, so
a checker that cannot fail is itself a failing test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnjax"
LAB = "bnjax.experiments"

# The library's data path, bottom up: a module may import only from earlier rows
# (modules of one row do not import each other). The README's architecture table
# lists the same order.
ORDER: list[tuple[str, ...]] = [
    ("bnjax._sharding",),
    ("bnjax._numerics",),
    ("bnjax._checks", "bnjax.activations"),
    ("bnjax.stats",),
    ("bnjax.population",),
    ("bnjax._config",),
    ("bnjax._kernel",),
    ("bnjax.functional",),
    ("bnjax.whitening",),
    ("bnjax._module_common",),
    ("bnjax.linen", "bnjax.nnx"),
    ("bnjax.folding", "bnjax._capture", "bnjax.compat"),
    ("bnjax.recalibration", "bnjax.diagnostics", "bnjax.interop", "bnjax.adapt"),
    ("bnjax",),
    ("bnjax.training._rng",),
    ("bnjax.training.state",),
    ("bnjax.training.data_order",),
    ("bnjax.training.steps", "bnjax.training.checkpoint", "bnjax.training.distributed"),
    ("bnjax.training.loops", "bnjax.training.fit", "bnjax.training.parallel"),
    ("bnjax.training",),
]


# --------------------------------------------------------------------------- the checker


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def is_lab(name: str) -> bool:
    return name == LAB or name.startswith(LAB + ".")


def is_private(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def imports(path: Path, name: str, known: set[str]):
    """``(imported module, imported name or None, line)`` for every import of a bnjax
    module in the file (lazy ones inside functions included), relative imports resolved;
    and the attribute reach-ins ``(module, attribute, line)`` through module aliases."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges, aliases, reach = [], {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "bnjax":
                    edges.append((a.name, None, node.lineno))
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "bnjax"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] != "bnjax":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # `from bnjax import functional as F`: a module
                    edges.append((sub, None, node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    edges.append((base, a.name, node.lineno))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            reach.append((aliases[node.value.id], node.attr, node.lineno))
    return edges, reach


def violations(root: Path, order: list[tuple[str, ...]]) -> list[str]:
    """Every breach of the house rules in the package at ``root``."""
    found = modules(root)
    known = set(found)
    rank = {m: i for i, row in enumerate(order) for m in row}
    out = []
    for name, path in found.items():
        lab = is_lab(name)
        if not lab and name not in rank:
            out.append(f"{name}: not placed in the documented order (ORDER)")
        edges, reach = imports(path, name, known)
        for target, item, line in edges:
            where = f"{path.relative_to(root.parent)}:{line}"
            if target == name or target not in known:
                continue
            if lab:
                if not is_lab(target) and (is_private(target) or (item or "").startswith("_")):
                    out.append(f"{where}: the lab imports a private name {target}.{item or ''}")
                continue
            if is_lab(target):
                out.append(f"{where}: library module {name} imports the lab ({target})")
            elif target in rank and name in rank and rank[target] >= rank[name]:
                out.append(f"{where}: {name} imports {target}, which stands above it")
            if item is not None and item.startswith("_"):
                out.append(f"{where}: {name} imports the private {target}.{item}")
        for target, attr, line in reach:
            if target != name and (lab and not is_lab(target) or not lab):
                out.append(
                    f"{path.relative_to(root.parent)}:{line}: {name} reaches into "
                    f"{target}.{attr}"
                )
    return out


# --------------------------------------------------------------------------- the rules


def test_the_library_keeps_the_house_rules():
    assert violations(PACKAGE, ORDER) == []


def test_import_bnjax_loads_no_lab_module():
    code = "import sys, bnjax; print([m for m in sys.modules if m.startswith('bnjax.')])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert loaded, "import bnjax loaded no submodule at all: the check would be vacuous"
    assert [m for m in loaded if is_lab(m)] == []


def test_readme_architecture_table_names_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Architecture") :]
    table = table[: table.index("\n## ", 1)] if "\n## " in table[1:] else table
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in table
    ]
    assert missing == []


# --------------------------------------------------------------------------- the checker can fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, src in files.items():
        p = tmp_path / "bnjax" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    return tmp_path / "bnjax"


_CLEAN = {
    "__init__.py": "from bnjax import low, high\n",
    "_private.py": "def helper():\n    return 1\n",
    "low.py": "from bnjax._private import helper\n",
    "high.py": "from bnjax import low\n",
    "experiments/__init__.py": "",
    "experiments/run.py": "import bnjax\nfrom bnjax import high\n",
}
_ORDER = [("bnjax._private",), ("bnjax.low",), ("bnjax.high",), ("bnjax",)]


@pytest.mark.parametrize(
    "rel, src, expected",
    [
        ("low.py", "def f():\n    from bnjax.experiments import run\n", "imports the lab"),
        ("low.py", "from bnjax import high\n", "stands above it"),
        ("experiments/run.py", "from bnjax._private import helper\n", "private name"),
        ("experiments/run.py", "from bnjax.low import _secret\n", "private name"),
        ("experiments/run.py", "from bnjax import low\nlow._secret()\n", "reaches into"),
        ("high.py", "from bnjax import low\nlow._secret()\n", "reaches into"),
        ("high.py", "from bnjax.low import _secret\n", "imports the private"),
        ("extra.py", "", "not placed in the documented order"),
    ],
)
def test_the_checker_catches_each_breach(tmp_path, rel, src, expected):
    root = _package(tmp_path, _CLEAN)
    assert violations(root, _ORDER) == []
    (root / rel).write_text(src)
    found = violations(root, _ORDER)
    assert any(expected in v for v in found), found


def test_all_lists_exactly_the_public_definitions():
    """Each public library module's ``__all__`` names only what exists, and every public
    function or class it defines (``def`` / ``class`` at top level) is in it."""
    import importlib

    bad = {}
    for name, path in modules(PACKAGE).items():
        if is_lab(name) or is_private(name) or name == "bnjax":
            continue
        mod = importlib.import_module(name)
        exported = set(getattr(mod, "__all__", ()))
        tree = ast.parse(path.read_text())
        defined = {
            n.name
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
        }
        problems = sorted(defined - exported) + [f"{n}?" for n in exported if not hasattr(mod, n)]
        if problems:
            bad[name] = problems
    assert bad == {}
