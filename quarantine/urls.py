from django.urls import path

from . import views

app_name = "quarantine"
urlpatterns = [
    path("", views.index, name="index"),
    # Fixed words first: a queue id is any string of letters and digits, "lists" included.
    path("lists/", views.lists, name="lists"),
    path("lists/add", views.list_add, name="list_add"),
    path("lists/<int:entry_id>/delete", views.list_delete, name="list_delete"),
    path("bulk", views.bulk, name="bulk"),
    path("bulk/<int:job_id>", views.bulk_status, name="bulk_status"),
    path("<str:queue_id>/", views.detail, name="detail"),
    path("<str:queue_id>/release", views.release, name="release"),
    path("<str:queue_id>/delete", views.delete, name="delete"),
    path("<str:queue_id>/learn", views.learn, name="learn"),
    path("<str:queue_id>/allow", views.allow_sender, name="allow_sender"),
    path("<str:queue_id>/block", views.block_sender, name="block_sender"),
]
