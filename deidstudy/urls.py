"""URL configuration for deidstudy.

``/`` → the researcher's cohorts; ``/cohorts/…`` researcher dashboard (surveys app);
``/accounts/…`` login/logout; ``/admin/`` Django admin; ``/django-rq/`` RQ dashboard
(staff only, django-rq's own views).
"""
from django.contrib import admin
from django.urls import include, path

from surveys.cohorts import views as survey_views
from surveys.login_throttle import ThrottledLoginView

urlpatterns = [
    path("", survey_views.home, name="home"),
    path("", include("surveys.urls")),
    path("", include("surveys.studies.urls")),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("django-rq/", include("django_rq.urls")),
]
