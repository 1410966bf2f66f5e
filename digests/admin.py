from django.contrib import admin

from .models import DigestLink, DigestPolicy, DomainDigestPolicy, Subscription


@admin.register(DigestPolicy)
class DigestPolicyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "default_frequency", "hour", "weekday"]


@admin.register(DomainDigestPolicy)
class DomainDigestPolicyAdmin(admin.ModelAdmin):
    list_display = ["domain", "frequency", "hour", "non_users"]


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = ["kind", "user", "address", "frequency", "last_sent_at", "sent_count"]
    list_filter = ["kind", "frequency"]
    readonly_fields = ["upto", "last_run_at", "last_sent_at", "sent_count"]


@admin.register(DigestLink)
class DigestLinkAdmin(admin.ModelAdmin):
    """What the links did; their tokens are nowhere here (only hashes are stored)."""

    list_display = ["message", "recipient", "action", "created_at", "expires_at", "used_at", "outcome"]
    list_filter = ["action"]
    exclude = ["token_hash"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
