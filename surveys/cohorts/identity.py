"""Identity tables (pseudonym → PatientID, name, birth date): who may see them, and the audit.

Only the cohort's own researchers (its owner and the researchers added to it) may see a
cohort's identity table — superusers and staff included, they are no exception — and
only on the mapping page after an explicit confirmation. Every view is recorded in the
database (:class:`surveys.models.IdentityAccess`) *before* the table is built, and logged
on the ``deidstudy.audit`` logger (recorded at INFO whatever the root log level).
The Django admin never shows identity fields (see :mod:`surveys.admin`).
"""

from __future__ import annotations

import csv
import io
import logging

from django.db import transaction
from django.http import HttpRequest

from ..login_throttle import client_address
from ..models import Cohort, IdentityAccess

audit = logging.getLogger("deidstudy.audit")

MAPPING_COLUMNS = ["pseudonym", "PatientID", "PatientName", "PatientBirthDate"]


def may_see_identities(user, cohort: Cohort) -> bool:
    """True for an active owner or researcher of ``cohort`` (and nobody else)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return cohort.owner_id == user.pk or cohort.researchers.filter(pk=user.pk).exists()


def mapping_csv(cohort: Cohort, user, request: HttpRequest | None = None) -> str:
    """The cohort's identity table as CSV, after recording the view; raises
    ``PermissionError`` for a user who may not see it."""
    if not may_see_identities(user, cohort):
        raise PermissionError("only the cohort's researchers may see its identity table")
    with transaction.atomic():
        subjects = list(cohort.subjects.select_related("identity"))
        IdentityAccess.objects.create(
            cohort=cohort, cohort_label=f"#{cohort.pk} {cohort.name}"[:220], user=user,
            username=user.get_username(), action="mapping_csv", n_subjects=len(subjects),
            client_address=client_address(request)[:64])
    audit.info("identity table of cohort %s (%d subjects) shown to user %s (%s)", cohort.pk,
               len(subjects), user.pk, user.get_username())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(MAPPING_COLUMNS)
    for subject in subjects:
        ident = getattr(subject, "identity", None)
        w.writerow([subject.pseudonym, getattr(ident, "patient_id", ""),
                    getattr(ident, "patient_name", ""), getattr(ident, "birth_date", "")])
    return buf.getvalue()


def recent_accesses(cohort: Cohort, limit: int = 20) -> list[IdentityAccess]:
    """The cohort's most recent identity-table views, newest first."""
    return list(cohort.identity_accesses.all()[:limit])
