"""Running a study: close / reopen it, revoke invitations, exclude / re-include / reset raters.

Views stay thin: each action is one function here, atomic, returning what changed.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from ..models import Answer, Invitation, Rater, Study, Trial
from .flow import advance

__all__ = ["close_study", "exclude_rater", "include_rater", "reopen_study", "reset_rater",
           "revoke_invitation"]


def close_study(study: Study) -> bool:
    """Close: no enrolment, no trial start and no answer is accepted any more, also from
    raters who already started. Returns False when it was closed already."""
    return bool(Study.objects.filter(pk=study.pk, closed_at__isnull=True)
                .update(closed_at=timezone.now()))


def reopen_study(study: Study) -> bool:
    """Accept answers again (the design stays frozen)."""
    return bool(Study.objects.filter(pk=study.pk, closed_at__isnull=False)
                .update(closed_at=None))


def revoke_invitation(invitation: Invitation) -> bool:
    """Withdraw an invitation link: nobody can start with it any more (raters who already
    started with it continue while the study is open)."""
    return bool(Invitation.objects.filter(pk=invitation.pk, revoked_at__isnull=True)
                .update(revoked_at=timezone.now()))


def exclude_rater(rater: Rater, reason: str) -> None:
    """Exclude a rater from the analysis by hand (not pre-registered; the report says so and
    gives the reason). ``reason`` is required (≤ 200 characters)."""
    reason = " ".join((reason or "").split())[:200]
    if not reason:
        raise ValueError("give a reason for the exclusion")
    Rater.objects.filter(pk=rater.pk).update(excluded_at=timezone.now(), excluded_reason=reason)


def include_rater(rater: Rater) -> None:
    """Undo :func:`exclude_rater` (the pre-registered rule still applies)."""
    Rater.objects.filter(pk=rater.pk).update(excluded_at=None, excluded_reason="")


def reset_rater(rater: Rater) -> int:
    """Delete the rater's answers and send them back to the instructions, e.g. after a
    technical failure; their trial plan (and counterbalancing slot) is kept, and the report
    counts the reset. Returns the number of answers deleted."""
    with transaction.atomic():
        locked = Rater.objects.select_for_update().get(pk=rater.pk)
        n, _ = Answer.objects.filter(trial__rater=locked).delete()
        Trial.objects.filter(rater=locked).update(shown_at=None)
        if locked.step in (Rater.Step.TRIALS, Rater.Step.DONE):
            advance(locked, locked.step, Rater.Step.INSTRUCTIONS)
        Rater.objects.filter(pk=locked.pk).update(finished=None,
                                                  reset_count=locked.reset_count + 1)
    return n
