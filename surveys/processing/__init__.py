"""Background work: the row + RQ job protocol (``rowjobs``), the per-subject stage
jobs (``jobs``) and stages (``stages``: thin adapters over :mod:`pipeline`), the
cohort re-identification summary (``reid``) and the viewer data cache (``viewer``)."""
