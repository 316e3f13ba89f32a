"""Face boxes of the labelled real test series (``tests/data/realct_labels/``), by rule.

The detector's ``face`` class has no edge a person could draw: it is defined on the
synthetic heads (:attr:`pipeline.synth.SynthHead.face_label_mask`) as the soft tissue of
the face zone with no bone in front of it along the row direction, within 25 mm of the
skin. On a real slice the same rule gives the box written to the label file: soft tissue
(−400…200 HU) of the patient (largest component above −400 HU), no voxel ≥ 300 HU in front
of it in its column, within 25 mm (in-plane) of the skin, inside the face zone — rows in
front of a coronal line 25 mm anterior to the ear canals and columns within the
bizygomatic half-width of the face's midline (both measured on the images and given on the
command line) — joined with the series' eye and nose boxes. The slices it applies to
(menton − 3 mm to brow + 30 mm, as on the synthetic heads) are given too. Prints JSON
``{slice: [["face", i0, j0, i1, j1]]}`` in native pixels.

    .venv/bin/python scripts/realct_face_boxes.py ../shared/realct/ge-head-ct \\
        --slices 0-15 --max-row 187 --columns 86-352 --labels tests/data/realct_labels/ge-head-ct.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import dicom_io  # noqa: E402


def face_boxes(hu: np.ndarray, pixel_mm: float, slices: range, max_row: int, cols: tuple[int, int],
               features: dict[int, list]) -> dict[int, list]:
    out = {}
    for k in slices:
        sl = hu[k].astype(np.float32)
        body = sl > -400
        lab, n = ndi.label(body)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = ndi.binary_fill_holes(lab == sizes.argmax())
        soft = body & (sl < 200)
        bone_in_front = np.logical_or.accumulate(sl >= 300, axis=0)
        near_skin = ndi.distance_transform_edt(body) * pixel_mm <= 25.0
        m = soft & ~bone_in_front & near_skin
        m[max_row:] = False
        m[:, :cols[0]] = False
        m[:, cols[1]:] = False
        m = ndi.binary_opening(m)
        boxes = [b[1:] for b in features.get(k, []) if b[0] in ("eyes", "nose")]
        if m.sum() >= 50:
            jj, ii = np.nonzero(m)
            boxes.append([int(ii.min()), int(jj.min()), int(ii.max()) + 1, int(jj.max()) + 1])
        if boxes:
            b = np.array(boxes)
            out[k] = [["face", int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", type=Path)
    ap.add_argument("--slices", default="0-15")
    ap.add_argument("--max-row", type=int, required=True)
    ap.add_argument("--columns", required=True)
    ap.add_argument("--labels", type=Path, default=None, help="label file with the eye and nose boxes")
    args = ap.parse_args(argv)
    vol = dicom_io.load_series(dicom_io.scan_folder(args.series).series[0]).volume
    a, _, b = args.slices.partition("-")
    c0, _, c1 = args.columns.partition("-")
    feats: dict[int, list] = {}
    if args.labels is not None:
        feats = {int(k): v for k, v in json.loads(args.labels.read_text())["slices"].items()}
    res = face_boxes(vol.hu, float(vol.spacing_mm[1]), range(int(a), int(b) + 1), args.max_row,
                     (int(c0), int(c1)), feats)
    print(json.dumps({str(k): v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
