#!/usr/bin/env python3
"""Build deidstudy's own copy of DICOM PS3.15 Table E.1-1 (confidentiality profile).

Reads the reference JSON (innolitics/dicom-standard extraction, see
``shared/reference/README.md``) and writes ``pipeline/data/confidentiality_profile.json``,
a compact table the pipeline uses at run time, so that the project runs without the
``shared/`` folder.

Output format (one attribute per line so that diffs stay readable)::

    {"source": ..., "option_columns": {...},
     "attributes": {"00080050": {"keyword": "AccessionNumber", "name": "Accession Number",
                                 "basic": "Z"}, ...
                    "60xx3000": {..., "options": {"cleanGraphOpt": "C"}}},
     "private_attributes": {"name": "Private Attributes", "basic": "X",
                            "options": {"rtnSafePrivOpt": "C"}}}

Keys are the 8 hex digits of the tag in lower case; an ``x`` is a masked digit of a
repeating group (``50xxxxxx`` = Curve Data, ``60xx3000`` = Overlay Data).

Usage::

    python scripts/build_profile_table.py [--reference PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "dicom-ps3.15-confidentiality-profile.json"
DEFAULT_OUTPUT = ROOT / "pipeline" / "data" / "confidentiality_profile.json"

#: Option columns of the reference, with the PS3.15 option each one belongs to.
OPTION_COLUMNS = {
    "rtnSafePrivOpt": "Retain Safe Private Option",
    "rtnUIDsOpt": "Retain UIDs Option",
    "rtnDevIdOpt": "Retain Device Identity Option",
    "rtnInstIdOpt": "Retain Institution Identity Option",
    "rtnPatCharsOpt": "Retain Patient Characteristics Option",
    "rtnLongFullDatesOpt": "Retain Longitudinal Temporal Information Full Dates Option",
    "rtnLongModifDatesOpt": "Retain Longitudinal Temporal Information Modified Dates Option",
    "cleanDescOpt": "Clean Descriptors Option",
    "cleanStructContOpt": "Clean Structured Content Option",
    "cleanGraphOpt": "Clean Graphics Option",
}
ACTIONS = {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
TAG_RE = re.compile(r"^\(([0-9A-Fx]{4}),([0-9A-Fx]{4})\)$", re.IGNORECASE)
PRIVATE_TAG = "(GGGG,EEEE) WHERE GGGG IS ODD"


def table_key(tag: str) -> str:
    """Return the table key (``"ggggeeee"``, lower case, ``x`` = masked digit) of ``(GGGG,EEEE)``.

    Raises ``ValueError`` for anything that is not a (possibly masked) tag.
    """
    m = TAG_RE.match(tag.strip())
    if not m:
        raise ValueError(f"not a tag: {tag!r}")
    return (m.group(1) + m.group(2)).lower()


def _keyword(key: str) -> str:
    """pydicom keyword of a table key ('' if pydicom does not know it)."""
    from pydicom.datadict import keyword_for_tag

    probe = key.replace("x", "0")  # 60xx3000 -> 60003000: pydicom resolves repeaters
    try:
        return keyword_for_tag(int(probe, 16)) or ""
    except (KeyError, ValueError):
        return ""


def build_table(reference_rows: list[dict]) -> dict:
    """Convert the reference rows to deidstudy's compact table (see module docstring)."""
    attributes: dict[str, dict] = {}
    private: dict | None = None
    for row in reference_rows:
        basic = row["basicProfile"].strip()
        if basic not in ACTIONS:
            raise ValueError(f"unknown action {basic!r} for {row['tag']}")
        options = {col: row[col].strip() for col in OPTION_COLUMNS if row.get(col)}
        name = " ".join(row["name"].split())
        entry: dict = {"name": name, "basic": basic}
        if options:
            entry["options"] = options
        if row["tag"].strip().upper() == PRIVATE_TAG:
            private = entry
            continue
        key = table_key(row["tag"])
        if key in attributes:
            raise ValueError(f"duplicate tag {row['tag']}")
        attributes[key] = {"keyword": _keyword(key), **entry}
    if private is None:
        raise ValueError("the reference has no 'Private Attributes' row")
    return {
        "source": "DICOM PS3.15 Table E.1-1 (Application Level Confidentiality Profile "
        "Attributes), via innolitics/dicom-standard (2025-01); built by "
        "scripts/build_profile_table.py",
        "option_columns": OPTION_COLUMNS,
        "attributes": dict(sorted(attributes.items())),
        "private_attributes": private,
    }


def dumps_table(table: dict) -> str:
    """Serialise the table as JSON with one attribute per line."""
    lines = ["{"]
    for head in ("source", "option_columns"):
        lines.append(f"  {json.dumps(head)}: {json.dumps(table[head])},")
    lines.append('  "attributes": {')
    items = list(table["attributes"].items())
    for n, (key, entry) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        lines.append(f"    {json.dumps(key)}: {json.dumps(entry)}{comma}")
    lines.append("  },")
    lines.append(f'  "private_attributes": {json.dumps(table["private_attributes"])}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not args.reference.is_file():
        print(f"reference table not found: {args.reference}", file=sys.stderr)
        return 2
    rows = json.loads(args.reference.read_text(encoding="utf-8"))
    table = build_table(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dumps_table(table), encoding="utf-8")
    print(f"wrote {len(table['attributes'])} attributes + private row to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
