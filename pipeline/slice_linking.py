"""Linking a detector's boxes across neighbouring slices (Seq-NMS-style rescoring).

A slice detector scores each axial slice alone. On a CT the same nose, globe or
auricle is seen on several neighbouring slices, and the slices where it is
small or partly volumed (the narrow upper nose between the eyes, the lowest
slice of a globe) score lower than the slices where it is large. Seq-NMS
(Han et al., 2016, "Seq-NMS for Video Object Detection", arXiv:1602.08465)
links boxes of one class whose IoU between neighbouring frames is at least
``link_iou`` into chains, takes the chain with the highest score sum, gives
its boxes the chain's mean score, removes it and repeats.

Here the rescoring **never lowers a score**: a box's new score is the larger
of its own and its chain's mean. Because a chain's mean is at most its best
score, a box can only rise to a threshold ``conf`` when some box of its chain
already reached it: linking extends a detection to the neighbouring slices of
the same object, it never creates an object that no slice found (a phantom or
a head without a face stays without boxes). Boxes below ``floor`` never join
a chain (they are the detector's background noise). A box overlapping a
chain's box on the same slice (IoU > 0.3) is not linked again but keeps its
own score (Seq-NMS drops it; here the detector's own NMS has already run).

Boxes are ``(i0, j0, i1, j1)`` in slice pixels (column, row), as
:class:`pipeline.detector.Detection`; slices are given in their order along
the stack (neighbouring list entries are neighbouring slices).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .detector import Detection
from .detector import _iou_one_to_many as _iou  # (x0, y0, x1, y1) box vs (N, 4) boxes

__all__ = ["LINK_FLOOR", "LINK_IOU", "detect_linked", "link_slices"]

#: the IoU two boxes of one class on neighbouring slices need to belong to one chain
#: (Seq-NMS' value)
LINK_IOU = 0.5
#: boxes scoring below this never join a chain. Chosen on synthetic held-out heads
#: (seeds 27000-27019, shipped INT8 model, threshold 0.3): going from 0.1 down to 0.05
#: finds 7 more boxes and adds 61 false ones; the mean AP is the same (0.871-0.873)
#: from 0.02 to 0.15.
LINK_FLOOR = 0.1
#: a box of the chain's slice overlapping a chain box by more than this is not linked again
_SUPPRESS_IOU = 0.3


def link_slices(dets: Sequence[Detection], *, link_iou: float = LINK_IOU,
                floor: float = LINK_FLOOR) -> list[Detection]:
    """Rescore ``dets`` (one :class:`Detection` per slice, in stack order) by chains
    of same-class boxes across neighbouring slices; see the module docstring.

    Returns new :class:`Detection` objects with the same boxes and class ids and
    scores ``max(own, chain mean)``; the input is not modified.
    """
    if not 0.0 < link_iou <= 1.0:
        raise ValueError("link_iou must be in (0, 1]")
    n = len(dets)
    scores = [np.asarray(d.scores, np.float32).copy() for d in dets]
    classes = sorted({int(c) for d in dets for c in np.asarray(d.class_ids).tolist()})
    for c in classes:
        idx = [np.flatnonzero((np.asarray(d.class_ids) == c) & (np.asarray(d.scores) >= floor)) for d in dets]
        own = [np.asarray(d.scores, np.float64)[i] for d, i in zip(dets, idx)]
        boxes = [np.asarray(d.boxes, np.float64)[i] for d, i in zip(dets, idx)]
        # links[k][a, b]: box a of slice k may follow box b of slice k-1
        links = [np.zeros((len(idx[0]), 0), bool)] if n else []
        for k in range(1, n):
            m = np.zeros((len(idx[k]), len(idx[k - 1])), bool)
            if m.size:
                for a, b in enumerate(boxes[k]):
                    m[a] = _iou(b, boxes[k - 1]) >= link_iou
            links.append(m)
        alive = [np.ones(len(i), bool) for i in idx]
        best: list[np.ndarray] = [np.empty(0)] * n  # best chain sum ending at each box (-inf: dead)
        back: list[np.ndarray] = [np.empty(0, np.int64)] * n  # its predecessor on slice k-1 (-1: none)
        top = np.full(n, -np.inf)  # best[k].max() per slice

        def update(k: int) -> bool:
            """Recompute slice k's chain sums from slice k-1's; True if they changed."""
            total = np.where(alive[k], own[k], -np.inf)
            prev = np.full(len(total), -1, np.int64)
            if k > 0 and links[k].size:
                cand = np.where(links[k], best[k - 1][None, :], -np.inf)
                j = np.argmax(cand, axis=1)
                v = cand[np.arange(len(j)), j]
                ok = np.isfinite(v) & alive[k]
                total[ok] += v[ok]
                prev[ok] = j[ok]
            changed = not (np.array_equal(total, best[k]) and np.array_equal(prev, back[k]))
            best[k], back[k] = total, prev
            top[k] = total.max() if total.size else -np.inf
            return changed

        for k in range(n):
            update(k)
        while n and np.isfinite(top.max()):
            # the chain with the highest score sum (ties: the later end slice, as max over (sum, k))
            k = int(n - 1 - np.argmax(top[::-1]))
            a = int(np.argmax(best[k]))
            chain: list[tuple[int, int]] = []
            while a >= 0:
                chain.append((k, a))
                a = int(back[k][a])
                k -= 1
            mean = float(np.mean([own[kk][aa] for kk, aa in chain]))
            for kk, aa in chain:
                g = idx[kk][aa]
                scores[kk][g] = max(scores[kk][g], np.float32(mean))
                alive[kk] &= _iou(boxes[kk][aa], boxes[kk]) <= _SUPPRESS_IOU
                alive[kk][aa] = False
            # only the chain's slices lost boxes: recompute from its first slice on, until
            # the sums stop changing after its last
            k0, k1 = chain[-1][0], chain[0][0]
            for kk in range(k0, n):
                if not update(kk) and kk > k1:
                    break
    return [Detection(np.asarray(d.boxes), s, np.asarray(d.class_ids)) for d, s in zip(dets, scores)]


def detect_linked(detector: Any, hu_slices: np.ndarray, *, conf: float, link: bool = True,
                  link_iou: float = LINK_IOU, floor: float = LINK_FLOOR) -> list[Detection]:
    """``detector.detect`` on neighbouring slices ``hu_slices[k, j, i]`` (HU), linked
    across slices (:func:`link_slices`) when ``link``, keeping boxes scoring above ``conf``
    (``score > conf``, as the detector's own threshold).

    The detector runs at ``min(conf, floor)`` so that the boxes a chain can lift
    above ``conf`` are seen. ``detector``: anything with ``.detect(hu_slices, conf=)``.
    """
    if not link:
        return list(detector.detect(hu_slices, conf=conf))
    raw = link_slices(detector.detect(hu_slices, conf=min(conf, floor)), link_iou=link_iou, floor=floor)
    out = []
    for d in raw:
        keep = np.asarray(d.scores) > conf  # as the detector itself: score > conf
        out.append(Detection(np.asarray(d.boxes)[keep], np.asarray(d.scores)[keep],
                             np.asarray(d.class_ids)[keep]))
    return out
