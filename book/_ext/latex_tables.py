"""Sphinx extension of the book: every table of the PDF as a ``longtable`` with column widths from its text.

Sphinx's LaTeX writer sets short tables with ``tabulary``, which sizes columns by their natural width.
The book's tables hold paragraphs and equations in every column (the verdict tables of the chapters),
which tabulary cannot measure ("No suitable columns!"): it then squeezes each column to a few letters.
Here each table becomes a ``longtable`` (it breaks across pages) whose columns share the line width in
proportion to the mean length of their cells' text. HTML is unaffected.
"""
from docutils import nodes


def _column_widths(table):
    rows = [row for row in table.findall(nodes.row)]
    n = max((len(row.children) for row in rows), default=0)
    lengths = [[] for _ in range(n)]
    for row in rows:
        for i, entry in enumerate(row.children):
            lengths[i].append(len(entry.astext()))
    return [max(9, round(sum(col) / len(col))) if col else 9 for col in lengths]


def _longtables(app, doctree, docname):
    if app.builder.format != "latex":
        return
    for table in doctree.findall(nodes.table):
        colspecs = list(table.findall(nodes.colspec))
        widths = _column_widths(table)
        if len(colspecs) != len(widths):
            continue
        for colspec, width in zip(colspecs, widths):
            colspec["colwidth"] = width
        table["classes"] = [c for c in table["classes"] if c != "colwidths-auto"] + ["longtable", "colwidths-given"]


def setup(app):
    app.connect("doctree-resolved", _longtables)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
