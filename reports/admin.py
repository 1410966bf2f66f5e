from django.contrib import admin

from .models import ApiToken, SavedFilter


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created with `manage.py api_token create` (the key is shown once); here they are revoked."""

    list_display = ("prefix", "user", "name", "created_at", "last_used_at")
    readonly_fields = ("user", "prefix", "key_hash", "created_at", "last_used_at")
    search_fields = ("user__username", "name", "prefix")

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(SavedFilter)
class SavedFilterAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "query", "created_at")
    search_fields = ("name", "user__username")
