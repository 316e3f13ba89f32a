"""``python manage.py pipeline_status COHORT [--wait] [--json]`` — stage counts of a cohort.

With ``--wait`` it polls until no stage is queued or running and prints a progress
line; exit status 1 if any stage failed.
"""

from __future__ import annotations

import json
import sys
import time

from django.core.management.base import BaseCommand, CommandError, CommandParser

from surveys.models import Cohort
from surveys.processing.jobs import cohort_progress


class Command(BaseCommand):
    help = "Show (or wait for) the pipeline status of a cohort."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("cohort", type=int)
        parser.add_argument("--wait", action="store_true")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (with --wait)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **opts) -> None:
        try:
            cohort = Cohort.objects.get(pk=opts["cohort"])
        except Cohort.DoesNotExist:
            raise CommandError("no such cohort") from None
        t0 = time.monotonic()
        while True:
            p = cohort_progress(cohort)
            if opts["json"] and not opts["wait"]:
                self.stdout.write(json.dumps(p))
                break
            c = p["counts"]
            line = (f"\r{c['done']}/{p['total']} stages done, {c['running']} running, "
                    f"{c['queued']} queued, {c['failed']} failed")
            self.stdout.write(line, ending="")
            sys.stdout.flush()
            if not opts["wait"] or p["settled"]:
                break
            if time.monotonic() - t0 > opts["timeout"]:
                raise CommandError("timed out waiting for the pipeline")
            time.sleep(1.0)
        self.stdout.write("")
        if p["counts"]["failed"]:
            for s in p["subjects"]:
                for st in s["stages"]:
                    if st["status"] == "failed":
                        self.stderr.write(f"{s['pseudonym']} {st['stage']}: {st['error']}")
            raise CommandError(f"{p['counts']['failed']} stage(s) failed")
