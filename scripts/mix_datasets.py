"""Mix YOLO datasets (e.g. domain-randomised and plain synthetic heads) into one, by symlinks.

    .venv/bin/python scripts/mix_datasets.py OUT --seed 18 \\
        --take /data/ds_domain:train:1900:train --take /data/ds_plain:train:all:train \\
        --take /data/ds_domain:val:all:val --take /data/ds_plain:val:all:val

Each ``--take DIR:SPLIT:N:TO`` links ``N`` images (``all``, or a random draw with ``--seed``) of
``DIR/images/SPLIT`` and their ``DIR/labels/SPLIT`` files into ``OUT/images/TO`` and
``OUT/labels/TO``, and ``OUT/data.yaml`` names the classes of the first dataset. Image names
must not collide (``build_dataset`` names them by subject seed and slice: build the parts with
disjoint seeds). Train on it with ``train_detector --data OUT/data.yaml``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--take", action="append", required=True, help="DIR:SPLIT:N:TO (N an integer or 'all')")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = args.out.resolve()
    names = None
    counts: dict[str, int] = {}
    for take in args.take:
        src, split, n, to = take.rsplit(":", 3)
        src = Path(src).resolve()
        if names is None:
            text = (src / "data.yaml").read_text()
            names = text[text.index("names:"):]
        imgs = sorted((src / "images" / split).glob("*.png"))
        if n != "all":
            imgs = sorted(rng.sample(imgs, min(int(n), len(imgs))))
        for kind in ("images", "labels"):
            (out / kind / to).mkdir(parents=True, exist_ok=True)
        for img in imgs:
            lab = src / "labels" / split / (img.stem + ".txt")
            dst = out / "images" / to / img.name
            if dst.exists():
                print(f"name collision: {img.name}", file=sys.stderr)
                return 1
            os.symlink(img.resolve(), dst)
            os.symlink(lab.resolve(), out / "labels" / to / lab.name)
        counts[to] = counts.get(to, 0) + len(imgs)
    lines = [f"path: {out}"] + [f"{s}: images/{s if s in counts else 'val'}" for s in ("train", "val", "test")]
    (out / "data.yaml").write_text("\n".join(lines) + "\n" + (names or ""))
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
