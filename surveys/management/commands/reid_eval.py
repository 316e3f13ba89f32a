"""``manage.py reid_eval ORIGINAL_DIR DEIDENTIFIED_DIR OUT`` — automated re-identification risk.

For every subject (original CT, de-identified CT) the chain of
:func:`pipeline.reid_features.subject_features` computes the features of

* the gallery   — a simulated second acquisition of the original (small seeded
  head motion, new sampling grid), rendered at the gallery view (default 0°);
* the control   — the original, rendered at the probe view (default 30°);
* the test      — the de-identified scan, rendered at the probe view,

* with ``--attack tissue-depth|learned|all`` — a face rebuilt on the skull of the
  de-identified scan alone (:mod:`pipeline.reconstruct`), rendered at the probe view
  like the test (conditions ``attack_tissue_depth``, ``attack_learned``),

and :func:`pipeline.reid.evaluate_study` measures closed-set identification
(rank-1, rank-5, CMC, ROC AUC with bootstrap 95 % CIs, chance level) for each
matcher — ``appearance`` (dlib face descriptor of the renders) and
``surface`` (depth maps of the same renders) — and for their fusion.

Pairs: ``--mapping FILE`` (the file ``deidentify --mapping`` wrote: each
written series' input folder and pseudonym folder), ``--pairs FILE.csv``
(columns ``original,deidentified``, folder paths relative to the two roots),
or sub-folders with the same name in both roots.

Writes ``OUT/metrics.json``, ``OUT/features.npz``, CMC / ROC / score plots
(PNG + SVG) per matcher and ``OUT/renders/<label>/`` (one PNG per condition at
the first elevation and light, and a sheet of every view). Subjects are named
by their de-identified folder only; original folder names, paths and
identities from the mapping file are never printed or written.
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

from pipeline.dicom_io import load_series, scan_folder
from pipeline.reid import (
    FUSED,
    evaluate_similarity,
    evaluate_study,
    plot_cmc,
    plot_roc,
    plot_similarity_distributions,
)

SAFE_ERRORS = ("SeriesError", "AlignmentError", "SurfaceError", "RenderError", "RenderTimeout",
               "EmbedError", "ReidError", "ShapeError", "ReconstructionError")
#: ``--attack`` choices → attack names of :data:`pipeline.reconstruct.ATTACKS`.
ATTACK_CHOICES = {"none": (), "tissue-depth": ("tissue_depth",), "learned": ("learned",),
                  "all": ("tissue_depth", "learned")}


@dataclass(frozen=True)
class Pair:
    """One subject: the original and de-identified series folders (absolute) and a safe label.

    ``n_files`` (from a mapping file) picks the original series when its
    folder holds several.
    """

    label: str
    original: Path
    deidentified: Path
    n_files: int | None = None


def _label_for(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.strip("/")) or "subject"


def _parse_views(text: str) -> tuple[float, float]:
    try:
        views = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise CommandError("--views must be GALLERY,PROBE yaw angles in degrees, e.g. 0,30"
                           ) from None
    if len(views) not in (1, 2):
        raise CommandError("--views takes the gallery and the probe yaw, e.g. 0,30")
    if any(abs(v) >= 90 for v in views):
        raise CommandError("--views angles must lie strictly between -90 and 90 degrees")
    return views[0], views[-1]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


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
        po, pd = orig_root / o, deid_root / d
        if not _inside(po, orig_root) or not _inside(pd, deid_root):
            raise CommandError(f"--pairs line {n}: folders must lie inside the two root folders")
        if not po.is_dir():
            raise CommandError(f"--pairs line {n}: the original folder does not exist")
        if not pd.is_dir():
            raise CommandError(f"--pairs line {n}: de-identified folder {d!r} does not exist")
        pairs.append(Pair(_label_for(d), po.resolve(), pd.resolve()))
    labels = [p.label for p in pairs]
    if len(set(labels)) != len(labels):
        raise CommandError("--pairs lists a de-identified folder more than once")
    return pairs


def _pairs_from_mapping(path: Path, orig_root: Path, deid_root: Path) -> list[Pair]:
    """Pairs from ``deidentify --mapping``: ``input_folder`` (below ORIGINAL) → ``output``.

    Messages name entries by their position and pseudonym folder only (the
    file holds identities and original folder names).
    """
    if not path.is_file():
        raise CommandError("--mapping file does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        rows = doc["series"]
        if not isinstance(rows, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CommandError("--mapping is not a mapping file written by `deidentify --mapping`"
                           ) from None
    pairs = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise CommandError(f"--mapping entry {n} is not an object")
        out, inp = row.get("output"), row.get("input_folder")
        if not out:  # a series that failed or was not written: nothing to compare
            continue
        if not isinstance(out, str) or not isinstance(inp, str):
            raise CommandError(f"--mapping entry {n}: missing input folder or output")
        po, pd = orig_root / inp, deid_root / out
        if not _inside(po, orig_root) or not _inside(pd, deid_root):
            raise CommandError(f"--mapping entry {n} ({out}): folders must lie inside the two "
                               "root folders (give the INPUT and OUTPUT folders of `deidentify`)")
        if not po.is_dir():
            raise CommandError(f"--mapping entry {n} ({out}): the original folder does not exist "
                               "below ORIGINAL_DIR (give the INPUT folder of `deidentify`)")
        if not pd.is_dir():
            raise CommandError(f"--mapping entry {n}: de-identified folder {out!r} does not exist")
        n_files = row.get("n_files")
        pairs.append(Pair(_label_for(out), po.resolve(), pd.resolve(),
                          int(n_files) if isinstance(n_files, int) else None))
    if not pairs:
        raise CommandError("--mapping lists no written series")
    labels = [p.label for p in pairs]
    if len(set(labels)) != len(labels):
        raise CommandError("--mapping lists an output folder more than once")
    return pairs


def _pairs_by_name(orig_root: Path, deid_root: Path) -> list[Pair]:
    names = sorted(p.name for p in deid_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    pairs = [Pair(_label_for(n), orig_root / n, deid_root / n) for n in names
             if (orig_root / n).is_dir()]
    if not pairs:
        raise CommandError("no sub-folder name is shared by ORIGINAL_DIR and DEIDENTIFIED_DIR; "
                           "give the pairing with --mapping FILE (written by `deidentify "
                           "--mapping`) or --pairs FILE.csv (columns original,deidentified)")
    return pairs


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


def _positions(ref: Any) -> list[tuple[float, ...]]:
    import pydicom

    pos = []
    for f in ref.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pos.append(tuple(round(float(v), 2) for v in ds.ImagePositionPatient))
    return sorted(pos)


def _original_series(pair: Pair, deid_ref: Any) -> Any:
    """The original CT series of ``pair``: the only one in its folder, else the one with the
    de-identified series' number of files and slice positions (kept by `deidentify`)."""
    ct = [s for s in scan_folder(pair.original).series if s.modality == "CT"]
    if len(ct) > 1:
        n = pair.n_files or deid_ref.n_files
        ct = [s for s in ct if s.n_files == n]
    if len(ct) > 1:
        want = _positions(deid_ref)
        ct = [s for s in ct if _positions(s) == want]
    if len(ct) == 1:
        return ct[0]
    raise ValueError(f"{pair.label}: the original folder holds {len(ct)} matching CT series "
                     "(need exactly one)")


def _deid_series(pair: Pair) -> Any:
    ct = [s for s in scan_folder(pair.deidentified).series if s.modality == "CT"]
    if len(ct) == 1:
        return ct[0]
    raise ValueError(f"{pair.label}: the de-identified folder holds {len(ct)} CT series "
                     "(need exactly one)")


def process_pair(pair: Pair, protocol: Any, out_dir: Path, backend: str,
                 rescan_salt: int = 0, attacks: tuple[str, ...] = (),
                 model_path: Path | None = None) -> dict[str, Any]:
    """Load, align, render and embed one pair (runs in a worker process). Never raises."""
    try:
        # loaded on first use: pulls in trimesh
        from pipeline import render as R  # first: sets the OpenGL platform
        from pipeline.reid_features import subject_features
        from pipeline.rescan import volume_seed

        ref_d = _deid_series(pair)
        ref_o = _original_series(pair, ref_d)
        vol_o = load_series(ref_o).volume
        vol_d = load_series(ref_d).volume
        f = subject_features(vol_o, vol_d, label=pair.label,
                             seed=volume_seed(vol_o, rescan_salt), protocol=protocol,
                             backend=backend, keep_renders=True, attacks=attacks,
                             attack_model=_learned_model(model_path, attacks))
        subj_dir = out_dir / "renders" / pair.label
        rows = []
        for cond, rs in f.renders.items():
            R.save_png(rs[0].image, subj_dir / f"{cond}.png")
            rows.append(np.concatenate([r.image for r in rs], axis=1))
        R.save_png(np.concatenate(rows, axis=0), subj_dir / "all_views.png")
        f.renders = {}
        return {"label": pair.label, "ok": True, "features": f,
                "backend": backend if backend != "auto" else
                ("pyrender" if R.opengl_available() else "raycast")}
    except Exception as exc:  # noqa: BLE001 — reported per subject, without identifiers
        name = type(exc).__name__
        msg = str(exc) if name in SAFE_ERRORS or isinstance(exc, ValueError) else ""
        return {"label": pair.label, "ok": False, "error": f"{name}: {msg}" if msg else name}


def _learned_model(path: Path | None, attacks: tuple[str, ...]) -> Any:
    if path is None or "learned" not in attacks:
        return None  # the shipped model
    # loaded on first use: pulls in scipy
    from pipeline.skull_to_face import load_model

    return load_model(path)


def format_study(study: dict[str, Any]) -> str:
    """Plain-text table of an :func:`pipeline.reid.evaluate_study` dict (one line per matcher)."""
    lines = []
    n = study["n_subjects"]
    ch = study["chance"]
    lines.append(f"{n} subjects; chance: rank-1 {ch['rank1']:.2f}, rank-5 {ch['rank5']:.2f}, "
                 f"AUC {ch['auc']:.2f}")
    if study["small_cohort"]:
        lines.append(f"WARNING: fewer than {study['min_subjects']} subjects — the rates and their "
                     "confidence intervals say little.")

    def fmt(m: dict[str, Any], key: str) -> str:
        ci = m.get(f"{key}_ci95")
        return f"{m[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    for name, entry in study["matchers"].items():
        for cond in study["conditions"]:
            m = entry[cond]
            lines.append(f"  {name:<10s} {cond:<13s} rank-1 {fmt(m, 'rank1'):<20s} "
                         f"rank-5 {fmt(m, 'rank5'):<20s} AUC {fmt(m, 'auc')}")
    return "\n".join(lines)


class Command(BaseCommand):
    help = ("Render original and de-identified CT faces and measure automated re-identification "
            "(appearance and surface matchers and their fusion; rank-1/5, CMC, AUC with "
            "bootstrap CIs) into OUT.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("original", type=Path, help="folder of original CT series "
                            "(the INPUT folder of `deidentify`)")
        parser.add_argument("deidentified", type=Path, help="folder written by `deidentify`")
        parser.add_argument("out", type=Path, help="output folder (created if missing)")
        how = parser.add_mutually_exclusive_group()
        how.add_argument("--mapping", type=Path, default=None,
                         help="mapping file written by `deidentify --mapping` (pairs the series)")
        how.add_argument("--pairs", type=Path, default=None,
                         help="CSV with columns original,deidentified (relative folder paths)")
        parser.add_argument("--views", default="0,30",
                            help="gallery and probe yaw in degrees (default 0,30)")
        parser.add_argument("--no-rescan", action="store_true",
                            help="gallery = the original itself instead of a simulated second "
                                 "acquisition (the control then compares a surface with itself)")
        parser.add_argument("--rescan-seed", type=int, default=0,
                            help="varies the simulated second acquisitions (default 0; the "
                                 "same scan and seed always give the same gallery)")
        parser.add_argument("--workers", type=int, default=1, help="subjects processed in parallel")
        parser.add_argument("--backend", choices=("auto", "pyrender", "raycast"), default="auto",
                            help="renderer (default auto: OpenGL/OSMesa, else embree ray casting)")
        parser.add_argument("--bootstrap", type=int, default=2000,
                            help="bootstrap resamples for the 95%% CIs (default 2000)")
        parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        parser.add_argument("--attack", choices=tuple(ATTACK_CHOICES), default="none",
                            help="also rebuild a face on each de-identified skull and match it "
                                 "(tissue-depth landmarks, the learned skull-to-face model, or "
                                 "all); default none")
        parser.add_argument("--learned-model", type=Path, default=None,
                            help="skull-to-face model of the learned attack (default: the shipped "
                                 "pipeline/models/skull_to_face.npz)")

    def handle(self, *args: Any, **opts: Any) -> None:
        # loaded on first use: pulls in trimesh
        from pipeline.reid_features import ReidProtocol

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
        gallery_yaw, probe_yaw = _parse_views(opts["views"])
        if opts["mapping"]:
            pairs = _pairs_from_mapping(opts["mapping"], orig_root, deid_root)
        elif opts["pairs"]:
            pairs = _pairs_from_csv(opts["pairs"], orig_root, deid_root)
        else:
            pairs = _expand(_pairs_by_name(orig_root, deid_root))
        if len(pairs) < 2:
            raise CommandError("re-identification needs at least two subjects")
        protocol = ReidProtocol(gallery_yaw_deg=gallery_yaw, probe_yaw_deg=probe_yaw,
                                rescan=not opts["no_rescan"])
        out_dir.mkdir(parents=True, exist_ok=True)

        show = sys.stderr.isatty() and opts["verbosity"] > 0
        bar = tqdm(total=len(pairs), unit="subject", disable=not show, file=sys.stderr)
        results: list[dict[str, Any]] = []
        attacks = ATTACK_CHOICES[opts["attack"]]
        model_path = opts["learned_model"].resolve() if opts["learned_model"] else None
        held_out: dict[str, Any] | None = None
        if "learned" in attacks:
            # loaded on first use: pulls in scipy
            from pipeline.reconstruct import ReconstructionError
            from pipeline.skull_to_face import check_held_out, load_model

            try:
                model = load_model(model_path)
                seeds = synthetic_seeds(orig_root)
                held_out = (check_held_out(model, seeds) if seeds is not None else {
                    "synthetic": False, "disjoint": True,
                    "note": "no phi.json of synth_cohort beside the originals: not synthetic "
                            "heads; the model was trained on synthetic heads only"})
            except ReconstructionError as exc:
                raise CommandError(str(exc)) from None
        if opts["workers"] == 1:
            for p in pairs:
                results.append(process_pair(p, protocol, out_dir, opts["backend"],
                                            opts["rescan_seed"], attacks, model_path))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=opts["workers"], mp_context=ctx) as pool:
                futs = [pool.submit(process_pair, p, protocol, out_dir, opts["backend"],
                                    opts["rescan_seed"], attacks, model_path) for p in pairs]
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
        metrics = self._metrics(ok, failed, protocol, opts["bootstrap"], opts["seed"], out_dir,
                                opts["rescan_seed"], attacks, model_path, held_out)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.stdout.write(format_study(metrics["study"]))
        self.stdout.write(f"metrics: {out_dir / 'metrics.json'}")
        if failed:
            raise CommandError(f"{len(failed)} of {len(results)} subject(s) failed")

    @staticmethod
    def _metrics(ok: list[dict[str, Any]], failed: list[dict[str, Any]], protocol: Any,
                 n_boot: int, seed: int, out_dir: Path, rescan_salt: int = 0,
                 attacks: tuple[str, ...] = (), model_path: Path | None = None,
                 held_out: dict[str, Any] | None = None) -> dict[str, Any]:
        # loaded on first use: pulls in trimesh
        from pipeline.reid_features import MATCHERS, study_similarities

        ids = [r["label"] for r in ok]
        feats = [r["features"] for r in ok]
        sims = study_similarities(feats)
        study = evaluate_study(sims, ids, labels=MATCHERS, n_bootstrap=n_boot, seed=seed)
        plot_cmc(study, out_dir / "cmc")
        for name in study["matchers"]:
            plot_cmc(study, out_dir / f"cmc_{name}", matcher=name)
        for name, conds in sims.items():
            mets = {c: evaluate_similarity(s, ids, ids, n_bootstrap=0) for c, s in conds.items()}
            plot_roc(mets, out_dir / f"roc_{name}")
            plot_similarity_distributions(
                mets, out_dir / f"scores_{name}",
                xlabel="cosine similarity (centred)" if name == "appearance"
                else "−(median depth difference, mm)")
        conds = list(feats[0].embeddings)
        np.savez_compressed(
            out_dir / "features.npz", labels=np.array(ids), conditions=np.array(conds),
            embeddings=np.array([[f.embeddings[c] for c in conds] for f in feats]),
            depth_maps=np.array([[f.depth_maps[c] for c in conds] for f in feats]),
            detected=np.array([[f.detected[c] for c in conds] for f in feats]))
        primary = study["matchers"][study["primary"]]
        flat: dict[str, Any] = {}
        for cond in study["conditions"]:
            for key in ("rank1", "rank5", "auc"):
                flat[f"{key}_{cond}"] = primary[cond][key]
                flat[f"{key}_{cond}_ci95"] = primary[cond].get(f"{key}_ci95")
        return {
            "n_subjects": len(ok),
            "primary_matcher": study["primary"] if study["primary"] != FUSED else FUSED,
            **flat,
            "face_detected_fraction": {c: float(np.mean([f.detected[c].mean() for f in feats]))
                                       for c in conds},
            "protocol": _jsonable(protocol.as_dict()),
            "rescan_seed": rescan_salt,
            "render_backend": sorted({r["backend"] for r in ok}),
            "timings_s_mean": {k: float(np.mean([f.timings_s.get(k, 0.0) for f in feats]))
                               for k in feats[0].timings_s},
            "attacks": _attack_summary(attacks, feats, model_path, held_out),
            "study": study,
            "failures": [{"label": r["label"], "error": r["error"]} for r in failed],
        }


def synthetic_seeds(orig_root: Path) -> list[int] | None:
    """Seeds of the subjects of a ``manage.py synth_cohort`` cohort whose DICOM folder is
    ``orig_root`` (its ``phi.json`` beside or inside it), or None for other data."""
    for phi in (orig_root / "phi.json", orig_root.parent / "phi.json"):
        if phi.is_file():
            try:
                return [int(s["seed"]) for s in json.loads(phi.read_text())["subjects"]]
            except (ValueError, KeyError, TypeError):
                raise CommandError(f"{phi.name} beside the originals is not synth_cohort's") from None
    return None


def _attack_summary(attacks: tuple[str, ...], feats: list[Any], model_path: Path | None = None,
                    held_out: dict[str, Any] | None = None) -> dict[str, Any]:
    """What each reconstruction attack is, its model card (learned) and what it found."""
    # loaded on first use: pulls in scipy
    from pipeline.reconstruct import ATTACKS, LANDMARK_NAMES

    out: dict[str, Any] = {}
    for name in attacks:
        entry: dict[str, Any] = {"condition": f"attack_{name}", "description": ATTACKS[name],
                                 "voxels_added_mean": float(np.mean(
                                     [f.attacks[name]["voxels_added"] for f in feats]))}
        if name == "tissue_depth":
            found = [len(f.attacks[name]["landmarks_found"]) for f in feats]
            entry["landmarks_found_mean"] = float(np.mean(found))
            entry["landmarks_searched"] = len(LANDMARK_NAMES)
        if name == "learned":
            # loaded on first use: pulls in scipy
            from pipeline.skull_to_face import load_model

            card = load_model(model_path).card
            entry["model"] = {k: card.get(k) for k in (
                "train_seeds", "validation_seeds", "n_train", "acquisitions", "k", "lam",
                "validation_mae_mm", "validation_mae_mm_mean_face")}
            entry["held_out"] = held_out
        out[name] = entry
    return out


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o
