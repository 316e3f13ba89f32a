"""Study report: analyses (``pipeline.stats.analyze``) with and without excluded raters,
plots, per-subject difficulty, exports (CSV, data dictionary, design sidecar, JSON) and
the typeset PDF (:mod:`surveys.studies.pdf`).

Figures are matplotlib ``Figure`` objects (no pyplot state, thread-safe) rendered with
mathtext off, so user text such as a group named ``$\\frac{a$`` is drawn as typed.
Only pseudonyms (rater codes, subject pseudonyms) appear in any output.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections import defaultdict
from typing import Any

import matplotlib
from django.core.cache import cache
from django.utils import timezone
from matplotlib.figure import Figure

from pipeline.stats import ALL_GROUPS, analyze, format_p, summarize_values

from ..csvsafe import write_csv
from ..models import Rater, Study
from .participation import attention, exclusion_rule_text, exclusions, funnel_totals, progress
from .prereg import analysis_plan, paired_conditions, reference_group
from .service import EXPORT_COLUMNS, practice_reservation, response_rows

__all__ = [
    "DATA_DICTIONARY",
    "accuracy_figure",
    "analysis_json",
    "attention",
    "dataset_zip",
    "design_document",
    "difficulty",
    "png_bytes",
    "practice_note",
    "progress",
    "responses_csv",
    "rt_figure",
    "rt_table",
    "study_analysis",
    "study_results",
    "tests_table",
]

#: Column → (type, meaning, units / allowed values) of the answer exports.
DATA_DICTIONARY: dict[str, tuple[str, str, str]] = {
    "rater_id": ("string", "pseudonymous rater code (R-0001 …), order of arrival", "—"),
    "rater_group": ("string", "rater group, from the rater's invitation (locked; analysed)",
                    "one of the study's groups"),
    "subject_id": ("string", "subject pseudonym of the trial's target", "SUBJ-nnnn"),
    "condition": ("string", "condition of the trial: control = original target vs original "
                            "candidates; deidentified = de-identified target vs original "
                            "candidates; practice / catch for unscored trials",
                  "control, deidentified, practice, catch"),
    "correct": ("integer", "1 when the chosen candidate is the target's subject", "0 or 1"),
    "n_choices": ("integer", "number of candidates k (chance = 1/k)", "≥ 2"),
    "response_time_ms": ("number", "browser-measured time from the images being shown to the "
                                   "choice", "milliseconds; blank = not measured"),
    "confidence": ("integer", "rater's confidence, if the study asked", "1 (guess) – 5 "
                                                                        "(certain); blank"),
    "server_rt_ms": ("number", "server time from the trial first being served to the answer",
                     "milliseconds"),
    "rt_suspect": ("integer", "1 when the browser time exceeds the server time by more than "
                              "1.5 s (clock or tampering)", "0 or 1"),
    "timed_out": ("integer", "1 when the time limit ran out (no choice)", "0 or 1"),
    "choice": ("integer", "1-based position of the chosen candidate", "1 … k; blank = none"),
    "correct_choice": ("integer", "1-based position of the right candidate", "1 … k"),
    "trial_kind": ("string", "practice (feedback, not scored), main (scored), catch "
                             "(attention check: target identical to one candidate)",
                   "practice, main, catch"),
    "trial_position": ("integer", "0-based position in the rater's session", "≥ 0"),
    "target_view": ("string", "render view of the target", "e.g. yaw+0"),
    "candidate_view": ("string", "render view of the candidates", "e.g. yaw+30"),
    "self_reported_profession": ("string", "the questionnaire's profession answer (not "
                                           "used to group raters)", "free choice; blank"),
    "group_mismatch": ("integer", "1 when the self-reported profession contradicts the "
                                  "invitation's group", "0 or 1"),
    "years_experience": ("integer", "years of professional experience (professional groups "
                                    "only)", "years; blank for lay groups"),
    "rater_excluded": ("integer", "1 when the rater is excluded (pre-registered rule or "
                                  "researcher)", "0 or 1"),
    "exclusion_reason": ("string", "why the rater is excluded", "text; blank"),
    "answered_at": ("datetime", "server time the answer was stored", "ISO 8601, UTC"),
    "enlarged": ("string", "images the rater enlarged before answering (0 = the target, "
                           "1 … k = candidates)", "';'-separated positions; blank = none"),
    "design_sha256": ("string", "SHA-256 of the pre-registered design and analysis plan "
                                "(design.json → preregistration)", "64 hex digits; blank "
                                                                   "before the freeze"),
}


# ---------------------------------------------------------------------------- analyses


def study_analysis(rows: list[dict[str, Any]], mixed_model: bool = True,
                   paired: tuple[str, str] | None = None,
                   reference: str | None = None) -> dict[str, Any] | None:
    """``pipeline.stats.analyze`` of main-trial answers, or None without answers
    (``mixed_model=False`` skips the slow model fit, e.g. for plots). ``paired`` is the
    McNemar pair (None: no McNemar, e.g. between-rater design); ``reference`` the model's
    reference group."""
    if not rows:
        return None
    digest = hashlib.sha256(json.dumps(
        [[r["rater_id"], r["subject_id"], r["condition"], r["correct"], r["n_choices"],
          r.get("response_time_ms"), r.get("confidence"), r["rater_group"]] for r in rows]
        + [list(paired or ()), reference], default=str).encode()).hexdigest()
    key = f"studies:analysis:v2:{int(mixed_model)}:{digest}"
    result = cache.get(key)
    if result is None:
        conds = {r["condition"] for r in rows}
        pair = paired if paired and set(paired) <= conds else None
        result = analyze(rows, mixed_model=mixed_model, paired_conditions=pair,
                         reference_group=reference)
        if paired is None:  # between design: say why there is no McNemar
            for m in result["mcnemar"].values():
                if m["n_pairs"] == 0:
                    m["note"] = ("not applicable: between-rater design (each rater saw a "
                                 "subject in one condition only)")
        cache.set(key, result, 3600)
    return result


def study_results(study: Study, mixed_model: bool = True) -> dict[str, Any]:
    """Both analyses of a study's main trials and which one is primary.

    ``{"primary": "excluded"|"all", "all": analysis, "excluded": analysis,
    "excluded_raters": {code: info}, "n_answers": {...}, "rows": rows of all raters}``.
    ``excluded`` drops the raters excluded by the rule or by the researcher; when nobody
    is excluded both analyses are the same object.
    """
    rows = response_rows(study)
    excl = exclusions(study)
    kept = [r for r in rows if r["rater_id"] not in excl]
    pair, ref = paired_conditions(study), reference_group(study)
    a_all = study_analysis(rows, mixed_model, pair, ref)
    a_kept = a_all if len(kept) == len(rows) else study_analysis(kept, mixed_model, pair, ref)
    return {"primary": study.primary_analysis, "all": a_all, "excluded": a_kept,
            "excluded_raters": excl, "rows": rows, "rows_kept": kept,
            "n_answers": {"all": len(rows), "excluded": len(kept)}}


def primary_label(study: Study, which: str, role: bool = True) -> str:
    """Words for one of the two analyses (``role``: say whether it is the primary one)."""
    text = "without excluded raters" if which == "excluded" else "all raters"
    if not role:
        return text
    return text + (" (primary, pre-registered)" if which == study.primary_analysis else
                   " (sensitivity analysis)")


def tests_table(analysis: dict[str, Any], order=None) -> list[dict[str, Any]]:
    """Flat rows (test, scope, detail, p, sided, p_text) of the analysis for the tables
    (groups in ``order``, pooled last)."""
    rows = []

    def add(test: str, scope: str, detail: str, p: float | None, sided: str | None) -> None:
        rows.append({"test": test, "scope": scope, "detail": detail, "p": p, "sided": sided,
                     "p_text": format_p(p, sided)})

    mm = analysis.get("mixed_model") or {}
    for name, t in (mm.get("terms") or {}).items():
        add("mixed model (Wald)", name,
            f"β = {t['estimate']:.3f}, SE {t['sd']:.3f}, 95 % CI [{t['ci_low']:.3f}, "
            f"{t['ci_high']:.3f}]" if t.get("estimate") is not None else "",
            t.get("p_value"), "two-sided")
    for g in _ordered(analysis["groups"], order):
        for c, cell in analysis["groups"][g].items():
            if cell["n"]:
                add("binomial vs chance", f"{g} / {c}",
                    f"{cell['n_correct']}/{cell['n']}, chance {cell['chance']:.2f}",
                    cell["chance_p"], "one-sided")
    mcn = analysis["mcnemar"]
    if mcn and all(m["p_value"] is None for m in mcn.values()) and \
            len({m["note"] for m in mcn.values()}) == 1:
        add("exact McNemar", "every group", next(iter(mcn.values()))["note"] or "no pairs",
            None, None)
        mcn = {}
    for g, m in mcn.items():
        if m["p_value"] is None:
            add("exact McNemar", g, m["note"] or "no pairs", None, None)
        else:
            add("exact McNemar", g, f"b = {m['b']}, c = {m['c']}, pairs = {m['n_pairs']}",
                m["p_value"], "two-sided")
    for c, b in analysis["between_groups"].items():
        stat = "" if b.get("statistic") is None else f"statistic {b['statistic']:.3g}"
        add(b.get("test") or "between groups (n/a)", c,
            "; ".join(x for x in (stat, b.get("note") or "") if x), b.get("p_value"),
            "two-sided" if b.get("p_value") is not None else None)
    for c, k in analysis["fleiss_kappa"].items():
        add("Fleiss' kappa", c, "n/a" if k is None else f"κ = {k:.3f}", None, None)
    return rows


def _ordered(names, order=None) -> list[str]:
    """Group names in the study's order (others after, by name), pooled last."""
    order = list(order or [])
    names = [g for g in names if g != ALL_GROUPS]
    return ([g for g in order if g in names] + sorted(g for g in names if g not in order)
            + [ALL_GROUPS])


def accuracy_cells(analysis: dict[str, Any] | None, order=None) -> list[dict[str, Any]]:
    """Rows group × condition of the accuracy table (groups in ``order``, pooled last)."""
    if not analysis:
        return []
    out = []
    for g in _ordered(analysis["groups"], order):
        for c, cell in analysis["groups"][g].items():
            out.append({"group": g, "condition": c, **cell,
                        "p_text": format_p(cell["chance_p"], "one-sided")})
    return out


def difficulty(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per subject and condition: n answers, n correct, accuracy (hardest first)."""
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        cells[(r["subject_id"], r["condition"])].append(int(r["correct"]))
    out = [{"subject_id": s, "condition": c, "n": len(v), "n_correct": sum(v),
            "accuracy": sum(v) / len(v)} for (s, c), v in cells.items()]
    return sorted(out, key=lambda d: (d["accuracy"], d["subject_id"], d["condition"]))


def rt_table(rows: list[dict[str, Any]], order=None) -> list[dict[str, Any]]:
    """Response time summaries (seconds) per group × condition (browser times)."""
    data: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["response_time_ms"] != "":
            data[(r["rater_group"], r["condition"])].append(float(r["response_time_ms"]) / 1e3)
    rank = {g: n for n, g in enumerate(_ordered({g for g, _ in data}, order))}
    out = []
    for (g, c), v in sorted(data.items(), key=lambda kv: (rank[kv[0][0]], kv[0][1])):
        s = summarize_values(v)
        out.append({"group": g, "condition": c, **s})
    return out


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


def design_summary(study: Study) -> list[tuple[str, str]]:
    """(label, value) rows describing the frozen design, for the page and the PDF."""
    lay = set(study.lay_groups or [])
    groups = ", ".join(f"{g} (general public)" if g in lay else g for g in study.groups)
    design = ("between raters: each rater sees a subject in one condition only; conditions "
              "counterbalanced across the raters of each group by a Latin square"
              if study.design == "between" else
              "within raters (paired): each rater may see a subject in every condition; "
              "carry-over between conditions is possible")
    return [
        ("Design", design),
        ("Task", f"{study.n_choices}-alternative forced choice (chance {1 / study.n_choices:.0%})"),
        ("Conditions", ", ".join(study.conditions)),
        ("Views", ", ".join(study.views)),
        ("Screens per rater", f"{study.n_screens}: {study.n_practice} practice (with "
                              f"feedback), {study.trials_per_rater} scored, {study.n_catch} "
                              f"attention check{'' if study.n_catch == 1 else 's'} (catch)"),
        ("Rater groups", f"{groups}; the group comes from the invitation"),
        ("Confidence rating", "asked (1–5)" if study.ask_confidence else "not asked"),
        ("Time limit", f"{study.time_limit_s} s per screen" if study.time_limit_s else "none"),
        ("Seed", str(study.seed)),
        ("Practice subjects", practice_note(study)),
        ("Exclusion rule", exclusion_rule_text(study)),
        ("Primary analysis", "mixed-effects logistic model correct ~ condition * group + "
                             "(1 | rater) + (1 | subject), "
                             + primary_label(study, study.primary_analysis)),
        ("Frozen", f"{study.frozen_at:%Y-%m-%d %H:%M} UTC" if study.frozen_at else
         "not yet (freezes when the first rater starts)"),
        ("Status", f"closed {study.closed_at:%Y-%m-%d %H:%M} UTC" if study.closed_at
         else "open"),
        ("Pre-registration SHA-256", study.prereg_hash or "not frozen yet"),
    ]


# ---------------------------------------------------------------------------- figures


def _plain(fig_fn):
    """Run a figure builder with mathtext off: user text is drawn as typed."""
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fig_fn(*args, **kwargs)
    wrapper.__doc__ = fig_fn.__doc__
    wrapper.__name__ = fig_fn.__name__
    return wrapper


@_plain
def accuracy_figure(analysis: dict[str, Any] | None, title: str | None = None,
                    order=None) -> Figure:
    """Bar chart: accuracy by group × condition with Wilson 95 % CI error bars, chance line
    (legend below the axes, groups in ``order``)."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    if not analysis:
        ax.text(0.5, 0.5, "no answers yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    groups = _ordered(analysis["groups"], order)
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
    labels = ["all groups" if g == ALL_GROUPS else _short(g) for g in groups]
    ax.set_xticks(range(len(groups)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (Wilson 95 % CI)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=len(conds) + 1, frameon=False)
    fig.tight_layout()
    return fig


@_plain
def rt_figure(rows: list[dict[str, Any]], order=None) -> Figure:
    """Box plots of browser response times (s) per group × condition (groups in ``order``)."""
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.add_subplot()
    data: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["response_time_ms"] != "":
            data[(r["rater_group"], r["condition"])].append(float(r["response_time_ms"]) / 1e3)
    if not data:
        ax.text(0.5, 0.5, "no response times yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    rank = {g: n for n, g in enumerate(_ordered({g for g, _ in data}, order))}
    keys = sorted(data, key=lambda k: (rank[k[0]], k[1]))
    ax.boxplot([data[k] for k in keys], tick_labels=[f"{_short(g)}\n{c}" for g, c in keys])
    ax.set_ylabel("response time (s)")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


@_plain
def cmc_figure(cmc: list[float]) -> Figure:
    """CMC curve of the automated re-identification with the chance line."""
    fig = Figure(figsize=(4.6, 2.8), dpi=100)
    ax = fig.add_subplot()
    n = len(cmc)
    ranks = list(range(1, n + 1))
    ax.step(ranks, cmc, where="post", label="de-identified vs original")
    ax.plot(ranks, [r / n for r in ranks], "--", color="grey", label="chance")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """PNG encoding of a matplotlib figure (no metadata), mathtext off."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"text.parse_math": False}):
        fig.savefig(buf, format="png", metadata={"Software": None}, dpi=dpi)
    return buf.getvalue()


# ---------------------------------------------------------------------------- exports


def responses_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text, one row per answer, columns :data:`EXPORT_COLUMNS`; cells a spreadsheet
    would run as a formula are escaped (:func:`surveys.csvsafe.safe_cell`)."""
    return write_csv(rows, EXPORT_COLUMNS)


def data_dictionary_csv() -> str:
    """The data dictionary of the answer exports as CSV (column, type, meaning, units)."""
    return write_csv([{"column": c, "type": t, "meaning": m, "units": u}
                      for c, (t, m, u) in DATA_DICTIONARY.items()],
                     ("column", "type", "meaning", "units"))


def rater_table(study: Study) -> list[dict[str, Any]]:
    """One row per rater (not previews): code, group, questionnaire, funnel, exclusion."""
    excl = exclusions(study)
    out = []
    for r in Rater.objects.filter(study=study, is_preview=False).select_related("study") \
            .order_by("index"):
        ex = excl.get(r.code)
        out.append({
            "rater_id": r.code, "rater_group": r.group,
            "self_reported_profession": r.self_reported_profession,
            "group_mismatch": r.group_mismatch, "years_experience": r.years_experience,
            "step": r.step, "consented": r.consented_at is not None,
            "declined": r.declined_at is not None, "finished": r.finished is not None,
            "counterbalancing_slot": r.group_index, "reset_count": r.reset_count,
            "excluded": bool(ex), "excluded_by_rule": bool(ex and ex["rule"]),
            "excluded_by_researcher": bool(ex and ex["manual"]),
            "exclusion_reasons": ex["reasons"] if ex else [],
        })
    return out


def design_document(study: Study) -> dict[str, Any]:
    """The design sidecar (``design.json``): the pre-registered plan (parsed) and its hash,
    the current state (raters, exclusions, funnel) and the data dictionary."""
    plan = json.loads(study.prereg_json) if study.prereg_json else None
    return {
        "study": {"name": study.name, "id": study.pk},
        "preregistration": plan,
        "preregistration_sha256": study.prereg_hash or None,
        "how_to_verify": ("sha256 of json.dumps(preregistration, sort_keys=True, "
                          "separators=(',', ':'), ensure_ascii=False) encoded as UTF-8"),
        "frozen_at": study.frozen_at.isoformat() if study.frozen_at else None,
        "closed_at": study.closed_at.isoformat() if study.closed_at else None,
        "analysis_plan": plan["analysis"] if plan else analysis_plan(study),
        "exclusion_rule": exclusion_rule_text(study),
        "progress": progress(study),
        "raters": rater_table(study),
        "data_dictionary": [{"column": c, "type": t, "meaning": m, "units": u}
                            for c, (t, m, u) in DATA_DICTIONARY.items()],
        "generated_at": timezone.now().isoformat(),
    }


def dataset_zip(study: Study) -> bytes:
    """Analysis dataset: ``responses_long.csv`` (every answer, tidy: one row per answer,
    practice and catch marked), ``data_dictionary.csv``, ``design.json`` and a README."""
    rows = response_rows(study, kinds=("practice", "main", "catch"))
    readme = (
        "Blinded re-identification study: analysis dataset\n\n"
        "responses_long.csv  one row per answer (every trial kind; analyse trial_kind = main;\n"
        "                    the pre-registered exclusions are in rater_excluded)\n"
        "data_dictionary.csv column, type, meaning, units of responses_long.csv\n"
        "design.json         the pre-registered design and analysis plan, its SHA-256,\n"
        "                    raters, exclusions and the recruitment funnel\n\n"
        f"Pre-registration SHA-256: {study.prereg_hash or 'not frozen yet'}\n"
        "Cells starting with = + - @ are written with a leading apostrophe (spreadsheet "
        "formula protection).\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in (("responses_long.csv", responses_csv(rows)),
                           ("data_dictionary.csv", data_dictionary_csv()),
                           ("design.json", json.dumps(design_document(study), indent=2,
                                                      ensure_ascii=False, allow_nan=False)),
                           ("README.txt", readme)):
            info = zipfile.ZipInfo(f"study-{study.pk}/{name}",
                                   date_time=timezone.now().timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, text)
    return buf.getvalue()


def analysis_json(study: Study) -> str:
    """JSON text: both analyses of the main trials (which one is primary), the design
    (with the subjects reserved for practice, which the analysis excludes), the
    pre-registration hash, progress, attention checks and exclusions."""
    res = study_results(study)
    practice = practice_reservation(study)
    doc = {"study": {"name": study.name, "n_choices": study.n_choices, "design": study.design,
                     "conditions": study.conditions, "views": study.views, "seed": study.seed,
                     "trials_per_rater": study.trials_per_rater, "groups": study.groups,
                     "lay_groups": study.lay_groups,
                     "n_practice": study.n_practice, "n_catch": study.n_catch,
                     "practice_subjects": practice["pseudonyms"],
                     "practice_subjects_reserved": practice["reserved"],
                     "practice_excluded_from_analysis": True,
                     "exclusion_rule": exclusion_rule_text(study),
                     "closed_at": study.closed_at.isoformat() if study.closed_at else None},
           "preregistration_sha256": study.prereg_hash or None,
           "primary_analysis": study.primary_analysis,
           "progress": progress(study), "progress_total": funnel_totals(progress(study)),
           "attention": attention(study),
           "excluded_raters": list(res["excluded_raters"].values()),
           "analysis": res[study.primary_analysis],
           "analysis_all_raters": res["all"],
           "analysis_without_excluded": res["excluded"]}
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
