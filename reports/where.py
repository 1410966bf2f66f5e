"""Where is my mail? A search of the log for users (their own mail) and domain administrators (their domains):
by sender, recipient and a time window, each attempt told in plain words from what the log keeps.

Refused at SMTP time (which check, our exact reply), accepted and delivered (the downstream's reply), deferred
(the next try), bounced, quarantined (why: the rules and score, the virus, the attachment; a release button for
whoever may release it), or not seen at all in the window. Where the cause is on the sender's side (SPF, DMARC,
a DNS block list, a sender domain that does not resolve) there is a short text to forward to the sender.
Every message comes from `Message.objects.visible_to`: another login's mail does not exist here (404).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Exists, OuterRef, prefetch_related_objects
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from gateway.access import acts_for, addresses_of, domains_of, may_release_virus
from gateway.models import Message, Recipient, Verdict, keyset_rows

from .views import message_for

MAX_RESULTS = 100
MAX_WINDOW = timedelta(days=31)

REFUSALS = {
    Message.Refusal.RELAY_DENIED: "we do not relay mail for that recipient's domain",
    Message.Refusal.UNKNOWN_USER: "the recipient address does not exist here (check its spelling)",
    Message.Refusal.OVER_SIZE: "the message was larger than we accept",
    Message.Refusal.TOO_MANY_RECIPIENTS: "the message had more recipients than we accept at once",
    Message.Refusal.BAD_SENDER: "the sender address is not a valid address",
    Message.Refusal.BAD_RECIPIENT: "the recipient address is not a valid address",
    Message.Refusal.BAD_MESSAGE: "the message itself was malformed",
    Message.Refusal.CANT_RESOLVE: "the sender's domain has no mail server nor address in the DNS",
    Message.Refusal.RBL: "the sending server's address is on a DNS block list",
    Message.Refusal.REVERSE_DNS: "the sending server's address has no matching reverse DNS name",
    Message.Refusal.HELO: "the sending server introduced itself with a name that is not valid",
    Message.Refusal.SPF: "the sending server is not allowed to send mail for the sender's domain (SPF)",
    Message.Refusal.DMARC: "the message failed the DMARC check of its From domain, whose policy says to refuse it",
    Message.Refusal.GREYLISTED: "greylisting: a first try from an unknown server is asked to come back in a few "
                                "minutes; a real mail server does, and then it is accepted",
    Message.Refusal.RATE_LIMIT: "the sending server sent too much too fast",
    Message.Refusal.BLOCKED_SENDER: "the sender is on a block list",
    Message.Refusal.EARLY_TALKER: "the sending server talked before our greeting (as spam software does)",
    Message.Refusal.AUTH_FAILED: "the login failed",
    Message.Refusal.SENDER_NOT_OWNED: "the login may not send as that sender address",
    Message.Refusal.PROTECTED_SENDER: "it came from outside but claimed to be from one of our own domains",
}

# The causes on the sender's side, and what their mail administrator can do about it.
SENDER_SIDE = {
    Message.Refusal.SPF: "Your domain's SPF record does not list the server that sent it ({client}). Send through "
                         "a server the record lists, or add this one to the SPF record of {domain}.",
    Message.Refusal.DMARC: "Neither SPF nor DKIM passed for the From domain, whose DMARC policy is to reject such "
                           "mail. Make sure your server DKIM-signs for {domain}, or sends from a server its SPF "
                           "record lists.",
    Message.Refusal.RBL: "The address of the server that sent it ({client}) is listed on a DNS block list of "
                         "spam sources. Your provider or mail administrator can look it up and ask for removal.",
    Message.Refusal.CANT_RESOLVE: "The sender's domain ({domain}) has no MX nor address record, so no reply could "
                                  "reach it. Its DNS needs fixing.",
    Message.Refusal.REVERSE_DNS: "The address of the server that sent it ({client}) has no reverse DNS name that "
                                 "points back to it. Its provider can set one.",
    Message.Refusal.HELO: "The server that sent it introduced itself (HELO/EHLO) with a name that does not "
                          "resolve. Its mail administrator can set a real host name.",
}

NOT_SEEN = ("Nothing matching reached us in this window. That usually means the sender's server has not sent it "
            "yet or is still retrying (it keeps trying for days, and tells the sender when it gives up); or it was "
            "sent to another address (check the spelling); or it went to another server (an old MX record). "
            "Mail refused before its sender was known (a server blocked at the first contact) is logged without "
            "sender: search by recipient only, or ask the sender for the error their server got.")


@dataclass
class Answer:
    recipient: str
    state: str  # a word for the badge: refused, delivered, deferred, on_its_way, bounced, quarantined, deleted, ...
    words: str
    reply: str = ""
    forward: str = ""
    may_release: bool = False


def _when(value) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z") if value else ""


def _held_why(message: Message, recipient: Recipient) -> str:
    if message.virus_names:
        return "it carries a virus (" + ", ".join(message.virus_names) + ")"
    blocked = [a.get("name") or "unnamed" for a in message.attachments if a.get("blocked")]
    if blocked:
        return "it has an attachment of a blocked type (" + ", ".join(blocked) + ")"
    if message.verdict == Verdict.BLOCKED_SENDER:
        return "its sender is on a block list"
    if message.verdict == Verdict.UNSCANNABLE:
        return "it could not be fully scanned (" + "; ".join(str(n) for n in message.scan_notes[:3]) + ")"
    if message.spam_score is not None:
        rules = sorted(message.spam_rules, key=lambda r: -float(r.get("score") or 0))[:5]
        named = ", ".join(f"{r['name']} {float(r.get('score') or 0):g}" for r in rules)
        # The recipient's own spam policy set the limit (docs/spam-policy.md); older rows have none.
        limit = (f"the policy {recipient.policy}" if recipient.policy
                 else f"the limit is {message.spam_threshold or 0:g}")
        return f"it scored {message.spam_score:.1f} as spam ({limit})" + (f": {named}" if named else "")
    return message.get_verdict_display().lower() or "of its verdict"


def _forward_text(message: Message, recipient: str) -> str:
    fix = SENDER_SIDE.get(message.refusal_reason)
    if not fix:
        return ""
    domain = message.sender_domain or (message.header_from.rpartition("@")[2].strip("> ") if message.header_from
                                       else "your domain")
    return (f"Hello,\n\nyour message to {recipient or 'us'}, sent {_when(message.received_at)} from "
            f"<{message.envelope_sender or ''}>, was refused by our mail gateway ({settings.SMTP_HOSTNAME}) "
            f"with this reply:\n\n    {message.smtp_reply}\n\n"
            + fix.format(client=message.client_ip or "unknown", domain=domain)
            + "\n\nPlease pass this on to whoever runs your mail, then send the message again. Thank you.\n")


@dataclass(frozen=True)
class Asker:
    """Who asks, read once per page: the rules of gateway.access for the recipients of many messages."""

    user: object
    acts: Callable[[str, str], bool]  # for whom the login acts (recipients_in_scope)
    addresses: frozenset[str]
    domains: frozenset[str]
    may_release_virus: bool

    @classmethod
    def of(cls, user) -> Asker:
        return cls(user, acts_for(user), frozenset(addresses_of(user)), frozenset(domains_of(user)),
                   may_release_virus(user))


def explain(message: Message, recipient: Recipient | None, asker: Asker) -> Answer:
    address = recipient.address if recipient else ""
    if message.state == Message.State.REFUSED:
        check = message.get_refusal_reason_display() or "a check"
        words = (f"Refused at SMTP time, {_when(message.received_at)}, by the {check.lower()} check: "
                 f"{REFUSALS.get(message.refusal_reason, 'it broke our policy')}. It was never accepted, so the "
                 "sender's server has the error (and, for a temporary refusal, tries again).")
        return Answer(address, "refused", words, message.smtp_reply, _forward_text(message, address))
    if message.state in (Message.State.RECEIVED, Message.State.SCANNING, Message.State.SCAN_DEFERRED):
        words = f"Accepted {_when(message.received_at)}; waiting for the scan."
        if message.state == Message.State.SCAN_DEFERRED:
            words += f" A scanner did not answer; the next try is at {_when(message.next_attempt_at)}."
        return Answer(address, "scanning", words)
    if recipient is None:
        return Answer("", message.state, message.get_state_display())
    status = recipient.status
    reply = f"{recipient.reply_code or ''} {recipient.reply_text}".strip()
    released = " (released from the quarantine)" if recipient.released else ""
    if status == Recipient.Status.DELIVERED:
        return Answer(address, "delivered", f"Delivered{released} {_when(recipient.delivered_at)} to the mail "
                                            "server, which accepted it with the reply below. If it is not in the "
                                            "mailbox, look in its junk folder and its rules.", reply)
    if status == Recipient.Status.DEFERRED:
        return Answer(address, "deferred", f"Not delivered yet{released}: the mail server answered with a temporary "
                                           f"error (below). The next try is at {_when(recipient.next_attempt_at)}.",
                      reply)
    if status in (Recipient.Status.PENDING, Recipient.Status.DELIVERING, Recipient.Status.RELEASED):
        return Answer(address, "on_its_way", f"Accepted and on its way to the mail server{released}.")
    if status == Recipient.Status.BOUNCED:
        told = " The sender was sent a failure notice." if recipient.dsn_sent else ""
        return Answer(address, "bounced", f"Could not be delivered: the mail server refused it for good.{told}",
                      reply)
    if status == Recipient.Status.EXPIRED:
        return Answer(address, "bounced", "Could not be delivered: the mail server kept answering with temporary "
                                          "errors until the queue gave up.", reply)
    if status == Recipient.Status.QUARANTINED:
        mine = asker.acts(recipient.address, recipient.domain)
        may = mine and (message.verdict != Verdict.VIRUS or asker.may_release_virus)
        since = _when(message.scanned_at or message.received_at)
        return Answer(address, "quarantined",
                      f"Held in the quarantine since {since}, because {_held_why(message, recipient)}.",
                      may_release=may)
    if status == Recipient.Status.DELETED:
        return Answer(address, "deleted",
                      f"Held in the quarantine, because {_held_why(message, recipient)}, and then deleted.")
    if status == Recipient.Status.HELD:
        return Answer(address, "held", "On hold in the mail queue: an administrator holds it back for now.")
    if status == Recipient.Status.REFUSED:
        return Answer(address, "refused", f"Refused at SMTP time: {REFUSALS.get(message.refusal_reason, '')}.",
                      message.smtp_reply, _forward_text(message, address))
    return Answer(address, status, recipient.get_status_display())


def shown_recipients(message: Message, asker: Asker) -> list[Recipient]:
    """The recipients of a message this login may hear about: those it acts for; all of them when the message
    is its own (it sent it, or its domain did). From `message.recipients.all()`, which a page of many
    messages prefetches."""
    everyone = sorted(message.recipients.all(), key=lambda r: r.pk)
    own_sender = message.envelope_sender.lower() in asker.addresses or message.sender_domain in asker.domains
    return everyone if own_sender else [r for r in everyone if asker.acts(r.address, r.domain)]


def answers(message: Message, asker: Asker) -> list[Answer]:
    recipients = shown_recipients(message, asker)
    return [explain(message, r, asker) for r in recipients] or [explain(message, None, asker)]


class WhereForm(forms.Form):
    # Short labels (the filter grid's columns are narrow); the placeholder says that part of an address will do.
    sender = forms.CharField(required=False, max_length=320, label="From",
                             widget=forms.TextInput(attrs={"placeholder": "sender, or part of it"}))
    recipient = forms.CharField(required=False, max_length=320, label="To",
                                widget=forms.TextInput(attrs={"placeholder": "recipient, or part of it"}))
    since = forms.DateTimeField(required=False, label="Since",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, label="Until",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))

    def window(self):
        now = timezone.now()
        data = self.cleaned_data if self.is_valid() else {}
        until = data.get("until") or now
        since = data.get("since") or until - timedelta(days=2)
        if since > until:
            since, until = until, since
        return max(since, until - MAX_WINDOW), until


# The first slice of the window "Where is my mail?" reads for an administrator; each next one is this many
# times longer, back to the window's start.
FIRST_SLICE = timedelta(minutes=30)
SLICE_GROWTH = 2


def _newest_first(qs, since, until, limit: int) -> list[Message]:
    """The newest `limit` messages of `qs` received between since and until (inclusive), read slice by slice
    from the newest: PostgreSQL cannot tell how many a substring of the sender matches, and for a window of
    a busy gateway's whole mail it reads and sorts all of it rather than walk back until it has enough (2 s
    at ten million messages). A slice is a range of the received_at index; a search that matches often
    ends in the first."""
    rows: list[Message] = []
    end, span, first = until, FIRST_SLICE, True
    while end > since and len(rows) < limit:
        start = max(since, end - span)
        part = qs.filter(received_at__gte=start, **({"received_at__lte": end} if first else {"received_at__lt": end}))
        rows += part.order_by("-received_at", "-pk")[:limit - len(rows)]
        end, span, first = start, span * SLICE_GROWTH, False
    return rows


@login_required
def search(request: HttpRequest) -> HttpResponse:
    form = WhereForm(request.GET or None)
    since, until = form.window()
    results = None
    if form.is_bound and form.is_valid():
        sender, recipient = form.cleaned_data["sender"].strip().lower(), form.cleaned_data["recipient"].strip().lower()

        def searched(qs):
            qs = qs.exclude(direction=Message.Direction.DSN)
            if sender:
                qs = qs.filter(envelope_sender__icontains=sender)
            if recipient:
                qs = qs.filter(Exists(Recipient.objects.filter(message=OuterRef("pk"), address__icontains=recipient)))
            return qs

        # A user's mail newest first from their own indexes (see newest_visible_parts).
        parts = Message.objects.newest_visible_parts(request.user)
        if parts is not None:
            rows = keyset_rows([searched(part.filter(_sort__gte=since, _sort__lte=until)) for part in parts],
                               descending=True, beyond=None, limit=MAX_RESULTS + 1)
        else:
            rows = _newest_first(searched(Message.objects.visible_to(request.user)), since, until, MAX_RESULTS + 1)
        prefetch_related_objects(rows[:MAX_RESULTS], "recipients")
        asker = Asker.of(request.user)
        results = [(m, answers(m, asker)) for m in rows[:MAX_RESULTS]]
        more = len(rows) > MAX_RESULTS
    else:
        more = False
    return render(request, "reports/where.html", {
        "form": form, "results": results, "more": more, "since": since, "until": until, "not_seen": NOT_SEEN,
        "max_results": MAX_RESULTS,
    })


@login_required
def detail(request: HttpRequest, queue_id: str) -> HttpResponse:
    message = message_for(request.user, queue_id)
    return render(request, "reports/where_detail.html", {"message": message,
                                                        "answers": answers(message, Asker.of(request.user))})
