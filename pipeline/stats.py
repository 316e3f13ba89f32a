"""Statistics of the blinded human re-identification study.

Raters from one or more groups (e.g. ``"general"``, ``"plastic surgeon"``) do
k-alternative forced-choice trials: a target render and ``n_choices``
candidates, exactly one of which shows the same subject, so chance accuracy
is ``1 / n_choices``. Trials come in conditions (any string; the paper uses
``"control"`` = original vs original from another view, and
``"deidentified"`` = de-identified vs original). Jang et al. report 84 % → 55 %.

One response is a mapping with the columns

==================  =========================================================
``rater_id``        pseudonymous rater code (non-empty string)
``rater_group``     rater group (non-empty string; ``"all"`` is reserved)
``subject_id``      pseudonymous subject code (non-empty string)
``condition``       trial condition (non-empty string, reported verbatim)
``correct``         1/0, true/false (case-insensitive) or a bool
``n_choices``       number of candidates k, an integer ≥ 2
``response_time_ms`` optional, milliseconds ≥ 0 (blank = missing)
``confidence``      optional, a number from 1 to 5 (blank = missing)
==================  =========================================================

A rater belongs to exactly one group and answers a subject at most once per
condition (otherwise pairing and agreement are ambiguous and
:class:`ResponsesError` is raised). Identifiers never appear in the results or
in error messages (rows are named by number only).

Everything here is pure Python + numpy/scipy/statsmodels; no Django.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = [
    "ResponsesError",
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "ALL_GROUPS",
    "Z_95",
    "wilson_ci",
    "format_p",
    "chance_p_value",
    "exact_mcnemar",
    "between_groups_test",
    "fleiss_kappa_binary",
    "summarize_values",
    "fit_mixed_model",
    "validate_responses",
    "read_responses_csv",
    "analyze",
]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "rater_id", "rater_group", "subject_id", "condition", "correct", "n_choices",
)
#: Optional numeric columns and their allowed closed ranges.
OPTIONAL_COLUMNS: dict[str, tuple[float, float]] = {
    "response_time_ms": (0.0, math.inf),
    "confidence": (1.0, 5.0),
}
#: Key under which every group pooled together is reported.
ALL_GROUPS = "all"
#: Two-sided 95 % standard-normal quantile used for the model's intervals.
Z_95 = float(sps.norm.ppf(0.975))

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}
_MAX_LISTED_ERRORS = 5


class ResponsesError(ValueError):
    """Invalid or unusable response data (message names rows by number only)."""


# --------------------------------------------------------------------------
# Small tests and intervals
# --------------------------------------------------------------------------


def format_p(p: float | None, sided: str | None = None) -> str:
    """A p-value as printed in reports: ``< 0.0001`` below 10⁻⁴, 4 decimals below 0.001,
    else 3 decimals; ``—`` for None. ``sided`` ("one-sided" / "two-sided") is appended in
    parentheses when given."""
    if p is None or _isnan(p):
        text = "—"
    elif p < 1e-4:
        text = "< 0.0001"
    elif p < 1e-3:
        text = f"{p:.4f}"
    else:
        text = f"{p:.3f}"
    return f"{text} ({sided})" if sided and text != "—" else text


def wilson_ci(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    ``z`` is the two-sided standard-normal quantile; the default is the exact 95 % one,
    ``Φ⁻¹(0.975)`` = 1.959963985… (:data:`Z_95`), not the rounded 1.96. Returns
    ``(low, high)`` as proportions in [0, 1]; exactly 0 when ``k == 0`` and
    exactly 1 when ``k == n``. Raises ``ValueError`` unless ``0 <= k <= n`` and
    ``n >= 1``.
    """
    k, n = _as_count(k, "k"), _as_count(n, "n")
    if n < 1 or k > n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def chance_p_value(n_correct: int, n_choices: Sequence[int]) -> float:
    """One-sided exact p-value that accuracy exceeds chance: P(X ≥ n_correct).

    ``n_choices[t]`` is the number of candidates k of trial ``t``; under the
    null hypothesis trial ``t`` is correct with probability ``1 / k_t``
    independently, so X is Poisson-binomial (the exact binomial test
    ``binomtest(n_correct, n, 1/k, alternative="greater")`` when every trial has
    the same k). The distribution is computed exactly by convolving one
    binomial per distinct k.
    """
    n_correct = _as_count(n_correct, "n_correct")
    ks = Counter(_as_count(k, "n_choices") for k in n_choices)
    n = sum(ks.values())
    if n == 0:
        raise ValueError("chance_p_value needs at least one trial")
    if n_correct > n:
        raise ValueError(f"n_correct={n_correct} exceeds the number of trials {n}")
    if min(ks) < 2:
        raise ValueError("every trial needs n_choices >= 2")
    if n_correct == 0:
        return 1.0
    pmf = np.ones(1)
    for k, count in sorted(ks.items()):
        pmf = np.convolve(pmf, sps.binom.pmf(np.arange(count + 1), count, 1.0 / k))
    # Summing the small upper-tail terms keeps precision for tiny p-values.
    return float(min(1.0, pmf[n_correct:].sum()))


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant pair counts ``b`` and ``c``.

    ``b`` and ``c`` are the two off-diagonal cells of a paired 2×2 table; under
    the null hypothesis ``b ~ Binomial(b + c, 1/2)``. Returns
    ``min(1, 2 · P(Binomial(b + c, 1/2) ≤ min(b, c)))``; 1.0 when ``b = c = 0``.
    """
    b, c = _as_count(b, "b"), _as_count(c, "c")
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), n, 0.5)))


def between_groups_test(table: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Compare accuracy between rater groups: rows = groups, columns = (correct, incorrect).

    * 2 groups → Fisher's exact test (two-sided), ``statistic`` = odds ratio;
    * more groups → Pearson chi-square test of independence (no continuity
      correction), ``statistic`` = χ², ``dof`` given; a note warns when an
      expected count is below 5 (the p-value is then approximate);
    * when every answer is correct (or every answer is incorrect) the groups
      cannot differ: p = 1 (the only table with these margins).

    Returns ``{test, statistic, p_value, note}``; raises ``ValueError`` for
    fewer than 2 groups, negative counts or a group without answers.
    """
    arr = np.asarray(table, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError("table must have one (correct, incorrect) row per group")
    if arr.shape[0] < 2:
        raise ValueError("between_groups_test needs at least 2 groups")
    if (arr < 0).any() or (arr != np.round(arr)).any():
        raise ValueError("table must hold non-negative integer counts")
    if (arr.sum(axis=1) == 0).any():
        raise ValueError("every group in the table needs at least one answer")
    two = arr.shape[0] == 2
    test = "Fisher exact (two-sided)" if two else "chi-square test of independence"
    out: dict[str, Any] = {"test": test, "statistic": None, "p_value": None, "note": None}
    if (arr.sum(axis=0) == 0).any():
        out.update(p_value=1.0, note="every answer has the same outcome; the groups cannot differ")
        if not two:
            out["statistic"] = 0.0
        return out
    if two:
        res = sps.fisher_exact(arr.astype(int), alternative="two-sided")
        out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        return out
    res = sps.chi2_contingency(arr, correction=False)
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue), dof=int(res.dof))
    n_small = int((res.expected_freq < 5).sum())
    if n_small:
        out["note"] = f"{n_small} expected count(s) below 5: the chi-square p-value is approximate"
    return out


def fleiss_kappa_binary(ratings_per_item: Iterable[Sequence[bool]]) -> float | None:
    """Fleiss' kappa for two categories (here: rater correct / incorrect).

    ``ratings_per_item`` holds, for each item (a subject in one condition), the
    outcome of every rater who saw it. Items with fewer than 2 ratings cannot
    show agreement and are ignored. With the same number of ratings per item
    this is ``statsmodels.stats.inter_rater.fleiss_kappa``; otherwise the usual
    generalisation to unequal numbers of raters is used (per-item agreement
    ``P_i = Σ_j n_ij(n_ij − 1) / (n_i(n_i − 1))``, category proportions pooled
    over all ratings), which equals Fleiss' kappa in the balanced case.
    Returns ``None`` when no item has 2 ratings or when chance agreement is 1
    (every rating in the same category — kappa is undefined).
    """
    rows = []
    for item in ratings_per_item:
        vals = [bool(v) for v in item]
        if len(vals) >= 2:
            n_correct = sum(vals)
            rows.append((n_correct, len(vals) - n_correct))
    if not rows:
        return None
    table = np.asarray(rows, dtype=float)
    n_i = table.sum(axis=1)
    p_cat = table.sum(axis=0) / table.sum()
    p_expected = float((p_cat**2).sum())
    if p_expected >= 1.0 - 1e-12:
        return None
    if np.all(n_i == n_i[0]):
        from statsmodels.stats.inter_rater import fleiss_kappa

        return float(fleiss_kappa(table, method="fleiss"))
    p_i = (table * (table - 1)).sum(axis=1) / (n_i * (n_i - 1))
    return float((p_i.mean() - p_expected) / (1.0 - p_expected))


def summarize_values(values: Iterable[float | None]) -> dict[str, Any]:
    """``{n, mean, median, q1, q3, iqr}`` of the non-missing values (same unit as input).

    Quartiles use numpy's default linear interpolation. Statistics are
    ``None`` when there is no value.
    """
    arr = np.asarray([v for v in values if v is not None and not _isnan(v)], dtype=float)
    if arr.size == 0:
        return {"n": 0, "mean": None, "median": None, "q1": None, "q3": None, "iqr": None}
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "mean": float(arr.mean()), "median": float(med),
            "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1)}


# --------------------------------------------------------------------------
# Mixed-effects logistic model
# --------------------------------------------------------------------------

MIXED_MODEL_METHOD = (
    "statsmodels BinomialBayesMixedGLM.fit_vb (variational Bayes; priors N(0, 2²) on fixed "
    "effects and N(0, 1) on log random-effect SDs); estimate = posterior mean, sd = "
    "Laplace approximation of the joint fixed+random-effect posterior at the VB solution "
    "given the VB variance components; 95 % interval = estimate ± 1.96·sd; "
    "p-value = two-sided normal approximation of z = estimate / sd"
)


def fit_mixed_model(
    rows: Sequence[Mapping[str, Any]],
    reference_condition: str | None = None,
    reference_group: str | None = None,
) -> dict[str, Any]:
    """Fit ``correct ~ condition * group + (1 | rater) + (1 | subject)`` (logit link).

    ``rows`` are validated responses (see :func:`validate_responses`). Factors
    are *simple*-coded: the column of a non-reference level ℓ is
    ``1[level = ℓ] − 1/L`` (L levels), so with balanced data

    * ``(Intercept)`` is the mean log-odds over all condition × group cells;
    * ``condition[ℓ vs ref]`` is the log-odds ratio of condition ℓ vs the
      reference condition, averaged over groups;
    * ``group[g vs ref]`` is the log-odds ratio of group g vs the reference
      group, averaged over conditions;
    * ``condition[…]:group[…]`` is the difference between the groups'
      condition effects (difference of log-odds ratios).

    Random intercepts for rater and subject (each only when it has ≥ 2
    levels). The fit is statsmodels' ``BinomialBayesMixedGLM.fit_vb``. Its
    mean-field posterior SDs ignore the correlation between fixed and random
    effects and grossly under-state the uncertainty of between-rater terms
    (group effects), so ``sd`` comes from the Laplace approximation at the VB
    solution (``vb_sd`` is reported too). The weak N(0, 2²) prior keeps
    estimates finite under perfect separation (e.g. 100 % accuracy in a cell).

    When the full model cannot be fitted (one group or one condition, empty
    cells, a numerical failure) reduced formulas are tried (without the
    interaction, then condition only); ``formula`` names the one fitted and
    ``fallbacks`` lists the ones abandoned with the reason. When nothing can
    be fitted the result is ``{method, formula, error, fallbacks}``; this
    function never raises for data problems.
    """
    out: dict[str, Any] = {"method": MIXED_MODEL_METHOD, "formula": None, "fallbacks": []}
    if not rows:
        out["error"] = "no responses"
        return out
    y = np.array([1.0 if r["correct"] else 0.0 for r in rows])
    conditions = sorted({r["condition"] for r in rows})
    groups = sorted({r["rater_group"] for r in rows})
    ref_c = reference_condition if reference_condition in conditions else conditions[0]
    ref_g = reference_group if reference_group in groups else groups[0]
    c_levels = [ref_c] + [c for c in conditions if c != ref_c]
    g_levels = [ref_g] + [g for g in groups if g != ref_g]
    out["reference"] = {"condition": ref_c, "group": ref_g}
    out["coding"] = "simple (level indicator − 1/L); see pipeline.stats.fit_mixed_model"
    if y.min() == y.max():
        out["formula"] = _formula(len(c_levels) > 1, len(g_levels) > 1, True, rows)
        out["error"] = ("every answer is " + ("correct" if y[0] else "incorrect")
                        + ": a logistic model cannot be fitted")
        return out

    cond_cols = _simple_coded([r["condition"] for r in rows], c_levels, "condition")
    group_cols = _simple_coded([r["rater_group"] for r in rows], g_levels, "group")
    inter_cols = [(f"{nc}:{ng}", xc * xg) for nc, xc in cond_cols for ng, xg in group_cols]

    z_blocks, vcp_names = _random_effect_blocks(rows)
    if not z_blocks:
        out["formula"] = _formula(bool(cond_cols), bool(group_cols), bool(inter_cols), rows)
        out["error"] = "needs at least 2 raters or 2 subjects for a mixed model"
        return out

    candidates = []
    if cond_cols and group_cols:
        candidates.append((True, True, True))
        candidates.append((True, True, False))
    if cond_cols:
        candidates.append((True, False, False))
    if group_cols and not cond_cols:
        candidates.append((False, True, False))
    if not candidates:
        candidates.append((False, False, False))

    for use_c, use_g, use_i in candidates:
        formula = _formula(use_c, use_g, use_i, rows)
        cols = [("(Intercept)", np.ones(len(rows)))]
        cols += cond_cols if use_c else []
        cols += group_cols if use_g else []
        cols += inter_cols if use_i else []
        names = [n for n, _ in cols]
        x = np.column_stack([c for _, c in cols])
        if np.linalg.matrix_rank(x) < x.shape[1]:
            out["fallbacks"].append({"formula": formula, "error": "design is rank-deficient "
                                     "(some condition × group cells are empty)"})
            continue
        try:
            fitted = _fit_vb(y, x, names, z_blocks, vcp_names)
        except Exception as exc:  # noqa: BLE001 - any numerical failure → next formula
            out["fallbacks"].append({"formula": formula, "error": _one_line(exc)})
            continue
        out.update(formula=formula, **fitted)
        return out
    out["formula"] = out["fallbacks"][-1]["formula"] if out["fallbacks"] else None
    out["error"] = "no formula could be fitted"
    return out


def _formula(use_c: bool, use_g: bool, use_i: bool, rows: Sequence[Mapping[str, Any]]) -> str:
    fixed = ("condition * group" if use_i else
             " + ".join([t for t, u in (("condition", use_c), ("group", use_g)) if u]) or "1")
    rand = ""
    if len({r["rater_id"] for r in rows}) >= 2:
        rand += " + (1 | rater)"
    if len({r["subject_id"] for r in rows}) >= 2:
        rand += " + (1 | subject)"
    return f"correct ~ {fixed}{rand}"


def _simple_coded(values: Sequence[str], levels: Sequence[str], factor: str) -> list:
    vals = np.asarray(values, dtype=object)
    n_levels = len(levels)
    return [(f"{factor}[{lv} vs {levels[0]}]", (vals == lv).astype(float) - 1.0 / n_levels)
            for lv in levels[1:]]


def _random_effect_blocks(rows: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], list[str]]:
    blocks, names = [], []
    for key, name in (("rater_id", "rater"), ("subject_id", "subject")):
        codes: dict[str, int] = {}
        idx = np.array([codes.setdefault(r[key], len(codes)) for r in rows])
        if len(codes) >= 2:
            blocks.append(idx)
            names.append(name)
    return blocks, names


def _one_blas_thread():
    """Context limiting BLAS to one thread: the fit's small matrix products are up to 10×
    slower when several threads fight over a busy machine's cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in requirements.txt
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fit_vb(y: np.ndarray, x: np.ndarray, names: list[str], z_blocks: list[np.ndarray],
            vcp_names: list[str]) -> dict[str, Any]:
    import scipy.sparse as sparse
    from scipy.special import expit
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    n = len(y)
    mats, ident = [], []
    for j, idx in enumerate(z_blocks):
        q = int(idx.max()) + 1
        mats.append(sparse.csr_matrix((np.ones(n), (np.arange(n), idx)), shape=(n, q)))
        ident.append(np.full(q, j))
    z = sparse.hstack(mats).tocsr()
    ident_arr = np.concatenate(ident)
    fe_p = 2.0
    model = BinomialBayesMixedGLM(y, x, z, ident_arr, vcp_p=1.0, fe_p=fe_p, fep_names=names,
                                  vcp_names=vcp_names)
    with warnings.catch_warnings(record=True) as caught, _one_blas_thread():
        warnings.simplefilter("always")
        res = model.fit_vb(rng=0)  # fixed start: identical results on every run
    vb_mean = np.asarray(res.fe_mean, dtype=float)
    vb_sd = np.asarray(res.fe_sd, dtype=float)
    vcp = np.asarray(res.vcp_mean, dtype=float)
    vc = np.asarray(res.vc_mean, dtype=float)
    if not (np.isfinite(vb_mean).all() and np.isfinite(vb_sd).all() and np.isfinite(vcp).all()):
        raise FloatingPointError("the variational fit returned non-finite values")

    # Laplace approximation of p(fixed, random | y, variance components) at the VB means.
    design = sparse.hstack([sparse.csr_matrix(x), z]).tocsr()
    mu = expit(design @ np.concatenate([vb_mean, vc]))
    weights = mu * (1.0 - mu)
    hessian = (design.T @ sparse.diags(weights) @ design).toarray()
    prior_precision = np.concatenate([np.full(x.shape[1], fe_p**-2), np.exp(-2.0 * vcp)[ident_arr]])
    hessian[np.diag_indices_from(hessian)] += prior_precision
    cov = np.linalg.inv(hessian)[: x.shape[1], : x.shape[1]]
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    if not np.isfinite(sd).all() or (sd <= 0).any():
        raise FloatingPointError("the Laplace covariance is not positive definite")

    terms = {}
    for name, m, s, s_vb in zip(names, vb_mean, sd, vb_sd):
        terms[name] = {
            "estimate": float(m), "sd": float(s), "vb_sd": float(s_vb),
            "ci_low": float(m - Z_95 * s), "ci_high": float(m + Z_95 * s),
            "p_value": float(2.0 * sps.norm.sf(abs(m / s))),
        }
    messages = sorted({_one_line(w.message) for w in caught
                       if not issubclass(w.category, DeprecationWarning)})
    return {
        "terms": terms,
        "random_effects_sd": {nm: float(np.exp(v)) for nm, v in zip(vcp_names, vcp)},
        "n": int(n),
        "converged": bool(getattr(res.optim_retvals, "success", True)),
        "warnings": messages,
    }


# --------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------


def validate_responses(
    rows: Iterable[Mapping[str, Any]], *, first_row_number: int = 1, row_label: str = "row"
) -> list[dict[str, Any]]:
    """Check and normalise responses; return one typed dict per response.

    Output dicts have ``rater_id, rater_group, subject_id, condition`` (stripped
    ``str``), ``correct`` (``bool``), ``n_choices`` (``int``) and, when the column
    exists in the input, ``response_time_ms`` / ``confidence`` (``float`` or
    ``None`` when blank). Extra columns are dropped. Errors name rows as
    ``f"{row_label} {first_row_number + index}"`` and never quote identifiers;
    up to five problems are listed in one :class:`ResponsesError`.
    """
    rows = list(rows)
    if not rows:
        raise ResponsesError("no responses: the input has no data rows")
    present = set().union(*(r.keys() for r in rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise ResponsesError("missing column(s): " + ", ".join(missing)
                             + "; required: " + ", ".join(REQUIRED_COLUMNS))
    optional = [c for c in OPTIONAL_COLUMNS if c in present]
    errors: list[str] = []
    out: list[dict[str, Any]] = []
    first_seen: dict[tuple[str, str, str], int] = {}
    rater_group: dict[str, str] = {}
    for index, row in enumerate(rows):
        where = f"{row_label} {first_row_number + index}"
        rec: dict[str, Any] = {}
        for col in ("rater_id", "rater_group", "subject_id", "condition"):
            value = row.get(col)
            text = "" if value is None or _isnan(value) else str(value).strip()
            if not text:
                errors.append(f"{where}: {col} is empty")
            rec[col] = text
        rec["correct"] = _parse_correct(row.get("correct"), where, errors)
        rec["n_choices"] = _parse_n_choices(row.get("n_choices"), where, errors)
        for col in optional:
            rec[col] = _parse_optional(row.get(col), col, where, errors)
        if rec["rater_group"] == ALL_GROUPS:
            errors.append(f"{where}: the group name '{ALL_GROUPS}' is reserved for the pooled "
                          "results")
        if rec["rater_id"] and rec["rater_group"]:
            group = rater_group.setdefault(rec["rater_id"], rec["rater_group"])
            if group != rec["rater_group"]:
                errors.append(f"{where}: a rater appears in two groups "
                              f"({_quote(group)} and {_quote(rec['rater_group'])})")
        key = (rec["rater_id"], rec["subject_id"], rec["condition"])
        if all(key):
            if key in first_seen:
                errors.append(f"{where}: repeats the answer of {row_label} "
                              f"{first_row_number + first_seen[key]} (same rater, subject and "
                              "condition)")
            else:
                first_seen[key] = index
        out.append(rec)
    if errors:
        more = len(errors) - _MAX_LISTED_ERRORS
        msg = "; ".join(errors[:_MAX_LISTED_ERRORS])
        if more > 0:
            msg += f"; and {more} more problem(s)"
        raise ResponsesError(f"invalid responses: {msg}")
    return out


def read_responses_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a responses CSV (UTF-8, optional BOM, header row first).

    Returns the rows of :func:`validate_responses` (errors name file lines, the
    header being line 1). Raises :class:`ResponsesError` for an unreadable or
    empty file, missing columns or bad values.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            if not header:
                raise ResponsesError("the responses file is empty (no header row)")
            header = [h.strip() if h else "" for h in header]
            reader.fieldnames = header
            dup = sorted({h for h in header if h and header.count(h) > 1})
            if dup:
                raise ResponsesError("duplicate column(s) in the header: " + ", ".join(dup))
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ResponsesError("missing column(s): " + ", ".join(missing)
                                     + "; required: " + ", ".join(REQUIRED_COLUMNS))
            rows = []
            for row in reader:
                if None in row:
                    raise ResponsesError(f"line {reader.line_num}: more fields than header columns")
                if all((v or "").strip() == "" for v in row.values()):
                    raise ResponsesError(f"line {reader.line_num}: blank row")
                rows.append(row)
    except FileNotFoundError:
        raise ResponsesError("the responses file does not exist") from None
    except UnicodeDecodeError:
        raise ResponsesError("the responses file is not UTF-8 text") from None
    except csv.Error as exc:
        raise ResponsesError(f"the responses file is not valid CSV ({_one_line(exc)})") from None
    except OSError as exc:
        reason = exc.strerror or "I/O error"
        raise ResponsesError(f"cannot read the responses file ({reason})") from None
    if not rows:
        raise ResponsesError("no responses: the file has a header but no data rows")
    return validate_responses(rows, first_row_number=2, row_label="line")


def _parse_correct(value: Any, where: str, errors: list[str]) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not _isnan(value):
        if value in (0, 1):
            return bool(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    errors.append(f"{where}: correct must be 0, 1, true or false, got {_show(value)}")
    return False


def _parse_n_choices(value: Any, where: str, errors: list[str]) -> int:
    number = _to_float(value)
    if number is None or not number.is_integer() or number < 2:
        errors.append(f"{where}: n_choices must be an integer >= 2, got {_show(value)}")
        return 2
    return int(number)


def _parse_optional(value: Any, col: str, where: str, errors: list[str]) -> float | None:
    if value is None or _isnan(value) or (isinstance(value, str) and not value.strip()):
        return None
    low, high = OPTIONAL_COLUMNS[col]
    number = _to_float(value)
    if number is None or not math.isfinite(number) or not low <= number <= high:
        rng = f">= {low:g}" if math.isinf(high) else f"from {low:g} to {high:g}"
        errors.append(f"{where}: {col} must be a number {rng} or blank, got {_show(value)}")
        return None
    return number


def _to_float(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _isnan(value: Any) -> bool:
    """True for float NaN and for pandas' missing-value markers (pd.NA, pd.NaT)."""
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return type(value).__name__ in {"NAType", "NaTType"}


def _show(value: Any) -> str:
    text = repr(value.strip() if isinstance(value, str) else value)
    return text if len(text) <= 24 else text[:21] + "..."


def _quote(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _one_line(obj: Any) -> str:
    text = " ".join(str(obj).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer() or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------


def analyze(
    responses: Sequence[Mapping[str, Any]] | Any,
    *,
    paired_conditions: tuple[str, str] | None = None,
    reference_group: str | None = None,
    mixed_model: bool = True,
) -> dict[str, Any]:
    """Analyse a blinded re-identification study; return a JSON-serialisable dict.

    ``responses`` is a sequence of mappings or a pandas DataFrame with the
    columns of the module docstring (validated with :func:`validate_responses`).
    NaN/infinite numbers are reported as ``None``. Keys:

    ``groups``
        group name and ``"all"`` → condition → ``{n, n_correct, accuracy,
        ci_low, ci_high, chance, chance_p, n_raters}``: accuracy with its Wilson
        95 % interval (proportions), ``chance`` = mean of 1/k over the trials,
        ``chance_p`` = exact one-sided p that accuracy exceeds chance
        (Poisson-binomial when k varies, see :func:`chance_p_value`). Every
        condition appears for every group; an empty cell has ``n = 0`` and
        ``None`` figures.
    ``mcnemar``
        group and ``"all"`` → ``{b, c, n_pairs, p_value, note}`` on (rater,
        subject) pairs answered in both paired conditions (A, B):
        ``b`` = correct in A only, ``c`` = correct in B only; exact two-sided
        p (:func:`exact_mcnemar`); ``p_value`` is ``None`` (with a note) when
        there is no pair.
    ``between_groups``
        condition → ``{test, statistic, p_value, note, groups}``
        (:func:`between_groups_test` over groups with answers in that
        condition; ``test`` is ``None`` with fewer than 2 groups).
    ``mixed_model``
        see :func:`fit_mixed_model`: ``{method, formula, reference, coding,
        terms: {name: {estimate, sd, vb_sd, ci_low, ci_high, p_value}},
        random_effects_sd, n, converged, warnings, fallbacks}`` or ``{method,
        formula, error, fallbacks}``; ``None`` when ``mixed_model=False``.
    ``fleiss_kappa``
        condition → Fleiss' kappa (or ``None``) of the raters' outcome
        categories *correct* / *incorrect*, items = subjects shown in that
        condition (:func:`fleiss_kappa_binary`); ``fleiss_kappa_detail`` gives
        ``{n_items, ratings_per_item_min, ratings_per_item_max}`` of the
        items used.
    ``response_time_ms``, ``confidence``
        group and ``"all"`` → condition → :func:`summarize_values`, or ``None``
        when the column is absent.
    ``meta``
        ``{n_responses, n_raters, n_subjects, groups, raters_per_group,
        conditions, n_choices, paired_conditions, notes}``.

    ``paired_conditions`` = (A, B) for McNemar and the model's reference
    condition A, any two condition names; by default ``("control",
    "deidentified")`` when both are present, else the two conditions when there
    are exactly two (``"control"`` first if it is one of them, otherwise in order
    of first appearance in ``responses``), else no pairing (with a note). ``reference_group`` is the
    model's reference group (default: first group name in sorted order).
    """
    rows = validate_responses(_records(responses))
    groups = sorted({r["rater_group"] for r in rows})
    conditions = sorted({r["condition"] for r in rows})
    notes: list[str] = []
    pair = _choose_pair(list(dict.fromkeys(r["condition"] for r in rows)), paired_conditions,
                        notes)

    by_group: dict[str, list[dict[str, Any]]] = {g: [] for g in groups}
    for r in rows:
        by_group[r["rater_group"]].append(r)
    by_group[ALL_GROUPS] = rows

    result: dict[str, Any] = {
        "groups": {g: {c: _accuracy_cell([r for r in rs if r["condition"] == c])
                       for c in conditions} for g, rs in by_group.items()},
        "mcnemar": {g: _mcnemar_cell(rs, pair) for g, rs in by_group.items()},
        "between_groups": {c: _between_cell(rows, groups, c) for c in conditions},
        "mixed_model": (fit_mixed_model(rows, pair[0] if pair else _default_reference(conditions),
                                        reference_group) if mixed_model else None),
    }
    kappa, detail = {}, {}
    for c in conditions:
        items: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            if r["condition"] == c:
                items[r["subject_id"]].append(r["correct"])
        used = [len(v) for v in items.values() if len(v) >= 2]
        kappa[c] = fleiss_kappa_binary(items.values())
        detail[c] = {"n_items": len(used), "ratings_per_item_min": min(used, default=None),
                     "ratings_per_item_max": max(used, default=None)}
    result["fleiss_kappa"] = kappa
    result["fleiss_kappa_detail"] = detail
    for col in OPTIONAL_COLUMNS:
        if col in rows[0]:
            result[col] = {g: {c: summarize_values(r[col] for r in rs if r["condition"] == c)
                               for c in conditions} for g, rs in by_group.items()}
        else:
            result[col] = None
    raters_per_group = {g: len({r["rater_id"] for r in by_group[g]}) for g in groups}
    result["meta"] = {
        "n_responses": len(rows),
        "n_raters": len({r["rater_id"] for r in rows}),
        "n_subjects": len({r["subject_id"] for r in rows}),
        "groups": groups,
        "raters_per_group": raters_per_group,
        "conditions": conditions,
        "n_choices": sorted({r["n_choices"] for r in rows}),
        "paired_conditions": list(pair) if pair else None,
        "notes": notes,
    }
    return _jsonable(result)


def _records(responses: Any) -> list[Mapping[str, Any]]:
    if hasattr(responses, "to_dict") and hasattr(responses, "columns"):
        return responses.to_dict(orient="records")
    if isinstance(responses, (str, bytes, Mapping)):
        raise ResponsesError("responses must be a sequence of rows or a DataFrame")
    return list(responses)


def _choose_pair(conditions: list[str], requested: tuple[str, str] | None,
                 notes: list[str]) -> tuple[str, str] | None:
    if requested is not None:
        a, b = requested
        absent = [c for c in (a, b) if c not in conditions]
        if a == b or absent:
            raise ResponsesError("paired_conditions must name two different conditions present in "
                                 "the data; absent: " + (", ".join(map(_quote, absent)) or "none"))
        return a, b
    if "control" in conditions and "deidentified" in conditions:
        return "control", "deidentified"
    if len(conditions) == 2:
        # any two names: "control" first when present, else in order of first appearance
        if conditions[1] == "control":
            return conditions[1], conditions[0]
        return conditions[0], conditions[1]
    notes.append(f"no condition pair for McNemar: {len(conditions)} conditions; name the two to "
                 "compare (paired_conditions / --pair A B)")
    return None


def _default_reference(conditions: list[str]) -> str:
    return "control" if "control" in conditions else conditions[0]


def _accuracy_cell(cell: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(cell)
    if n == 0:
        return {"n": 0, "n_correct": 0, "accuracy": None, "ci_low": None, "ci_high": None,
                "chance": None, "chance_p": None, "n_raters": 0}
    k = sum(r["correct"] for r in cell)
    low, high = wilson_ci(k, n)
    ks = [r["n_choices"] for r in cell]
    return {"n": n, "n_correct": k, "accuracy": k / n, "ci_low": low, "ci_high": high,
            "chance": float(np.mean([1.0 / v for v in ks])), "chance_p": chance_p_value(k, ks),
            "n_raters": len({r["rater_id"] for r in cell})}


def _mcnemar_cell(rows: list[dict[str, Any]], pair: tuple[str, str] | None) -> dict[str, Any]:
    if pair is None:
        return {"b": 0, "c": 0, "n_pairs": 0, "p_value": None,
                "note": "no pair of conditions to compare"}
    a_name, b_name = pair
    first = {(r["rater_id"], r["subject_id"]): r["correct"]
             for r in rows if r["condition"] == a_name}
    second = {(r["rater_id"], r["subject_id"]): r["correct"]
              for r in rows if r["condition"] == b_name}
    keys = first.keys() & second.keys()
    b = sum(1 for key in keys if first[key] and not second[key])
    c = sum(1 for key in keys if second[key] and not first[key])
    if not keys:
        return {"b": 0, "c": 0, "n_pairs": 0, "p_value": None,
                "note": f"no rater answered the same subject in both {_quote(a_name)} and "
                        f"{_quote(b_name)}"}
    return {"b": b, "c": c, "n_pairs": len(keys), "p_value": exact_mcnemar(b, c),
            "note": f"b = correct in {_quote(a_name)} only, c = correct in {_quote(b_name)} only"}


def _between_cell(rows: list[dict[str, Any]], groups: list[str], condition: str) -> dict[str, Any]:
    counts = {g: [0, 0] for g in groups}
    for r in rows:
        if r["condition"] == condition:
            counts[r["rater_group"]][0 if r["correct"] else 1] += 1
    present = [g for g in groups if sum(counts[g]) > 0]
    if len(present) < 2:
        return {"test": None, "statistic": None, "p_value": None, "groups": present,
                "note": "fewer than 2 groups answered in this condition"}
    out = between_groups_test([counts[g] for g in present])
    out["groups"] = present
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
