"""The same patient in several cohorts of one researcher.

Pseudonyms are assigned per cohort (``SUBJ-0001`` of one cohort and ``SUBJ-0001`` of
another are unrelated people, and one patient gets a different pseudonym in every
cohort), so two de-identified cohorts shared separately cannot be linked through their
pseudonyms. Inside the platform every subject keeps a keyed hash of its PatientID
(:attr:`surveys.models.Subject.patient_key`, HMAC with the project secret — the same
patient gives the same key in every cohort, and the key reveals nothing without the
secret). That is how an import is matched against the researcher's other cohorts: the
researcher, who uploaded both, is told that e.g. ``SUBJ-0003`` here is ``SUBJ-0011`` in
"Trauma 2023", so the patient is not counted twice in an analysis by mistake.

Only cohorts the user owns or is a researcher of are searched (not every cohort a
superuser may open): nothing about other researchers' cohorts is revealed.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Q

from ..models import Cohort, Subject

EXPLANATION = ("Pseudonyms are assigned per cohort, so the same patient has a different "
               "pseudonym in each cohort (de-identified cohorts shared separately cannot be "
               "linked by pseudonym). The match is made on a keyed hash of the patient ID, "
               "never on the ID itself.")


@dataclass(frozen=True)
class Match:
    """Subject ``pseudonym`` of this cohort is ``other_pseudonym`` in ``other_cohort``."""

    pseudonym: str
    other_cohort_id: int
    other_cohort_name: str
    other_pseudonym: str


def own_cohorts(user):
    """Cohorts ``user`` owns or is a researcher of."""
    if not getattr(user, "is_authenticated", False):
        return Cohort.objects.none()
    return Cohort.objects.filter(Q(owner=user) | Q(researchers=user)).distinct()


def matches(user, cohort: Cohort, subjects=None) -> list[Match]:
    """Subjects of ``cohort`` (or of ``subjects``) that are also in another of ``user``'s
    cohorts, sorted by pseudonym then cohort."""
    subs = list(subjects) if subjects is not None else list(cohort.subjects.all())
    by_key = {s.patient_key: s.pseudonym for s in subs if s.patient_key}
    if not by_key:
        return []
    others = (Subject.objects.filter(patient_key__in=list(by_key),
                                     cohort__in=own_cohorts(user).exclude(pk=cohort.pk))
              .select_related("cohort").order_by("cohort__name", "pseudonym"))
    out = [Match(by_key[o.patient_key], o.cohort_id, o.cohort.name, o.pseudonym) for o in others]
    return sorted(out, key=lambda m: (m.pseudonym, m.other_cohort_name, m.other_pseudonym))
