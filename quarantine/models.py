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
            models.UniqueConstraint(fields=["kind", "scope", "sender", "domain", "user"], name="unique_list_entry"),
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
