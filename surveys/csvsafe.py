"""CSV cells a spreadsheet will not run as a formula (CSV / formula injection).

Excel, LibreOffice and Google Sheets evaluate a cell that starts with ``=``, ``+``,
``-``, ``@`` (and, in some versions, a tab or carriage return) as a formula — a group
named ``=HYPERLINK("http://…","x")`` would become a live link. :func:`safe_cell` prefixes
such text with an apostrophe (OWASP's recommendation; spreadsheets show the text as
typed). Numbers are left alone, including negative ones and text that parses as a
number (``-0.53``), so analysis tools read them unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["safe_cell", "write_csv"]

_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def safe_cell(value: Any) -> Any:
    """``value`` unchanged unless it is text a spreadsheet would evaluate: then ``'`` + text."""
    if isinstance(value, str) and value.startswith(_TRIGGERS) and not _is_number(value):
        return "'" + value
    return value


def write_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text (``\\n`` line ends, header first) with every cell passed through
    :func:`safe_cell`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n",
                       extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: safe_cell(v) for k, v in row.items()})
    return buf.getvalue()
