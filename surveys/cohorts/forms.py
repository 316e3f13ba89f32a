"""Forms of the researcher side."""

from __future__ import annotations

from django import forms

from ..models import Cohort


class CohortForm(forms.ModelForm):
    """Create a cohort: a name, a description, and whether to keep the identity mapping."""

    class Meta:
        model = Cohort
        fields = ["name", "description", "keep_mapping"]
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}
        labels = {"keep_mapping": "Keep the pseudonym → identity mapping (visible to this "
                                  "cohort's researchers only)"}
