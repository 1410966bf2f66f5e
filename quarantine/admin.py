from __future__ import annotations

from django.contrib import admin

from gateway.admin import AuditedAdmin, ReadOnlyAdmin

from .models import BulkJob, SenderListEntry


@admin.register(SenderListEntry)
class SenderListEntryAdmin(AuditedAdmin):
    list_display = ("sender", "kind", "scope", "domain", "user", "comment", "created_by", "created_at")
    list_filter = ("kind", "scope", "domain")
    search_fields = ("sender", "comment", "domain__name", "user__username")
    list_select_related = ("domain", "user", "created_by")
    raw_id_fields = ("user", "created_by")

    def save_model(self, request, obj, form, change):
        if not change and obj.created_by_id is None:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(BulkJob)
class BulkJobAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "created_by", "action", "state", "total", "done", "succeeded", "skipped", "failed")
    list_filter = ("action", "state")
    search_fields = ("created_by__username",)
    list_select_related = ("created_by",)
