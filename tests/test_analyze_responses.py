"""Tests of ``manage.py analyze_responses`` (json / csv / html output, bad input)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipeline.stats import analyze, read_responses_csv

ROOT = Path(__file__).resolve().parent.parent
SMALL_CSV = Path(__file__).parent / "data" / "responses_small.csv"
SECRET = "PATIENT-SECRET-4711"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("analyze_responses", *args, stdout=out)
    return out.getvalue()


@pytest.fixture(scope="module")
def expected():
    return analyze(read_responses_csv(SMALL_CSV))


def test_json_to_stdout_equals_analyze(expected):
    assert json.loads(run(str(SMALL_CSV))) == expected


def test_csv_is_a_long_table_matching_the_json(expected, tmp_path):
    target = tmp_path / "out.csv"
    message = run(str(SMALL_CSV), "--format", "csv", "--output", str(target))
    assert "written to" in message
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert list(rows[0]) == ["section", "group", "condition", "term", "statistic", "value"]
    index = {(r["section"], r["group"], r["condition"], r["term"], r["statistic"]): r["value"]
             for r in rows}
    assert len(index) == len(rows)  # every figure has a unique address
    for group, cells in expected["groups"].items():
        for condition, cell in cells.items():
            for stat, value in cell.items():
                got = index[("accuracy", group, condition, "", stat)]
                assert (got == "" if value is None else float(got) == value)
    for group, m in expected["mcnemar"].items():
        assert int(index[("mcnemar", group, "control vs deidentified", "", "b")]) == m["b"]
        assert float(index[("mcnemar", group, "control vs deidentified", "", "p_value")]) \
            == m["p_value"]
    for condition, b in expected["between_groups"].items():
        assert float(index[("between_groups", "", condition, "", "p_value")]) == b["p_value"]
        assert index[("between_groups", "", condition, "", "test")] == b["test"]
    for term, figures in expected["mixed_model"]["terms"].items():
        assert float(index[("mixed_model", "", "", term, "estimate")]) == figures["estimate"]
    for condition, kappa in expected["fleiss_kappa"].items():
        assert float(index[("fleiss_kappa", "", condition, "", "kappa")]) == kappa
    assert float(index[("response_time_ms", "all", "control", "", "median")]) == \
        expected["response_time_ms"]["all"]["control"]["median"]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_escaped(tmp_path):
    rows = SMALL_CSV.read_text(encoding="utf-8").replace("plastic surgeon", "<b>surgeons</b> & co")
    source = tmp_path / "responses.csv"
    source.write_text(rows, encoding="utf-8")
    html = run(str(source), "--format", "html")
    parser = _Collector()
    parser.feed(html)
    assert html.startswith("<!DOCTYPE html>")
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    assert not [v for k, v in parser.attrs if k in {"src", "href"}]
    assert parser.tags.count("table") >= 6
    assert "b" not in parser.tags  # the group name was escaped, not interpreted
    text = " ".join(parser.text)
    assert "<b>surgeons</b> & co" in text
    assert "100.0 %" in text  # the general/control cell is 12/12
    assert "R01" not in html and "S01" not in html


def test_pair_and_reference_group_options(tmp_path):
    body = SMALL_CSV.read_text(encoding="utf-8").replace("deidentified", "masked")
    source = tmp_path / "r.csv"
    source.write_text(body, encoding="utf-8")
    res = json.loads(run(str(source), "--pair", "masked", "control",
                         "--reference-group", "plastic surgeon"))
    assert res["meta"]["paired_conditions"] == ["masked", "control"]
    assert res["mixed_model"]["reference"] == {"condition": "masked", "group": "plastic surgeon"}
    flipped = json.loads(run(str(source)))  # default: ("control", the other one)
    assert (res["mcnemar"]["all"]["b"], res["mcnemar"]["all"]["c"]) == \
        (flipped["mcnemar"]["all"]["c"], flipped["mcnemar"]["all"]["b"])


def test_mcnemar_for_two_conditions_named_anything(tmp_path):
    """Conditions named original / deidentified (no "control"): the command pairs them and
    gives the exact McNemar result, checked against statsmodels; the HTML labels p."""
    from statsmodels.stats.contingency_tables import mcnemar

    rng = __import__("random").Random(5)
    lines = ["rater_id,rater_group,subject_id,condition,correct,n_choices"]
    table = [[0, 0], [0, 0]]
    for r in range(6):
        for s in range(8):
            a, b = rng.random() < 0.85, rng.random() < 0.5
            table[int(not a)][int(not b)] += 1
            lines.append(f"R{r},g{r % 2},S{s},original,{int(a)},4")
            lines.append(f"R{r},g{r % 2},S{s},deidentified,{int(b)},4")
    path = tmp_path / "named.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = json.loads(run(str(path), "--format", "json"))
    assert res["meta"]["paired_conditions"] == ["original", "deidentified"]
    m = res["mcnemar"]["all"]
    assert (m["n_pairs"], m["b"], m["c"]) == (48, table[0][1], table[1][0])
    assert m["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
    # the reversed pair swaps b and c and keeps p
    rev = json.loads(run(str(path), "--pair", "deidentified", "original"))["mcnemar"]["all"]
    assert (rev["b"], rev["c"], rev["p_value"]) == (m["c"], m["b"], m["p_value"])
    html = run(str(path), "--format", "html")
    assert "original and deidentified" in html and "(two-sided)" in html


@pytest.mark.parametrize("body, message", [
    ("", "empty"),
    ("rater_id,subject_id\nR1,S1\n", "missing column(s): rater_group, condition"),
    ("rater_id,rater_group,subject_id,condition,correct,n_choices\n"
     f"R1,g,{SECRET},control,yes,4\n", "line 2: correct must be 0, 1, true or false"),
])
def test_bad_csv_gives_one_line_command_error(tmp_path, body, message):
    source = tmp_path / "bad.csv"
    source.write_text(body, encoding="utf-8")
    with pytest.raises(CommandError) as info:
        run(str(source))
    assert message in str(info.value)
    assert "\n" not in str(info.value) and SECRET not in str(info.value)


def test_missing_file_and_unwritable_output(tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        run(str(tmp_path / "missing.csv"))
    with pytest.raises(CommandError, match="cannot write"):
        run(str(SMALL_CSV), "--output", str(tmp_path / "no" / "such" / "dir.json"))


def test_manage_py_error_has_no_traceback(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_text("rater_id\nR1\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "manage.py", "analyze_responses", str(source)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("CommandError: missing column(s)")
