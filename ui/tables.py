"""Small tables and labels as markdown (Streamlit-free, unit-tested directly).

Lighter than ``st.dataframe`` where a page shows a handful of rows: the browser redraws a markdown
table in a fraction of a data frame's time (the Explorer's tables are redrawn on every ξ move),
and the server need not import pandas and pyarrow for it (about 60 MiB kept by the app server).
"""

from __future__ import annotations

_MARKDOWN = set("\\`*_{}[]<>|$~:")


def md_text(value) -> str:
    """``value`` as literal markdown text: a class name, a label, a table cell."""
    return "".join(f"\\{c}" if c in _MARKDOWN else c for c in str(value))


def markdown_table(rows: list[dict]) -> str:
    """``rows`` (dicts with the same keys) as a markdown table, numbers right-aligned. Lighter
    than a data frame element for the browser to redraw on every ξ move."""
    columns = list(rows[0])
    numeric = [all(_is_number(r[c]) for r in rows if r[c] != "") for c in columns]
    lines = ["| " + " | ".join(md_text(c) for c in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(md_text(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
