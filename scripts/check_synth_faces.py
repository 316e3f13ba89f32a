#!/usr/bin/env python
"""Check that synthetic heads have faces dlib finds and tells apart.

For N subjects (seeds S..S+N-1) this generates, at a small size:

* a *gallery* head (frontal pose, noise realisation A),
* a *probe* head (second noise realisation, a small yaw of 8–15°, alternating
  sign), and
* a *defaced probe*: the probe with ``face_soft_tissue_mask`` set to air,

renders each skin surface frontally (:func:`pipeline.synth.render_skin_frontal`),
runs dlib's HOG frontal face detector (upsample 1) and, on detected faces, the
5-point shape predictor and the ResNet face descriptor. It prints the face
detection fraction per set and rank-1 identification of the probes against the
gallery (nearest descriptor by Euclidean distance; an undetected probe counts
as a miss), and saves a contact sheet PNG.

Usage: .venv/bin/python scripts/check_synth_faces.py [--n 20] [--seed 0]
       [--size 160x192x192] [--spacing 1.2] [--sheet /tmp/synth_faces.png]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.synth import SubjectParams, generate_head, render_skin_frontal


def model_paths() -> tuple[str, str]:
    """Paths of dlib's 5-point shape predictor and ResNet descriptor shipped with
    face_recognition_models (located without importing it: its __init__ needs
    pkg_resources, which recent setuptools no longer provides)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face_recognition_models is not installed")
    base = Path(next(iter(spec.submodule_search_locations))) / "models"
    sp = base / "shape_predictor_5_face_landmarks.dat"
    rec = base / "dlib_face_recognition_resnet_model_v1.dat"
    for f in (sp, rec):
        if not f.is_file():
            raise SystemExit(f"missing model file {f.name}")
    return str(sp), str(rec)


class FaceEngine:
    """dlib HOG detector + 5-point landmarks + ResNet 128-d descriptor."""

    def __init__(self) -> None:
        import dlib

        sp, rec = model_paths()
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(sp)
        self.encoder = dlib.face_recognition_model_v1(rec)

    def describe(self, grey: np.ndarray) -> tuple[np.ndarray | None, object | None]:
        """Descriptor (128,) of the largest detected face, and its rectangle; (None, None) if none."""
        rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        rects = self.detector(rgb, 1)
        if len(rects) == 0:
            return None, None
        r = max(rects, key=lambda q: q.width() * q.height())
        shape = self.predictor(rgb, r)
        return np.asarray(self.encoder.compute_face_descriptor(rgb, shape)), r


def rank1(gallery: list[np.ndarray | None], probes: list[np.ndarray | None]) -> tuple[int, int, list[str]]:
    """(correct, total, misses): a probe is correct when its nearest gallery descriptor (Euclidean)
    is its own; ``misses`` describes the failures (undetected, or rank of the true match)."""
    ids = [i for i, g in enumerate(gallery) if g is not None]
    if not ids:
        return 0, len(probes), ["no gallery faces"]
    g = np.stack([gallery[i] for i in ids])
    correct = 0
    misses = []
    for i, pr in enumerate(probes):
        if pr is None:
            misses.append(f"{i}: not detected")
            continue
        d = np.linalg.norm(g - pr[None, :], axis=1)
        order = [ids[o] for o in np.argsort(d)]
        if order[0] == i:
            correct += 1
        else:
            rank = order.index(i) + 1 if i in order else None
            misses.append(f"{i}: nearest {order[0]}, true match at rank {rank}")
    return correct, len(probes), misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="200x192x192", help="slices x rows x cols")
    ap.add_argument("--spacing", type=float, default=1.2, help="isotropic spacing, mm")
    ap.add_argument("--sheet", default="/tmp/synth_faces.png")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.size.lower().split("x"))
    spacing = (args.spacing,) * 3
    engine = FaceEngine()

    sets: dict[str, list] = {"gallery": [], "probe": [], "defaced": []}
    renders: dict[str, list[np.ndarray]] = {k: [] for k in sets}
    t0 = time.time()
    gen_s = 0.0
    for n in range(args.n):
        params = SubjectParams.random(args.seed + n)
        yaw = (8.0 + 7.0 * ((n * 7919) % 11) / 10.0) * (1 if n % 2 == 0 else -1)
        t = time.time()
        g = generate_head(params, shape=shape, spacing_mm=spacing, pose_deg=(0.0, 0.0, 0.0),
                          noise_seed=1000 + n)
        pr = generate_head(params, shape=shape, spacing_mm=spacing, pose_deg=(yaw, 0.0, 0.0),
                           noise_seed=2000 + n)
        gen_s += time.time() - t
        defaced_hu = pr.volume.hu.copy()
        defaced_hu[pr.face_soft_tissue_mask] = -1000
        from pipeline.volume import Volume

        dv = Volume(hu=defaced_hu, spacing_mm=pr.volume.spacing_mm, origin_lps_mm=pr.volume.origin_lps_mm)
        for name, vol in (("gallery", g.volume), ("probe", pr.volume), ("defaced", dv)):
            img = render_skin_frontal(vol)
            desc, rect = engine.describe(img)
            sets[name].append(desc)
            mark = img.copy()
            if rect is not None:
                x0, y0 = max(rect.left(), 0), max(rect.top(), 0)
                x1, y1 = min(rect.right(), img.shape[1] - 1), min(rect.bottom(), img.shape[0] - 1)
                mark[y0, x0:x1] = 255
                mark[y1, x0:x1] = 255
                mark[y0:y1, x0] = 255
                mark[y0:y1, x1] = 255
            renders[name].append(mark)
        print(f"subject {n:3d}: detected gallery={sets['gallery'][-1] is not None} "
              f"probe(yaw {yaw:+.0f}°)={sets['probe'][-1] is not None} "
              f"defaced={sets['defaced'][-1] is not None}", flush=True)

    print()
    for name, descs in sets.items():
        det = sum(d is not None for d in descs)
        print(f"face detected, {name:8s}: {det}/{len(descs)} = {100.0 * det / len(descs):.0f} %")
    c, tot, miss = rank1(sets["gallery"], sets["probe"])
    print(f"rank-1 probe (2nd noise, yaw 8-15°) vs gallery: {c}/{tot} = {100.0 * c / tot:.0f} %"
          + (f"   misses: {'; '.join(miss)}" if miss else ""))
    c2, tot2, _ = rank1(sets["gallery"], sets["defaced"])
    print(f"rank-1 defaced probe vs gallery:               {c2}/{tot2} = {100.0 * c2 / tot2:.0f} %")
    gd = [d for d in sets["gallery"] if d is not None]
    if len(gd) > 1:
        m = np.stack(gd)
        dist = np.linalg.norm(m[:, None] - m[None], axis=2)
        iu = np.triu_indices(len(gd), 1)
        print(f"gallery inter-subject descriptor distance: min {dist[iu].min():.3f} "
              f"median {np.median(dist[iu]):.3f}")
    same = [np.linalg.norm(a - b) for a, b in zip(sets["gallery"], sets["probe"])
            if a is not None and b is not None]
    if same:
        print(f"same-subject gallery-probe distance: median {np.median(same):.3f} max {max(same):.3f}")
    print(f"generation {gen_s:.1f} s for {2 * args.n} heads of {shape}; total {time.time() - t0:.1f} s")

    from PIL import Image

    # contact sheet: blocks of up to 10 subjects; in each block one row per set
    per_row = 10
    blocks = []
    for b0 in range(0, args.n, per_row):
        for k in ("gallery", "probe", "defaced"):
            tiles = renders[k][b0:b0 + per_row]
            tiles += [np.zeros_like(tiles[0])] * (per_row - len(tiles))
            blocks.append(np.concatenate(tiles, axis=1))
        blocks.append(np.full((8, blocks[-1].shape[1]), 80, np.uint8))
    sheet = Image.fromarray(np.concatenate(blocks, axis=0))
    sheet = sheet.resize((sheet.width // 2, sheet.height // 2), Image.Resampling.LANCZOS)
    sheet.save(args.sheet)
    print(f"contact sheet: {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
