"""``python manage.py import_cohort PATH --name NAME`` — import a folder or zip of DICOM.

Creates the cohort (or adds to an existing one with ``--cohort ID``), imports all or
nothing with the same safety checks as the web upload, and with ``--enqueue``
queues the pipeline for the new subjects. Output names subjects by pseudonym only.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from surveys.cohorts.importing import ImportRejected, import_folder, import_zip
from surveys.cohorts.overlap import EXPLANATION, matches
from surveys.models import Cohort
from surveys.processing import jobs, rowjobs


class Command(BaseCommand):
    help = "Import a folder or zip archive of DICOM (one folder per subject) into a cohort."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="folder or .zip archive")
        parser.add_argument("--name", help="name of the new cohort")
        parser.add_argument("--cohort", type=int, help="add to this existing cohort id instead")
        parser.add_argument("--owner", help="username of the owner (default: first superuser)")
        parser.add_argument("--keep-mapping", action="store_true",
                            help="store the pseudonym → identity mapping (new cohort only)")
        parser.add_argument("--copy", action="store_true",
                            help="copy files from a folder (default for folders; zips are unpacked)")
        parser.add_argument("--enqueue", action="store_true", help="queue the pipeline (needs Redis)")

    def handle(self, *args, **opts) -> None:
        path: Path = opts["path"]
        if not path.exists():
            raise CommandError("the path does not exist")
        if opts["cohort"]:
            try:
                cohort = Cohort.objects.get(pk=opts["cohort"])
            except Cohort.DoesNotExist:
                raise CommandError(f"no cohort with id {opts['cohort']}") from None
        else:
            if not opts["name"]:
                raise CommandError("give --name for a new cohort or --cohort ID")
            User = get_user_model()
            if opts["owner"]:
                owner = User.objects.filter(username=opts["owner"]).first()
            else:
                owner = User.objects.filter(is_superuser=True).order_by("pk").first()
            if owner is None:
                raise CommandError("no owner: create a user first or give --owner USERNAME")
            cohort = None
        try:
            with rowjobs.push_failures() as not_queued, transaction.atomic():
                if cohort is None:
                    cohort = Cohort.objects.create(name=opts["name"], owner=owner,
                                                   keep_mapping=opts["keep_mapping"])
                    cohort.researchers.add(owner)
                say = (lambda m: self.stdout.write(m)) if opts["verbosity"] > 1 else None
                if path.is_file():
                    result = import_zip(cohort, path)
                else:
                    result = import_folder(cohort, path, move=False, progress=say)
                if opts["enqueue"]:
                    for subject in cohort.subjects.filter(pseudonym__in=result.subjects):
                        jobs.enqueue_subject(subject)
        except ImportRejected as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"cohort {cohort.pk} ({cohort.name}): imported {len(result.subjects)} "
                          f"subject(s), {result.n_series} series, {result.n_files} files"
                          + (" — pipeline queued" if opts["enqueue"] else ""))

        new = cohort.subjects.filter(pseudonym__in=result.subjects)
        found = matches(cohort.owner, cohort, new)
        for m in found:
            self.stdout.write(f"note: {m.pseudonym} is the same patient as {m.other_pseudonym} in "
                              f"cohort {m.other_cohort_id} ({m.other_cohort_name})")
        if found:
            self.stdout.write(f"      {EXPLANATION}")
        if not_queued:
            self.stderr.write(f"warning: Redis was not reachable; {len(not_queued)} stage(s) are "
                              "recorded as queued and start when a worker finds Redis again")
