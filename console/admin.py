"""The Django admin for the mail path's tables: the mail-flow configuration, the SMTP-time policy and the
allow/block lists are editable here, the mail log is readable here (never edited: it is the record of what
happened), and every change made here is audited like a change made on the /manage/ pages. The greylisting
triplets and the call-ahead cache can be looked at and deleted (to forget one); a DKIM key shows its DNS
record, never its private key."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import forms as auth_forms
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django_otp.plugins.otp_totp.admin import TOTPDeviceAdmin
from django_otp.plugins.otp_totp.models import TOTPDevice

from gateway.mailauth.dkim import zone_file_entry
from gateway.models import (
    AuditEvent,
    Directory,
    DirectoryAddress,
    DirectoryLookup,
    DKIMKey,
    DNSBLZone,
    Domain,
    DomainSpamPolicy,
    GreylistEntry,
    MailFlowSettings,
    Message,
    MetricTotal,
    NodeHeartbeat,
    RawMessage,
    Recipient,
    RecipientVerification,
    Route,
    SenderListEntry,
    SMTPPolicy,
    TrustedNetwork,
    UserProfile,
    UserSpamPolicy,
    ValidRecipient,
    record_audit,
)

from .login import ThrottledAdminAuthenticationForm
from .usernames import HELP_TEXT as USERNAME_HELP
from .usernames import username_taken, validate_username

# The admin's login is a door like the site's: the same throttle, the same words when it refuses.
admin.site.login_form = ThrottledAdminAuthenticationForm


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


@admin.register(DomainSpamPolicy)
class DomainSpamPolicyAdmin(AuditedAdmin):
    list_display = ("domain", "spam_threshold", "high_spam_threshold", "action_spam", "action_high_spam",
                    "users_may_choose", "users_may_skip_quarantine")
    search_fields = ("domain__name",)
    list_select_related = ("domain",)


@admin.register(UserSpamPolicy)
class UserSpamPolicyAdmin(AuditedAdmin):
    list_display = ("user", "spam_threshold", "high_spam_threshold", "skip_quarantine")
    search_fields = ("user__username", "user__email")
    list_select_related = ("user",)
    raw_id_fields = ("user",)


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
    list_display = ("address", "message", "status", "verdict", "action", "policy", "released", "reply_code",
                    "delivered_at")
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


@admin.register(NodeHeartbeat)
class NodeHeartbeatAdmin(ReadOnlyAdmin):
    """Written by the processes themselves (gateway/heartbeat.py); shown on /status/."""

    list_display = ("node", "kind", "pid", "version", "started_at", "seen_at", "smtp_connections")
    list_filter = ("node", "kind")


@admin.register(MetricTotal)
class MetricTotalAdmin(ReadOnlyAdmin):
    """The counters the processes add up (gateway/metrics.py); served at /metrics."""

    list_display = ("node", "name", "labels", "value")
    list_filter = ("node", "name")


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


class AdminUserCreationForm(auth_forms.AdminUserCreationForm):
    """Django's form for a new login, with the appliance's rule for login names (console.usernames)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["username"].help_text = USERNAME_HELP

    def clean_username(self):
        validate_username(self.cleaned_data.get("username") or "")
        return super().clean_username()  # unique whatever its case


class AdminUserChangeForm(auth_forms.UserChangeForm):
    """Django's form for a login, with the rule for login names; a name made before the rule stays as it is
    until it is changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "username" in self.fields:
            self.fields["username"].help_text = USERNAME_HELP

    def clean_username(self):
        username = self.cleaned_data.get("username") or ""
        if username != self.instance.username:
            validate_username(username)
        if username_taken(username, exclude_pk=self.instance.pk):
            raise ValidationError("A user with that username already exists.", code="unique")
        return username


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user admin, with the mail profile (role, domains, aliases) on the same page."""

    form = AdminUserChangeForm
    add_form = AdminUserCreationForm
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


# --- The SMTP-time policy ---------------------------------------------------------------------------


@admin.register(SMTPPolicy)
class SMTPPolicyAdmin(AuditedAdmin):
    """One row: it can be changed, not added twice nor deleted."""

    fieldsets = [
        ("Connection", {"fields": ["max_connections_per_ip", "max_messages_per_minute", "rate_limit_action",
                                   "early_talker_action", "fcrdns_action", "fcrdns_score"]}),
        ("HELO", {"fields": ["helo_action", "helo_score", "helo_impersonation_action", "helo_impersonation_score"]}),
        ("Sender", {"fields": ["sender_domain_action", "sender_domain_score", "spf_fail_action", "spf_fail_score",
                               "spf_softfail_action", "spf_softfail_score", "spf_neutral_action",
                               "spf_neutral_score", "spf_permerror_action", "spf_permerror_score",
                               "spf_temperror_action"]}),
        ("Recipient", {"fields": ["blocked_sender_action", "greylisting_action", "greylist_delay",
                                  "greylist_retry_window_hours", "greylist_lifetime_days", "greylist_ipv4_prefix",
                                  "greylist_ipv6_prefix", "callahead_positive_hours", "callahead_negative_minutes",
                                  "callahead_unreachable_action"]}),
        ("Message", {"fields": ["dkim_action", "dkim_score", "dmarc_reject_action", "dmarc_reject_score",
                                "dmarc_quarantine_action", "dmarc_quarantine_score", "dmarc_temperror_action",
                                "protected_sender_action", "protected_sender_score"]}),
        ("SMTP AUTH", {"fields": ["auth_max_failures", "auth_failure_window_minutes"]}),
    ]

    def has_add_permission(self, request) -> bool:
        return not SMTPPolicy.objects.exists()

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(DNSBLZone)
class DNSBLZoneAdmin(AuditedAdmin):
    list_display = ("zone", "enabled", "action", "score", "answers", "description")
    list_editable = ("enabled", "action")
    search_fields = ("zone", "description")


@admin.register(GreylistEntry)
class GreylistEntryAdmin(admin.ModelAdmin):
    list_display = ("client_network", "sender", "recipient", "first_seen", "last_seen", "passed_at", "attempts")
    search_fields = ("client_network", "sender", "recipient")
    list_filter = (("passed_at", admin.EmptyFieldListFilter),)
    readonly_fields = [f.name for f in GreylistEntry._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(RecipientVerification)
class RecipientVerificationAdmin(admin.ModelAdmin):
    list_display = ("address", "exists", "reply", "checked_at", "expires_at")
    search_fields = ("address",)
    readonly_fields = [f.name for f in RecipientVerification._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Directory)
class DirectoryAdmin(AuditedAdmin):
    """The directories (edited best on /manage/directories/, which tests them): the bind password is never
    shown; left empty, the saved one stays."""

    list_display = ("name", "kind", "domain", "uri", "active", "position")
    list_filter = ("kind", "active")
    search_fields = ("name", "uri")

    def get_form(self, request, obj=None, change=False, **kwargs):
        from django import forms

        form = super().get_form(request, obj, change=change, **kwargs)
        form.base_fields["bind_password"].widget = forms.PasswordInput(render_value=False)
        form.base_fields["bind_password"].required = False
        return form

    def save_model(self, request, obj, form, change):
        if change and not form.cleaned_data.get("bind_password"):
            obj.bind_password = Directory.objects.get(pk=obj.pk).bind_password
        super().save_model(request, obj, form, change)


@admin.register(DirectoryAddress)
class DirectoryAddressAdmin(ReadOnlyAdmin):
    list_display = ("address", "primary", "name", "directory", "synced_at")
    list_filter = ("directory",)
    search_fields = ("address", "primary", "name")


@admin.register(DirectoryLookup)
class DirectoryLookupAdmin(admin.ModelAdmin):
    """The recipient check's cached answers: looked at, and deleted to forget one."""

    list_display = ("address", "exists", "directory", "dn", "checked_at", "expires_at")
    search_fields = ("address",)
    readonly_fields = [f.name for f in DirectoryLookup._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(DKIMKey)
class DKIMKeyAdmin(AuditedAdmin):
    list_display = ("domain", "selector", "algorithm", "active", "created_at")
    list_filter = ("active", "algorithm")
    fields = ("domain", "selector", "algorithm", "active", "dns_record", "created_at")
    readonly_fields = ("domain", "selector", "algorithm", "dns_record", "created_at")

    @admin.display(description="DNS record to publish")
    def dns_record(self, obj: DKIMKey) -> str:
        return zone_file_entry(obj.selector, obj.domain.name, obj.public_txt) if obj.pk else ""

    def has_add_permission(self, request) -> bool:
        return False  # keys are made by `manage.py dkim genkey`, which prints the record to publish


# --- Allow and block lists --------------------------------------------------------------------------


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


# --- Two-factor login ---------------------------------------------------------------------------------------


# django-otp's admin of the TOTP devices, audited like the rest: where an administrator deletes the device of a
# user who lost it (as `manage.py twofactor reset` does). Its secret is not shown (OTP_ADMIN_HIDE_SENSITIVE_DATA).
admin.site.unregister(TOTPDevice)


@admin.register(TOTPDevice)
class AuditedTOTPDeviceAdmin(AuditedAdmin, TOTPDeviceAdmin):
    pass
