"""The one rule for error text that reaches a user (researcher page, CLI, job status).

Privacy rule: an error shown to a user never carries a patient identifier, a header
value or an input path. The project's own errors (``ValueError`` subclasses such as
:class:`pipeline.dicom_io.SeriesError`) are written without identifiers, so their
first line is shown. Operating-system errors carry file names, so only their reason
(``strerror``) is kept. Anything else is an internal error: only its class name is
shown, and the details go to the worker log without the message text.
"""

from __future__ import annotations

import pydicom.errors

MAX_CHARS = 500


def safe_message(exc: BaseException, *, trust_value_errors: bool = True,
                 internal: str = "see the worker log") -> str:
    """A one-line, identifier-free reason for ``exc``.

    ``trust_value_errors=False`` treats ``ValueError`` texts as internal too (for code
    paths where a ``ValueError`` may come from a library that quotes its input).
    ``internal`` is appended to the internal-error text (what the user can do).
    """
    if isinstance(exc, OSError):
        return f"file system error: {exc.strerror or exc.__class__.__name__}"
    if isinstance(exc, pydicom.errors.InvalidDicomError):
        return "invalid DICOM file in series"
    if trust_value_errors and isinstance(exc, ValueError) and str(exc).strip():
        return str(exc).strip().splitlines()[0][:MAX_CHARS]
    return f"internal error ({exc.__class__.__name__}); {internal}"
