"""Face removal on the real CT series in ``../shared/realct/`` (see its README), measured
independently of the defacer (:mod:`pipeline.evaluate`).

Per series: written or not, "no face found", removed mL per region, and the
independent figures: soft tissue changed inside the facial skeleton (hull of
the bone ≥ 300 HU shrunk by 3 mm; overall and worst slice), soft tissue outside
it (more than 3 mm) in the face's slices that was removed, voxels changed
outside the body, bone Dice at 300 and 150 HU, seconds; and for a series with
hand-drawn labels (``tests/data/realct_labels/<series>.json``) the same "outside
removed" inside each labelled class's boxes (``labelled_removed``:
:func:`pipeline.evaluate.labelled_removal`; per box with ``--per-box``).

    .venv/bin/python benchmarks/bench_realct.py [--method auto|anatomical|model]
         [--shared ../shared/realct] [--pictures DIR] [--per-box]

The face region of each series is :data:`pipeline.evaluate.REALCT_FACE_REGIONS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import dicom_io  # noqa: E402
from pipeline.deface import deface, qa_picture  # noqa: E402
from pipeline.deidentify import make_face_method  # noqa: E402
from pipeline.evaluate import (  # noqa: E402
    REALCT_FACE_REGIONS,
    face_region_mask,
    labelled_removal,
    native_skeleton_hull,
    removal_figures,
)
from pipeline.real_labels import load_labels  # noqa: E402

LABELS = ROOT / "tests" / "data" / "realct_labels"


def measure(folder: Path, method_name: str, pictures: Path | None = None, per_box: bool = False) -> dict:
    scan = dicom_io.scan_folder(folder)
    loaded = dicom_io.load_series(scan.series[0])
    method, _ = make_face_method(method_name)
    t = time.perf_counter()
    res = deface(loaded.volume, method)
    seconds = time.perf_counter() - t
    spec = REALCT_FACE_REGIONS.get(folder.name)
    region = None if spec is None else face_region_mask(loaded.volume, **spec)
    hull = native_skeleton_hull(loaded.volume)
    fig = removal_figures(loaded.volume, res.hu, hull=hull, region=region)
    labelled = None
    if (LABELS / f"{folder.name}.json").is_file():
        got = labelled_removal(loaded.volume, res.hu, load_labels(LABELS / f"{folder.name}.json").slices,
                               hull=hull)
        labelled = {c: {k: v for k, v in r.as_dict().items() if per_box or k != "per_box"}
                    for c, r in got.items()}
    if pictures is not None:
        from PIL import Image

        pictures.mkdir(parents=True, exist_ok=True)
        Image.fromarray(qa_picture(loaded.volume, res)).save(pictures / f"{folder.name}.png")
    qa = res.qa
    return {"series": folder.name, "slices": int(loaded.volume.hu.shape[0]),
            "regular_spacing": bool(loaded.volume.is_regular), "face_found": qa.face_found,
            "no_face_reason": qa.no_face_reason, "removed_ml": qa.removed_ml,
            "removed_ml_by_region": qa.removed_ml_by_region, "seconds": round(seconds, 2),
            **fig.as_dict(), **({"labelled_removed": labelled} if labelled else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--method", default="auto", choices=["auto", "anatomical", "model"])
    ap.add_argument("--pictures", type=Path, default=None, help="write QA pictures here")
    ap.add_argument("--per-box", action="store_true", help="list every labelled box's figure")
    args = ap.parse_args(argv)
    if not args.shared.is_dir():
        print(f"no real CT folder at {args.shared}", file=sys.stderr)
        return 2
    for folder in sorted(p for p in args.shared.iterdir() if p.is_dir()):
        print(json.dumps(measure(folder, args.method, args.pictures, args.per_box)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
