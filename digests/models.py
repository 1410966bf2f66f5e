"""The digests' own tables: how often who gets one, how far each got (the high-water mark), and the links in
them, of which only the SHA-256 of each token is kept."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.validators import MaxValueValidator
from django.db import models
from django.utils import timezone

from gateway.models import Domain, Message, Recipient


class Frequency(models.TextChoices):
    OFF = "off", "Off"
    DAILY = "daily", "Daily"
    TWICE_DAILY = "twice_daily", "Twice a day"
    WEEKLY = "weekly", "Weekly"


class Weekday(models.IntegerChoices):
    MONDAY = 0, "Monday"
    TUESDAY = 1, "Tuesday"
    WEDNESDAY = 2, "Wednesday"
    THURSDAY = 3, "Thursday"
    FRIDAY = 4, "Friday"
    SATURDAY = 5, "Saturday"
    SUNDAY = 6, "Sunday"


def new_token() -> str:
    """256 random bits, URL-safe: what a link carries. Only hash_token of it is stored."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


class DigestPolicy(models.Model):
    """The administrator's defaults: one row."""

    default_frequency = models.CharField(max_length=12, choices=Frequency.choices, default=Frequency.DAILY,
                                         help_text="For users who chose nothing, in domains that say nothing")
    hour = models.PositiveSmallIntegerField(default=8, validators=[MaxValueValidator(23)],
                                            help_text="Hour of the day (TIME_ZONE) digests go out; twice a day: "
                                                      "this hour and twelve hours later")
    weekday = models.PositiveSmallIntegerField(choices=Weekday.choices, default=Weekday.MONDAY,
                                               help_text="The day of the weekly digests")

    class Meta:
        verbose_name = verbose_name_plural = "digest policy"

    def __str__(self) -> str:
        return "Digest policy"

    @classmethod
    def load(cls) -> DigestPolicy:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def save(self, *args, **kwargs):
        self.pk = 1
        super().save(*args, **kwargs)


class DomainDigestPolicy(models.Model):
    """One domain's overrides of the defaults, and whether its addresses that are not users get a digest."""

    domain = models.OneToOneField(Domain, on_delete=models.CASCADE, related_name="digest_policy")
    frequency = models.CharField(max_length=12, choices=Frequency.choices, blank=True,
                                 help_text="Empty: the default")
    hour = models.PositiveSmallIntegerField(null=True, blank=True, validators=[MaxValueValidator(23)],
                                            help_text="Empty: the default")
    non_users = models.BooleanField(default=False,
                                    help_text="Addresses of this domain that are no login's get a digest too "
                                              "(their links work without a login)")

    class Meta:
        verbose_name = "domain digest policy"
        verbose_name_plural = "domain digest policies"

    def __str__(self) -> str:
        return f"Digests of {self.domain}"


class Subscription(models.Model):
    """One receiver of digests and how far its digests got.

    kind 'user': a login's own addresses (its digest goes to its e-mail address); 'domain': a domain
    administrator's digest of all the quarantined mail of their domains; 'address': an address that is no
    login's, in a domain whose policy says so. `upto` is the high-water mark: mail quarantined up to then was
    in a digest (or there was none); every message also keeps its links, so a message is never listed twice."""

    class Kind(models.TextChoices):
        USER = "user", "A user's own mail"
        DOMAIN = "domain", "A domain administrator's domains"
        ADDRESS = "address", "An address without a login"

    kind = models.CharField(max_length=7, choices=Kind.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="digest_subscriptions")
    address = models.CharField(max_length=320, blank=True, help_text="For kind 'address'")
    frequency = models.CharField(max_length=12, choices=Frequency.choices, blank=True,
                                 help_text="Empty: the domain's or the default (for 'domain': off)")
    upto = models.DateTimeField(null=True, blank=True, help_text="Mail quarantined up to here was reported")
    last_run_at = models.DateTimeField(null=True, blank=True, help_text="When a digest was last due")
    last_sent_at = models.DateTimeField(null=True, blank=True)
    sent_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "user", "address"], name="unique_subscription",
                                               nulls_distinct=False)]
        ordering = ["kind", "address", "user_id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.user or self.address}"


class DigestLink(models.Model):
    """One link of one digest: one action on one recipient of one message. The token is in the mail only."""

    class Action(models.TextChoices):
        RELEASE = "release", "Release"
        RELEASE_ALLOW = "release_allow", "Release and allow the sender"
        DELETE = "delete", "Delete"
        PREVIEW = "preview", "Preview"

    token_hash = models.CharField(max_length=64, unique=True)
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="links")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="digest_links")
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="digest_links")
    action = models.CharField(max_length=13, choices=Action.choices)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)
    used_at = models.DateTimeField(null=True, blank=True)
    used_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=300, blank=True, help_text="What its use did")

    class Meta:
        indexes = [models.Index(fields=["subscription", "recipient"], name="digestlink_reported")]

    def __str__(self) -> str:
        return f"{self.action} {self.message.queue_id} for {self.recipient.address}"


class UnsubscribeLink(models.Model):
    """The List-Unsubscribe link of one digest: it leads to its subscription's frequency, without a login."""

    token_hash = models.CharField(max_length=64, unique=True)
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="unsubscribe_links")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"unsubscribe {self.subscription}"
