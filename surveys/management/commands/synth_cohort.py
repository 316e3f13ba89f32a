"""``python manage.py synth_cohort OUT --subjects N --seed S`` — synthetic CT cohort with fake PHI.

Layout written below OUT:

* ``dicom/<LAST>_<FIRST>_<ID>/`` — one CT series per subject; folder names
  and headers deliberately carry the fake identity (like real exports);
* ``truth/subject-<index>.npz`` — ground truth per subject (tissue labels,
  feature ids, face soft-tissue mask, per-slice feature boxes as JSON,
  identity parameters as JSON, pose, geometry, SeriesInstanceUID);
* ``phi.json`` — per subject the planted identifiers (test material for leak
  scans) and the relative DICOM folder.

Subject ``i`` (0-based) uses seed ``S + i`` for its face, its fake identity
and its noise. The printed summary contains no identifiers.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from pipeline.synth import SubjectParams, SynthError, generate_head
from pipeline.synth_phi import FakePHI, PHIWriteError, write_synthetic_series

#: Named sizes: (slices, rows, columns), spacing (dk, dj, di) in mm.
SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "tiny": ((40, 48, 48), (6.0, 5.0, 5.0)),
    "small": ((64, 80, 80), (3.75, 3.0, 3.0)),
    "medium": ((80, 96, 96), (3.0, 2.5, 2.5)),
    "large": ((200, 192, 192), (1.2, 1.2, 1.2)),
    "full": ((300, 512, 512), (1.0, 0.45, 0.45)),
}
#: Field of view used for custom ``RxCxS`` sizes (mm): in-plane, along z.
FOV_MM = (240.0, 260.0)


def parse_size(text: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Named size or ``RxCxS`` (rows × columns × slices, FOV 240 mm in-plane, 260 mm in z)."""
    if text in SIZES:
        return SIZES[text]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip().lower())
    if not m:
        raise CommandError(f"--size must be one of {', '.join(SIZES)} or RxCxS (e.g. 128x128x100)")
    rows, cols, slices = (int(v) for v in m.groups())
    if min(rows, cols, slices) < 8 or rows * cols * slices > 120_000_000:
        raise CommandError("--size RxCxS needs each value ≥ 8 and at most 1.2e8 voxels")
    return (slices, rows, cols), (FOV_MM[1] / slices, FOV_MM[0] / rows, FOV_MM[0] / cols)


class Command(BaseCommand):
    help = "Write a synthetic head-CT cohort with fake identities, ground truth and a PHI list."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("out", type=Path, help="output folder (dicom/, truth/, phi.json)")
        parser.add_argument("--subjects", type=int, default=4, help="number of subjects (default 4)")
        parser.add_argument("--seed", type=int, default=0, help="subject i uses seed SEED+i")
        parser.add_argument("--size", default="small",
                            help=f"{'|'.join(SIZES)} or RxCxS (default small)")
        parser.add_argument("--compress", choices=["rle", "jpeg2000-lossless", "jpeg-lossless"],
                            default=None, help="compress pixel data (default: uncompressed)")
        parser.add_argument("--shuffle", action="store_true",
                            help="random file names in random order (readers must sort by geometry)")
        parser.add_argument("--force", action="store_true", help="allow a non-empty OUT")

    def handle(self, *args, **opts) -> None:
        out: Path = opts["out"]
        n = int(opts["subjects"])
        seed = int(opts["seed"])
        if n < 1:
            raise CommandError("--subjects must be at least 1")
        shape, spacing = parse_size(str(opts["size"]))
        if out.exists() and any(out.iterdir()) and not opts["force"]:
            raise CommandError("OUT is not empty (use --force to write into it)")
        dicom_dir, truth_dir = out / "dicom", out / "truth"
        dicom_dir.mkdir(parents=True, exist_ok=True)
        truth_dir.mkdir(parents=True, exist_ok=True)

        show = opts["verbosity"] > 0 and sys.stderr.isatty()
        subjects = []
        t0 = time.time()
        n_files = 0
        for i in tqdm(range(n), unit="subject", disable=not show, file=sys.stderr):
            s = seed + i
            try:
                params = SubjectParams.random(s)
                head = generate_head(params, shape=shape, spacing_mm=spacing, noise_seed=s)
                phi = FakePHI.random(s)
                paths = write_synthetic_series(head, phi, dicom_dir / phi.folder_name,
                                               compress=opts["compress"], shuffle_names=opts["shuffle"],
                                               seed=s)
            except (SynthError, PHIWriteError) as exc:
                raise CommandError(f"subject {i}: {exc}") from None
            n_files += len(paths)
            import pydicom

            series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
            np.savez_compressed(
                truth_dir / f"subject-{i:03d}.npz",
                labels=head.labels,
                feature_ids=head.feature_ids,
                face_soft_tissue_mask=head.face_soft_tissue_mask,
                ear_soft_tissue_mask=head.ear_soft_tissue_mask,
                structures=head.structures,
                inside_hull_3mm=head.inside_hull_3mm,
                feature_boxes=np.array(json.dumps(head.feature_boxes)),
                params=np.array(json.dumps(params.to_dict())),
                pose_deg=np.asarray(head.pose_deg, float),
                spacing_mm=np.asarray(head.volume.spacing_mm, float),
                origin_lps_mm=np.asarray(head.volume.origin_lps_mm, float),
                series_instance_uid=np.array(series_uid),
                seed=np.array(s),
            )
            subjects.append({
                "index": i,
                "seed": s,
                "dicom_folder": f"dicom/{phi.folder_name}",
                "truth": f"truth/subject-{i:03d}.npz",
                "series_instance_uid": series_uid,
                "phi": phi.to_dict(),
                "identifiers": phi.identifiers() + [phi.folder_name],
            })
        (out / "phi.json").write_text(json.dumps({
            "note": "FAKE identities planted in synthetic DICOM headers and folder names (test material)",
            "size": {"shape": list(shape), "spacing_mm": list(spacing)},
            "compress": opts["compress"],
            "shuffled_names": bool(opts["shuffle"]),
            "subjects": subjects,
        }, indent=1))
        self.stdout.write(
            f"synth_cohort: {n} subjects, {n_files} DICOM files, volume {shape[0]}×{shape[1]}×{shape[2]} "
            f"at {spacing[0]:g}×{spacing[1]:g}×{spacing[2]:g} mm, {time.time() - t0:.1f} s\n"
            f"  DICOM:        {dicom_dir}/ (folder names carry the fake identities)\n"
            f"  ground truth: {truth_dir}/subject-NNN.npz\n"
            f"  planted PHI:  {out / 'phi.json'}"
        )
