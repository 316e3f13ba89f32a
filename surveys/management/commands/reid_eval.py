"""``python manage.py reid_eval ORIGINAL_DIR DEIDENTIFIED_DIR OUT`` — face re-identification risk.

For every subject pair (original CT, de-identified CT): bone alignment to the
canonical head frame (computed once from the original and applied to both),
skin surfaces, standardised renders at ``--views`` (yaw degrees; the first is
the gallery view), dlib face embeddings, then closed-set identification:

* gallery  = original render at the first view (one per subject);
* control  = original render at the second view (probe that only differs by
  view; with a single view it equals the gallery and the control is trivial);
* test     = de-identified render at the same (second) view.

Pairs: sub-folders with the same name in both folders (``OUTPUT/<pseudonym>``
as written by ``deidentify``), or ``--pairs FILE.csv`` with columns
``original,deidentified`` (folder paths relative to the two roots). Each side
must hold one CT series (or series in equally named sub-folders).

Writes ``OUT/renders/<label>/{original,deidentified}_yaw±NNN.png``,
``OUT/metrics.json``, ``OUT/embeddings.npz`` and CMC / ROC / similarity plots
(PNG + SVG). Subjects are named by their de-identified folder path only;
original folder names and paths are never printed or written.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

SAFE_ERRORS = ("SeriesError", "AlignmentError", "SurfaceError", "RenderError", "RenderTimeout",
               "EmbedError", "ReidError")


@dataclass(frozen=True)
class Pair:
    """One subject: the original and de-identified series folders (absolute) and a safe label."""

    label: str
    original: Path
    deidentified: Path


def _label_for(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.strip("/")) or "subject"


def _parse_views(text: str) -> list[float]:
    try:
        views = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise CommandError("--views must be comma-separated yaw angles in degrees, e.g. 0,30,-30") from None
    if not views:
        raise CommandError("--views needs at least one angle")
    if any(abs(v) >= 90 for v in views):
        raise CommandError("--views angles must lie strictly between -90 and 90 degrees")
    if len(set(views)) != len(views):
        raise CommandError("--views angles must be distinct")
    return views


def _pairs_from_csv(path: Path, orig_root: Path, deid_root: Path) -> list[Pair]:
    if not path.is_file():
        raise CommandError("--pairs file does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"original", "deidentified"} <= set(reader.fieldnames):
            raise CommandError("--pairs CSV needs the columns original,deidentified")
        rows = list(reader)
    pairs = []
    for n, row in enumerate(rows, start=2):
        o, d = (row.get("original") or "").strip(), (row.get("deidentified") or "").strip()
        if not o or not d:
            raise CommandError(f"--pairs line {n}: empty folder")
        po, pd = (orig_root / o).resolve(), (deid_root / d).resolve()
        if not po.is_relative_to(orig_root.resolve()) or not pd.is_relative_to(deid_root.resolve()):
            raise CommandError(f"--pairs line {n}: folders must lie inside the two root folders")
        if not po.is_dir():
            raise CommandError(f"--pairs line {n}: the original folder does not exist")
        if not pd.is_dir():
            raise CommandError(f"--pairs line {n}: de-identified folder {d!r} does not exist")
        pairs.append(Pair(_label_for(d), po, pd))
    labels = [p.label for p in pairs]
    if len(set(labels)) != len(labels):
        raise CommandError("--pairs lists a de-identified folder more than once")
    return pairs


def _pairs_by_name(orig_root: Path, deid_root: Path) -> list[Pair]:
    names = sorted(p.name for p in deid_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    pairs = [Pair(_label_for(n), orig_root / n, deid_root / n) for n in names
             if (orig_root / n).is_dir()]
    if not pairs:
        raise CommandError("no sub-folder name is shared by ORIGINAL_DIR and DEIDENTIFIED_DIR; "
                           "give the pairing with --pairs FILE.csv (columns original,deidentified)")
    return pairs


def _one_series(folder: Path, root: Path, side: str, label: str) -> Any:
    """The single CT series below ``folder`` (scan_folder); CommandError-safe messages."""
    from pipeline.dicom_io import scan_folder

    ct = [s for s in scan_folder(folder).series if s.modality == "CT"]
    if len(ct) == 1:
        return ct[0]
    raise ValueError(f"{label}: the {side} folder holds {len(ct)} CT series (need exactly one)")


def _expand(pairs: list[Pair]) -> list[Pair]:
    """Split subject folders with several series into per-series pairs (same sub-folder names)."""
    out: list[Pair] = []
    for p in pairs:
        subs_d = sorted(x.name for x in p.deidentified.iterdir() if x.is_dir())
        files_d = [x for x in p.deidentified.iterdir() if x.is_file()]
        if len(subs_d) > 1 and not files_d and all((p.original / s).is_dir() for s in subs_d):
            out.extend(Pair(f"{p.label}_{_label_for(s)}", p.original / s, p.deidentified / s)
                       for s in subs_d)
        else:
            out.append(p)
    return out


def process_pair(pair: Pair, views: list[float], out_dir: Path, backend: str) -> dict[str, Any]:
    """Load, align, render and embed one pair (runs in a worker process). Never raises."""
    try:
        from pipeline import render as R  # first: sets the OpenGL platform
        from pipeline.dicom_io import load_series
        from pipeline.embed import get_embedder

        ref_o = _one_series(pair.original, pair.original, "original", pair.label)
        ref_d = _one_series(pair.deidentified, pair.deidentified, "de-identified", pair.label)
        vol_o = load_series(ref_o).volume
        vol_d = load_series(ref_d).volume
        settings = R.RenderSettings()
        res = R.render_subject(vol_o, vol_d, yaw_degs=views, settings=settings, backend=backend)
        emb = get_embedder()
        out: dict[str, Any] = {"label": pair.label, "ok": True, "timings_s": res.timings_s,
                               "shared_alignment": res.shared_alignment,
                               "backend": res.original[0].backend}
        subj_dir = out_dir / "renders" / pair.label
        for cond, rr in (("original", res.original), ("deidentified", res.deidentified)):
            vecs, det = [], []
            for v in rr:
                R.save_png(v.image, subj_dir / f"{cond}_yaw{round(v.yaw_deg):+04d}.png")
                e = emb.embed(v.image, R.canonical_face_box(v.yaw_deg, settings))
                vecs.append(e.vector)
                det.append(e.detected)
            out[f"{cond}_vectors"] = np.array(vecs)
            out[f"{cond}_detected"] = det
        return out
    except Exception as exc:  # noqa: BLE001 — reported per subject, without identifiers
        name = type(exc).__name__
        msg = str(exc) if name in SAFE_ERRORS or isinstance(exc, ValueError) else ""
        return {"label": pair.label, "ok": False, "error": f"{name}: {msg}" if msg else name}


class Command(BaseCommand):
    help = ("Render original and de-identified CT faces, embed them (dlib) and measure "
            "re-identification (rank-1/5, CMC, AUC with bootstrap CIs) into OUT.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("original", type=Path, help="folder of original CT series")
        parser.add_argument("deidentified", type=Path, help="folder written by `deidentify`")
        parser.add_argument("out", type=Path, help="output folder (created if missing)")
        parser.add_argument("--pairs", type=Path, default=None,
                            help="CSV with columns original,deidentified (relative folder paths)")
        parser.add_argument("--views", default="0,30,-30",
                            help="yaw angles in degrees; the first is the gallery view "
                                 "(default 0,30,-30)")
        parser.add_argument("--workers", type=int, default=1, help="subjects processed in parallel")
        parser.add_argument("--backend", choices=("auto", "pyrender", "raycast"), default="auto",
                            help="renderer (default auto: OpenGL/OSMesa, else embree ray casting)")
        parser.add_argument("--bootstrap", type=int, default=2000,
                            help="bootstrap resamples for the 95%% CIs (default 2000)")
        parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    def handle(self, *args: Any, **opts: Any) -> None:
        orig_root: Path = opts["original"]
        deid_root: Path = opts["deidentified"]
        out_dir: Path = opts["out"]
        if not orig_root.is_dir():
            raise CommandError("ORIGINAL_DIR is not a folder")
        if not deid_root.is_dir():
            raise CommandError("DEIDENTIFIED_DIR is not a folder")
        if opts["workers"] < 1:
            raise CommandError("--workers must be at least 1")
        if opts["bootstrap"] < 0:
            raise CommandError("--bootstrap must be 0 or more")
        views = _parse_views(opts["views"])
        pairs = (_pairs_from_csv(opts["pairs"], orig_root, deid_root) if opts["pairs"]
                 else _expand(_pairs_by_name(orig_root, deid_root)))
        if len(pairs) < 2:
            raise CommandError("re-identification needs at least two subjects")
        out_dir.mkdir(parents=True, exist_ok=True)

        show = sys.stderr.isatty() and opts["verbosity"] > 0
        bar = tqdm(total=len(pairs), unit="subject", disable=not show, file=sys.stderr)
        results: list[dict[str, Any]] = []
        if opts["workers"] == 1:
            for p in pairs:
                results.append(process_pair(p, views, out_dir, opts["backend"]))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=opts["workers"], mp_context=ctx) as pool:
                futs = [pool.submit(process_pair, p, views, out_dir, opts["backend"]) for p in pairs]
                for f in futs:
                    results.append(f.result())
                    bar.update(1)
        bar.close()

        ok = [r for r in results if r["ok"]]
        failed = [r for r in results if not r["ok"]]
        for r in failed:
            self.stderr.write(f"{r['label']}: failed ({r['error']})")
        if len(ok) < 2:
            raise CommandError(f"only {len(ok)} subject(s) could be processed; need at least two")
        metrics = self._metrics(ok, failed, views, opts["bootstrap"], opts["seed"], out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.stdout.write(
            f"{metrics['n_subjects']} subjects: rank-1 control {metrics['rank1_control']:.0%}, "
            f"de-identified {metrics['rank1_deidentified']:.0%}; AUC control "
            f"{metrics['auc_control']:.3f}, de-identified {metrics['auc_deidentified']:.3f}; "
            f"face found {metrics['face_detected_fraction']:.0%}; metrics: {out_dir / 'metrics.json'}")
        if failed:
            raise CommandError(f"{len(failed)} of {len(results)} subject(s) failed")

    @staticmethod
    def _metrics(ok: list[dict[str, Any]], failed: list[dict[str, Any]], views: list[float],
                 n_boot: int, seed: int, out_dir: Path) -> dict[str, Any]:
        from pipeline.reid import (
            evaluate_condition,
            plot_cmc,
            plot_roc,
            plot_similarity_distributions,
            summarise,
        )

        ids = [r["label"] for r in ok]
        probe_view = 1 if len(views) > 1 else 0
        gallery = np.array([r["original_vectors"][0] for r in ok])
        control = np.array([r["original_vectors"][probe_view] for r in ok])
        deid = np.array([r["deidentified_vectors"][probe_view] for r in ok])
        kw = {"n_bootstrap": n_boot, "seed": seed}
        conds = {"control": evaluate_condition(control, gallery, ids, ids, **kw),
                 "deidentified": evaluate_condition(deid, gallery, ids, ids, **kw)}
        per_view = {}
        for vi, yaw in enumerate(views):
            m = evaluate_condition(np.array([r["deidentified_vectors"][vi] for r in ok]),
                                   gallery, ids, ids, n_bootstrap=0)
            per_view[f"{yaw:g}"] = {"rank1_deidentified": m.rank1, "rank5_deidentified": m.rank5,
                                    "auc_deidentified": m.auc}
        plot_cmc(conds, out_dir / "cmc")
        plot_roc(conds, out_dir / "roc")
        plot_similarity_distributions(conds, out_dir / "similarity")
        np.savez(out_dir / "embeddings.npz", labels=np.array(ids), views_deg=np.array(views),
                 original=np.array([r["original_vectors"] for r in ok]),
                 deidentified=np.array([r["deidentified_vectors"] for r in ok]))
        det_o = np.array([r["original_detected"] for r in ok])
        det_d = np.array([r["deidentified_detected"] for r in ok])
        return {
            "n_subjects": len(ok),
            "face_detected_fraction": float(det_o[:, 0].mean()),
            "face_detected_fraction_by_view": {f"{y:g}": float(det_o[:, i].mean())
                                               for i, y in enumerate(views)},
            "face_detected_fraction_deidentified_by_view": {f"{y:g}": float(det_d[:, i].mean())
                                                            for i, y in enumerate(views)},
            "gallery_view_deg": views[0],
            "probe_view_deg": views[probe_view],
            "control_is_trivial": probe_view == 0,
            "views_deg": views,
            "render_backend": sorted({r["backend"] for r in ok}),
            "bootstrap_resamples": n_boot,
            "bootstrap_seed": seed,
            **summarise(conds),
            "per_view_deidentified": per_view,
            "subjects": ids,
            "failures": [{"label": r["label"], "error": r["error"]} for r in failed],
        }
