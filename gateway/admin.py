"""The Django admin for the gateway's tables: the mail-flow configuration is editable here, the mail log
is readable here (never edited: it is the record of what happened), and every change made here is
audited like a change made on the /manage/ pages."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import (
    AuditEvent,
    Domain,
    MailFlowSettings,
    Message,
    RawMessage,
    Recipient,
    Route,
    TrustedNetwork,
    UserProfile,
    ValidRecipient,
    record_audit,
)


class AuditedAdmin(admin.ModelAdmin):
    """Writes an audit row for every save and delete made through the admin."""

    def _audit(self, request: HttpRequest, action: str, obj) -> None:
        record_audit(f"admin_{action}", user=request.user, ip=request.META.get("REMOTE_ADDR"),
                     target=f"{obj._meta.verbose_name} {obj}"[:500], model=obj._meta.label, pk=str(obj.pk))

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        self._audit(request, "change" if change else "add", obj)

    def delete_model(self, request, obj):
        self._audit(request, "delete", obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self._audit(request, "delete", obj)
        super().delete_queryset(request, queryset)


class ReadOnlyAdmin(admin.ModelAdmin):
    """The log is evidence: it can be looked at, not altered, from the admin."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- Configuration ---------------------------------------------------------------------------------


class DomainInline(admin.TabularInline):
    model = Domain
    fields = ("name", "active", "recipient_check")
    extra = 0
    show_change_link = True


@admin.register(Route)
class RouteAdmin(AuditedAdmin):
    list_display = ("name", "host", "port", "require_tls", "domain_count")
    search_fields = ("name", "host")
    list_filter = ("require_tls",)
    inlines = [DomainInline]

    @admin.display(description="domains")
    def domain_count(self, obj: Route) -> int:
        return obj.domains.count()


class ValidRecipientInline(admin.TabularInline):
    model = ValidRecipient
    extra = 1


@admin.register(Domain)
class DomainAdmin(AuditedAdmin):
    list_display = ("name", "route", "active", "recipient_check", "created_at")
    list_filter = ("active", "recipient_check", "route")
    search_fields = ("name", "route__host", "route__name")
    list_select_related = ("route",)
    inlines = [ValidRecipientInline]


@admin.register(ValidRecipient)
class ValidRecipientAdmin(AuditedAdmin):
    list_display = ("address", "domain")
    search_fields = ("address", "domain__name")
    list_filter = ("domain",)
    list_select_related = ("domain",)


@admin.register(TrustedNetwork)
class TrustedNetworkAdmin(AuditedAdmin):
    list_display = ("network", "description")
    search_fields = ("network", "description")


@admin.register(MailFlowSettings)
class MailFlowSettingsAdmin(AuditedAdmin):
    """One row: it can be changed, not added twice nor deleted."""

    list_display = ("__str__", "spam_threshold", "high_spam_threshold", "action_spam", "action_high_spam",
                    "action_virus", "max_message_size")

    def has_add_permission(self, request) -> bool:
        return not MailFlowSettings.objects.exists()

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- The mail log ----------------------------------------------------------------------------------


class RecipientInline(admin.TabularInline):
    model = Recipient
    fields = ("address", "status", "verdict", "action", "released", "reply_code", "reply_text", "delivered_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("queue_id", "received_at", "envelope_sender", "subject", "verdict", "spam_score", "state",
                    "direction", "client_ip")
    list_filter = ("state", "verdict", "direction", "quarantined", "refusal_reason")
    search_fields = ("=queue_id", "envelope_sender", "subject", "message_id", "=client_ip")
    date_hierarchy = "received_at"
    inlines = [RecipientInline]
    # The log reaches millions of rows: no COUNT(*) of the whole table for each page.
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        # The admin is for administrators, but it reads through the one scoping rule all the same.
        return Message.objects.visible_to(request.user)


@admin.register(Recipient)
class RecipientAdmin(ReadOnlyAdmin):
    list_display = ("address", "message", "status", "verdict", "action", "released", "reply_code", "delivered_at")
    list_filter = ("status", "verdict", "released")
    search_fields = ("address", "=message__queue_id")
    list_select_related = ("message",)
    raw_id_fields = ("message",)
    show_full_result_count = False


@admin.register(RawMessage)
class RawMessageAdmin(ReadOnlyAdmin):
    """Listed so that an administrator can see what is stored; the bytes themselves are downloaded from the
    message page, not shown here."""

    list_display = ("message", "stored_size")
    search_fields = ("=message__queue_id",)
    fields = ("message", "stored_size")
    readonly_fields = fields
    show_full_result_count = False

    @admin.display(description="bytes stored")
    def stored_size(self, obj: RawMessage) -> int:
        return len(obj.data or b"")

    def get_queryset(self, request: HttpRequest) -> QuerySet[RawMessage]:
        return super().get_queryset(request).select_related("message").defer("data")

    def has_view_permission(self, request, obj=None) -> bool:
        return super().has_view_permission(request, obj) and request.user.is_superuser


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("at", "username", "ip", "action", "target", "message")
    list_filter = ("action",)
    search_fields = ("username", "target", "action", "=ip", "=message__queue_id")
    date_hierarchy = "at"
    list_select_related = ("message",)
    show_full_result_count = False


# --- People ----------------------------------------------------------------------------------------


@admin.register(UserProfile)
class UserProfileAdmin(AuditedAdmin):
    list_display = ("user", "role", "domain_list", "addresses")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email", "addresses")
    filter_horizontal = ("domains",)
    list_select_related = ("user",)

    @admin.display(description="domains")
    def domain_list(self, obj: UserProfile) -> str:
        return ", ".join(d.name for d in obj.domains.all())

    def get_queryset(self, request: HttpRequest) -> QuerySet[UserProfile]:
        return super().get_queryset(request).prefetch_related("domains")


class UserProfileInline(admin.StackedInline):
    model = UserProfile
    can_delete = False
    filter_horizontal = ("domains",)
    verbose_name_plural = "mail profile"


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user admin, with the mail profile (role, domains, aliases) on the same page."""

    inlines = [UserProfileInline]
    list_display = ("username", "email", "first_name", "last_name", "role", "is_active", "is_superuser")
    list_select_related = ("mail_profile",)

    @admin.display(description="role")
    def role(self, obj) -> str:
        profile = getattr(obj, "mail_profile", None)
        return profile.get_role_display() if profile else ("Administrator" if obj.is_superuser else "—")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        record_audit("admin_change" if change else "admin_add", user=request.user, ip=request.META.get("REMOTE_ADDR"),
                     target=f"user {obj.username}", model="auth.User", pk=str(obj.pk))

    def delete_model(self, request, obj):
        record_audit("admin_delete", user=request.user, ip=request.META.get("REMOTE_ADDR"),
                     target=f"user {obj.username}", model="auth.User", pk=str(obj.pk))
        super().delete_model(request, obj)
