"""``python manage.py demo`` — synthetic cohort → de-identification, on embedded defaults.

Generates a small synthetic cohort with fake patient data, de-identifies it with
the default method, and prints where the outputs and the QA summary are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = "Generate a synthetic CT cohort and de-identify it (outputs in demo-output/)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out", type=Path, default=Path(settings.BASE_DIR) / "demo-output")
        parser.add_argument("--subjects", type=int, default=4)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--size", default="medium", help="synthetic volume size (see synth_cohort)")

    def handle(self, *args, **opts) -> None:
        out: Path = opts["out"]
        inp, deid, mapping = out / "input", out / "deidentified", out / "mapping.json"
        for p in (inp, deid):
            if p.exists():
                shutil.rmtree(p)
        mapping.unlink(missing_ok=True)
        self.stdout.write(f"1/2 generating {opts['subjects']} synthetic subjects in {inp}")
        call_command("synth_cohort", str(inp), subjects=opts["subjects"], seed=opts["seed"],
                     size=opts["size"], verbosity=opts["verbosity"])
        self.stdout.write(f"2/2 de-identifying into {deid}")
        call_command("deidentify", str(inp / "dicom"), str(deid), mapping=str(mapping),
                     registry=str(out / "pseudonym-registry.json"), verbosity=opts["verbosity"],
                     stdout=self.stdout, stderr=self.stderr)
        summary = json.loads((deid / "deid-summary.json").read_text())
        if summary["n_failed"]:
            raise CommandError(f"{summary['n_failed']} series failed; see {deid / 'deid-summary.json'}")
        self.stdout.write("")
        self.stdout.write(f"de-identified DICOM : {deid}/SUBJ-*/S*/")
        self.stdout.write(f"QA summary          : {deid / 'deid-summary.json'}")
        self.stdout.write(f"identity mapping    : {mapping}  (kept outside the output folder)")
        self.stdout.write(f"synthetic input     : {inp / 'dicom'}  (fake identities in headers and names)")
