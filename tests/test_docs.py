"""The API site as a reader sees it: build it with mkdocs, then check the rendered HTML.

Every API page (``site/api/**/index.html``) is parsed with the standard library's
``html.parser`` and checked for the rendering defects a docstring can cause:

* ``>>>`` outside a code block, or nested blockquotes (a doctest read as Markdown);
* reStructuredText left in the text: ``Example::``-style literal-block markers,
  double-backtick literals, ``:class:`` / ``:func:`` / ``:mod:`` roles;
* a Returns section split into several rows (one sentence cut across rows:
  bnjax documents a returned tuple in one paragraph, so one row per section);
* an attribute or parameter table row whose name cell is a fragment (``use_bias,``);
* a Flax module class (``bnjax.linen.*`` / ``bnjax.nnx.*`` layers) whose ``__call__``
  is not documented, or a class without its signature line.

Each check also runs on a small HTML snippet that has the defect, so a check that
cannot fail is itself a failing test. Needs the ``docs`` extra (skipped without it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_CLASSES = {
    "linen": ["BatchNorm", "BatchRenorm", "BatchNormAct", "BatchWhitening"],
    "nnx": ["BatchNorm", "BatchRenorm", "BatchNormAct", "BatchWhitening"],
}
ROLE = re.compile(r":(class|func|mod|meth|attr|data|obj):`")


class _Page(HTMLParser):
    """Collects a page's text outside code, its Returns tables, table name cells,
    heading ids and signature blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.code_depth = 0
        self.quote_depth = 0
        self.nested_quotes = 0  # a doctest read as Markdown: '>>>' becomes 3 quote levels
        self.text: list[str] = []  # text outside <pre>/<code>
        self.ids: set[str] = set()
        self.signatures: set[str] = set()  # heading ids followed by a signature block
        self.last_heading: str | None = None
        self.returns_rows: list[list[str]] = []
        self.name_cells: list[str] = []
        self._section: str | None = None
        self._await_section = False
        self._cell: list[str] | None = None
        self._cell_index = 0
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("pre", "code"):
            self.code_depth += 1
        if tag == "blockquote":
            self.quote_depth += 1
            self.nested_quotes += self.quote_depth >= 2
        if a.get("id"):
            self.ids.add(a["id"])
            if "doc-heading" in (a.get("class") or ""):
                self.last_heading = a["id"]
        cls = a.get("class") or ""
        if "doc-signature" in cls and self.last_heading:
            self.signatures.add(self.last_heading)
        if "doc-section-title" in cls:
            self._await_section = True
        if tag == "table" and self._section:
            self._table = self._section
            if self._section == "returns":
                self.returns_rows.append([])
        if tag == "tr" and "doc-section-item" in cls:
            self._row = []
            self._cell_index = 0
        if tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("pre", "code"):
            self.code_depth -= 1
        if tag == "blockquote":
            self.quote_depth -= 1
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            if self._section == "returns" and self.returns_rows:
                self.returns_rows[-1].append(" | ".join(self._row))
            elif self._section in ("attributes", "parameters") and self._row:
                self.name_cells.append(self._row[0])
            self._row = None
        if tag == "table":
            self._section = None

    def handle_data(self, data):
        if self._await_section and data.strip():
            self._section = data.strip().rstrip(":").lower()
            self._await_section = False
        if self._cell is not None:
            self._cell.append(data)
        if self.code_depth == 0:
            self.text.append(data)


def problems(html: str, page: str = "page") -> list[str]:
    """Every rendering defect of one API page (see the module docstring)."""
    p = _Page()
    p.feed(html)
    text = "".join(p.text)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if ">>>" in s:
            out.append(f"{page}: '>>>' outside a code block: {s[:80]!r}")
        if "``" in s:
            out.append(f"{page}: RST double-backtick literal in text: {s[:80]!r}")
        if ROLE.search(s):
            out.append(f"{page}: RST role in text: {s[:80]!r}")
        if re.search(r"\w::\s*$", s):
            out.append(f"{page}: RST literal-block marker '::': {s[:80]!r}")
    if p.nested_quotes:
        out.append(f"{page}: {p.nested_quotes} nested blockquotes (a doctest outside Examples:)")
    for rows in p.returns_rows:
        if len(rows) > 1:
            out.append(f"{page}: a Returns section split into {len(rows)} rows: {rows[0][:60]!r}")
        for row in rows:
            cell = row.split(" | ")[0]
            if cell.startswith(("`", ":")) or re.search(r"\b(the|is|of|and|with)\b", cell):
                out.append(f"{page}: a Returns type cell holds the description: {row[:60]!r}")
    for name in p.name_cells:
        if name.endswith(",") or not name:
            out.append(f"{page}: a table name cell is a fragment: {name!r}")
    return out, p


def module_problems(p: _Page, module: str, classes: list[str]) -> list[str]:
    out = []
    for cls in classes:
        ident = f"bnjax.{module}.{cls}"
        if ident not in p.ids:
            out.append(f"{ident} is not on its page")
            continue
        if f"{ident}.__call__" not in p.ids:
            out.append(f"{ident}.__call__ is not documented")
        if ident not in p.signatures:
            out.append(f"{ident} has no signature line")
    return out


# --------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs test needs the docs extra")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for noise in ("WARNING", "Formatting signatures requires", "end of life", "not included in"):
        assert noise not in log, f"the build printed {noise!r}:\n{log[-2000:]}"
    return out


def test_api_pages_render_cleanly(site):
    pages = sorted((site / "api").rglob("index.html"))
    assert len(pages) >= 20
    found = []
    for page in pages:
        found += problems(page.read_text(), str(page.relative_to(site)))[0]
    assert not found, "\n".join(found[:40]) + f"\n({len(found)} in all)"


@pytest.mark.parametrize("module", list(MODULE_CLASSES))
def test_module_classes_show_call_and_signature(site, module):
    _, p = problems((site / "api" / module / "index.html").read_text())
    assert not module_problems(p, module, MODULE_CLASSES[module])


def test_results_pages_embed_their_plot(site):
    pages = sorted(site.rglob("results/index.html")) + [site / "lr_tolerance/diagnosis/index.html"]
    assert len(pages) >= 7
    for page in pages:
        html = page.read_text()
        assert re.search(r'<img [^>]*src="[^"]+\.png"', html), f"{page} shows no plot"


# --------------------------------------------------------------------------- the checks can fail

BROKEN = {
    "doctest": "<p>&gt;&gt;&gt; x = 1</p>",
    "quotes": "<blockquote><blockquote><p>x = 1</p></blockquote></blockquote>",
    "backticks": "<p>use ``x`` here</p>",
    "role": "<p>see :class:`Foo`</p>",
    "literal": "<p>Example::</p>",
    "returns": (
        '<p><span class="doc-section-title">Returns:</span></p><table><tbody>'
        '<tr class="doc-section-item"><td>Array</td><td>(y, s): y has</td></tr>'
        '<tr class="doc-section-item"><td>Stats</td><td>the shape.</td></tr></tbody></table>'
    ),
    "returns_type": (
        '<p><span class="doc-section-title">Returns:</span></p><table><tbody>'
        '<tr class="doc-section-item"><td>`(y, new_state)`</td><td>y has the shape.</td></tr>'
        "</tbody></table>"
    ),
    "name": (
        '<p><span class="doc-section-title">Attributes:</span></p><table><tbody>'
        '<tr class="doc-section-item"><td>use_bias,</td><td>use_scale</td></tr></tbody></table>'
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_check_catches_its_defect(kind):
    found, _ = problems(BROKEN[kind])
    assert found, kind
    clean = "<pre><code>&gt;&gt;&gt; x = 1  ``x`` :class:`F` a::</code></pre>"
    assert not problems(clean)[0]


def test_module_check_catches_a_missing_call():
    html = '<h2 id="bnjax.linen.BatchNorm" class="doc doc-heading">BatchNorm</h2>'
    _, p = problems(html)
    assert module_problems(p, "linen", ["BatchNorm"]) == [
        "bnjax.linen.BatchNorm.__call__ is not documented",
        "bnjax.linen.BatchNorm has no signature line",
    ]
