"""The package as a user installs it: a wheel built from the sources, installed into a
fresh virtual environment, runs from a folder outside the checkout.

The wheel must carry every module, the migrations, the management commands, the
templates, the static files (including the vendored viewer) and the models; Django
must find them there (``deidstudy.settings`` falls back to the packaged copies).
Dependencies come from the test's own environment (a ``.pth`` file), not the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pipeline", "surveys", "deidstudy", "templates", "static",
           "pyproject.toml", "requirements.txt", "README.md")

pytestmark = pytest.mark.slow

CHECK = r"""
import json, os, sys
from pathlib import Path
import django
import deidstudy
django.setup()
from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.management import call_command, get_commands
from django.db.migrations.loader import MigrationLoader
from django.template.loader import get_template

expect = json.loads(sys.argv[1])
for name in expect["templates"]:
    get_template(name)
missing_static = [n for n in expect["static"] if not finders.find(n)]
loader = MigrationLoader(None, ignore_no_migrations=True)
migrations = sorted(name for app, name in loader.disk_migrations if app == "surveys")
commands = sorted(n for n, app in get_commands().items() if app == "surveys")
call_command("migrate", verbosity=0)
call_command("check", verbosity=0)
import pipeline.models
models = sorted(p.name for p in Path(list(pipeline.models.__path__)[0]).iterdir()
                if p.suffix in (".onnx", ".pt"))
print(json.dumps({"package": deidstudy.__file__, "missing_static": missing_static,
                  "migrations": migrations, "commands": commands, "models": models,
                  "templates_dir": str(settings.TEMPLATES[0]["DIRS"][0])}))
"""


def _copy_sources(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def _relative_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix in suffixes)


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(tmp_path):
    src, out, venv, run = (tmp_path / n for n in ("src", "dist", "venv", "run"))
    src.mkdir()
    run.mkdir()
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True,
                   capture_output=True)
    (wheel,) = out.glob("deidstudy-*.whl")

    # every module of the source tree is in the wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.relative_to(ROOT).as_posix() for pkg in ("pipeline", "surveys", "deidstudy")
                     for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    assert [m for m in modules if m not in names] == []

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deidstudy-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    expect = {
        "templates": _relative_files(ROOT / "templates", (".html", ".txt")),
        "static": _relative_files(ROOT / "static", (".css", ".js", ".png", ".jpg")),
    }
    assert len(expect["templates"]) > 20 and any("niivue" in s for s in expect["static"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "DATABASE_URL") and not k.startswith("DEIDSTUDY_")}
    env.update(DJANGO_SETTINGS_MODULE="deidstudy.settings", DEIDSTUDY_VAR_DIR=str(run / "var"),
               DEIDSTUDY_SECRET_KEY="wheel-test-" + "x" * 40)
    r = subprocess.run([str(py), "-c", CHECK, json.dumps(expect)], cwd=run, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    assert Path(got["package"]).is_relative_to(venv)  # the installed copy, not the checkout
    assert Path(got["templates_dir"]).is_relative_to(venv)
    assert got["missing_static"] == []
    assert got["migrations"] == sorted(p.stem for p in (ROOT / "surveys/migrations").glob("0*.py"))
    assert got["commands"] == sorted(p.stem for p in (ROOT / "surveys/management/commands")
                                     .glob("*.py") if not p.name.startswith("_"))
    assert got["models"] == sorted(p.name for p in (ROOT / "pipeline/models").iterdir()
                                   if p.suffix in (".onnx", ".pt"))
    assert (run / "var" / "deidstudy.sqlite3").is_file()
