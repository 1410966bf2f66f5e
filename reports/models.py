"""The reports' own tables: roll-ups of the mail log, saved filters and API tokens.

Reports read roll-ups, not the raw log (DESIGN.md): `reports.rollup` recomputes the rows of the days that
changed since its last run, every minute. A roll-up row belongs to a *scope*: "*" is all mail (what an
administrator sees), a protected domain's name is the mail to or from that domain (what its domain
administrators see). A user's numbers are kept per address and day (`AddressStat`, and the score rows of
`DailyTop`); what those rows do not hold (a user's top senders, the last 24 hours by hour) is read from their
own messages of the period through `Message.objects.visible_to`, whose time window is served by an index.
"""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

ALL_SCOPE = "*"


class Counters(models.Model):
    """The counters of a roll-up row: accepted messages by verdict, their volume, and the refusals."""

    messages = models.BigIntegerField(default=0, help_text="Accepted messages (refused attempts not counted)")
    clean = models.BigIntegerField(default=0)
    spam = models.BigIntegerField(default=0)
    high_spam = models.BigIntegerField(default=0)
    virus = models.BigIntegerField(default=0)
    blocked_attachment = models.BigIntegerField(default=0)
    blocked_sender = models.BigIntegerField(default=0)
    unscannable = models.BigIntegerField(default=0, help_text="Messages the scanners could not check whole")
    quarantined = models.BigIntegerField(default=0)
    volume = models.BigIntegerField(default=0, help_text="Bytes of the accepted messages")
    refused = models.BigIntegerField(default=0, help_text="Attempts refused at SMTP time, all reasons")
    refused_unknown_user = models.BigIntegerField(default=0)
    refused_cant_resolve = models.BigIntegerField(default=0)
    refused_rbl = models.BigIntegerField(default=0)
    refused_relay_denied = models.BigIntegerField(default=0)

    COUNTERS = ("messages", "clean", "spam", "high_spam", "virus", "blocked_attachment", "blocked_sender",
                "unscannable", "quarantined", "volume", "refused", "refused_unknown_user", "refused_cant_resolve",
                "refused_rbl", "refused_relay_denied")

    class Meta:
        abstract = True


class TrafficStat(Counters):
    """Counters of one hour of mail in one scope and direction."""

    hour = models.DateTimeField(help_text="Start of the hour (UTC)")
    scope = models.CharField(max_length=253, help_text='"*" for all mail, else a protected domain')
    direction = models.CharField(max_length=10)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "hour", "direction"], name="trafficstat_unique")]

    def __str__(self) -> str:
        return f"{self.scope} {self.hour:%Y-%m-%d %H}h {self.direction}: {self.messages}"


class AddressStat(Counters):
    """Counters of one local day of the mail from or to one address of a protected domain: a user's numbers,
    kept as a domain's are (a user's dashboard and reports read these rows, not their messages).

    Attempts refused as an unknown user are not counted here: the address was nobody's, and a dictionary
    attack would otherwise leave a row for each address it tried.
    """

    day = models.DateField(help_text="Local date (TIME_ZONE)")
    address = models.CharField(max_length=320)
    direction = models.CharField(max_length=10)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["address", "day", "direction"], name="addressstat_unique")]

    def __str__(self) -> str:
        return f"{self.address} {self.day} {self.direction}: {self.messages}"


class DailyTop(models.Model):
    """Per day and scope, how many messages (and bytes) one sender, recipient, domain, rule… had."""

    class Kind(models.TextChoices):
        SENDER = "sender", "Sender"
        SENDER_DOMAIN = "sender_domain", "Sender domain"
        RECIPIENT = "recipient", "Recipient"
        RECIPIENT_DOMAIN = "recipient_domain", "Recipient domain"
        VIRUS = "virus", "Virus"
        RULE = "rule", "SpamAssassin rule"
        REFUSAL = "refusal", "Refusal reason"
        SCORE = "score", "Spam score (whole points)"

    day = models.DateField(help_text="Local date (TIME_ZONE)")
    # "*", a protected domain, or (for the score kind only: a user's score distribution) an address.
    scope = models.CharField(max_length=320)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    key = models.CharField(max_length=320)
    count = models.BigIntegerField(default=0)
    volume = models.BigIntegerField(default=0)
    score_sum = models.FloatField(default=0, help_text="For rules: the sum of the rule's scores")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "kind", "day", "key"], name="dailytop_unique")]

    def __str__(self) -> str:
        return f"{self.day} {self.scope} {self.kind} {self.key}: {self.count}"


class RuleDescription(models.Model):
    """The last seen description and score of a SpamAssassin rule, for the rule-hits report."""

    name = models.CharField(max_length=100, primary_key=True)
    description = models.CharField(max_length=500, blank=True)
    score = models.FloatField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class RollupState(models.Model):
    """Where the last roll-up stopped: the highest message id it had seen, and when it ran."""

    last_message_id = models.BigIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_duration_ms = models.PositiveIntegerField(default=0)
    last_days = models.PositiveIntegerField(default=0, help_text="How many days the last run recomputed")

    @classmethod
    def load(cls) -> RollupState:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def __str__(self) -> str:
        return f"roll-up at message {self.last_message_id}, {self.last_run_at}"


class SavedFilter(models.Model):
    """A named set of message-log filters (the query string) that a user keeps."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="saved_filters")
    name = models.CharField(max_length=100)
    query = models.CharField(max_length=2000, help_text="The message log's query string")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="savedfilter_unique_name")]

    def __str__(self) -> str:
        return self.name


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """A read-only API key of one user, sent as `Authorization: Token <key>`.

    Only the SHA-256 of the key is stored: a database dump does not give API access.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=8, help_text="First characters of the key, to recognise it")
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user}, {self.name})"

    @classmethod
    def create_for(cls, user, name: str = "") -> tuple[ApiToken, str]:
        """A new token; the clear key is returned once and never stored."""
        key = secrets.token_urlsafe(32)
        while key.startswith("-"):  # a key (or its prefix) given on a command line must not read as an option
            key = secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=key[:8], key_hash=hash_token(key))
        return token, key

    @classmethod
    def authenticate(cls, key: str):
        token = cls.objects.select_related("user").filter(key_hash=hash_token(key.strip())).first()
        if token is None or not token.user.is_active:
            return None
        now = timezone.now()
        # Write the last use at most once a minute: an API poller should not turn reads into writes.
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            cls.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user
