"""URLs of the researcher side (mounted at the site root)."""

from django.urls import path

from .cohorts import viewer_views, views

app_name = "surveys"

urlpatterns = [
    path("cohorts/", views.cohort_list, name="cohort_list"),
    path("cohorts/<int:cohort_id>/", views.cohort_detail, name="cohort_detail"),
    path("cohorts/<int:cohort_id>/status.json", views.cohort_status, name="cohort_status"),
    path("cohorts/<int:cohort_id>/qa-grid/", views.qa_grid_fragment, name="qa_grid"),
    path("cohorts/<int:cohort_id>/upload/", views.cohort_upload, name="cohort_upload"),
    path("cohorts/<int:cohort_id>/uploads/<int:upload_id>/retry/", views.upload_retry,
         name="upload_retry"),
    path("cohorts/<int:cohort_id>/run/", views.cohort_run, name="cohort_run"),
    path("cohorts/<int:cohort_id>/stages/<int:run_id>/retry/", views.stage_retry, name="stage_retry"),
    path("cohorts/<int:cohort_id>/subjects/<str:pseudonym>/", views.subject_detail,
         name="subject_detail"),
    path("cohorts/<int:cohort_id>/subjects/<str:pseudonym>/status.json",
         viewer_views.subject_status, name="subject_status"),
    path("cohorts/<int:cohort_id>/subjects/<str:pseudonym>/viewer.json", viewer_views.manifest,
         name="viewer_manifest"),
    path("cohorts/<int:cohort_id>/subjects/<str:pseudonym>/viewer/<str:label>/<str:version>/"
         "<str:view>/<int:n>.bin", viewer_views.slice_data, name="viewer_slice"),
    path("cohorts/<int:cohort_id>/subjects/<str:pseudonym>/viewer/<str:label>/<str:version>/"
         "mesh/<str:name>.bin", viewer_views.mesh_data, name="viewer_mesh"),
    path("cohorts/<int:cohort_id>/images/<int:image_id>.png", views.image, name="image"),
    path("cohorts/<int:cohort_id>/images/<int:image_id>/thumb.png", viewer_views.image_thumb,
         name="image_thumb"),
    path("cohorts/<int:cohort_id>/reid-cmc.png", views.reid_plot, name="reid_plot"),
    path("cohorts/<int:cohort_id>/download/qa.csv", views.download_qa, name="download_qa"),
    path("cohorts/<int:cohort_id>/download/deidentified.zip", views.download_deid,
         name="download_deid"),
    path("cohorts/<int:cohort_id>/mapping/", views.identity_mapping, name="identity_mapping"),
]
