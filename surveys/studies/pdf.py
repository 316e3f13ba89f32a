"""The typeset PDF report of a study (ReportLab platypus, A4).

Sections: design, recruitment and progress, exclusions, primary analysis (accuracy table
and plot, mixed-model terms with β, SE, 95 % CI and p), the other tests, the sensitivity
analysis, per-subject difficulty, response times, automated re-identification. Every page
has the study name, the pre-registration hash, the generation date and "page n of m".

Text is set in DejaVu Sans (shipped with matplotlib, so no system font is needed) and
every table cell is a wrapped paragraph: long model terms and user-chosen group names
wrap inside their column instead of running off the page. User text is XML-escaped
before it reaches ReportLab's paragraph markup.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as _xml_escape

import matplotlib
from django.utils import timezone
from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak,
    Image,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from pipeline.reid import cmc_figure as both_curves
from pipeline.stats import ALL_GROUPS, format_p

from ..models import Study
from .participation import exclusion_rule_text, funnel_totals, progress
from .reid_section import automated_reid
from .report import (
    accuracy_cells,
    accuracy_figure,
    cmc_figure,
    design_summary,
    difficulty,
    png_bytes,
    primary_label,
    rater_table,
    rt_figure,
    rt_table,
    study_results,
    tests_table,
)

__all__ = ["build_pdf"]

PAGE_W, PAGE_H = A4
MARGIN = 16 * mm
BODY_W = PAGE_W - 2 * MARGIN
_FONTS_READY = False


def _fonts() -> None:
    global _FONTS_READY
    if _FONTS_READY:
        return
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pdfmetrics.registerFont(TTFont("DejaVu", str(ttf / "DejaVuSans.ttf")))
    pdfmetrics.registerFont(TTFont("DejaVu-Bold", str(ttf / "DejaVuSans-Bold.ttf")))
    pdfmetrics.registerFont(TTFont("DejaVu-Oblique", str(ttf / "DejaVuSans-Oblique.ttf")))
    pdfmetrics.registerFont(TTFont("DejaVu-Mono", str(ttf / "DejaVuSansMono.ttf")))
    pdfmetrics.registerFontFamily("DejaVu", normal="DejaVu", bold="DejaVu-Bold",
                                  italic="DejaVu-Oblique", boldItalic="DejaVu-Bold")
    _FONTS_READY = True


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName="DejaVu", fontSize=8.6, leading=11.2,
                          alignment=TA_LEFT, spaceAfter=3)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.2, leading=9,
                                textColor=colors.HexColor("#444444")),
        "cell": ParagraphStyle("cell", parent=base, fontSize=7.4, leading=9, spaceAfter=0),
        "cellb": ParagraphStyle("cellb", parent=base, fontName="DejaVu-Bold", fontSize=7.0,
                                leading=8.6, spaceAfter=0),
        "num": ParagraphStyle("num", parent=base, fontSize=7.4, leading=9, spaceAfter=0,
                              alignment=2),
        "numb": ParagraphStyle("numb", parent=base, fontName="DejaVu-Bold", fontSize=7.0,
                               leading=8.6, spaceAfter=0, alignment=2),
        "title": ParagraphStyle("title", parent=base, fontName="DejaVu-Bold", fontSize=15,
                                leading=19, spaceAfter=4),
        "h1": ParagraphStyle("h1", parent=base, fontName="DejaVu-Bold", fontSize=11.5,
                             leading=14, spaceBefore=9, spaceAfter=4,
                             textColor=colors.HexColor("#1d3557")),
        "h2": ParagraphStyle("h2", parent=base, fontName="DejaVu-Bold", fontSize=9.4,
                             leading=12, spaceBefore=6, spaceAfter=3),
        "mono": ParagraphStyle("mono", parent=base, fontName="DejaVu-Mono", fontSize=7.6,
                               leading=9.6),
    }


def esc(text: Any) -> str:
    """User or data text → ReportLab paragraph markup (XML-escaped)."""
    return _xml_escape("" if text is None else str(text))


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _val(row: dict, v: float | None) -> str:
    """A re-identification figure: a rate as percent, anything else (AUC) as a number."""
    return _pct(v) if row.get("unit", "rate") == "rate" else _num(v)


def _group(g: str) -> str:
    return "all groups" if g == ALL_GROUPS else g


class _Report:
    def __init__(self, study: Study) -> None:
        _fonts()
        self.study = study
        self.s = _styles()
        self.story: list = []
        self.generated = timezone.now()

    # --------------------------------------------------------------- helpers
    def p(self, text: str, style: str = "body") -> None:
        self.story.append(Paragraph(text, self.s[style]))

    def h1(self, text: str) -> None:
        self.story.append(CondPageBreak(25 * mm))  # no heading alone at a page foot
        self.p(text, "h1")

    def table(self, header: list[str], rows: list[list[Any]], widths: list[float],
              numeric: set[int] = frozenset(), zebra: bool = True) -> None:
        """A table of wrapped paragraphs; ``widths`` are fractions of the body width."""
        total = sum(widths)
        col_w = [BODY_W * w / total for w in widths]
        data = [[Paragraph(esc(h), self.s["numb" if i in numeric else "cellb"])
                 for i, h in enumerate(header)]]
        for row in rows:
            data.append([Paragraph(v if isinstance(v, _Markup) else esc(v),
                                   self.s["num" if i in numeric else "cell"])
                         for i, v in enumerate(row)])
        t = Table(data, colWidths=col_w, repeatRows=1)
        style = [
            ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.HexColor("#1d3557")),
            ("LINEBELOW", (0, -1), (-1, -1), 0.4, colors.HexColor("#999999")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TOPPADDING", (0, 0), (-1, -1), 1.6),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 1.6),
            ("LEFTPADDING", (0, 0), (-1, -1), 3),
            ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ]
        if zebra:
            for i in range(1, len(data)):
                if i % 2 == 0:
                    style.append(("BACKGROUND", (0, i), (-1, i), colors.HexColor("#f2f4f7")))
        t.setStyle(TableStyle(style))
        self.story.append(t)
        self.story.append(Spacer(1, 4))

    def figure(self, fig, width_frac: float = 0.82) -> None:
        data = png_bytes(fig, dpi=200)
        w_in, h_in = fig.get_size_inches()
        w = BODY_W * width_frac
        img = Image(io.BytesIO(data), width=w, height=w * h_in / w_in)
        self.story.append(img)
        self.story.append(Spacer(1, 4))

    # --------------------------------------------------------------- sections
    def build(self) -> bytes:
        st = self.study
        self.res = study_results(st)
        self.p("Blinded re-identification study — report", "title")
        self.p(f"<b>{esc(st.name)}</b> · cohort {esc(st.cohort.name)} · generated "
               f"{self.generated:%Y-%m-%d %H:%M} UTC")
        self.p("Pre-registration SHA-256 (design and analysis plan, fixed when the design "
               f"froze): <font name='DejaVu-Mono'>{esc(st.prereg_hash or 'not frozen yet')}"
               "</font>", "small")

        self.h1("1 Design")
        self.table(["", ""], [[_Markup(f"<b>{esc(k)}</b>"), v] for k, v in design_summary(st)],
                   [0.22, 0.78], zebra=False)

        self.section_progress()
        self.section_exclusions()
        primary = st.primary_analysis
        other = "all" if primary == "excluded" else "excluded"
        self.section_analysis(primary, "4 Primary analysis", full=True)
        self.section_analysis(other, "5 Sensitivity analysis", full=False)
        self.section_difficulty()
        self.section_rt()
        self.section_reid()
        return self.render()

    def section_progress(self) -> None:
        self.h1("2 Recruitment and progress")
        rows = progress(self.study)
        tot = funnel_totals(rows)
        data = [[r["group"], r["enrolled"], r["consented"], r["declined"], r["started"],
                 r["finished"], r["stopped"], r["excluded"], r["mismatch"],
                 f"{r['answered']} / {r['planned']}"] for r in rows]
        data.append([_Markup("<b>total</b>"), tot["enrolled"], tot["consented"],
                     tot["declined"], tot["started"], tot["finished"], tot["stopped"],
                     tot["excluded"], tot["mismatch"], f"{tot['answered']} / {tot['planned']}"])
        self.table(["Group (invitation)", "Enrolled", "Consented", "Declined", "Started",
                    "Finished", "Stopped early", "Excluded", "Mismatch",
                    "Trials answered / planned"], data,
                   [0.14, 0.085, 0.1, 0.085, 0.08, 0.085, 0.08, 0.085, 0.09, 0.14],
                   numeric=set(range(1, 10)))
        self.p("Enrolled = opened an invitation and pressed Start; started = answered at least "
               "one trial; trials count the raters who started. Mismatch = the "
               "questionnaire's profession contradicts the invitation's group (the rater is "
               "analysed in the invitation's group).", "small")

    def section_exclusions(self) -> None:
        self.h1("3 Exclusions")
        self.p(esc(exclusion_rule_text(self.study)) + " The rule was declared with the "
               "design and is part of the pre-registration hash.")
        excl = self.res["excluded_raters"]
        if excl:
            self.table(["Rater", "Group", "By", "Reason"],
                       [[e["rater_id"], e["group"],
                         " + ".join(x for x, f in (("rule", e["rule"]),
                                                   ("researcher", e["manual"])) if f),
                         "; ".join(e["reasons"])] for e in excl.values()],
                       [0.12, 0.2, 0.14, 0.54])
        else:
            self.p("No rater is excluded.")
        mism = [r for r in rater_table(self.study) if r["group_mismatch"]]
        if mism:
            self.p("Raters whose self-reported profession contradicts their invitation's group "
                   "(kept in the invitation's group):", "small")
            self.table(["Rater", "Invitation group", "Self-reported profession"],
                       [[r["rater_id"], r["rater_group"], r["self_reported_profession"]]
                        for r in mism], [0.2, 0.4, 0.4])

    def section_analysis(self, which: str, title: str, full: bool) -> None:
        st = self.study
        a = self.res[which]
        self.h1(f"{title}: {esc(primary_label(st, which, role=False))}")
        n_ans = self.res["n_answers"][which]
        if not a:
            self.p("No answers to scored trials yet.")
            return
        meta = a["meta"]
        self.p(f"{n_ans} answers to scored trials from {meta['n_raters']} raters on "
               f"{meta['n_subjects']} subjects (practice and catch trials excluded).")
        if which == "excluded" and not self.res["excluded_raters"]:
            self.p("Nobody is excluded, so this analysis equals the analysis of all raters.",
                   "small")
        cells = accuracy_cells(a, st.groups)
        self.table(["Group", "Condition", "Raters", "n", "Correct", "Accuracy",
                    "Wilson 95 % CI", "p vs chance (one-sided)"],
                   [[_group(c["group"]), c["condition"], c["n_raters"], c["n"], c["n_correct"],
                     _pct(c["accuracy"]),
                     "—" if c["ci_low"] is None else f"{_pct(c['ci_low'])} – {_pct(c['ci_high'])}",
                     format_p(c["chance_p"])] for c in cells],
                   [0.18, 0.14, 0.08, 0.07, 0.08, 0.1, 0.19, 0.16], numeric={2, 3, 4, 5, 7})
        if full:
            self.figure(accuracy_figure(a, order=st.groups), 0.68)
        mm_ = a.get("mixed_model") or {}
        self.p("Mixed-effects logistic model" + ("" if full else " (sensitivity)"), "h2")
        if mm_.get("error"):
            self.p(f"Not fitted: {esc(mm_['error'])} (formula {esc(mm_.get('formula'))}).")
        elif mm_.get("terms"):
            ref = mm_["reference"]
            self.p(f"<font name='DejaVu-Mono'>{esc(mm_['formula'])}</font>; log-odds scale; "
                   f"reference condition {esc(ref['condition'])}, reference group "
                   f"{esc(ref['group'])}; n = {mm_['n']}.", "small")
            self.table(["Term", "β (log-odds)", "SE", "95 % CI", "p (Wald, two-sided)"],
                       [[name, _num(t["estimate"]), _num(t["sd"]),
                         f"[{_num(t['ci_low'])}, {_num(t['ci_high'])}]",
                         format_p(t["p_value"])] for name, t in mm_["terms"].items()],
                       [0.46, 0.12, 0.1, 0.17, 0.15], numeric={1, 2, 4})
            re_sd = mm_.get("random_effects_sd") or {}
            self.p("Random-intercept SDs (log-odds): " + ", ".join(
                f"{esc(k)} {v:.3f}" for k, v in re_sd.items()) + ". " + esc(mm_["method"])
                + ".", "small")
            for f in mm_.get("fallbacks") or []:
                self.p(f"Abandoned {esc(f['formula'])}: {esc(f['error'])}", "small")
        if full:
            self.p("Other tests", "h2")
            rows = [t for t in tests_table(a, st.groups)
                    if not t["test"].startswith("mixed model")]
            self.table(["Test", "Scope", "Detail", "p"],
                       [[t["test"], _group(t["scope"]), t["detail"], t["p_text"]] for t in rows],
                       [0.2, 0.22, 0.38, 0.2])

    def section_difficulty(self) -> None:
        self.h1("6 Per-subject difficulty")
        rows = difficulty(self.res["rows_kept" if self.study.primary_analysis == "excluded"
                                   else "rows"])
        if not rows:
            self.p("No answers yet.")
            return
        self.p("Accuracy per subject and condition in the primary analysis, hardest first.",
               "small")
        self.table(["Subject", "Condition", "n", "Correct", "Accuracy"],
                   [[d["subject_id"], d["condition"], d["n"], d["n_correct"],
                     _pct(d["accuracy"])] for d in rows],
                   [0.3, 0.3, 0.12, 0.12, 0.16], numeric={2, 3, 4})

    def section_rt(self) -> None:
        self.h1("7 Response times")
        rows = self.res["rows_kept" if self.study.primary_analysis == "excluded" else "rows"]
        tab = rt_table(rows, self.study.groups)
        if not tab:
            self.p("No response times yet.")
            return
        self.table(["Group", "Condition", "n", "Median (s)", "IQR (s)", "Mean (s)"],
                   [[r["group"], r["condition"], r["n"], _num(r["median"], "{:.2f}"),
                     f"{_num(r['q1'], '{:.2f}')} – {_num(r['q3'], '{:.2f}')}",
                     _num(r["mean"], "{:.2f}")] for r in tab],
                   [0.26, 0.2, 0.1, 0.14, 0.18, 0.12], numeric={2, 3, 5})
        self.figure(rt_figure(rows, order=self.study.groups), 0.66)

    def section_reid(self) -> None:
        self.h1("8 Automated re-identification")
        info = automated_reid(self.study.cohort, self.res[self.study.primary_analysis],
                              self.study.n_choices)
        self.p(esc(info["note"]))
        if info["rows"]:
            self.table(["Measure", "Matcher", "Value", "95 % CI", "Chance"],
                       [[r["measure"], r["matcher"], _val(r, r["value"]),
                         "—" if r["ci_low"] is None else
                         f"{_val(r, r['ci_low'])} – {_val(r, r['ci_high'])}",
                         _val(r, r["chance"])]
                        for r in info["rows"]], [0.34, 0.28, 0.12, 0.14, 0.12],
                       numeric={2, 4})
        side = (info.get("reid_table") or {}).get("side_by_side") or []
        if side:
            labels = info["reid_table"]["side_by_side_labels"]
            self.p("De-identified beside de-identified + reconstruction (a face rebuilt on the "
                   "kept skull from the de-identified scan alone): rank-1 [95 % CI]; AUC.")
            w = 0.76 / len(labels)
            self.table(["Matcher", *labels],
                       [[r["matcher"], *[
                           f"{c['rank1']:.2f} [{_num(c['rank1_lo'], '{:.2f}')}, "
                           f"{_num(c['rank1_hi'], '{:.2f}')}]; {c['auc']:.2f}"
                           for c in r["cells"]]] for r in side],
                       [0.24, *[w] * len(labels)])
        if info.get("metrics"):
            self.figure(both_curves(info["metrics"]), 0.55)
        elif info.get("cmc"):
            self.figure(cmc_figure(info["cmc"]), 0.55)

    # --------------------------------------------------------------- page furniture
    def render(self) -> bytes:
        buf = io.BytesIO()
        st = self.study
        name = st.name if len(st.name) <= 70 else st.name[:69] + "…"
        stamp = f"{self.generated:%Y-%m-%d %H:%M} UTC"
        digest = st.prereg_hash or "not frozen yet"

        class NumberedCanvas(Canvas):
            """Draws the header/footer of every page at save(), when the page count is known
            ("page n of m")."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._pages: list[dict] = []

            def showPage(self):  # noqa: N802 - ReportLab API
                self._pages.append(dict(self.__dict__))
                self._startPage()

            def save(self):
                total = len(self._pages)
                for state in self._pages:
                    self.__dict__.update(state)
                    self._furniture(total)
                    super().showPage()
                super().save()

            def _furniture(self, total: int) -> None:
                self.saveState()
                self.setFont("DejaVu", 7)
                self.setFillColor(colors.HexColor("#555555"))
                self.drawString(MARGIN, PAGE_H - 10 * mm, f"Re-identification study: {name}")
                self.drawRightString(PAGE_W - MARGIN, PAGE_H - 10 * mm, stamp)
                self.setStrokeColor(colors.HexColor("#cccccc"))
                self.line(MARGIN, PAGE_H - 11.5 * mm, PAGE_W - MARGIN, PAGE_H - 11.5 * mm)
                self.line(MARGIN, 12.5 * mm, PAGE_W - MARGIN, 12.5 * mm)
                self.setFont("DejaVu-Mono", 6.3)
                self.drawString(MARGIN, 9 * mm, f"pre-registration SHA-256 {digest}")
                self.setFont("DejaVu", 7)
                self.drawRightString(PAGE_W - MARGIN, 9 * mm,
                                     f"page {self._pageNumber} of {total}")
                self.restoreState()

        doc = SimpleDocTemplate(
            buf, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=16 * mm,
            bottomMargin=17 * mm, title="Re-identification study report", author="",
            creator="deidstudy", producer="deidstudy", subject="", keywords="")
        doc.build(self.story, canvasmaker=NumberedCanvas)
        return buf.getvalue()


class _Markup(str):
    """Text that is already paragraph markup (not escaped again)."""


def build_pdf(study: Study) -> bytes:
    """PDF bytes of the study report."""
    return _Report(study).build()
