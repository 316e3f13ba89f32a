"""``python manage.py analyze_responses FILE.csv`` — statistics of a re-identification study.

Reads the raters' answers (columns ``rater_id, rater_group, subject_id,
condition, correct, n_choices`` and optionally ``response_time_ms``,
``confidence``; see :mod:`pipeline.stats`) and writes the analysis:

* ``--format json`` (default): the dict of :func:`pipeline.stats.analyze`;
* ``--format csv``: a tidy long table, one figure per line, with columns
  ``section, group, condition, term, statistic, value`` (empty cells where a
  level does not apply, empty value for "not available");
* ``--format html``: a self-contained report page (inline CSS, no scripts, no
  external resources).

Output goes to stdout unless ``--output PATH``. Any problem with the input
ends the command with a one-line ``CommandError`` (rows are named by line
number; identifiers are never echoed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.html import escape

from pipeline.stats import ALL_GROUPS, ResponsesError, analyze, format_p, read_responses_csv
from surveys.csvsafe import write_csv

FORMATS = ("json", "csv", "html")
CSV_COLUMNS = ("section", "group", "condition", "term", "statistic", "value")


class Command(BaseCommand):
    help = ("Analyse a blinded re-identification study (accuracy vs chance, McNemar, between-group "
            "tests, mixed-effects logistic model, Fleiss' kappa) from a responses CSV.")
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="responses CSV (UTF-8, header row)")
        parser.add_argument("--format", choices=FORMATS, default="json",
                            help="json (default), csv (long table) or html (report page)")
        parser.add_argument("--output", type=Path, default=None,
                            help="write here instead of stdout")
        parser.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                            help="the two conditions compared by McNemar (default: control "
                                 "deidentified)")
        parser.add_argument("--reference-group", default=None,
                            help="reference group of the mixed model (default: first by name)")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            rows = read_responses_csv(opts["file"])
            result = analyze(rows, paired_conditions=tuple(opts["pair"]) if opts["pair"] else None,
                             reference_group=opts["reference_group"])
        except ResponsesError as exc:
            raise CommandError(" ".join(str(exc).split())) from None
        fmt = opts["format"]
        if fmt == "json":
            text = json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        elif fmt == "csv":
            text = to_csv(result)
        else:
            text = to_html(result)
        if opts["output"] is None:
            self.stdout.write(text, ending="")
            return
        try:
            opts["output"].write_text(text, encoding="utf-8")
        except OSError as exc:
            reason = exc.strerror or "I/O error"
            raise CommandError(f"cannot write the output file ({reason})") from None
        self.stdout.write(f"{fmt} analysis of {result['meta']['n_responses']} responses written "
                          f"to {opts['output']}")


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


def flatten(result: dict[str, Any]) -> list[dict[str, str]]:
    """Rows ``{section, group, condition, term, statistic, value}`` of an analysis dict."""
    out: list[dict[str, str]] = []

    def add(section: str, statistic: str, value: Any, group: str = "", condition: str = "",
            term: str = "") -> None:
        out.append({"section": section, "group": group, "condition": condition, "term": term,
                    "statistic": statistic, "value": _cell(value)})

    for group, cells in result["groups"].items():
        for condition, cell in cells.items():
            for stat, value in cell.items():
                add("accuracy", stat, value, group, condition)
    pair = result["meta"]["paired_conditions"]
    pair_label = f"{pair[0]} vs {pair[1]}" if pair else ""
    for group, cell in result["mcnemar"].items():
        for stat, value in cell.items():
            add("mcnemar", stat, value, group, pair_label)
    for condition, cell in result["between_groups"].items():
        for stat, value in cell.items():
            add("between_groups", stat, value, condition=condition)
    model = result["mixed_model"]
    if model is not None:
        for key, value in model.items():
            if key == "terms":
                for term, figures in value.items():
                    for stat, v in figures.items():
                        add("mixed_model", stat, v, term=term)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    add("mixed_model", f"{key}.{sub}", v)
            elif key == "fallbacks":
                for fb in value:
                    add("mixed_model", "fallback", f"{fb['formula']}: {fb['error']}")
            else:
                add("mixed_model", key, value)
    for condition, kappa in result["fleiss_kappa"].items():
        add("fleiss_kappa", "kappa", kappa, condition=condition)
        for stat, value in result["fleiss_kappa_detail"][condition].items():
            add("fleiss_kappa", stat, value, condition=condition)
    for section in ("response_time_ms", "confidence"):
        if result[section] is None:
            continue
        for group, cells in result[section].items():
            for condition, cell in cells.items():
                for stat, value in cell.items():
                    add(section, stat, value, group, condition)
    for key, value in result["meta"].items():
        if isinstance(value, dict):
            for sub, v in value.items():
                add("meta", key, v, group=sub)
        else:
            add("meta", key, value)
    return out


def to_csv(result: dict[str, Any]) -> str:
    """The long CSV table of :func:`flatten`.

    Header ``section,group,condition,term,statistic,value``; floats at full
    precision (``repr``), empty value for "not available". Text a spreadsheet would run
    as a formula (a group named ``=HYPERLINK(…)``) is written with a leading ``'``
    (:func:`surveys.csvsafe.safe_cell`).
    """
    return write_csv(flatten(result), CSV_COLUMNS)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "; ".join(_cell(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:70rem;
color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
p.note,li{color:#555;font-size:.9rem}
"""


def to_html(result: dict[str, Any]) -> str:
    """A self-contained HTML report page (inline CSS; no scripts or external resources)."""
    meta = result["meta"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Re-identification study: analysis</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Blinded re-identification study: analysis</h1>",
        f"<p>{meta['n_responses']} responses from {meta['n_raters']} raters on "
        f"{meta['n_subjects']} subjects; conditions: {escape(', '.join(meta['conditions']))}; "
        f"candidates per trial (k): {escape(', '.join(map(str, meta['n_choices'])))}.</p>",
    ]
    parts += _notes(meta["notes"])

    parts.append("<h2>Accuracy by group and condition</h2>")
    rows = []
    for group, cells in result["groups"].items():
        for condition, c in cells.items():
            rows.append([_label(group), condition, c["n_raters"], c["n"], c["n_correct"],
                         _pct(c["accuracy"]), _ci(c["ci_low"], c["ci_high"]), _pct(c["chance"]),
                         _p(c["chance_p"])])
    parts.append(_table(["Group", "Condition", "Raters", "n", "Correct", "Accuracy",
                         "Wilson 95 % CI", "Chance", "p (> chance, exact, one-sided)"], rows))

    pair = meta["paired_conditions"]
    parts.append("<h2>Paired comparison (exact McNemar)</h2>")
    if pair:
        parts.append(f"<p class=\"note\">Pairs = the same rater and subject in both "
                     f"{escape(pair[0])} and {escape(pair[1])}; b = correct in "
                     f"{escape(pair[0])} only, c = correct in {escape(pair[1])} only.</p>")
    parts.append(_table(["Group", "Pairs", "b", "c", "p (two-sided)", "Note"],
                        [[_label(g), m["n_pairs"], m["b"], m["c"], _p(m["p_value"]),
                          m["note"] or ""] for g, m in result["mcnemar"].items()]))

    parts.append("<h2>Between groups</h2>")
    parts.append(_table(["Condition", "Groups", "Test", "Statistic", "p (two-sided)", "Note"],
                        [[c, ", ".join(b["groups"]), b["test"] or "—", _num(b["statistic"]),
                          _p(b["p_value"]), b["note"] or ""]
                         for c, b in result["between_groups"].items()]))

    parts.append("<h2>Mixed-effects logistic model</h2>")
    model = result["mixed_model"]
    if model is None:
        parts.append("<p>Not fitted.</p>")
    else:
        parts.append(f"<p><code>{escape(model.get('formula') or '')}</code></p>")
        parts.append(f"<p class=\"note\">{escape(model['method'])}</p>")
        if "error" in model:
            parts.append(f"<p><strong>Not fitted:</strong> {escape(model['error'])}</p>")
        else:
            ref = model["reference"]
            parts.append(f"<p class=\"note\">Log-odds scale; reference condition "
                         f"{escape(ref['condition'])}, reference group {escape(ref['group'])}; "
                         f"{escape(model['coding'])}.</p>")
            parts.append(_table(["Term", "Estimate", "SD", "95 % interval",
                                 "p (Wald, two-sided)"],
                                [[t, _num(v["estimate"]), _num(v["sd"]),
                                  _ci(v["ci_low"], v["ci_high"], pct=False), _p(v["p_value"])]
                                 for t, v in model["terms"].items()]))
            parts.append(_table(["Random intercept", "SD (log-odds)"],
                                [[k, _num(v)] for k, v in model["random_effects_sd"].items()]))
            parts += _notes(model.get("warnings", []))
        parts += _notes([f"abandoned {f['formula']}: {f['error']}" for f in model["fallbacks"]])

    parts.append("<h2>Inter-rater agreement (Fleiss' kappa, correct / incorrect)</h2>")
    parts.append(_table(["Condition", "Kappa", "Subjects", "Raters per subject"],
                        [[c, _num(k), result["fleiss_kappa_detail"][c]["n_items"],
                          _range(result["fleiss_kappa_detail"][c])]
                         for c, k in result["fleiss_kappa"].items()]))

    for key, title in (("response_time_ms", "Response time (ms)"),
                       ("confidence", "Confidence (1–5)")):
        if result[key] is None:
            continue
        parts.append(f"<h2>{escape(title)}</h2>")
        parts.append(_table(["Group", "Condition", "n", "Median", "IQR (Q1–Q3)", "Mean"],
                            [[_label(g), c, s["n"], _num(s["median"]),
                              _ci(s["q1"], s["q3"], pct=False), _num(s["mean"])]
                             for g, cells in result[key].items() for c, s in cells.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) or (
                isinstance(value, str) and re.match(r"-?\d", value) is not None)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _notes(notes: list[str]) -> list[str]:
    if not notes:
        return []
    return ["<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"]


def _label(group: str) -> str:
    return "All groups" if group == ALL_GROUPS else group


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"


def _p(value: float | None) -> str:
    return format_p(value)


def _ci(low: float | None, high: float | None, pct: bool = True) -> str:
    if low is None or high is None:
        return "—"
    return f"{_pct(low)} – {_pct(high)}" if pct else f"{_num(low)} – {_num(high)}"


def _range(detail: dict[str, Any]) -> str:
    lo, hi = detail["ratings_per_item_min"], detail["ratings_per_item_max"]
    if lo is None:
        return "—"
    return str(lo) if lo == hi else f"{lo}–{hi}"

