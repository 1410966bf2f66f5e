from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("quarantine/", include("quarantine.urls")),
    path("manage/", include("gateway.urls", namespace="manage")),
    # Last: it holds the site root (the dashboard) and the login.
    path("", include("reports.urls")),
]
