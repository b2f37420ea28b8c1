"""Griffe extension: Sphinx roles in bnjax's docstrings become mkdocs cross-references.

The docstrings use ``:func:`name```, ``:class:`name```, ``:mod:`name``` (and
``:meth:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``). A name inside
``bnjax`` (absolute, or relative to the documented object's module or class)
becomes an autorefs link ``[`name`][bnjax.full.path]``; a ``bnjax.`` name or
an undotted name that resolves to nothing stays a link to itself, which
autorefs reports, so a broken reference fails ``mkdocs build --strict``.
Dotted names outside ``bnjax`` (``jax.jit``, ``flax.linen.BatchNorm``) and
private objects become inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([\w.]+)(\(\))?`")


def _resolve(pkg: griffe.Module, scope: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` seen from ``scope`` (None: not an object of ``pkg``)."""
    candidates = [name] if name.startswith(pkg.name + ".") or name == pkg.name else []
    obj: griffe.Object | None = scope
    while obj is not None:
        candidates.append(f"{obj.path}.{name}")
        obj = obj.parent
    candidates.append(f"{pkg.name}.{name}")
    for path in candidates:
        try:
            target = pkg[path[len(pkg.name) + 1 :]] if path != pkg.name else pkg
            if any(part.startswith("_") and not part.startswith("__") for part in path.split(".")):
                return ""  # private objects are not documented: inline code
            if target.is_alias:
                if not target.target_path.startswith(pkg.name + "."):
                    return None  # an imported outside name (jax, flax)
                return target.final_target.path
            return target.path
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return None


class SphinxRefs(griffe.Extension):
    """Rewrites the roles of every docstring once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        def visit(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                scope = obj if obj.is_module or obj.is_class else obj.parent or obj

                def link(m: re.Match) -> str:
                    tilde, name, call = m.group(1), m.group(2), m.group(3) or ""
                    shown = (name.rsplit(".", 1)[-1] if tilde else name) + call
                    path = _resolve(pkg, scope, name)
                    if path is None and ("." not in name or name.startswith(pkg.name + ".")):
                        path = name  # looks like ours but is not: autorefs reports it
                    return f"[`{shown}`][{path}]" if path else f"`{shown}`"

                obj.docstring.value = ROLE.sub(link, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
