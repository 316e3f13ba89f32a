"""Forms of the study pages (researcher design/invitations, rater questionnaire)."""

from __future__ import annotations

import secrets

from django import forms

from ..models import DEFAULT_GROUPS, STUDY_CONDITIONS, Study


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


class StudyForm(forms.ModelForm):
    """Design of a study; ``views`` and ``groups`` are comma-separated lists."""

    conditions = forms.MultipleChoiceField(
        choices=[(c, c) for c in STUDY_CONDITIONS], initial=list(STUDY_CONDITIONS),
        widget=forms.CheckboxSelectMultiple)
    views = forms.CharField(initial="yaw+0, yaw+30",
                            help_text="render views, comma-separated (e.g. yaw+0, yaw+30)")
    groups = forms.CharField(initial=", ".join(DEFAULT_GROUPS),
                             help_text="rater groups, comma-separated")
    seed = forms.IntegerField(required=False, min_value=0,
                              help_text="blank = a random seed (recorded)")

    class Meta:
        model = Study
        fields = ["name", "cohort", "n_choices", "conditions", "views", "trials_per_rater",
                  "n_practice", "n_catch", "groups", "ask_confidence", "time_limit_s",
                  "consent_text", "seed"]

    def __init__(self, *args, cohorts=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if cohorts is not None:
            self.fields["cohort"].queryset = cohorts
        if self.instance.pk:
            self.initial["views"] = ", ".join(self.instance.views)
            self.initial["groups"] = ", ".join(self.instance.groups)
        self.fields["n_choices"].min_value = 2

    def clean_views(self) -> list[str]:
        views = _split(self.cleaned_data["views"])
        if not views:
            raise forms.ValidationError("name at least one view")
        return list(dict.fromkeys(views))

    def clean_groups(self) -> list[str]:
        groups = _split(self.cleaned_data["groups"])
        if not groups:
            raise forms.ValidationError("name at least one group")
        if "all" in groups:
            raise forms.ValidationError('"all" is reserved for the pooled results')
        if any(len(g) > 64 for g in groups):
            raise forms.ValidationError("group names are at most 64 characters")
        return list(dict.fromkeys(groups))

    def clean_seed(self) -> int:
        seed = self.cleaned_data.get("seed")
        return secrets.randbits(31) if seed is None else seed


class InvitationForm(forms.Form):
    """A new invitation link for one group."""

    group = forms.ChoiceField()
    label = forms.CharField(required=False, max_length=100)
    expires_at = forms.DateTimeField(required=False, help_text="UTC, e.g. 2026-12-31 18:00")
    max_uses = forms.IntegerField(required=False, min_value=1)

    def __init__(self, *args, groups: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["group"].choices = [(g, g) for g in groups]


class QuestionnaireForm(forms.Form):
    """Rater questionnaire: group confirmation and years of experience."""

    group = forms.ChoiceField(label="Which group describes you?")
    years_experience = forms.IntegerField(min_value=0, max_value=80,
                                          label="Years of professional experience")

    def __init__(self, *args, groups: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["group"].choices = [(g, g) for g in groups]
