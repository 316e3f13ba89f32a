"""Deployment checks (``manage.py check --deploy``): secrets, debug mode, folder modes.

``DEIDSTUDY_PRODUCTION=1`` already refuses to start without both secrets (settings);
these checks also catch a deployment that forgot ``DEIDSTUDY_PRODUCTION`` or uses weak
values, and state folders other users can read.
"""

from __future__ import annotations

import stat
from pathlib import Path

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

#: Shortest accepted project secret (characters); ``secrets.token_urlsafe(48)`` gives 64.
MIN_PROJECT_SECRET_LENGTH = 32


@register(Tags.security, deploy=True)
def check_secrets(app_configs=None, **kwargs) -> list:
    """The project secret and Django's key are set, private, strong and distinct."""
    errors = []
    project = getattr(settings, "PROJECT_SECRET", "") or ""
    key = getattr(settings, "SECRET_KEY", "") or ""
    hint = ("set it in the environment, e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'; see the README's security section")
    if not project or project == getattr(settings, "DEV_PROJECT_SECRET", None):
        errors.append(Error(
            "DEIDSTUDY_PROJECT_SECRET is not set: the published development value is in use, "
            "with which anybody can link de-identified UIDs to the original ones and undo "
            "the date shift", hint=hint, id="deidstudy.E001"))
    elif len(project) < MIN_PROJECT_SECRET_LENGTH:
        errors.append(Error(
            f"DEIDSTUDY_PROJECT_SECRET is shorter than {MIN_PROJECT_SECRET_LENGTH} characters",
            hint=hint, id="deidstudy.E002"))
    if not key or key == getattr(settings, "DEV_SECRET_KEY", None):
        errors.append(Error(
            "DEIDSTUDY_SECRET_KEY is not set: the published development key is in use "
            "(sessions and CSRF tokens can be forged)", hint=hint, id="deidstudy.E003"))
    if project and key and project == key:
        errors.append(Error(
            "DEIDSTUDY_PROJECT_SECRET and DEIDSTUDY_SECRET_KEY are the same value; use two "
            "secrets (Django's key can be rotated, the project secret cannot)",
            id="deidstudy.E004"))
    return errors


@register(Tags.security, deploy=True)
def check_production_mode(app_configs=None, **kwargs) -> list:
    """Production mode is on and debug mode is off."""
    errors = []
    if not getattr(settings, "PRODUCTION", False):
        errors.append(Error(
            "DEIDSTUDY_PRODUCTION is not set: cookies are not secure-only and HTTPS is not "
            "enforced", hint="set DEIDSTUDY_PRODUCTION=1 on a deployment", id="deidstudy.E005"))
    if getattr(settings, "PRODUCTION", False) and settings.DEBUG:
        errors.append(Error(
            "DEIDSTUDY_DEBUG is on in production: error pages would show request data and "
            "local variables (paths, header values)", hint="unset DEIDSTUDY_DEBUG",
            id="deidstudy.E006"))
    return errors


def _open_to_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:  # not created yet: it will be created 0700 (see surveys.apps)
        return False


@register(Tags.security, deploy=True)
def check_folder_modes(app_configs=None, **kwargs) -> list:
    """The state and data folders are not open to other users of the machine."""
    warnings = []
    for name in ("VAR_DIR", "DATA_DIR"):
        folder = getattr(settings, name, None)
        if folder is not None and _open_to_others(Path(folder)):
            mode = stat.S_IMODE(Path(folder).stat().st_mode)
            warnings.append(Warning(
                f"{name} ({mode:04o}) can be read or entered by other users of this machine; "
                "it holds identifiable originals", hint=f"chmod -R go-rwx {folder}",
                id="deidstudy.W001"))
    return warnings
