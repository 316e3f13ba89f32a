"""The rater's step machine: one function moves a rater, and only along
:attr:`surveys.models.Rater.TRANSITIONS`.

Every move is a conditional UPDATE on the step the caller saw, so two tabs of one
rater (or a double click) cannot both move it: the second finds the step changed and
does nothing. The database refuses unknown steps (``rater_step_known`` constraint).
"""

from __future__ import annotations

from typing import Any

from ..models import Rater, RaterStep

__all__ = ["StepError", "advance"]


class StepError(ValueError):
    """A move the step machine does not have (a programming error, never user input)."""


def advance(rater: Rater | int, frm: RaterStep, to: RaterStep, **fields: Any) -> bool:
    """Move ``rater`` from step ``frm`` to ``to`` (setting ``fields`` too) if it is still
    at ``frm``; returns whether it moved. Raises :class:`StepError` for a move that
    :attr:`Rater.TRANSITIONS` does not list."""
    if to not in Rater.TRANSITIONS.get(frm, ()):
        raise StepError(f"a rater cannot move from {frm!r} to {to!r}")
    pk = rater if isinstance(rater, int) else rater.pk
    moved = Rater.objects.filter(pk=pk, step=frm).update(step=to, **fields) == 1
    if moved and isinstance(rater, Rater):
        rater.step = to
        for name, value in fields.items():
            setattr(rater, name, value)
    return moved
