"""The Django admin of the quarantine's own table: the bulk jobs, read-only."""

from __future__ import annotations

from django.contrib import admin

from console.admin import ReadOnlyAdmin

from .models import BulkJob


@admin.register(BulkJob)
class BulkJobAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "created_by", "action", "state", "total", "done", "succeeded", "skipped", "failed")
    list_filter = ("action", "state")
    search_fields = ("created_by__username",)
    list_select_related = ("created_by",)
