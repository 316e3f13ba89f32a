"""URLs of studies: researcher pages under ``studies/``, rater pages under ``take/``."""

from django.urls import path

from . import rater_views as rv
from . import researcher_views as sv

app_name = "studies"

urlpatterns = [
    path("studies/", sv.study_list, name="study_list"),
    path("studies/<int:study_id>/", sv.study_detail, name="study_detail"),
    path("studies/<int:study_id>/edit/", sv.study_edit, name="study_edit"),
    path("studies/<int:study_id>/invite/", sv.invite, name="invite"),
    path("studies/<int:study_id>/report/", sv.study_report, name="study_report"),
    path("studies/<int:study_id>/plots/<slug:name>.png", sv.plot, name="plot"),
    path("studies/<int:study_id>/export/responses.csv", sv.export_responses,
         name="export_responses"),
    path("studies/<int:study_id>/export/all-answers.csv", sv.export_all_answers,
         name="export_all_answers"),
    path("studies/<int:study_id>/export/analysis.json", sv.export_analysis,
         name="export_analysis"),
    path("studies/<int:study_id>/export/report.pdf", sv.export_pdf, name="export_pdf"),
    path("studies/<int:study_id>/export/dataset.zip", sv.export_dataset, name="export_dataset"),
    path("studies/<int:study_id>/export/data-dictionary.csv", sv.export_dictionary,
         name="export_dictionary"),
    path("studies/<int:study_id>/export/design.json", sv.export_design, name="export_design"),
    path("studies/<int:study_id>/export/panel.csv", sv.export_panel, name="export_panel"),
    path("studies/<int:study_id>/do/<slug:action>/", sv.study_action, name="study_action"),
    path("studies/<int:study_id>/invitations/<int:inv_id>/revoke/", sv.invitation_action,
         name="revoke_invitation"),
    path("studies/<int:study_id>/raters/<str:code>/<slug:action>/", sv.rater_action,
         name="rater_action"),
    # rater side (no account)
    path("take/", rv.take, name="take"),
    path("take/start/", rv.enter_code, name="enter_code"),
    path("take/i/<str:token>/", rv.invitation, name="invitation"),
    path("take/r/<str:token>/", rv.resume, name="resume"),
    path("take/consent/", rv.consent, name="consent"),
    path("take/about-you/", rv.questionnaire, name="questionnaire"),
    path("take/instructions/", rv.instructions, name="instructions"),
    path("take/trial/", rv.trials, name="trials"),
    path("take/feedback/<str:token>/", rv.feedback, name="feedback"),
    path("take/img/<str:token>", rv.image, name="image"),
    path("take/thanks/", rv.done, name="done"),
    path("take/declined/", rv.declined, name="declined"),
]
