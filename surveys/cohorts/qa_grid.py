"""The cohort at a glance: one QA card per subject, figures flagged when they look wrong.

Each card shows the subject's primary series (the one renders and embeddings use): a
thumbnail of its QA picture (removed voxels in red), removed volume, change inside the
facial skeleton, change outside the body, bone Dice, warnings and the de-identification
status, and the nose check: how much of the soft tissue outside the skeleton around the
nose (the detector's nose boxes, else the anatomy's nose region) was removed. The cohort
page sorts the cards by any figure (``static/surveys/cohort.js``).

A figure is **flagged** when it breaks what a correct de-identification guarantees
(:data:`LIMITS`: bone unchanged, nothing inside the skeleton or outside the body
changed) or is an outlier of the cohort: further than :data:`OUTLIER_Z` robust standard
deviations (1.4826 × median absolute deviation) from the cohort median, computed over
at least :data:`MIN_FOR_OUTLIERS` subjects — e.g. a subject with far less tissue removed
than the others (a face left behind) or far more (too much removed).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from ..models import Cohort

#: Absolute limits: (figure, comparison, value, why).
LIMITS = [
    ("bone_dice", "<", 0.999, "bone changed (Dice at 300 HU below 0.999)"),
    ("inside_pct", ">", 1.0, "more than 1 % of the soft tissue inside the facial skeleton changed"),
    ("outside_ml", ">", 1.0, "more than 1 mL outside the body changed"),
    ("nose_check_pct", "<", 90.0, "the nose may be left: less than 90 % of the soft tissue "
     "outside the skeleton around the nose removed"),
]
OUTLIER_Z = 3.0
MIN_FOR_OUTLIERS = 5
#: Figures a card shows and the grid sorts by: key, label, unit, decimals.
FIGURES = [
    ("removed_ml", "Removed", "mL", 1),
    ("nose_ml", "Nose removed", "mL", 1),
    ("nose_check_pct", "Nose check: removed", "%", 0),
    ("inside_pct", "Inside skeleton changed", "%", 2),
    ("outside_ml", "Outside body changed", "mL", 1),
    ("bone_dice", "Bone Dice", "", 4),
    ("n_warnings", "Warnings", "", 0),
]


@dataclass
class Card:
    """QA of one subject (primary series) for the grid."""

    subject_id: int
    pseudonym: str
    status: str  # de-identification stage status
    figures: dict[str, float | None]
    warnings: list[str]
    face_found: bool | None
    no_face_reason: str
    n_series: int
    qa_image_id: int | None
    flags: dict[str, str] = field(default_factory=dict)  # figure → why

    @property
    def flagged(self) -> bool:
        return bool(self.flags) or bool(self.warnings) or self.face_found is False \
            or self.status == "failed"

    @property
    def signature(self) -> str:
        key = repr((self.status, sorted(self.figures.items()), self.warnings, self.face_found,
                    self.qa_image_id, sorted(self.flags.items())))
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def rows(self) -> list[dict[str, object]]:
        """(label, formatted value, flag reason) for the template."""
        out = []
        for key, label, unit, dec in FIGURES:
            v = self.figures.get(key)
            text = "–" if v is None else (f"{v:.{dec}f}" + (f" {unit}" if unit else ""))
            out.append({"key": key, "label": label, "text": text, "flag": self.flags.get(key, "")})
        return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def flag_outliers(cards: list[Card]) -> None:
    """Fill ``card.flags`` (absolute limits, then cohort outliers)."""
    for c in cards:
        for key, op, limit, why in LIMITS:
            v = c.figures.get(key)
            if v is not None and ((op == "<" and v < limit) or (op == ">" and v > limit)):
                c.flags[key] = why
    for key in ("removed_ml", "nose_ml", "inside_pct", "outside_ml"):
        vals = [c.figures[key] for c in cards if c.figures.get(key) is not None]
        if len(vals) < MIN_FOR_OUTLIERS:
            continue
        med = _median(vals)
        mad = _median([abs(v - med) for v in vals]) * 1.4826
        if mad <= 0 or not math.isfinite(mad):
            continue
        for c in cards:
            v = c.figures.get(key)
            if v is None or key in c.flags:
                continue
            z = (v - med) / mad
            if abs(z) > OUTLIER_Z:
                c.flags[key] = (f"{'far above' if z > 0 else 'far below'} the cohort "
                                f"(median {med:.2f}, robust z {z:+.1f})")


def cards(cohort: Cohort) -> list[Card]:
    """One :class:`Card` per subject of ``cohort``, flagged, in pseudonym order."""
    out = []
    subjects = cohort.subjects.prefetch_related("stages", "series", "images")
    for subject in subjects:
        series = sorted(subject.series.all(), key=lambda s: (-s.n_slices, s.label))
        s = series[0] if series else None
        run = next((r for r in subject.stages.all() if r.stage == "deidentify"), None)
        qa_img = next((i for i in subject.images.all() if i.kind == "qa"), None)
        figures = {
            "removed_ml": None if s is None else s.removed_ml,
            "nose_ml": None if s is None or not s.qa else s.removed_by_region.get("nose"),
            "nose_check_pct": None if s is None else s.nose_check_removed_pct,
            "inside_pct": None if s is None else s.inside_changed_pct,
            "outside_ml": None if s is None else s.outside_body_ml,
            "bone_dice": None if s is None else s.bone_dice,
            "n_warnings": None if s is None or not s.qa else float(len(s.warnings or [])),
        }
        out.append(Card(subject_id=subject.pk, pseudonym=subject.pseudonym,
                        status=run.status if run else "", figures=figures,
                        warnings=list((s.warnings or []) if s else []),
                        face_found=None if s is None else s.face_found,
                        no_face_reason="" if s is None else s.no_face_reason,
                        n_series=len(series), qa_image_id=qa_img.pk if qa_img else None))
    flag_outliers(out)
    return out
