"""Allow and block lists: global (administrators), per domain (domain administrators), per user."""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from gateway.models import Domain


def validate_sender_pattern(value: str) -> None:
    """An address, @domain, *.domain (its subdomains), an IP address or a CIDR network."""
    value = value.strip().lower()
    if not value:
        raise ValidationError("empty pattern")
    try:
        ipaddress.ip_network(value, strict=False)
        return
    except ValueError:
        pass
    if value.startswith("*."):
        domain = value[2:]
    elif value.startswith("@"):
        domain = value[1:]
    elif "@" in value:
        local, _, domain = value.rpartition("@")
        if not local or any(c.isspace() for c in local):
            raise ValidationError(f"{value!r}: not an e-mail address")
    else:
        raise ValidationError(f"{value!r}: use an address, @domain, *.domain, an IP address or a network")
    labels = domain.rstrip(".").split(".")
    if len(labels) < 2 or not all(labels) or any(not (c.isalnum() or c in "-_") for lab in labels for c in lab):
        raise ValidationError(f"{value!r}: {domain!r} is not a domain name")


class SenderListEntry(models.Model):
    class Kind(models.TextChoices):
        ALLOW = "allow", "Allow"
        BLOCK = "block", "Block"

    class Scope(models.TextChoices):
        GLOBAL = "global", "Everyone"
        DOMAIN = "domain", "A domain"
        USER = "user", "One user"

    kind = models.CharField(max_length=5, choices=Kind.choices)
    scope = models.CharField(max_length=6, choices=Scope.choices, default=Scope.GLOBAL)
    sender = models.CharField(max_length=320, validators=[validate_sender_pattern],
                              help_text="address, @domain, *.domain, IP address or CIDR network")
    domain = models.ForeignKey(Domain, null=True, blank=True, on_delete=models.CASCADE,
                               help_text="For scope 'domain'")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="sender_list_entries", help_text="For scope 'user'")
    comment = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "allow/block list entry"
        verbose_name_plural = "allow/block list entries"
        ordering = ["scope", "kind", "sender"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "scope", "sender", "domain", "user"], name="unique_list_entry",
                                    nulls_distinct=False),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.sender} ({self.scope})"

    def clean(self) -> None:
        if self.scope == self.Scope.DOMAIN and not self.domain_id:
            raise ValidationError({"domain": "a domain entry needs its domain"})
        if self.scope == self.Scope.USER and not self.user_id:
            raise ValidationError({"user": "a user entry needs its user"})

    def save(self, *args, **kwargs):
        self.sender = self.sender.strip().lower()
        super().save(*args, **kwargs)


class BulkJob(models.Model):
    """One bulk action on quarantined mail (a selection, or everything a filter matches), worked in chunks.

    The job remembers *what* was asked (the selection or the filter) rather than a frozen list of ids, and walks
    the matching messages by id with a cursor: a filter matching 100,000 messages costs one row here, and each
    chunk re-applies the owner's scope, so a job never reaches mail its owner may no longer see.
    """

    class Action(models.TextChoices):
        RELEASE = "release", "Release"
        DELETE = "delete", "Delete"
        LEARN_SPAM = "learn_spam", "Learn as spam"
        LEARN_HAM = "learn_ham", "Learn as ham"

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="bulk_jobs")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now, help_text="Last progress: a stalled job is resumed")
    finished_at = models.DateTimeField(null=True, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=10, choices=Action.choices)
    state = models.CharField(max_length=7, choices=State.choices, default=State.RUNNING)
    selection = models.JSONField(null=True, blank=True, help_text="Message ids picked by hand; null: the filter")
    filters = models.JSONField(default=dict, blank=True, help_text="The quarantine filter, for 'all that match'")
    cursor = models.BigIntegerField(default=0, help_text="Messages with an id up to this one are done")
    upto = models.BigIntegerField(null=True, blank=True,
                                  help_text="The last id that matched when the job began: later mail is not part of it")
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0, help_text="No longer quarantined when their turn came")
    failed = models.PositiveIntegerField(default=0)
    errors = models.JSONField(default=list, blank=True, help_text="[queue_id: reason], the first few")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} of {self.total} by {self.created_by} ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state != self.State.RUNNING
