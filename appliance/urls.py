from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from console.login import LoginView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("quarantine/", include("quarantine.urls")),
    path("digest/", include("digests.urls")),
    path("account/", include("console.account")),
    path("manage/", include("console.urls", namespace="manage")),
    path("", include("console.operations_urls")),  # /queue/, /status/, /healthz, /metrics
    # Last: it holds the site root (the dashboard).
    path("", include("reports.urls")),
]
