"""Agreement of two labellers' boxes on one real series (label files as ``tests/data/realct_labels/``).

    .venv/bin/python scripts/label_agreement.py FIRST.json SECOND.json [--class ears] [--iou 0.5]

Per slice, the two labellers' boxes of the class are paired one to one by IoU
(:func:`pipeline.real_labels.label_agreement`). Prints the pairs at IoU ≥ ``--iou``, the median
and lowest IoU, the slices on which every box of both is paired at ≥ ``--iou``, and one line per
slice. Slices are numbered; nothing else of the series is printed. Exit status 1 (with a
message, no traceback) when a file is missing or malformed or the two files name different
series.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.detector_data import CLASSES
from pipeline.real_labels import label_agreement, load_labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--class", dest="cls", default="ears", choices=CLASSES)
    ap.add_argument("--iou", type=float, default=0.5)
    a = ap.parse_args(argv)
    try:
        first, second = load_labels(a.first), load_labels(a.second)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read the label files ({exc.__class__.__name__}: {exc})", file=sys.stderr)
        return 1
    if first.series != second.series:
        print(f"error: the files label different series ({first.series!r}, {second.series!r})", file=sys.stderr)
        return 1
    r = label_agreement(first, second, a.cls, iou=a.iou)
    print(f"{r['class']} on {first.series}: first {r['first']} boxes, second {r['second']}; "
          f"{r['agree']} of {r['pairs']} pairs at IoU >= {a.iou} (median {r['median_iou']}, lowest {r['min_iou']}); "
          f"slices agreeing {r['slices_agree']}/{r['slices']}")
    for k, s in r["per_slice"].items():
        extra = "".join(f", {n} only in {w}" for w, n in (("first", s["only_first"]), ("second", s["only_second"])) if n)
        print(f"  slice {k:3d}: IoU {' '.join(f'{v:.2f}' for v in s['iou']) or '-'}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
