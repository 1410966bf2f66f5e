"""The mail path's tables: configuration of the flow, the SMTP-time policy and the sender lists, and
the log of every message.

The scoping rule of who may see which message lives here too (`MessageQuerySet.visible_to`, built on
the roles of gateway.access), so that every page, export and API of the other apps shares it.
"""

from __future__ import annotations

import ipaddress
import secrets
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from .access import Role, addresses_of, domains_of, role_of
from .snapshot import Snapshot


def validate_domain_name(value: str) -> None:
    labels = value.rstrip(".").split(".")
    if len(labels) < 2 or any(not label or len(label) > 63 for label in labels) or len(value) > 253:
        raise ValidationError(f"{value!r} is not a fully qualified domain name")
    for label in labels:
        if label.startswith("-") or label.endswith("-") or not all(c.isalnum() or c == "-" for c in label):
            raise ValidationError(f"{value!r} is not a valid domain name")


def validate_network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IP address or CIDR network") from exc


class Route(models.Model):
    """Where mail for a domain goes: the organisation's real mail server."""

    name = models.CharField(max_length=100, unique=True)
    host = models.CharField(max_length=255, help_text="Host name or IP address of the mail server")
    port = models.PositiveIntegerField(default=25, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    require_tls = models.BooleanField(default=False, help_text="Refuse to deliver unless STARTTLS succeeds")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def for_address(cls, address: str) -> Route:
        """The route to HOST:PORT, created on first use (named after the address)."""
        host, port = parse_host_port(address, default_port=25)
        route, _ = cls.objects.get_or_create(host=host, port=port, defaults={"name": f"{host}:{port}"})
        return route


def parse_host_port(value: str, *, default_port: int) -> tuple[str, int]:
    """Split HOST:PORT, [IPv6]:PORT or a bare host; raise ValueError when malformed."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    if not host:
        raise ValueError(f"{value!r}: no host")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{value!r}: the port is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"{value!r}: the port is out of range")
    return host, number


class Domain(models.Model):
    """A protected (relay) domain: mail for it is accepted, scanned and relayed to its route."""

    class RecipientCheck(models.TextChoices):
        ANY = "any", "Accept any local part"
        LIST = "list", "Only the listed addresses"
        CALLAHEAD = "callahead", "Ask the route's server (RCPT probe)"
        LDAP = "ldap", "Look the address up in the domain's directory (LDAP)"

    name = models.CharField(max_length=253, unique=True, validators=[validate_domain_name])
    route = models.ForeignKey(Route, on_delete=models.PROTECT, related_name="domains")
    active = models.BooleanField(default=True)
    recipient_check = models.CharField(max_length=10, choices=RecipientCheck.choices, default=RecipientCheck.ANY)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        self.name = self.name.strip().rstrip(".").lower()
        super().save(*args, **kwargs)


class ValidRecipient(models.Model):
    """An address known to exist at a domain whose recipient check is 'list'."""

    domain = models.ForeignKey(Domain, on_delete=models.CASCADE, related_name="valid_recipients")
    address = models.CharField(max_length=320, unique=True)

    def __str__(self) -> str:
        return self.address

    def save(self, *args, **kwargs):
        self.address = self.address.strip().lower()
        super().save(*args, **kwargs)


class TrustedNetwork(models.Model):
    """Clients in these networks may relay to any domain (the organisation's own servers)."""

    network = models.CharField(max_length=50, unique=True, validators=[validate_network])
    description = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return self.network

    def save(self, *args, **kwargs):
        self.network = str(ipaddress.ip_network(self.network, strict=False))
        super().save(*args, **kwargs)


class Verdict(models.TextChoices):
    CLEAN = "clean", "Clean"
    SPAM = "spam", "Spam"
    HIGH_SPAM = "high_spam", "High spam"
    VIRUS = "virus", "Virus"
    BLOCKED_ATTACHMENT = "blocked_attachment", "Blocked attachment"
    UNSCANNABLE = "unscannable", "Unscannable"
    BLOCKED_SENDER = "blocked_sender", "Blocked sender"


# Verdicts on the content itself, which no threshold, spam policy or list entry changes: a blocked sender's virus
# stays a virus, and an allowed sender's unscannable message is held like anyone's.
CONTENT_VERDICTS = (Verdict.VIRUS, Verdict.UNSCANNABLE, Verdict.BLOCKED_ATTACHMENT)


def spam_verdict(score: float | None, spam_threshold: float, high_spam_threshold: float) -> str:
    """A spam score read against thresholds: high spam, spam or clean (no score: clean)."""
    if score is not None and score >= high_spam_threshold:
        return Verdict.HIGH_SPAM
    if score is not None and score >= spam_threshold:
        return Verdict.SPAM
    return Verdict.CLEAN


class Action(models.TextChoices):
    DELIVER = "deliver", "Deliver"
    TAG = "tag", "Deliver tagged (subject prefix)"
    QUARANTINE = "quarantine", "Quarantine"
    DELETE = "delete", "Delete"


DEFAULT_BLOCKED_ATTACHMENTS = "\n".join(
    ["*.exe", "*.scr", "*.js", "*.jse", "*.vbs", "*.vbe", "*.bat", "*.cmd", "*.com", "*.pif", "*.cpl",
     "*.hta", "*.msi", "*.wsf", "*.wsh", "*.lnk", "*.jar", "*.ps1", "*.reg", "*.iso"]
)


class MailFlowSettings(models.Model):
    """The mail-flow settings: one row, edited in the admin (and later the settings page)."""

    spam_threshold = models.FloatField(default=5.0, help_text="SpamAssassin score from which mail is spam")
    high_spam_threshold = models.FloatField(default=15.0, help_text="Score from which mail is high spam")
    action_spam = models.CharField(max_length=12, choices=Action.choices, default=Action.TAG)
    action_high_spam = models.CharField(max_length=12, choices=Action.choices, default=Action.QUARANTINE)
    action_virus = models.CharField(max_length=12, choices=Action.choices, default=Action.QUARANTINE)
    action_blocked_attachment = models.CharField(max_length=12, choices=Action.choices,
                                                 default=Action.QUARANTINE)
    action_blocked_sender = models.CharField(max_length=12, choices=Action.choices, default=Action.QUARANTINE,
                                             help_text="For a sender on a block list")
    action_unscannable = models.CharField(
        max_length=12, choices=Action.choices, default=Action.QUARANTINE,
        help_text="For a message the scanners could not fully check (a limit reached, MIME that cannot be read "
                  "one way only, too large for clamd): never delivered unchecked unless this says so")
    subject_prefix = models.CharField(max_length=50, default="[SPAM]")
    max_message_size = models.PositiveIntegerField(default=25 * 1024 * 1024, help_text="Bytes (SMTP SIZE)")
    max_recipients = models.PositiveIntegerField(default=100, help_text="Per message")
    queue_lifetime_hours = models.PositiveIntegerField(default=5 * 24,
                                                       help_text="How long a deferred delivery is retried")
    blocked_attachments = models.TextField(
        default=DEFAULT_BLOCKED_ATTACHMENTS,
        help_text="One pattern per line: *.ext, a file name, or a glob. Double extensions such as "
                  "invoice.pdf.exe are caught by their last extension; executables are also found by content.")
    block_executables_by_content = models.BooleanField(
        default=True, help_text="Treat Windows/ELF/Mach-O executables as blocked whatever their name")
    outbound_relay = models.CharField(
        max_length=255, blank=True,
        help_text="HOST:PORT that receives mail for domains that are not ours (DSNs, outbound relay). "
                  "Empty: deliver by MX look-up.")
    quarantine_retention_days = models.PositiveIntegerField(default=30)
    log_retention_days = models.PositiveIntegerField(default=365)

    class Meta:
        verbose_name = verbose_name_plural = "mail-flow settings"

    def __str__(self) -> str:
        return "Mail-flow settings"

    def clean(self) -> None:
        if self.high_spam_threshold < self.spam_threshold:
            raise ValidationError({"high_spam_threshold": "must be at least the spam threshold"})
        if self.outbound_relay:
            try:
                parse_host_port(self.outbound_relay, default_port=25)
            except ValueError as exc:
                raise ValidationError({"outbound_relay": str(exc)}) from exc

    @classmethod
    def load(cls) -> MailFlowSettings:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    @classmethod
    def cached(cls) -> MailFlowSettings:
        """The settings as read at most CONFIG_CACHE_SECONDS ago: for the path every message takes."""
        return _settings_snapshot.get()

    def save(self, *args, **kwargs):
        self.pk = 1
        super().save(*args, **kwargs)

    def action_for(self, verdict: str) -> str:
        return {
            Verdict.CLEAN: Action.DELIVER,
            Verdict.SPAM: self.action_spam,
            Verdict.HIGH_SPAM: self.action_high_spam,
            Verdict.VIRUS: self.action_virus,
            Verdict.BLOCKED_ATTACHMENT: self.action_blocked_attachment,
            Verdict.BLOCKED_SENDER: self.action_blocked_sender,
            Verdict.UNSCANNABLE: self.action_unscannable,
        }[verdict]

    @property
    def queue_lifetime(self) -> timedelta:
        return timedelta(hours=self.queue_lifetime_hours)

    def blocked_attachment_patterns(self) -> list[str]:
        return [line.strip().lower() for line in self.blocked_attachments.splitlines() if line.strip()]


_settings_snapshot = Snapshot(MailFlowSettings.load).clear_on_change(MailFlowSettings)


def _threshold(help_text: str) -> models.FloatField:
    return models.FloatField(null=True, blank=True, validators=[MinValueValidator(-1000), MaxValueValidator(100000)],
                             help_text=help_text)


class DomainSpamPolicy(models.Model):
    """A domain's own spam thresholds and actions (empty: the mail-flow settings' own), and what its users
    may choose for themselves. Edited by the domain's administrators and by administrators."""

    domain = models.OneToOneField(Domain, on_delete=models.CASCADE, related_name="spam_policy")
    spam_threshold = _threshold("Score from which mail is spam; empty: the global setting")
    high_spam_threshold = _threshold("Score from which mail is high spam; empty: the global setting")
    action_spam = models.CharField(max_length=12, choices=Action.choices, blank=True,
                                   help_text="Empty: the global setting")
    action_high_spam = models.CharField(max_length=12, choices=Action.choices, blank=True,
                                        help_text="Empty: the global setting")
    users_may_choose = models.BooleanField(default=False,
                                           help_text="Users may set their own thresholds, within the limits below")
    user_min_threshold = _threshold("The lowest threshold a user may choose; empty: no limit")
    user_max_threshold = _threshold("The highest threshold a user may choose; empty: no limit")
    users_may_skip_quarantine = models.BooleanField(
        default=False, help_text="Users may have their spam delivered tagged instead of quarantined")

    class Meta:
        verbose_name = verbose_name_plural = "domain spam policy"

    def __str__(self) -> str:
        return f"spam policy of {self.domain}"

    def clean(self) -> None:
        if (self.spam_threshold is not None and self.high_spam_threshold is not None
                and self.high_spam_threshold < self.spam_threshold):
            raise ValidationError({"high_spam_threshold": "must be at least the spam threshold"})
        if (self.user_min_threshold is not None and self.user_max_threshold is not None
                and self.user_max_threshold < self.user_min_threshold):
            raise ValidationError({"user_max_threshold": "must be at least the lowest threshold"})

    def within_limits(self, threshold: float) -> bool:
        """Whether a user of this domain may choose this threshold."""
        low, high = self.user_min_threshold, self.user_max_threshold
        return (low is None or threshold >= low) and (high is None or threshold <= high)

    def clamp(self, threshold: float) -> float:
        """A user's threshold brought within this domain's limits (limits tightened after the user chose,
        or the user's address in another domain than the one whose limits the form checked)."""
        if self.user_min_threshold is not None:
            threshold = max(threshold, self.user_min_threshold)
        if self.user_max_threshold is not None:
            threshold = min(threshold, self.user_max_threshold)
        return threshold


class UserSpamPolicy(models.Model):
    """A login's own spam thresholds (empty: its domain's) and whether its spam is tagged rather than
    quarantined; applied to mail for each of its addresses, within the limits of that address's domain."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="spam_policy")
    spam_threshold = _threshold("Score from which mail is spam; empty: your domain's setting")
    high_spam_threshold = _threshold("Score from which mail is high spam; empty: your domain's setting")
    skip_quarantine = models.BooleanField(
        default=False, help_text="Deliver my spam tagged instead of holding it in the quarantine (never a virus, "
                                 "a blocked attachment or a message that could not be checked)")

    class Meta:
        verbose_name = verbose_name_plural = "user spam policy"

    def __str__(self) -> str:
        return f"spam policy of {self.user}"

    def clean(self) -> None:
        if (self.spam_threshold is not None and self.high_spam_threshold is not None
                and self.high_spam_threshold < self.spam_threshold):
            raise ValidationError({"high_spam_threshold": "must be at least the spam threshold"})


class MessageQuerySet(models.QuerySet):
    def visible_to(self, user, *, received: tuple | None = None) -> MessageQuerySet:
        """The messages this user may see: the one scoping rule of the whole product.

        Administrators see all; a domain administrator the mail to or from their domains; a user the
        mail to or from their own addresses. Anyone else sees nothing.

        `received` = (start, end), end exclusive: only the messages received in that window. For a user it
        is applied inside the index look-ups (recipient address and time, envelope sender and time), so a
        day of a busy mailbox is read without its whole history.
        """
        role = role_of(user)
        window = Q(received_at__gte=received[0], received_at__lt=received[1]) if received else Q()
        if role == Role.ADMIN:
            return self.filter(window)
        if role == Role.DOMAIN_ADMIN:
            domains = domains_of(user)
            if not domains:
                return self.none()
            # EXISTS, not "id IN (subquery)": inside an OR, PostgreSQL re-runs an IN subquery per row
            # once it outgrows memory (minutes at a million messages); EXISTS uses the recipient index.
            return self.filter(window).filter(
                Q(sender_domain__in=domains)
                | Exists(Recipient.objects.filter(message_id=OuterRef("pk"), domain__in=domains))
            )
        if role != Role.USER:
            return self.none()
        addresses = addresses_of(user)
        if not addresses:
            return self.none()
        own = Recipient.objects.filter(address__in=addresses)
        if received:
            own = own.filter(received_at__gte=received[0], received_at__lt=received[1])
        mine = (Message.objects.filter(window, envelope_sender__in=addresses).order_by().values("pk")
                .union(own.order_by().values("message_id"), all=True))
        return self.filter(window, pk__in=mine)

    def newest_visible_parts(self, user) -> list[MessageQuerySet] | None:
        """A user's messages as parts that each come newest first from one index, for paging in time order:
        per address, the mail sent from it (envelope sender, received_at) and the mail to it (the recipient's
        own address and received_at). Each part is annotated `_sort`: the time its index is ordered by.

        Together the parts hold exactly `visible_to(user)`; a message can be in several (from and to the
        same person), so whoever merges them drops the repeats. None for anyone but a user: one query over
        `visible_to` is already served in time order by the message's own index.
        """
        if role_of(user) != Role.USER:
            return None
        parts = []
        for address in addresses_of(user):
            parts.append(self.filter(envelope_sender=address).annotate(_sort=models.F("received_at")))
            # The recipient's received_at, not the message's: only it is in the index the part is read from.
            parts.append(self.filter(recipients__address=address)
                         .annotate(_sort=models.F("recipients__received_at")))
        return parts


def keyset_rows(parts: list[models.QuerySet], *, descending: bool, beyond: tuple | None, limit: int) -> list:
    """Up to `limit` messages of the parts (querysets each annotated `_sort`) in (_sort, id) order, descending
    or ascending, strictly beyond the key (sort value, id) when one is given; a message in several parts once.

    Each part reads only its first `limit` rows, which is enough: a message among the first `limit` of the
    whole is among the first `limit` of every part that holds it.
    """
    found: dict[int, object] = {}
    order = ("-_sort", "-id") if descending else ("_sort", "id")
    for part in parts:
        if beyond is not None:
            value, pk = beyond
            part = part.filter(Q(_sort__lt=value) | Q(_sort=value, id__lt=pk) if descending
                               else Q(_sort__gt=value) | Q(_sort=value, id__gt=pk))
        for row in part.order_by(*order)[:limit]:
            found.setdefault(row.pk, row)
    rows = list(found.values())
    if len(parts) > 1:
        # A recipient row written without its time (by a process older than the column) sorts by its message's.
        rows.sort(key=lambda row: (row._sort or row.received_at, row.pk), reverse=descending)
    return rows[:limit]


def new_queue_id() -> str:
    # 12 hex digits, random: unique across SMTP nodes without asking the database first.
    return secrets.token_hex(6).upper()


class Message(models.Model):
    """One message, or one attempt refused at SMTP time (state 'refused'), in the mail log."""

    class State(models.TextChoices):
        REFUSED = "refused", "Refused at SMTP time"
        RECEIVED = "received", "Received, waiting for the scan"
        SCANNING = "scanning", "Being scanned"
        SCAN_DEFERRED = "scan_deferred", "Scan deferred (a scanner did not answer)"
        DELIVERING = "delivering", "Being delivered"
        DELIVERED = "delivered", "Delivered"
        PARTIAL = "partial", "Delivered to some recipients"
        BOUNCED = "bounced", "Delivery failed (bounced)"
        QUARANTINED = "quarantined", "Quarantined"
        RELEASED = "released", "Released from quarantine"
        DELETED = "deleted", "Deleted"

    class Direction(models.TextChoices):
        INBOUND = "inbound", "Inbound"
        OUTBOUND = "outbound", "Outbound"
        DSN = "dsn", "Delivery status notification"

    class Refusal(models.TextChoices):
        RELAY_DENIED = "relay_denied", "Relay denied"
        UNKNOWN_USER = "unknown_user", "Unknown user"
        OVER_SIZE = "over_size", "Over size"
        TOO_MANY_RECIPIENTS = "too_many_recipients", "Too many recipients"
        BAD_SENDER = "bad_sender", "Bad sender address"
        BAD_RECIPIENT = "bad_recipient", "Bad recipient address"
        BAD_MESSAGE = "bad_message", "Malformed message"
        CANT_RESOLVE = "cant_resolve", "Can't resolve sender domain"
        RBL = "rbl", "Listed in a DNSBL"
        REVERSE_DNS = "reverse_dns", "No forward-confirmed reverse DNS"
        HELO = "helo", "Bad HELO/EHLO"
        SPF = "spf", "SPF"
        DMARC = "dmarc", "DMARC"
        GREYLISTED = "greylisted", "Greylisted"
        RATE_LIMIT = "rate_limit", "Rate limit"
        BLOCKED_SENDER = "blocked_sender", "Blocked sender"
        EARLY_TALKER = "early_talker", "Talked before the greeting"
        AUTH_FAILED = "auth_failed", "Authentication failed"
        SENDER_NOT_OWNED = "sender_not_owned", "Sender not owned by the login"
        PROTECTED_SENDER = "protected_sender", "Our domain as sender from outside"

    objects = MessageQuerySet.as_manager()

    queue_id = models.CharField(max_length=20, unique=True, default=new_queue_id)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    node = models.CharField(max_length=100, default="")
    direction = models.CharField(max_length=10, choices=Direction.choices, default=Direction.INBOUND)
    state = models.CharField(max_length=15, choices=State.choices, default=State.RECEIVED)
    # Envelope and client
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    client_name = models.CharField(max_length=255, blank=True, help_text="Reverse DNS name of the client")
    helo = models.CharField(max_length=255, blank=True)
    authenticated_as = models.CharField(max_length=150, blank=True)
    mail_options = models.JSONField(default=list, blank=True, help_text="ESMTP MAIL parameters (BODY, SMTPUTF8)")
    envelope_sender = models.CharField(max_length=320, blank=True, db_index=True)
    sender_domain = models.CharField(max_length=253, blank=True, db_index=True)
    # Headers
    header_from = models.CharField(max_length=998, blank=True)
    subject = models.CharField(max_length=998, blank=True)
    message_id = models.CharField(max_length=998, blank=True)
    size = models.PositiveIntegerField(default=0)
    # Scan results
    verdict = models.CharField(max_length=20, choices=Verdict.choices, blank=True)
    action = models.CharField(max_length=12, choices=Action.choices, blank=True)
    quarantined = models.BooleanField(default=False)
    spam_score = models.FloatField(null=True, blank=True)
    spam_threshold = models.FloatField(null=True, blank=True)
    spam_rules = models.JSONField(default=list, blank=True, help_text="[{name, score, description}]")
    virus_names = models.JSONField(default=list, blank=True)
    attachments = models.JSONField(default=list, blank=True, help_text="[{name, type, size, sha256, blocked}]")
    scan_notes = models.JSONField(default=list, blank=True, help_text="What was not scanned, and why")
    checks = models.JSONField(default=dict, blank=True, help_text="SMTP-time and authentication checks")
    added_headers = models.TextField(blank=True, help_text="Headers prepended on delivery")
    # Refusals at SMTP time
    refusal_reason = models.CharField(max_length=20, choices=Refusal.choices, blank=True)
    smtp_reply = models.CharField(max_length=512, blank=True, help_text="Our final reply to the client")
    # Work in progress
    attempts = models.PositiveIntegerField(default=0, help_text="Scan attempts")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    scanned_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at", "-id"]
        indexes = [
            models.Index(fields=["state", "next_attempt_at"], name="message_due"),
            models.Index(fields=["verdict", "received_at"], name="message_verdict_time"),
            models.Index(fields=["quarantined", "received_at"], name="message_quarantine_time"),
            models.Index(fields=["client_ip", "received_at"], name="message_client_time"),
            # The message log filtered by node (several nodes, one view), newest first.
            models.Index(fields=["node", "received_at"], name="message_node_time"),
        ]

    def __str__(self) -> str:
        return f"{self.queue_id} from <{self.envelope_sender}>"

    def save(self, *args, **kwargs):
        if self.envelope_sender and not self.sender_domain and "@" in self.envelope_sender:
            self.sender_domain = self.envelope_sender.rsplit("@", 1)[1].lower()
        super().save(*args, **kwargs)

    def claim(self, from_states: list[str] | tuple[str, ...], to_state: str, **fields) -> bool:
        """Move this message to `to_state` only if it is still in one of `from_states`.

        Two workers, or a click made twice, race here: exactly one of them sees True.
        """
        now = timezone.now()
        changed = Message.objects.filter(pk=self.pk, state__in=from_states).update(
            state=to_state, claimed_at=now, **fields)
        if changed:
            self.state = to_state
            self.claimed_at = now
            for key, value in fields.items():
                setattr(self, key, value)
        return bool(changed)


def _stamp_received(recipient: Recipient) -> None:
    if recipient.received_at is None and recipient.message_id is not None:
        recipient.received_at = recipient.message.received_at


class RecipientQuerySet(models.QuerySet):
    def bulk_create(self, objs, *args, **kwargs):
        objs = list(objs)
        for obj in objs:
            _stamp_received(obj)
        return super().bulk_create(objs, *args, **kwargs)


class Recipient(models.Model):
    """One envelope recipient of a message, with its own verdict and delivery status."""

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for delivery"
        DELIVERING = "delivering", "Being delivered"
        DEFERRED = "deferred", "Deferred (temporary failure, will retry)"
        DELIVERED = "delivered", "Delivered"
        BOUNCED = "bounced", "Bounced (permanent failure)"
        EXPIRED = "expired", "Expired in the queue"
        QUARANTINED = "quarantined", "Held in quarantine"
        RELEASED = "released", "Released, waiting for delivery"
        DELETED = "deleted", "Deleted"
        REFUSED = "refused", "Refused at SMTP time"
        HELD = "held", "On hold in the mail queue (not delivered until released)"

    objects = RecipientQuerySet.as_manager()

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="recipients")
    address = models.CharField(max_length=320, db_index=True)
    # The message's received_at, copied: a user's mail in time order is read from one index on
    # (address, received_at) instead of from all their messages sorted (reports' migration 0005).
    received_at = models.DateTimeField(null=True, blank=True)
    domain = models.CharField(max_length=253, db_index=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    verdict = models.CharField(max_length=20, choices=Verdict.choices, blank=True)
    action = models.CharField(max_length=12, choices=Action.choices, blank=True)
    # The spam policy that gave this recipient its verdict and action, with the thresholds it used: "global
    # (spam 5, high spam 15)", "domain example.org (...)", "user alice@example.org (...)".
    policy = models.CharField(max_length=400, blank=True)
    # That policy's spam threshold: the "required" of the X-Spam-Status this recipient's copy carries.
    spam_threshold = models.FloatField(null=True, blank=True)
    released = models.BooleanField(default=False)
    reply_code = models.PositiveSmallIntegerField(null=True, blank=True)
    reply_text = models.TextField(blank=True, help_text="The downstream server's last reply")
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    dsn_sent = models.BooleanField(default=False, help_text="A failure notice went to the envelope sender")
    delay_warned = models.BooleanField(default=False, help_text="A delay warning (DSN, Action: delayed) went to "
                                                                "the envelope sender")

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="recipient_due")]

    def __str__(self) -> str:
        return self.address

    def save(self, *args, **kwargs):
        if not self.domain and "@" in self.address:
            self.domain = self.address.rsplit("@", 1)[1].lower()
        _stamp_received(self)
        super().save(*args, **kwargs)


# A recipient in these statuses is still on its way: its message keeps its bytes. One on hold in the mail queue
# is too: it waits for an administrator, not for a worker.
ACTIVE_RECIPIENT_STATUSES = [Recipient.Status.PENDING, Recipient.Status.DEFERRED, Recipient.Status.DELIVERING,
                             Recipient.Status.HELD]


class RawMessage(models.Model):
    """The bytes of a message as received, kept apart so the log stays small to scan."""

    message = models.OneToOneField(Message, on_delete=models.CASCADE, primary_key=True, related_name="raw")
    data = models.BinaryField()


class UserProfile(models.Model):
    """What a login may see: its role, its domains (domain administrators), its addresses (users)."""

    Role = Role

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mail_profile")
    role = models.CharField(max_length=15, choices=Role.choices, default=Role.USER)
    domains = models.ManyToManyField(Domain, blank=True, related_name="administrators")
    addresses = models.TextField(blank=True, help_text="Extra addresses and aliases, one per line")
    directory = models.ForeignKey(
        "Directory", null=True, blank=True, on_delete=models.SET_NULL, related_name="profiles",
        help_text="The directory this login belongs to: it logs in there, and its role and addresses come from "
                  "there at each login. Empty: a local account with its own password.")

    def __str__(self) -> str:
        return f"{self.user} ({self.get_role_display()})"

    def all_addresses(self) -> list[str]:
        found = [line.strip().lower() for line in self.addresses.splitlines() if line.strip()]
        if self.user.email:
            found.insert(0, self.user.email.lower())
        return list(dict.fromkeys(found))


class AuditEvent(models.Model):
    """Who did what, on what, when and from where: every action of a person, and the release of mail."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True, help_text="Kept if the user is deleted")
    ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=50, db_index=True)
    message = models.ForeignKey(Message, null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="audit_events")
    target = models.CharField(max_length=500, blank=True, help_text="What the action was on")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.username or 'system'} {self.action} {self.target}"


def record_audit(action: str, *, user=None, ip: str | None = None, message: Message | None = None,
                 target: str = "", **detail) -> AuditEvent:
    return AuditEvent.objects.create(
        action=action, user=user if getattr(user, "pk", None) else None,
        username=getattr(user, "username", "") or "", ip=ip or None, message=message,
        target=target or (message.queue_id if message else ""), detail=detail)


# --- SMTP-time policy and mail authentication (issue 3; docs/smtp-policy.md) ---------------------------------


class CheckAction(models.TextChoices):
    """What a check does when it finds something: the same five words for every check."""

    OFF = "off", "Off (not checked)"
    LOG = "log", "Log only"
    SCORE = "score", "Add to the spam score"
    TEMPFAIL = "tempfail", "Refuse temporarily (4xx)"
    REJECT = "reject", "Refuse (5xx)"


_ALL_ACTIONS = CheckAction.choices
_NO_SCORE = [c for c in CheckAction.choices if c[0] != CheckAction.SCORE]
_TEMPORARY = [c for c in CheckAction.choices if c[0] in (CheckAction.OFF, CheckAction.LOG, CheckAction.TEMPFAIL)]


def _action(default: str, help_text: str, choices=_ALL_ACTIONS) -> models.CharField:
    return models.CharField(max_length=8, choices=choices, default=default, help_text=help_text)


def _score(default: float) -> models.FloatField:
    return models.FloatField(default=default, help_text="Points added to the spam score when the action is 'score'")


class SMTPPolicy(models.Model):
    """What each SMTP-time check does: one row, read by the SMTP server with the rest of its policy.

    A DNS lookup that fails temporarily makes a check whose action is reject or tempfail answer
    451 4.4.3; a check that only logs or scores records 'temperror' and lets the mail pass.
    """

    # Connection
    max_connections_per_ip = models.PositiveIntegerField(
        default=50, help_text="Concurrent connections from one client IP (0: no limit); more get 421 4.7.0")
    max_messages_per_minute = models.PositiveIntegerField(
        default=0, help_text="Messages (MAIL commands) per minute from one client IP (0: no limit)")
    rate_limit_action = _action(CheckAction.TEMPFAIL, "Over a limit: 421 4.7.0 (tempfail or reject) or log",
                                _TEMPORARY + [(CheckAction.REJECT, "Refuse (421 too)")])
    early_talker_action = _action(CheckAction.REJECT, "A client that talks before the greeting", _NO_SCORE)
    fcrdns_action = _action(CheckAction.SCORE, "The client IP has no forward-confirmed reverse DNS name")
    fcrdns_score = _score(1.0)
    # HELO/EHLO
    helo_action = _action(CheckAction.SCORE, "HELO is not a fully qualified name that resolves, nor the "
                                             "client's own address literal")
    helo_score = _score(1.0)
    helo_impersonation_action = _action(CheckAction.REJECT, "HELO claims to be us (our name, our domains, "
                                                            "our address)")
    helo_impersonation_score = _score(3.0)
    # MAIL FROM
    sender_domain_action = _action(CheckAction.REJECT, "The sender domain has no MX nor address "
                                                       "(reject 550 5.1.8, tempfail 450 4.1.8)")
    sender_domain_score = _score(2.0)
    spf_fail_action = _action(CheckAction.REJECT, "SPF fail (550 5.7.23)")
    spf_fail_score = _score(5.0)
    spf_softfail_action = _action(CheckAction.SCORE, "SPF softfail")
    spf_softfail_score = _score(2.0)
    spf_neutral_action = _action(CheckAction.LOG, "SPF neutral")
    spf_neutral_score = _score(0.5)
    spf_permerror_action = _action(CheckAction.LOG, "SPF permerror (the sender's record is broken)")
    spf_permerror_score = _score(1.0)
    spf_temperror_action = _action(CheckAction.TEMPFAIL, "SPF temperror (a DNS failure): 451 4.4.3",
                                   _TEMPORARY)
    # RCPT TO
    blocked_sender_action = _action(
        CheckAction.LOG, "A sender on a block list: 'reject' refuses it at RCPT (554 5.7.1); 'log' lets the scan "
                         "apply the mail-flow action for blocked senders", _NO_SCORE)
    greylisting_action = _action(CheckAction.TEMPFAIL, "Greylisting: 451 4.7.1 on the first try ('log' only "
                                                       "learns)", _TEMPORARY)
    greylist_delay = models.PositiveIntegerField(default=300, help_text="Seconds before a retry is accepted")
    greylist_retry_window_hours = models.PositiveIntegerField(
        default=48, help_text="A retry later than this after the first try starts over")
    greylist_lifetime_days = models.PositiveIntegerField(
        default=36, help_text="A triplet that passed passes without delay while it is used at least this often")
    greylist_ipv4_prefix = models.PositiveSmallIntegerField(
        default=24, validators=[MaxValueValidator(32)], help_text="Client network of the triplet (IPv4)")
    greylist_ipv6_prefix = models.PositiveSmallIntegerField(
        default=64, validators=[MaxValueValidator(128)], help_text="Client network of the triplet (IPv6)")
    callahead_positive_hours = models.PositiveIntegerField(
        default=24 * 7, help_text="How long a recipient the route's server accepted is remembered")
    callahead_negative_minutes = models.PositiveIntegerField(
        default=60, help_text="How long a recipient the route's server refused is remembered")
    callahead_unreachable_action = _action(
        CheckAction.TEMPFAIL, "The route's server cannot be asked: 451 4.4.3 (tempfail) or accept (log)",
        _TEMPORARY)
    # DATA
    dkim_action = _action(CheckAction.LOG, "A DKIM signature that fails (RFC 6376 §6.3: alone, no reason to "
                                           "refuse)", [c for c in _ALL_ACTIONS if c[0] in ("off", "log", "score")])
    dkim_score = _score(1.0)
    dmarc_reject_action = _action(CheckAction.REJECT, "DMARC fail with p=reject (550 5.7.1)")
    dmarc_reject_score = _score(10.0)
    dmarc_quarantine_action = _action(CheckAction.SCORE, "DMARC fail with p=quarantine (the score makes it spam)")
    dmarc_quarantine_score = _score(5.0)
    dmarc_temperror_action = _action(CheckAction.TEMPFAIL, "The DMARC policy could not be looked up: 451 4.4.3",
                                     _TEMPORARY)
    protected_sender_action = _action(
        CheckAction.SCORE, "Mail from outside (neither trusted nor authenticated) whose envelope sender or header "
                           "From is one of our domains, without a passing SPF or DKIM for it (reject 550 5.7.1)")
    protected_sender_score = _score(3.0)
    # SMTP AUTH (submission ports)
    auth_max_failures = models.PositiveIntegerField(
        default=5, help_text="Failed AUTH attempts from one client IP before it is refused (421 4.7.0)")
    auth_failure_window_minutes = models.PositiveIntegerField(default=15)

    class Meta:
        verbose_name = verbose_name_plural = "SMTP policy"

    def __str__(self) -> str:
        return "SMTP policy"

    @classmethod
    def load(cls) -> SMTPPolicy:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def save(self, *args, **kwargs):
        self.pk = 1
        super().save(*args, **kwargs)


def validate_answer_list(value: str) -> None:
    for item in value.replace(",", " ").split():
        validate_network(item)


class DNSBLZone(models.Model):
    """A DNS block list of client addresses (e.g. zen.spamhaus.org), asked about every client."""

    zone = models.CharField(max_length=253, unique=True, validators=[validate_domain_name])
    enabled = models.BooleanField(default=True)
    action = _action(CheckAction.REJECT, "A listed client: 554 5.7.1 (reject), 450 4.7.1 (tempfail), score or log")
    score = models.FloatField(default=3.0, help_text="Points when the action is 'score'")
    answers = models.CharField(
        max_length=500, blank=True, validators=[validate_answer_list],
        help_text="Addresses or networks that mean 'listed' (e.g. 127.0.0.2 127.0.0.4/30); empty: any in "
                  "127.0.0.0/8 except 127.255.255.0/24, the error answers of Spamhaus")
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["zone"]
        verbose_name = "DNSBL zone"

    def __str__(self) -> str:
        return self.zone

    def save(self, *args, **kwargs):
        self.zone = self.zone.strip().rstrip(".").lower()
        super().save(*args, **kwargs)


class GreylistEntry(models.Model):
    """One greylisting triplet: client network, envelope sender, recipient."""

    key = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the triplet")
    client_network = models.CharField(max_length=50)
    sender = models.CharField(max_length=320, blank=True)
    recipient = models.CharField(max_length=320)
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now, db_index=True)
    passed_at = models.DateTimeField(null=True, blank=True, help_text="When a retry was first accepted")
    attempts = models.PositiveIntegerField(default=1)

    class Meta:
        verbose_name = "greylisting triplet"
        verbose_name_plural = "greylisting triplets"
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return f"{self.client_network} <{self.sender}> → <{self.recipient}>"


class RecipientVerification(models.Model):
    """The cached answer of a route's mail server to an RCPT probe (recipient call-ahead)."""

    address = models.CharField(max_length=320, unique=True)
    exists = models.BooleanField()
    reply = models.CharField(max_length=512, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["address"]

    def __str__(self) -> str:
        return f"{self.address}: {'exists' if self.exists else 'unknown'}"


class DKIMKey(models.Model):
    """A DKIM signing key of one of our domains (`manage.py dkim genkey`); the newest active one signs."""

    class Algorithm(models.TextChoices):
        RSA = "rsa-sha256", "RSA (rsa-sha256)"
        ED25519 = "ed25519-sha256", "Ed25519 (ed25519-sha256, RFC 8463)"

    domain = models.ForeignKey(Domain, on_delete=models.CASCADE, related_name="dkim_keys")
    selector = models.CharField(max_length=63)
    algorithm = models.CharField(max_length=15, choices=Algorithm.choices, default=Algorithm.RSA)
    private_key = models.TextField(help_text="PEM; a secret: whoever has it can sign as the domain")
    public_txt = models.TextField(help_text="The TXT record to publish at <selector>._domainkey.<domain>")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["domain__name", "-created_at"]
        verbose_name = "DKIM key"
        constraints = [models.UniqueConstraint(fields=["domain", "selector"], name="unique_dkim_selector")]

    def __str__(self) -> str:
        return f"{self.selector}._domainkey.{self.domain.name} ({self.algorithm})"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain.name}"


# --- Allow and block lists -------------------------------------------------------------------------------


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
    """An allow or block list entry: global (administrators), per domain (domain administrators), per user.
    Read at SMTP time (gateway.policy.lists) and by the scan."""

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
        # The table kept its first name when the model moved here from the quarantine app.
        db_table = "quarantine_senderlistentry"
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



# --- Running it: the heartbeat of each process and the counters they export (issue 16; docs/operations.md) ------


class NodeHeartbeat(models.Model):
    """One running process of the mail path (an SMTP server, a worker) as it last reported itself: written by
    the process every HEARTBEAT_SECONDS, read by the status page and /metrics."""

    class Kind(models.TextChoices):
        SMTP = "smtp", "SMTP server"
        WORKER = "worker", "Worker"

    node = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    pid = models.PositiveIntegerField()
    version = models.CharField(max_length=50, blank=True)
    started_at = models.DateTimeField()
    seen_at = models.DateTimeField(db_index=True)
    smtp_connections = models.PositiveIntegerField(null=True, blank=True, help_text="Open SMTP connections now")

    class Meta:
        ordering = ["node", "kind", "pid"]
        constraints = [models.UniqueConstraint(fields=["node", "kind", "pid"], name="unique_heartbeat")]

    def __str__(self) -> str:
        return f"{self.node} {self.kind}[{self.pid}]"


class MetricTotal(models.Model):
    """A counter (or a histogram's bucket, sum or count) of one node, as its processes added to it: each
    process counts in memory and adds what it counted here every HEARTBEAT_SECONDS (gateway/metrics.py);
    the web process serves the sums at /metrics."""

    node = models.CharField(max_length=100)
    name = models.CharField(max_length=100)
    labels = models.CharField(max_length=300, blank=True, help_text="name=value pairs, sorted, tab-separated")
    value = models.FloatField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node", "name", "labels"], name="unique_metric_total")]

    def __str__(self) -> str:
        return f"{self.node} {self.name}{{{self.labels}}} {self.value}"


# --- the organisation's directories: logins and recipients ----------------------------------------------

def validate_directory_uri(value: str) -> None:
    """ldap:// (StartTLS), ldaps://, imap:// (STARTTLS) or imaps://, each with a host; several LDAP servers
    may be given, separated by spaces, and are tried in turn."""
    from urllib.parse import urlsplit

    uris = value.split()
    if not uris:
        raise ValidationError("enter the server's URI")
    schemes = set()
    for uri in uris:
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError as exc:
            raise ValidationError(f"{uri}: {exc}") from exc
        if parts.scheme not in ("ldap", "ldaps", "imap", "imaps") or not parts.hostname:
            raise ValidationError(f"{uri}: expected ldap://host, ldaps://host, imap://host or imaps://host")
        if parts.path not in ("", "/") or parts.query:
            raise ValidationError(f"{uri}: only a host and a port")
        schemes.add(parts.scheme)
    if len(schemes) > 1:
        raise ValidationError("every server the same way: all ldap:// (StartTLS) or all ldaps://")
    if "imap" in schemes and len(uris) > 1:
        raise ValidationError("one IMAP server")


class Directory(models.Model):
    """A directory of the organisation's people that logins, and a domain's recipients, are checked against:
    an LDAP server (OpenLDAP, Active Directory) or a domain's IMAP server (logins only).

    A directory of a domain logs in that domain's people by their address and grants only addresses of that
    domain; a directory without a domain (LDAP only) serves logins by any name and grants addresses of every
    domain we receive mail for. Passwords are never stored: each login asks the directory. Its connection is
    always encrypted with the certificate verified: ldap:// and imap:// with StartTLS, ldaps:// and imaps:// with
    TLS from the start, against `ca_certificate` or the system's trusted CAs. docs/directory.md.
    """

    class Kind(models.TextChoices):
        LDAP = "ldap", "LDAP / Active Directory"
        IMAP = "imap", "IMAP server (logins only)"

    class GroupType(models.TextChoices):
        GROUP_OF_NAMES = "groupOfNames", "groupOfNames / member (OpenLDAP)"
        GROUP_OF_UNIQUE_NAMES = "groupOfUniqueNames", "groupOfUniqueNames / uniqueMember"
        POSIX = "posixGroup", "posixGroup / memberUid"
        ACTIVE_DIRECTORY = "activeDirectory", "Active Directory groups (nested)"

    class Unreachable(models.TextChoices):
        TEMPFAIL = "tempfail", "Defer the recipient: 451 4.4.3 (the sender retries)"
        ACCEPT = "accept", "Accept the recipient unchecked"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=4, choices=Kind.choices, default=Kind.LDAP)
    domain = models.ForeignKey(Domain, null=True, blank=True, on_delete=models.CASCADE, related_name="directories",
                               help_text="The domain whose people it holds. Empty (LDAP only): every domain.")
    active = models.BooleanField(default=True)
    position = models.PositiveSmallIntegerField("order", default=0, help_text="Directories are asked in this order")
    uri = models.CharField(
        "server URI", max_length=500, validators=[validate_directory_uri],
        help_text="ldap://host (StartTLS), ldaps://host, imap://host (STARTTLS) or imaps://host, with :port if "
                  "it is not the usual one; several LDAP servers separated by spaces")
    ca_certificate = models.TextField(
        "CA certificate", blank=True,
        help_text="The CA certificate(s) the server's certificate must chain to (PEM). Empty: the system's trusted "
                  "CAs.")
    timeout = models.PositiveSmallIntegerField(default=5, validators=[MinValueValidator(1), MaxValueValidator(60)],
                                               help_text="Seconds to wait for the server")
    # LDAP: how to find a person and what their entry says.
    bind_dn = models.CharField("bind DN", max_length=500, blank=True,
                               help_text="The service account the gateway searches as (empty: anonymous)")
    bind_password = models.CharField(max_length=500, blank=True)
    user_base = models.CharField(max_length=500, blank=True, help_text="Where people are searched")
    user_filter = models.CharField(
        max_length=500, default="(|(uid=%(user)s)(mail=%(user)s))",
        help_text="The search for the login; %(user)s is what the person typed. Active Directory: "
                  "(|(sAMAccountName=%(user)s)(userPrincipalName=%(user)s)(mail=%(user)s))")
    mail_attribute = models.CharField(max_length=100, default="mail", help_text="The primary address")
    alias_attributes = models.CharField(
        max_length=300, default="mailAlternateAddress proxyAddresses", blank=True,
        help_text="Attributes holding further addresses, separated by spaces (proxyAddresses values are read "
                  "as Active Directory writes them: smtp:address)")
    group_type = models.CharField(max_length=20, choices=GroupType.choices, default=GroupType.GROUP_OF_NAMES)
    group_base = models.CharField(max_length=500, blank=True,
                                  help_text="Where groups are searched (empty: the people's base)")
    admin_group = models.CharField("administrators' group", max_length=500, blank=True,
                                   help_text="DN of the group whose members are administrators")
    domain_admin_group = models.CharField(
        "domain administrators' group", max_length=500, blank=True,
        help_text="DN of the group whose members are domain administrators of the domains of their addresses")
    recipient_filter = models.CharField(
        max_length=500,
        default="(|(mail=%(address)s)(mailAlternateAddress=%(address)s)(proxyAddresses=smtp:%(address)s))",
        help_text="The recipient check's search; %(address)s is the recipient address")
    # The recipient check: how long answers are kept, and what a directory that cannot be asked means.
    positive_minutes = models.PositiveIntegerField("positive minutes", default=60,
                                                   help_text="How long an address found is remembered")
    negative_minutes = models.PositiveIntegerField(default=10,
                                                   help_text="How long an address not found is remembered")
    unreachable = models.CharField("when it cannot be reached", max_length=10, choices=Unreachable.choices,
                                   default=Unreachable.TEMPFAIL,
                                   help_text="The recipient check when the directory cannot be asked")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["position", "name"]
        verbose_name_plural = "directories"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        import ssl

        errors: dict[str, str] = {}
        scheme = self.uri.split()[0].partition(":")[0] if self.uri.split() else ""
        if scheme and scheme.rstrip("s") != self.kind:
            errors["uri"] = (f"a {self.get_kind_display()} is reached by "
                             + ("ldap:// or ldaps://" if self.kind == self.Kind.LDAP else "imap:// or imaps://"))
        if self.kind == self.Kind.IMAP and self.domain_id is None:
            errors["domain"] = "an IMAP server logs in the people of one domain: choose it"
        if self.kind == self.Kind.LDAP:
            if not self.user_base.strip():
                errors["user_base"] = "where are people searched?"
            if "%(user)s" not in self.user_filter:
                errors["user_filter"] = "the filter must contain %(user)s"
            if "%(address)s" not in self.recipient_filter:
                errors["recipient_filter"] = "the filter must contain %(address)s"
            for name, key in (("user_filter", "user"), ("recipient_filter", "address")):
                value = getattr(self, name).strip()
                if value and not (value.startswith("(") and value.endswith(")")):
                    errors.setdefault(name, "an LDAP filter is written in parentheses")
                try:
                    value % {key: "x"}  # how the filter is filled in; a stray % would fail at every login
                except (KeyError, ValueError, TypeError):
                    errors.setdefault(name, f"only %({key})s may follow a %; write %% for a percent sign")
        if self.ca_certificate.strip():
            if "-----BEGIN CERTIFICATE-----" not in self.ca_certificate:
                errors["ca_certificate"] = "paste the CA certificate in PEM form (-----BEGIN CERTIFICATE-----)"
            else:
                try:
                    ssl.create_default_context(cadata=self.ca_certificate.strip())
                except (ssl.SSLError, ValueError) as exc:
                    errors["ca_certificate"] = f"this is not a certificate that can be read: {exc}"
        if errors:
            raise ValidationError(errors)

    def alias_attribute_list(self) -> list[str]:
        return [name for name in self.alias_attributes.split() if name]


class DirectoryAddress(models.Model):
    """An address the directory holds, as the last `manage.py directory sync` found it: what the directory
    page lists, and what scripts read."""

    directory = models.ForeignKey(Directory, on_delete=models.CASCADE, related_name="addresses")
    address = models.CharField(max_length=320)
    primary = models.CharField(max_length=320, help_text="The primary address of the entry it belongs to")
    dn = models.CharField(max_length=1000)
    name = models.CharField(max_length=300, blank=True)
    synced_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["directory", "address"]
        constraints = [models.UniqueConstraint(fields=["directory", "address"], name="unique_directory_address")]

    def __str__(self) -> str:
        return self.address


class DirectoryLookup(models.Model):
    """The cached answer of a directory to the recipient check: whether the address is there, for
    `positive_minutes` or `negative_minutes` of its directory (shared by the SMTP nodes)."""

    address = models.CharField(max_length=320, unique=True)
    directory = models.ForeignKey(Directory, on_delete=models.CASCADE, related_name="lookups")
    exists = models.BooleanField()
    dn = models.CharField(max_length=1000, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.address}: {'found' if self.exists else 'not found'} in {self.directory_id}"
