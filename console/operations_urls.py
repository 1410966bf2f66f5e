"""URLs of the pages for running the appliance (console/operations.py), at the site's top level."""

from django.urls import path

from . import operations

urlpatterns = [
    path("queue/", operations.queue, name="queue"),
    path("queue/act", operations.queue_act, name="queue_act"),
    path("status/", operations.status, name="status"),
    path("healthz", operations.healthz, name="healthz"),
    path("metrics", operations.metrics_view, name="metrics"),
]
