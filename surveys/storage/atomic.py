"""Stage outputs rebuilt as whole folders (see :mod:`pipeline.atomic` for the rules)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.atomic import replace_dir, temp_sibling

from .mirror import push_tree
from .paths import data_path, subject_folder


@contextmanager
def output_folders(subject: Any, *names: str) -> Iterator[dict[str, Path]]:
    """Rebuild the subject folders ``names`` (see :func:`~.paths.subject_folder`) as a whole.

    Yields ``{name: temporary folder}`` to write into (hidden siblings of the final
    folders). When the block completes, each temporary folder replaces its folder
    (:func:`pipeline.atomic.replace_dir`) and, with a shared storage, the folder is
    uploaded as the reference copy (:func:`~.mirror.push_tree`: remote files it no
    longer holds are deleted). On an error the temporary folders are deleted and the
    old outputs stay. Leftovers of a killed earlier run are deleted first.
    """
    finals = {n: data_path(subject_folder(subject, n)) for n in names}
    tmps: dict[str, Path] = {}
    try:
        for n, final in finals.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            for left in (*final.parent.glob(f".{final.name}.tmp-*"),
                         *final.parent.glob(f".{final.name}.old-*")):
                shutil.rmtree(left, ignore_errors=True)
            tmps[n] = temp_sibling(final)
            tmps[n].mkdir()
        yield dict(tmps)
        for n, final in finals.items():
            replace_dir(tmps[n], final)
        for n in names:
            push_tree(subject_folder(subject, n))
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
