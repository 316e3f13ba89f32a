"""``python manage.py create_researcher USER [--password P] [--staff]`` — a researcher account.

Adds the user to the ``researcher`` group (created if missing). Without
``--password`` a random password is generated and printed.
"""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandParser

from surveys.access import RESEARCHER_GROUP


class Command(BaseCommand):
    help = "Create (or reset) a researcher account and print its password."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", default=None)
        parser.add_argument("--staff", action="store_true", help="also staff + superuser (admin, RQ)")

    def handle(self, *args, **opts) -> None:
        password = opts["password"] or secrets.token_urlsafe(9)
        User = get_user_model()
        user, created = User.objects.get_or_create(username=opts["username"])
        user.set_password(password)
        user.is_active = True
        if opts["staff"]:
            user.is_staff = user.is_superuser = True
        user.save()
        group, _ = Group.objects.get_or_create(name=RESEARCHER_GROUP)
        user.groups.add(group)
        self.stdout.write(f"{'created' if created else 'updated'} researcher "
                          f"{user.username!r} with password {password!r}")
