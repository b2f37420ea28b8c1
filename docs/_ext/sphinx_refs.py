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


def _linen_bases(cls: griffe.Class) -> list[griffe.Class] | None:
    """``cls`` and its bnjax base classes, most derived first, if the chain reaches
    ``nn.Module`` (a flax.linen module: a dataclass made by flax's metaclass)."""
    chain: list[griffe.Class] = []
    current: griffe.Class | None = cls
    while current is not None:
        chain.append(current)
        bases = [str(b) for b in current.bases]
        if any(b in ("nn.Module", "flax.linen.Module", "linen.Module") for b in bases):
            return chain
        parent = None
        for b in bases:
            try:
                target = current.parent[b] if current.parent is not None else None
            except Exception:  # noqa: BLE001 - an outside or unresolvable name
                target = None
            if target is not None and not target.is_alias and target.is_class:
                parent = target
                break
        current = parent
    return None


class FlaxModuleSignatures(griffe.Extension):
    """A flax.linen module's signature: its dataclass fields (flax builds ``__init__``
    from the annotated attributes of the class and its bases at run time, so a
    static reader sees none), plus flax's ``parent`` and ``name``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        def visit(obj: griffe.Object) -> None:
            for member in list(obj.members.values()):
                if member.is_alias:
                    continue
                if member.is_class:
                    self._signature(member)
                if member.is_module or member.is_class:
                    visit(member)

        visit(pkg)

    @staticmethod
    def _signature(cls: griffe.Class) -> None:
        if "__init__" in cls.members:
            return
        chain = _linen_bases(cls)
        if chain is None:
            return
        fields: dict[str, griffe.Parameter] = {}
        for klass in reversed(chain):
            for name, m in klass.members.items():
                if m.is_alias or not m.is_attribute or m.annotation is None:
                    continue
                if name.startswith("_") or "ClassVar" in str(m.annotation):
                    continue
                fields[name] = griffe.Parameter(
                    name, annotation=m.annotation, default=m.value,
                    kind=griffe.ParameterKind.positional_or_keyword,
                )
        extra = [
            griffe.Parameter(n, default="None", kind=griffe.ParameterKind.keyword_only)
            for n in ("parent", "name")
        ]
        init = griffe.Function(
            "__init__", lineno=0, endlineno=0, parent=cls,
            parameters=griffe.Parameters(
                griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
                *fields.values(), *extra,
            ),
            returns="None",
        )
        cls.set_member("__init__", init)


_RETURNS = re.compile(r"^(?P<head>[ \t]*Returns:[ \t]*\n)(?P<ind>[ \t]+)(?P<first>[^\n]*)", re.M)


class PlainReturns(griffe.Extension):
    """A Returns section is one paragraph of text in bnjax's docstrings (a tuple is
    described as a whole, ``(y, new_state)``: ...). With ``returns_named_value: false``
    griffe reads the text before the first colon of its first line as a type; a leading
    ``:`` gives it an empty type (the function's annotation is shown instead) and keeps
    the whole line as the description."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        def fix(m: re.Match) -> str:
            first = m.group("first")
            if ":" in first and not first.lstrip().startswith(":"):
                first = ": " + first
            return m.group("head") + m.group("ind") + first

        def visit(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                obj.docstring.value = _RETURNS.sub(fix, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
