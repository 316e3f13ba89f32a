"""``python manage.py deidentify INPUT OUTPUT`` — header and face de-identification.

Exit status 0 when every series was written; 1 with one line per failure
otherwise. Messages name input series by index, never by path or identity;
``--mapping FILE`` (outside OUTPUT) is the only place that links pseudonyms to
identities and input locations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from pipeline.deface import FACE_SHELL_NOTE
from pipeline.deidentify import (
    DATE_MODES,
    METHODS,
    DeidentifyError,
    DeidOptions,
    SeriesOutcome,
    deidentify_folder,
)


class Command(BaseCommand):
    help = "De-identify every CT series below INPUT (headers + face) into OUTPUT/<pseudonym>/<series>."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("input", type=Path, help="folder with one or many CT series at any depth")
        parser.add_argument("output", type=Path, help="output folder (created if missing)")
        parser.add_argument("--method", choices=METHODS, default="auto",
                            help="face-region method (default auto; 'none' = header only)")
        parser.add_argument("--weights", type=Path, default=None,
                            help="detector weights (.onnx or .pt) for --method model/auto")
        parser.add_argument("--class-map", type=Path, default=None,
                            help="JSON mapping the weights' class names to ours (face, eyes, nose, "
                                 "lips, ears; null to ignore a class)")
        parser.add_argument("--dates", choices=DATE_MODES, default="shift",
                            help="shift dates by a per-patient offset (keeps intervals) or remove them")
        parser.add_argument("--mapping", type=Path, default=None,
                            help="write pseudonym → identity links here (must be outside OUTPUT)")
        parser.add_argument("--workers", type=int, default=1, help="series processed in parallel")
        parser.add_argument("--prefix", default="SUBJ", help="pseudonym prefix (default SUBJ)")
        parser.add_argument("--registry", type=Path, default=None,
                            help="pseudonym registry (default: in the project's state folder)")
        parser.add_argument("--no-qa-pictures", action="store_true",
                            help="do not write OUTPUT/qa-pictures/ (they show the original faces)")

    def handle(self, *args, **opts) -> None:
        registry = opts["registry"] or Path(settings.VAR_DIR) / "pseudonym-registry.json"
        if settings.PROJECT_SECRET == settings.DEV_PROJECT_SECRET:
            self.stderr.write(
                "warning: DEIDSTUDY_PROJECT_SECRET is not set; the published development value "
                "is used, with which anybody can link the output UIDs to the original ones and "
                "undo the date shift. Set a private secret for real data (see the README).")
        try:
            options = DeidOptions(
                project_secret=settings.PROJECT_SECRET, method=opts["method"],
                weights=opts["weights"], class_map=opts["class_map"], dates=opts["dates"],
                workers=opts["workers"],
                pseudonym_prefix=opts["prefix"], qa_pictures=not opts["no_qa_pictures"],
            )
            show = sys.stderr.isatty() and opts["verbosity"] > 0

            def progress(it, total):
                return tqdm(it, total=total, unit="series", disable=not show, file=sys.stderr)

            summary = deidentify_folder(
                opts["input"], opts["output"], options, mapping_path=opts["mapping"],
                registry_path=registry, progress=progress,
            )
        except DeidentifyError as exc:
            raise CommandError(str(exc)) from None

        written = [s for s in summary.series if s.status == "written"]
        out = self.stdout
        for s in written:
            line, review = series_lines(s)
            out.write(line)
            if review:
                self.stderr.write(review)
        reasons: dict[str, int] = {}
        for f in summary.skipped_files:
            reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
        for reason, n in sorted(reasons.items()):
            self.stderr.write(f"skipped {n} file(s): {reason}"
                              + ("" if opts["mapping"] else " (their locations go to --mapping FILE)"))
        for s in summary.failures:
            self.stderr.write(f"input series #{s.index} ({s.n_files} files) failed: {s.error}")
        out.write(f"{len(written)} of {len(summary.series)} series written; summary: {summary.summary_path}")
        if any(s.qa_picture for s in written):
            out.write("QA pictures (they show the original faces: keep them with the mapping "
                      f"file, not with the data): {summary.summary_path.parent / 'qa-pictures'}")
        if not summary.series:
            raise CommandError("no CT series found in the input folder")
        if not summary.ok:
            n_bad = len(summary.failures)
            raise CommandError(f"{n_bad} series failed" if n_bad else "DICOM files were unreadable")


def series_lines(s: SeriesOutcome) -> tuple[str, str | None]:
    """The summary line of one written series and, when the nose check says the nose may be
    left or a mask, splint or cast was found on the face, a line asking for review (for
    stderr); output folders are pseudonymous, figures carry no identifier."""
    if s.face_found is False:
        reason = s.qa.get("no_face_reason", "")
        return (f"{s.output}: {s.slices} slices, method {s.method}: no face found ({reason}); "
                "pixels unchanged, header de-identified"), None
    dice = "n/a" if s.bone_dice is None else f"{s.bone_dice:.4f}"
    removed = "n/a" if s.removed_ml is None else f"{s.removed_ml:.1f} mL"
    inside = s.qa.get("inside_soft_changed_pct")
    extra = "" if inside is None else (
        f", inside the skeleton {inside:.2f} % changed, outside the body "
        f"{s.qa.get('outside_body_changed_ml', 0):.1f} mL")
    check = s.qa.get("nose_check") or {}
    if check.get("removed_pct") is not None:
        extra += f", nose check {check['removed_pct']:.0f} % removed"
    line = (f"{s.output}: {s.slices} slices, method {s.method}, removed {removed}, "
            f"bone Dice {dice}{extra}" + (f", {len(s.warnings)} warning(s)" if s.warnings else ""))
    reasons = []
    if check.get("nose_may_be_left"):
        why = next((w for w in s.warnings if "the nose may be left" in w), "")
        reasons.append(f"the nose may be left — {why}")
    reasons += [w for w in s.warnings if w.startswith(FACE_SHELL_NOTE)]
    review = f"REVIEW {s.output}: " + " | ".join(reasons) if reasons else None
    return line, review
