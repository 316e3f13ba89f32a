"""Forms of the study pages (researcher design/invitations, rater questionnaire)."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django import forms
from django.utils import timezone

from ..models import DEFAULT_GROUPS, DEFAULT_LAY_GROUPS, STUDY_CONDITIONS, Study

#: Invitations show identifiable original faces: they expire and have a use limit by default.
INVITATION_DEFAULT_DAYS = 30
INVITATION_MAX_DAYS = 365
INVITATION_DEFAULT_USES = 30


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


class StudyForm(forms.ModelForm):
    """Design of a study; ``views`` and ``groups`` are comma-separated lists."""

    conditions = forms.MultipleChoiceField(
        label="Conditions",
        choices=[("control", "control (original target vs original candidates)"),
                 ("deidentified", "de-identified (de-identified target vs original "
                                  "candidates)")],
        initial=list(STUDY_CONDITIONS), widget=forms.CheckboxSelectMultiple)
    views = forms.CharField(label="Render views", initial="yaw+0, yaw+30",
                            help_text="comma-separated (e.g. yaw+0, yaw+30)")
    groups = forms.CharField(label="Rater groups", initial=", ".join(DEFAULT_GROUPS),
                             help_text="comma-separated; each invitation belongs to one group, "
                                       "which raters cannot change")
    lay_groups = forms.CharField(
        label="Groups of the general public", required=False,
        initial=", ".join(DEFAULT_LAY_GROUPS),
        help_text="comma-separated subset of the rater groups; they are not asked about "
                  "professional experience")
    panel_completion_url = forms.URLField(
        label="Panel completion URL", required=False, assume_scheme="https",
        help_text=Study._meta.get_field("panel_completion_url").help_text)
    seed = forms.IntegerField(label="Random seed", required=False, min_value=0,
                              help_text="blank = a random seed (recorded)")

    class Meta:
        model = Study
        fields = ["name", "cohort", "n_choices", "conditions", "views", "design",
                  "trials_per_rater", "n_practice", "n_catch", "groups", "lay_groups",
                  "ask_confidence", "time_limit_s", "exclusion_min_catch",
                  "exclude_incomplete", "primary_analysis", "panel_completion_url",
                  "panel_completion_code", "consent_text", "seed"]
        labels = {"name": "Study name", "cohort": "Cohort"}

    def __init__(self, *args, cohorts=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if cohorts is not None:
            self.fields["cohort"].queryset = cohorts
        if self.instance.pk:
            self.initial["views"] = ", ".join(self.instance.views)
            self.initial["groups"] = ", ".join(self.instance.groups)
            self.initial["lay_groups"] = ", ".join(self.instance.lay_groups or [])
        self.fields["n_choices"].min_value = 2
        self.fields["design"].widget = forms.RadioSelect(choices=self.fields["design"].choices)
        self.fields["exclusion_min_catch"].min_value = 0.0
        self.fields["exclusion_min_catch"].max_value = 1.0

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

    def clean_lay_groups(self) -> list[str]:
        return list(dict.fromkeys(_split(self.cleaned_data.get("lay_groups") or "")))

    def clean_exclusion_min_catch(self):
        v = self.cleaned_data.get("exclusion_min_catch")
        if v is not None and not 0.0 <= v <= 1.0:
            raise forms.ValidationError("a fraction from 0 to 1 (e.g. 0.5)")
        return v

    def clean(self):
        data = super().clean()
        groups, lay = data.get("groups") or [], data.get("lay_groups") or []
        bad = [g for g in lay if g not in groups]
        if bad:
            self.add_error("lay_groups", "must be among the rater groups")
        code, url = data.get("panel_completion_code"), data.get("panel_completion_url")
        if url and not url.startswith("https://"):
            self.add_error("panel_completion_url", "use an https:// address")
        if code and not url:
            self.add_error("panel_completion_url", "give the address raters return to")
        return data

    def clean_seed(self) -> int:
        seed = self.cleaned_data.get("seed")
        return secrets.randbits(31) if seed is None else seed


class InvitationForm(forms.Form):
    """A new invitation link for one group; it expires and has a use limit (defaults:
    :data:`INVITATION_DEFAULT_DAYS` days, :data:`INVITATION_DEFAULT_USES` uses)."""

    group = forms.ChoiceField(label="Rater group")
    label = forms.CharField(label="Label (for you)", required=False, max_length=100)
    expires_at = forms.DateTimeField(label="Expires (UTC)",
                                     help_text=f"at most {INVITATION_MAX_DAYS} days ahead, "
                                               "e.g. 2026-12-31 18:00")
    max_uses = forms.IntegerField(label="Maximum number of raters", min_value=1,
                                  max_value=100000)

    def __init__(self, *args, groups: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["group"].choices = [(g, g) for g in groups]
        soon = timezone.now() + timedelta(days=INVITATION_DEFAULT_DAYS)
        self.fields["expires_at"].initial = soon.strftime("%Y-%m-%d %H:%M")
        self.fields["max_uses"].initial = INVITATION_DEFAULT_USES

    def clean_expires_at(self):
        v = self.cleaned_data["expires_at"]
        now = timezone.now()
        if v <= now:
            raise forms.ValidationError("the expiry must be in the future")
        if v > now + timedelta(days=INVITATION_MAX_DAYS):
            raise forms.ValidationError(f"at most {INVITATION_MAX_DAYS} days ahead")
        return v


#: Questionnaire answers for people outside the study's professional groups.
OTHER_HEALTH = "another healthcare profession"
NO_HEALTH = "not a healthcare professional"
FAMILIARITY = [("never", "never"), ("rarely", "a few times a year or less"),
               ("monthly", "about monthly"), ("weekly", "weekly or more often")]


class QuestionnaireForm(forms.Form):
    """Rater questionnaire. The group is the invitation's and is not asked; the profession
    is recorded separately (a contradiction is flagged, never used to regroup). Professional
    groups are asked their years of experience; groups of the general public how often they
    look at medical images of faces or heads instead."""

    profession = forms.ChoiceField(label="Which of these describes your profession?")
    years_experience = forms.IntegerField(min_value=0, max_value=80)
    familiarity = forms.ChoiceField(
        label="How often do you look at medical images (CT, MRI, X-ray) of heads or faces?",
        choices=FAMILIARITY, widget=forms.RadioSelect)

    def __init__(self, *args, study, group: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        professions = [g for g in study.groups if not study.is_lay(g)]
        self.fields["profession"].choices = [("", "— choose —")] + [
            (g, g) for g in professions] + [(OTHER_HEALTH, OTHER_HEALTH),
                                            (NO_HEALTH, NO_HEALTH)]
        if study.is_lay(group):
            del self.fields["years_experience"]
        else:
            del self.fields["familiarity"]
            self.fields["years_experience"].label = f"Years of experience as {group}"
