from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from console.login import AdminLoginView, LoginView, login_code

urlpatterns = [
    # Before the admin's own URLs: its login takes the same two steps as the site's (console/login.py).
    path("admin/login/", AdminLoginView.as_view(), name="admin_login"),
    path("admin/", admin.site.urls),
    path("login/", LoginView.as_view(), name="login"),
    path("login/code", login_code, name="login_code"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("quarantine/", include("quarantine.urls")),
    path("digest/", include("digests.urls")),
    path("account/", include("console.account")),
    path("manage/", include("console.urls", namespace="manage")),
    path("", include("console.operations_urls")),  # /queue/, /status/, /healthz, /metrics
    # Last: it holds the site root (the dashboard).
    path("", include("reports.urls")),
]
