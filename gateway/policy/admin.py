"""The Django admin of the SMTP-time policy's tables (registered by GatewayConfig.ready, beside gateway/admin.py):
the policy and the DNSBL zones are edited and audited like the rest of the mail-flow configuration; the
greylisting triplets and the call-ahead cache can be looked at and deleted (to forget one); a DKIM key shows
its DNS record, never its private key."""

from __future__ import annotations

from django.contrib import admin

from gateway.admin import AuditedAdmin
from gateway.auth.dkim import zone_file_entry
from gateway.models import DKIMKey, DNSBLZone, GreylistEntry, RecipientVerification, SMTPPolicy


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
                                "dmarc_quarantine_action", "dmarc_quarantine_score", "dmarc_temperror_action"]}),
        ("SMTP AUTH", {"fields": ["auth_max_failures", "auth_failure_window_minutes"]}),
    ]

    def has_add_permission(self, request) -> bool:
        return not SMTPPolicy.objects.exists()

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class DNSBLZoneAdmin(AuditedAdmin):
    list_display = ("zone", "enabled", "action", "score", "answers", "description")
    list_editable = ("enabled", "action")
    search_fields = ("zone", "description")


class GreylistEntryAdmin(admin.ModelAdmin):
    list_display = ("client_network", "sender", "recipient", "first_seen", "last_seen", "passed_at", "attempts")
    search_fields = ("client_network", "sender", "recipient")
    list_filter = (("passed_at", admin.EmptyFieldListFilter),)
    readonly_fields = [f.name for f in GreylistEntry._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


class RecipientVerificationAdmin(admin.ModelAdmin):
    list_display = ("address", "exists", "reply", "checked_at", "expires_at")
    search_fields = ("address",)
    readonly_fields = [f.name for f in RecipientVerification._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


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


def register(site: admin.AdminSite = admin.site) -> None:
    for model, model_admin in ((SMTPPolicy, SMTPPolicyAdmin), (DNSBLZone, DNSBLZoneAdmin),
                               (GreylistEntry, GreylistEntryAdmin),
                               (RecipientVerification, RecipientVerificationAdmin), (DKIMKey, DKIMKeyAdmin)):
        if not site.is_registered(model):
            site.register(model, model_admin)
