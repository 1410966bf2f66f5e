from django.urls import path

from . import views

app_name = "digests"
urlpatterns = [
    path("unsubscribe/<str:token>", views.unsubscribe, name="unsubscribe"),
    path("unsubscribe/<str:token>/frequency", views.frequency, name="frequency"),
    path("<str:queue_id>/preview/<str:token>/content", views.preview_content, name="preview_content"),
    path("<str:queue_id>/<str:action>/<str:token>", views.link, name="link"),
]
