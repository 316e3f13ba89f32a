"""Study report: analysis (``pipeline.stats.analyze``), plots, per-subject difficulty, PDF.

Figures are matplotlib ``Figure`` objects (no pyplot state, thread-safe) saved as PNG/PDF bytes made on the server; no browser needed.
Only pseudonyms (rater codes, subject pseudonyms) appear in any output.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import textwrap
from collections import defaultdict
from typing import Any

from django.core.cache import cache
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from pipeline.stats import ALL_GROUPS, analyze

from ..models import Rater, Study
from .service import EXPORT_COLUMNS, practice_reservation, response_rows

__all__ = [
    "accuracy_figure",
    "automated_reid",
    "analysis_json",
    "difficulty",
    "pdf_report",
    "png_bytes",
    "practice_note",
    "progress",
    "responses_csv",
    "rt_figure",
    "study_analysis",
    "tests_table",
]


def study_analysis(rows: list[dict[str, Any]], mixed_model: bool = True) -> dict[str, Any] | None:
    """``pipeline.stats.analyze`` of the main-trial answers, or None without answers
    (``mixed_model=False`` skips the slow model fit, e.g. for plots)."""
    if not rows:
        return None
    # the mixed model takes ~2 s for 1000 answers: cache per process on the exact answers
    digest = hashlib.sha256(json.dumps(
        [[r["rater_id"], r["subject_id"], r["condition"], r["correct"], r["n_choices"],
          r.get("response_time_ms"), r.get("confidence"), r["rater_group"]] for r in rows],
        default=str).encode()).hexdigest()
    key = f"studies:analysis:{int(mixed_model)}:{digest}"
    result = cache.get(key)
    if result is None:
        result = analyze(rows, mixed_model=mixed_model)
        cache.set(key, result, 3600)
    return result


def progress(study: Study) -> list[dict[str, Any]]:
    """Per group: raters enrolled / finished, answered and planned trials (all kinds)."""
    out = []
    for g in study.groups + sorted({r.group for r in study.raters.all()} - set(study.groups)):
        raters = Rater.objects.filter(study=study, group=g)
        planned = sum(r.trials.count() for r in raters)
        answered = sum(r.trials.filter(answer__isnull=False).count() for r in raters)
        out.append({"group": g, "raters": raters.count(),
                    "finished": raters.filter(finished__isnull=False).count(),
                    "answered": answered, "planned": planned,
                    "percent": round(100.0 * answered / planned, 1) if planned else 0.0})
    return out


def attention(study: Study) -> list[dict[str, Any]]:
    """Per rater (code, group): catch trials answered and passed, timed-out and
    response-time-suspect answers; ``flag`` when a catch trial was failed."""
    from ..models import Answer

    out: dict[str, dict[str, Any]] = {}
    qs = (Answer.objects.filter(trial__rater__study=study)
          .select_related("trial__rater").order_by("trial__rater__index"))
    for a in qs:
        r = a.trial.rater
        d = out.setdefault(r.code, {"rater_id": r.code, "rater_group": r.group, "catch_n": 0,
                                    "catch_correct": 0, "timed_out": 0, "rt_suspect": 0})
        if a.trial.kind == "catch":
            d["catch_n"] += 1
            d["catch_correct"] += int(a.correct)
        d["timed_out"] += int(a.timed_out)
        d["rt_suspect"] += int(a.rt_suspect)
    for d in out.values():
        d["flag"] = d["catch_correct"] < d["catch_n"]
    return list(out.values())


def difficulty(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per subject and condition: n answers, n correct, accuracy (hardest first)."""
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        cells[(r["subject_id"], r["condition"])].append(int(r["correct"]))
    out = [{"subject_id": s, "condition": c, "n": len(v), "n_correct": sum(v),
            "accuracy": sum(v) / len(v)} for (s, c), v in cells.items()]
    return sorted(out, key=lambda d: (d["accuracy"], d["subject_id"], d["condition"]))


def tests_table(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (test, scope, statistic, p) of the analysis for the report table."""
    rows = []
    for g, conds in analysis["groups"].items():
        for c, cell in conds.items():
            if cell["n"]:
                rows.append({"test": "binomial vs chance", "scope": f"{g} / {c}",
                             "detail": f"{cell['n_correct']}/{cell['n']}, chance "
                                       f"{cell['chance']:.2f}", "p": cell["chance_p"]})
    for g, m in analysis["mcnemar"].items():
        rows.append({"test": "exact McNemar", "scope": g,
                     "detail": f"b={m['b']} c={m['c']} pairs={m['n_pairs']}",
                     "p": m["p_value"]})
    for c, b in analysis["between_groups"].items():
        rows.append({"test": b.get("test") or "between groups (n/a)", "scope": c,
                     "detail": b.get("note") or "", "p": b.get("p_value")})
    mm = analysis.get("mixed_model") or {}
    for name, t in (mm.get("terms") or {}).items():
        rows.append({"test": f"mixed model ({mm.get('method')})", "scope": name,
                     "detail": f"β={t['estimate']:.3g} [{t['ci_low']:.3g}, {t['ci_high']:.3g}]"
                     if t.get("estimate") is not None else "", "p": t.get("p_value")})
    for c, k in analysis["fleiss_kappa"].items():
        rows.append({"test": "Fleiss' kappa", "scope": c,
                     "detail": "n/a" if k is None else f"κ={k:.3f}", "p": None})
    return rows


def accuracy_figure(analysis: dict[str, Any] | None) -> Figure:
    """Bar chart: accuracy by group × condition with Wilson 95 % CI error bars, chance line."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    if not analysis:
        ax.text(0.5, 0.5, "no answers yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    groups = [g for g in analysis["groups"] if g != ALL_GROUPS] + [ALL_GROUPS]
    conds = analysis["meta"]["conditions"]
    width = 0.8 / max(1, len(conds))
    chance = []
    for n, c in enumerate(conds):
        xs, ys, lo, hi = [], [], [], []
        for gi, g in enumerate(groups):
            cell = analysis["groups"][g][c]
            if cell["n"]:
                xs.append(gi + (n - (len(conds) - 1) / 2) * width)
                ys.append(cell["accuracy"])
                lo.append(cell["accuracy"] - cell["ci_low"])
                hi.append(cell["ci_high"] - cell["accuracy"])
                chance.append(cell["chance"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=4, label=c)
    if chance:
        ax.axhline(sum(chance) / len(chance), color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95 % Wilson CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rt_figure(rows: list[dict[str, Any]]) -> Figure:
    """Box plots of browser response times (s) per group × condition."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    data: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["response_time_ms"] != "":
            data[f"{r['rater_group']}\n{r['condition']}"].append(float(r["response_time_ms"]) / 1e3)
    if not data:
        ax.text(0.5, 0.5, "no response times yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    labels = sorted(data)
    ax.boxplot([data[k] for k in labels], tick_labels=labels)
    ax.set_ylabel("response time (s)")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """PNG encoding of a matplotlib figure (no metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def responses_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text, one row per answer, columns :data:`EXPORT_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def practice_note(study: Study) -> str:
    """One sentence naming the subjects (pseudonyms) reserved for practice, or saying none is."""
    p = practice_reservation(study)
    if not p["pseudonyms"]:
        if not study.n_practice:
            return "No subject reserved for practice (no practice trials)."
        return f"Subjects reserved for practice: none ({p['error'] or 'not reserved yet'})."
    when = "" if p["reserved"] else " (not yet reserved: no rater has started)"
    return (f"Subjects reserved for practice{when}: {', '.join(p['pseudonyms'])}; shown only in "
            "practice trials and excluded from the analysis.")


def analysis_json(study: Study) -> str:
    """JSON text: the analysis of the main trials plus the study design (including the
    subjects reserved for practice, which the analysis excludes)."""
    rows = response_rows(study)
    practice = practice_reservation(study)
    doc = {"study": {"name": study.name, "n_choices": study.n_choices,
                     "conditions": study.conditions, "views": study.views, "seed": study.seed,
                     "trials_per_rater": study.trials_per_rater, "groups": study.groups,
                     "n_practice": study.n_practice, "n_catch": study.n_catch,
                     "practice_subjects": practice["pseudonyms"],
                     "practice_subjects_reserved": practice["reserved"],
                     "practice_excluded_from_analysis": True},
           "progress": progress(study), "attention": attention(study),
           "analysis": study_analysis(rows)}
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)


def automated_reid(study: Study, analysis: dict[str, Any] | None) -> dict[str, Any]:
    """Template context of the automated re-identification section (cohort summary
    computed by :mod:`pipeline.reid`, human rates beside it); empty dict without one."""
    from django.urls import reverse

    from ..reid import human_vs_automated, reid_table

    summary = getattr(study.cohort, "reid", None) if hasattr(study.cohort, "reid") else None
    if summary is None or not summary.metrics:
        return {}
    return {"reid_table": reid_table(summary.metrics),
            "reid_plot_url": reverse("surveys:reid_plot", args=[study.cohort_id]),
            "reid_compare": human_vs_automated(analysis, summary.metrics, study.n_choices)}


def _automated_reid_page(study: Study, analysis: dict[str, Any] | None) -> Figure | None:
    """PDF page: human rates beside the automated ones, every matcher's table, CMC."""
    from pipeline.reid import cmc_figure

    ctx = automated_reid(study, analysis)
    if not ctx:
        return None
    table, compare = ctx["reid_table"], ctx["reid_compare"]
    lines = ["Automated re-identification (pipeline.reid; gallery: simulated second scan of each "
             "original)", f"{table['n']} subjects; chance rank-1 {table['chance']['rank1']:.2f}, "
             f"AUC 0.50" + ("   WARNING: fewer than 10 subjects" if table["small_cohort"] else ""),
             "", f"Accuracy in the raters' {study.n_choices}-choice task (chance "
             f"{1 / study.n_choices:.2f}):"]
    for row in compare:
        human = ("–" if row["human_accuracy"] is None else
                 f"{row['human_accuracy']:.3f} [{row['human_lo']:.3f}, {row['human_hi']:.3f}] "
                 f"(n = {row['human_n']})")
        auto = ", ".join(f"{a['matcher']} {a['k_choice']:.3f}" for a in row["automated"]
                         if a["k_choice"] is not None)
        lines.append(f"  {row['condition_label']}: raters {human}; automated {auto}")
    lines += ["", "Identification among all subjects (rank-1 / rank-5 / AUC, 95 % CI):"]
    for r in table["rows"]:
        def ci(key: str) -> str:
            lo, hi = r[f"{key}_lo"], r[f"{key}_hi"]
            return f"{r[key]:.2f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")
        lines.append(f"  {r['matcher']:<10s} {r['condition']:<13s} {ci('rank1'):<18s} "
                     f"{ci('rank5'):<18s} {ci('auc')}")
    lines += [""] + textwrap.wrap(table["tie_rule"], 110)
    fig = Figure(figsize=(8.27, 11.69))
    fig.text(0.05, 0.97, "\n".join(lines), va="top", family="monospace", fontsize=7)
    cmc = cmc_figure(study.cohort.reid.metrics)
    ax = fig.add_axes([0.12, 0.08, 0.76, 0.4])
    src = cmc.axes[0]
    for line in src.get_lines():
        ax.plot(line.get_xdata(), line.get_ydata(), drawstyle=line.get_drawstyle(),
                color=line.get_color(), linestyle=line.get_linestyle(),
                marker=line.get_marker(), markersize=3, label=line.get_label())
    ax.set_xlim(src.get_xlim())
    ax.set_ylim(src.get_ylim())
    ax.set_xticks([t for t in src.get_xticks() if src.get_xlim()[0] <= t <= src.get_xlim()[1]])
    ax.set_xlabel(src.get_xlabel())
    ax.set_ylabel(src.get_ylabel())
    ax.set_title(src.get_title(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def pdf_report(study: Study) -> bytes:
    """Multi-page PDF (matplotlib PdfPages): summary text, accuracy plot, tests, RTs."""
    rows = response_rows(study)
    analysis = study_analysis(rows)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": "Re-identification study report", "Author": "",
                                 "Creator": "deidstudy", "Producer": "deidstudy"}) as pdf:
        fig = Figure(figsize=(8.27, 11.69))
        lines = [f"Study: {study.name}",
                 (f"k = {study.n_choices}; conditions: "
                  f"{', '.join(study.conditions)}; views: {', '.join(study.views)}"),
                 (f"seed {study.seed}; {study.trials_per_rater} trials per rater "
                  f"(+{study.n_practice} practice, {study.n_catch} catch)"),
                 *textwrap.wrap(practice_note(study), 110), ""]
        for p in progress(study):
            lines.append(f"{p['group']}: {p['raters']} raters, {p['finished']} finished, "
                         f"{p['answered']}/{p['planned']} trials")
        lines.append("")
        if analysis:
            for g, conds in analysis["groups"].items():
                for c, cell in conds.items():
                    if cell["n"]:
                        lines.append(f"{g} / {c}: {cell['n_correct']}/{cell['n']} = "
                                     f"{cell['accuracy']:.3f} [{cell['ci_low']:.3f}, "
                                     f"{cell['ci_high']:.3f}]")
            lines.append("")
            for t in tests_table(analysis):
                p = "" if t["p"] is None else f"p = {t['p']:.4g}"
                lines.append(f"{t['test']} — {t['scope']}: {t['detail']} {p}")
        else:
            lines.append("no answers yet")
        fig.text(0.05, 0.97, "\n".join(lines[:70]), va="top", family="monospace", fontsize=7)
        pdf.savefig(fig)
        for f in (accuracy_figure(analysis), rt_figure(rows)):
            pdf.savefig(f)
        page = _automated_reid_page(study, analysis)
        if page is not None:
            pdf.savefig(page)
    return buf.getvalue()
