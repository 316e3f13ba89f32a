"""Cohorts as researchers handle them: import (``importing``, browser ``uploads``),
the dashboard and subject pages (``views``, ``viewer_views``, ``qa_grid``), identity
tables (``identity``) and patients shared between cohorts (``overlap``)."""
