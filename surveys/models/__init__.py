"""Models of the surveys app.

Cohorts, subjects, series and pipeline stage runs live in :mod:`surveys.models.cohorts`;
study / rater models (issue #6) go in their own module here and are imported below.
"""

from .cohorts import *
from .rowjob import *
from .security import *
from .studies import *
