"""``python manage.py train_skull_to_face`` — fit the learned reconstruction attack offline.

Synthetic heads (:mod:`pipeline.synth`, seeds given by ``--train`` and ``--val`` ranges,
acquisitions alternating over ``--sizes``) are de-identified and turned into training pairs
(:func:`pipeline.skull_to_face.training_pair`: radial bone features of the de-identified
scan, radial skin map of the original), cached one file per head in ``--cache``. Every
``(k, lam)`` of the grids ``--k`` × ``--lam`` is fitted on the training heads and scored on
the validation heads (mean absolute error of the skin radius, mm, over the cells of the face
the original shows); the best is kept, fitted on the training heads only, and written with
its card (training seeds, acquisitions, validation figures, baseline of the mean face) to
``--out`` (default the shipped ``pipeline/models/skull_to_face.npz``).

Keep the seed ranges away from the cohorts the attack is evaluated on (the README's cohorts
use seeds 4242…, 7000… and 9000…; the defaults here start at 300000).
"""

from __future__ import annotations

import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

#: Cells of the radial map that count in the validation error: the face (−60…60° azimuth,
#: −50…45° elevation), where the de-identification removed tissue.
FACE_THETA = (-60.0, 60.0)
FACE_PHI = (-50.0, 45.0)


def _range(text: str) -> list[int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise CommandError("seed ranges are FIRST:STOP, e.g. 300000:300400") from None
    if b <= a:
        raise CommandError("a seed range FIRST:STOP needs STOP > FIRST")
    return list(range(a, b))


def _pair(seed: int, size: str, cache: str) -> str:
    """Make (or reuse) the cached training pair of one head; returns its path."""
    # loaded on first use: pulls in scipy
    from pipeline.skull_to_face import training_pair

    path = Path(cache) / f"pair-{size}-{seed}.npz"
    if not path.is_file():
        d = training_pair(seed, size)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, x=d["x"].astype(np.float32), y=d["y"].astype(np.float32),
                            seed=seed, size=size, scale=d["scale"])
        tmp.replace(path)
    return str(path)


def face_cells(rg: Any) -> np.ndarray:
    """Boolean ``(n_phi, n_theta)`` mask of :data:`FACE_THETA` × :data:`FACE_PHI`."""
    t, p = np.meshgrid(rg.thetas, rg.phis)
    return (t >= FACE_THETA[0]) & (t <= FACE_THETA[1]) & (p >= FACE_PHI[0]) & (p <= FACE_PHI[1])


def map_errors(pred: np.ndarray, truth: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Per head: mean absolute difference (mm) over the known cells in ``cells``."""
    err = np.abs(pred - truth)
    ok = np.isfinite(err) & cells.ravel()[None, :]
    return np.array([e[m].mean() for e, m in zip(err, ok)])


def map_rank1(pred: np.ndarray, truth: np.ndarray, cells: np.ndarray) -> float:
    """Rank-1 identification of each head's true skin map among all validation heads by its
    predicted map (cohort-centred, median absolute difference over the face cells)."""
    ok = cells.ravel()
    p = pred[:, ok] - np.nanmean(pred[:, ok], axis=0)
    t = truth[:, ok] - np.nanmean(truth[:, ok], axis=0)
    d = np.array([[np.nanmedian(np.abs(pi - tj)) for tj in t] for pi in p])
    return float(np.mean(np.argmin(d, axis=1) == np.arange(len(d))))


class Command(BaseCommand):
    help = "Fit the learned skull-to-face reconstruction attack on synthetic heads."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--train", default="300000:300400", help="training seeds FIRST:STOP")
        parser.add_argument("--val", default="310000:310040", help="validation seeds FIRST:STOP")
        parser.add_argument("--sizes", default="small,medium",
                            help="acquisitions, alternating by seed (default small,medium)")
        parser.add_argument("--k", default="5,10,20,40,80,160",
                            help="numbers of principal components to try")
        parser.add_argument("--lam", default="1,10,100,1000,10000",
                            help="ridge regularisations to try")
        parser.add_argument("--workers", type=int, default=1, help="heads made in parallel")
        parser.add_argument("--cache", type=Path, default=None,
                            help="folder of cached training pairs (default VAR_DIR/skull_to_face)")
        parser.add_argument("--out", type=Path, default=None,
                            help="model file (default: the shipped pipeline/models/skull_to_face.npz)")

    def handle(self, *args: Any, **o: Any) -> None:
        # loaded on first use: pulls in scipy
        from pipeline.skull_to_face import ACQUISITIONS, DEFAULT_MODEL, RadialGrid, fit_model

        train, val = _range(o["train"]), _range(o["val"])
        if set(train) & set(val):
            raise CommandError("training and validation seeds overlap")
        sizes = [s.strip() for s in o["sizes"].split(",") if s.strip()]
        if not sizes or any(s not in ACQUISITIONS for s in sizes):
            raise CommandError(f"--sizes must name acquisitions from {', '.join(ACQUISITIONS)}")
        ks = [int(v) for v in o["k"].split(",")]
        lams = [float(v) for v in o["lam"].split(",")]
        cache = (o["cache"] or Path(settings.VAR_DIR) / "skull_to_face").resolve()
        cache.mkdir(parents=True, exist_ok=True)
        out = (o["out"] or DEFAULT_MODEL).resolve()
        t0 = time.perf_counter()
        jobs = [(s, sizes[s % len(sizes)]) for s in train + val]
        paths: dict[int, str] = {}
        if o["workers"] > 1:
            with ProcessPoolExecutor(max_workers=o["workers"]) as pool:
                futs = {pool.submit(_pair, s, z, str(cache)): s for s, z in jobs}
                for n, (f, s) in enumerate(futs.items(), 1):
                    paths[s] = f.result()
                    if n % 20 == 0:
                        self.stdout.write(f"  {n}/{len(jobs)} heads ({time.perf_counter() - t0:.0f} s)")
        else:
            for n, (s, z) in enumerate(jobs, 1):
                paths[s] = _pair(s, z, str(cache))
                if n % 20 == 0:
                    self.stdout.write(f"  {n}/{len(jobs)} heads ({time.perf_counter() - t0:.0f} s)")
        t_data = time.perf_counter() - t0

        def load(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = [], []
            for s in seeds:
                with np.load(paths[s]) as d:
                    xs.append(d["x"].ravel())
                    ys.append(d["y"].ravel())
            return np.array(xs, dtype=float), np.array(ys, dtype=float)

        rg = RadialGrid()
        xt, yt = load(train)
        xv, yv = load(val)
        cells = face_cells(rg)
        known = np.isfinite(yt)
        base = np.where(known, yt, 0.0).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
        base = np.where(known.any(axis=0), base, np.nan)  # cells no training head shows
        base_err = map_errors(np.broadcast_to(base, yv.shape), yv, cells)
        scores = []
        for k in ks:
            for lam in lams:
                m = fit_model(xt, yt, k, lam, rg)
                pred = np.array([m.predict_map(x.reshape(2, *rg.shape)).ravel() for x in xv])
                err = map_errors(pred, yv, cells)
                scores.append((float(err.mean()), k, lam))
                self.stdout.write(f"  k={k:<4d} lam={lam:<8g} validation MAE {err.mean():.2f} mm")
        _best_err, k, lam = min(scores)
        model = fit_model(xt, yt, k, lam, rg)
        pred = np.array([model.predict_map(x.reshape(2, *rg.shape)).ravel() for x in xv])
        err = map_errors(pred, yv, cells)
        card = {
            "what": "learned skull-to-face model (PCA of radial bone maps + ridge regression of "
                    "the radial skin map), the 'learned' reconstruction attack",
            "trained_on": "synthetic heads (pipeline.synth.SubjectParams.random(seed), default "
                          "random pose), de-identified by pipeline.deface.deface",
            "train_seeds": [train[0], train[-1] + 1],
            "validation_seeds": [val[0], val[-1] + 1],
            "n_train": len(train), "n_validation": len(val),
            "acquisitions": {s: {"shape": ACQUISITIONS[s][0], "spacing_mm": ACQUISITIONS[s][1]}
                             for s in sizes},
            "k": k, "lam": lam,
            "validation_mae_mm": round(float(err.mean()), 3),
            "validation_mae_mm_mean_face": round(float(base_err.mean()), 3),
            "validation_map_rank1": map_rank1(pred, yv, cells),
            "validation_map_rank1_mean_face_chance": 1.0 / len(val),
            "face_cells": {"theta_deg": FACE_THETA, "phi_deg": FACE_PHI},
            "grid_search": [{"mae_mm": round(e, 3), "k": kk, "lam": ll} for e, kk, ll in scores],
            "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)},
            "python": platform.python_version(), "numpy": np.__version__,
        }
        model.card = card
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(out)
        self.stdout.write(json.dumps({k_: card[k_] for k_ in (
            "k", "lam", "validation_mae_mm", "validation_mae_mm_mean_face",
            "validation_map_rank1")}))
        self.stdout.write(f"model: {out}")
