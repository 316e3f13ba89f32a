"""The typeset PDF report: every page rendered to PNG (pypdfium2) and checked — nothing
outside the page, the mixed-model terms with β, CI and p all present, the hash and
"page n of m" on every page — and user text (a group named like matplotlib mathtext or a
spreadsheet formula) never breaks a plot, the PDF or an export.

``DEIDSTUDY_PDF_PNG_DIR=/some/dir`` keeps the rendered pages for looking at them."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.test import Client

from tests.factories.studies import make_finished_study

pytestmark = pytest.mark.django_db
pdfium = pytest.importorskip("pypdfium2")

MATH = r"$\frac{a$"
FORMULA = '=HYPERLINK("http://evil.example","x")'


def render_pages(pdf: bytes, scale: float = 1.5) -> list[tuple[object, str, list]]:
    """(PIL image, text, char boxes in PDF points) of every page."""
    doc = pdfium.PdfDocument(pdf)
    out = []
    for i in range(len(doc)):
        page = doc[i]
        tp = page.get_textpage()
        n = tp.count_chars()
        text = tp.get_text_range()
        boxes = [tp.get_charbox(j) for j in range(n)]
        out.append((page.render(scale=scale).to_pil(), text, boxes, page.get_size()))
    return out


@pytest.fixture()
def pdf_study(tmp_path, settings):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    study, user = make_finished_study(settings.DATA_DIR, groups=("general", "plastic surgeon",
                                                                 MATH))
    c = Client()
    c.force_login(user)
    return study, c


def test_pdf_pages_render_and_hold_every_figure(pdf_study):
    study, c = pdf_study
    r = c.get(f"/studies/{study.pk}/export/report.pdf")
    assert r.status_code == 200 and r.content[:5] == b"%PDF-"
    pages = render_pages(r.content)
    n = len(pages)
    assert 3 <= n <= 12
    keep = os.environ.get("DEIDSTUDY_PDF_PNG_DIR")
    flat = ""
    for i, (img, text, boxes, (w, h)) in enumerate(pages, start=1):
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            img.save(Path(keep) / f"page-{i:02d}.png")
        px = np.asarray(img.convert("L"), float)
        assert px.std() > 10, f"page {i} looks blank"
        # nothing is set outside the page (the old report ran off its right edge)
        for left, bottom, right, top in boxes:
            if right > left:
                assert 0 <= left and right <= w and 0 <= bottom and top <= h, (i, left, right)
        # page furniture: hash and "page i of n" on every page
        assert study.prereg_hash in text.replace("\r\n", "").replace("\n", ""), i
        assert f"page {i} of {n}" in text
        flat += text
    squeeze = re.sub(r"\s+", "", flat)
    doc = json.loads(c.get(f"/studies/{study.pk}/export/analysis.json").content)
    mm = doc["analysis"]["mixed_model"]
    assert mm["terms"], mm
    for name, t in mm["terms"].items():  # every term with its β, CI and p visible
        assert re.sub(r"\s+", "", name) in squeeze, name
        assert f"{t['estimate']:.3f}" in flat and f"[{t['ci_low']:.3f}," in flat
    from pipeline.stats import format_p

    assert all(format_p(t["p_value"]) in flat for t in mm["terms"].values())
    for heading in ("1 Design", "2 Recruitment and progress", "3 Exclusions",
                    "4 Primary analysis", "5 Sensitivity analysis", "6 Per-subject difficulty",
                    "7 Response times", "8 Automated re-identification"):
        assert heading in flat, heading
    assert MATH in flat  # the mathtext-like group name is printed as typed
    assert "rank-1, de-identified" in flat and "rank-1, control" in flat
    assert "-choice accuracy" in flat  # the raters beside the matcher, same task
    excluded = [e["rater_id"] for e in doc["excluded_raters"]]
    assert excluded and all(code in flat for code in excluded)
    assert "(one-sided)" in flat and "two-sided" in flat


def test_mathtext_and_formula_group_names_break_nothing(tmp_path, settings):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    study, user = make_finished_study(settings.DATA_DIR, groups=(MATH, FORMULA), per_group=2)
    c = Client()
    c.force_login(user)
    for name in ("accuracy", "accuracy-sensitivity", "rt", "cmc"):
        r = c.get(f"/studies/{study.pk}/plots/{name}.png")
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG", name
    for url in ("report/", "", "export/report.pdf", "export/analysis.json",
                "export/dataset.zip"):
        assert c.get(f"/studies/{study.pk}/{url}").status_code == 200, url
    # CSV exports: the formula-like group is escaped with a leading apostrophe everywhere
    for url in ("export/responses.csv", "export/all-answers.csv"):
        text = c.get(f"/studies/{study.pk}/{url}").content.decode()
        rows = list(csv.DictReader(io.StringIO(text)))
        groups = {r["rater_group"] for r in rows}
        assert "'" + FORMULA in groups and FORMULA not in groups and MATH in groups
        assert not any(v.startswith(("=", "+", "@")) for r in rows for v in r.values() if v)
    z = zipfile.ZipFile(io.BytesIO(c.get(f"/studies/{study.pk}/export/dataset.zip").content))
    long_rows = list(csv.DictReader(io.StringIO(
        z.read(f"study-{study.pk}/responses_long.csv").decode())))
    assert {r["rater_group"] for r in long_rows} == {MATH, "'" + FORMULA}
    assert {r["trial_kind"] for r in long_rows} == {"practice", "main", "catch"}


def test_pdf_of_a_study_without_answers(tmp_path, settings):
    """Before anyone took part the PDF still renders: design, empty funnel, "no answers",
    the automated section's note, and "not frozen yet" instead of a hash."""
    from tests.factories.studies import make_render_cohort, make_researcher, make_study

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    study = make_study(make_render_cohort(settings.DATA_DIR, user), user)
    c = Client()
    c.force_login(user)
    pages = render_pages(c.get(f"/studies/{study.pk}/export/report.pdf").content)
    keep = os.environ.get("DEIDSTUDY_PDF_PNG_DIR")
    text = "".join(t for _, t, _, _ in pages)
    for i, (img, t, boxes, (w, h)) in enumerate(pages, start=1):
        if keep:
            img.save(Path(keep) / f"empty-{i:02d}.png")
        assert "not frozen yet" in t and f"page {i} of {len(pages)}" in t
        assert all(0 <= b[0] and b[2] <= w for b in boxes if b[2] > b[0])
    assert "No answers to scored trials yet." in text
    assert "No automated re-identification yet" in text
