"""URLs of the UI's reading side. Names are unprefixed (`dashboard`, `message_log`, …): every app links to them."""

from django.urls import path

from . import api, views, where

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("messages/", views.message_log, name="message_log"),
    path("messages/export.csv", views.message_export, name="message_export"),
    path("messages/filters/", views.saved_filter_create, name="saved_filter_create"),
    path("messages/filters/<int:pk>/delete", views.saved_filter_delete, name="saved_filter_delete"),
    path("messages/<str:queue_id>/", views.message_detail, name="message_detail"),
    path("messages/<str:queue_id>/original", views.message_download, name="message_download"),
    path("messages/<str:queue_id>/preview", views.message_preview, name="message_preview"),
    path("where/", where.search, name="where"),
    path("where/<str:queue_id>/", where.detail, name="where_detail"),
    path("reports/", views.reports_index, name="reports"),
    path("reports/<slug:slug>/", views.report, name="report"),
    path("audit/", views.audit_log, name="audit_log"),
    path("api/messages", api.messages, name="api_messages"),
    path("api/messages/<str:queue_id>", api.message, name="api_message"),
    path("api/stats/daily", api.stats_daily, name="api_stats"),
]
