from django.urls import path

from . import directories, views

app_name = "manage"
urlpatterns = [
    path("", views.index, name="index"),
    path("users/", views.users, name="users"),
    path("users/new", views.user_new, name="user_new"),
    path("users/<int:user_id>/", views.user_edit, name="user_edit"),
    path("domains/", views.domains, name="domains"),
    path("domains/new", views.domain_new, name="domain_new"),
    path("domains/<int:domain_id>/", views.domain_edit, name="domain_edit"),
    path("domains/<int:domain_id>/delete", views.domain_delete, name="domain_delete"),
    path("spam/", views.spam_policies, name="spam_policies"),
    path("spam/<int:domain_id>/", views.spam_policy_edit, name="spam_policy_edit"),
    path("spam/<int:domain_id>/delete", views.spam_policy_delete, name="spam_policy_delete"),
    path("routes/", views.routes, name="routes"),
    path("routes/<int:route_id>/", views.route_edit, name="route_edit"),
    path("routes/<int:route_id>/delete", views.route_delete, name="route_delete"),
    path("directories/", directories.directories, name="directories"),
    path("directories/new", directories.directory_new, name="directory_new"),
    path("directories/<int:directory_id>/", directories.directory_edit, name="directory_edit"),
    path("directories/<int:directory_id>/test", directories.directory_check, name="directory_check"),
    path("directories/<int:directory_id>/sync", directories.directory_sync, name="directory_sync"),
    path("directories/<int:directory_id>/delete", directories.directory_delete, name="directory_delete"),
    path("settings/", views.mail_settings, name="settings"),
    path("networks/", views.trusted_networks, name="trusted_networks"),
    path("networks/<int:network_id>/delete", views.trusted_network_delete, name="trusted_network_delete"),
]
