"""``python manage.py create_researcher USER [--password P] [--staff | --superuser]`` — a
researcher account.

Adds the user to the ``researcher`` group (created if missing). Without
``--password`` a random password is generated and printed.

``--staff`` opens the Django admin and the RQ dashboard to the user as an *operator*:
the ``operator`` group may view the pipeline, study and audit tables and retry stages
and uploads, but not manage accounts — so it cannot make itself a superuser. It is not
a superuser. ``--superuser`` is the explicit choice for that. Either way nobody sees the
identity table of a cohort they are not a researcher of (see :mod:`surveys.cohorts.identity`).
Running the command again resets the account to exactly what its options say.
"""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from surveys.access import RESEARCHER_GROUP

OPERATOR_GROUP = "operator"
#: Models of the surveys app an operator may change (the admin's retry actions).
OPERATOR_CHANGES = ("stagerun", "cohortupload")


def operator_group() -> Group:
    """The ``operator`` group: view every surveys table, change stage runs and uploads."""
    group, _ = Group.objects.get_or_create(name=OPERATOR_GROUP)
    perms = Permission.objects.filter(content_type__app_label="surveys").filter(
        codename__startswith="view_")
    changes = Permission.objects.filter(content_type__app_label="surveys",
                                        codename__in=[f"change_{m}" for m in OPERATOR_CHANGES])
    group.permissions.set(list(perms) + list(changes))
    return group


class Command(BaseCommand):
    help = "Create (or reset) a researcher account and print its password."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", default=None)
        role = parser.add_mutually_exclusive_group()
        role.add_argument("--staff", action="store_true",
                          help="also an operator: admin (read-only tables, retries) and RQ "
                               "dashboard; not a superuser")
        role.add_argument("--superuser", action="store_true",
                          help="also a superuser (every admin permission, account management)")

    def handle(self, *args, **opts) -> None:
        password = opts["password"] or secrets.token_urlsafe(9)
        User = get_user_model()
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=opts["username"])
            user.set_password(password)
            user.is_active = True
            user.is_superuser = bool(opts["superuser"])
            user.is_staff = bool(opts["staff"] or opts["superuser"])
            user.save()
            group, _ = Group.objects.get_or_create(name=RESEARCHER_GROUP)
            user.groups.add(group)
            operators = operator_group() if opts["staff"] else None
            if operators is not None:
                user.groups.add(operators)
            else:
                user.groups.remove(*Group.objects.filter(name=OPERATOR_GROUP))
        role = ("superuser" if opts["superuser"] else "operator (staff, not superuser)"
                if opts["staff"] else "researcher")
        self.stdout.write(f"{'created' if created else 'updated'} {role} "
                          f"{user.username!r} with password {password!r}")
