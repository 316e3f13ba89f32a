"""Contact sheet: real head-CT slices beside domain-randomised synthetic ones, as the detector sees them.

Top row: slices of ``../shared/realct/ge-head-ct`` (nose, orbits, ears) subsampled in-plane
as :class:`pipeline.face_model.ModelFaceRegion` does before detection. Rows below: slices
of domain-randomised training heads (:func:`pipeline.detector_data.domain_head`, seeds of
the *training* range) at the levels of the face, at their own acquisition's pixel size.
Every tile is the detector's soft-tissue channel (−250…250 HU), 192 px. With ``--boxes``
the synthetic tiles show their exact labels (red nose, blue eyes, green ears, magenta lips,
grey face).

    .venv/bin/python scripts/contact_sheet.py OUT.png [--seeds 7000-7011] [--boxes] [--width 960]

The sheet is written small: scaled to ``--width`` pixels, with a palette of 59 greys and
the five box colours (docs/detector-contact-sheet.png: ``--boxes``, default seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import dicom_io  # noqa: E402
from pipeline.detector_data import CLASSES, domain_head, volume_labels  # noqa: E402
from pipeline.synth import _FEATURE_CODES  # noqa: E402

TILE = 192
COLOURS = {"face": (150, 150, 150), "eyes": (40, 140, 255), "nose": (255, 40, 40), "lips": (255, 0, 255),
           "ears": (40, 220, 40)}


def _tile(hu: np.ndarray, boxes=None):
    from PIL import Image, ImageDraw

    g = np.clip((hu.astype(np.float32) + 250.0) / 500.0 * 255.0, 0, 255).astype(np.uint8)
    h, w = g.shape
    s = TILE / max(h, w)
    im = Image.fromarray(g).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR).convert("RGB")
    canvas = Image.new("RGB", (TILE, TILE))
    canvas.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    if boxes:
        d = ImageDraw.Draw(canvas)
        ox, oy = (TILE - im.width) // 2, (TILE - im.height) // 2
        for c, i0, j0, i1, j1 in boxes:
            d.rectangle([ox + i0 * s, oy + j0 * s, ox + i1 * s, oy + j1 * s], outline=COLOURS[CLASSES[c]])
    return np.asarray(canvas)


def small(img, width: int):
    """``img`` (PIL RGB) scaled to ``width`` px and mapped to 59 greys plus the box colours."""
    from PIL import Image

    if width and img.width != width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    colours = [(round(i * 255 / 58),) * 3 for i in range(59)] + list(COLOURS.values())
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for c in colours for v in c] + [0] * (768 - 3 * len(colours)))
    return img.convert("RGB").quantize(palette=pal, dither=Image.Dither.NONE)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "realct")
    ap.add_argument("--seeds", default="7000-7011")
    ap.add_argument("--real-slices", default="0,2,4,6,8,11")
    ap.add_argument("--per-row", type=int, default=6)
    ap.add_argument("--boxes", action="store_true")
    ap.add_argument("--width", type=int, default=960, help="output width in pixels (0: full size)")
    args = ap.parse_args(argv)
    a, _, b = args.seeds.partition("-")
    seeds = list(range(int(a), int(b or a) + 1))
    rows = []
    folder = args.shared / "ge-head-ct"
    if folder.is_dir():
        vol = dicom_io.load_series(dicom_io.scan_folder(folder).series[0]).volume
        f = max(1, vol.hu.shape[1] // 160)
        ks = [int(k) for k in args.real_slices.split(",")]
        rows.append(np.concatenate([_tile(vol.hu[k, ::f, ::f]) for k in ks], axis=1))
    tiles = []
    for seed in seeds:
        head = domain_head(seed)
        labels = volume_labels(head.feature_ids, head.face_label_mask, _FEATURE_CODES, 0.2)
        feat = [k for k, bx in enumerate(labels) if any(c != 0 for c, *_ in bx)]
        if not feat:
            continue
        pick = feat[len(feat) // 3] if seed % 2 else feat[(2 * len(feat)) // 3]
        tiles.append(_tile(head.volume.hu[pick], labels[pick] if args.boxes else None))
    n = args.per_row
    for r in range(0, len(tiles) - n + 1, n):
        rows.append(np.concatenate(tiles[r:r + n], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small(Image.fromarray(np.concatenate(rows, axis=0)), args.width).save(args.out, optimize=True)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
