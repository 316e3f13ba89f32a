"""``python manage.py study_power STUDY_ID`` — simulation-based power of a study's design.

Computes the estimate in this process (no queue) and stores it with the study, where the
study page shows it. Options override the expected rates and the simulation size.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from surveys.models import Study
from surveys.studies.design import DesignError
from surveys.studies.power import DEFAULTS, request_estimate
from surveys.studies.service import validate_study


class Command(BaseCommand):
    help = "Simulation-based power / precision of a study design (mixed model, Wilson CIs)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("study_id", type=int)
        for name, value in DEFAULTS.items():
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)

    def handle(self, *args: Any, **opts: Any) -> None:
        study = Study.objects.filter(pk=opts["study_id"]).first()
        if study is None:
            raise CommandError("no such study")
        try:
            validate_study(study)
        except DesignError as exc:
            raise CommandError(f"the design is impossible: {exc}") from None
        inputs = {k: opts[k] for k in DEFAULTS}
        pe = request_estimate(study, inputs, run_now=True)
        if pe.status != "done":
            raise CommandError(f"estimate failed: {pe.error}")
        self.stdout.write(json.dumps(pe.result, indent=2))
