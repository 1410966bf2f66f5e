"""Who mail may say it is from (docs/smtp-policy.md, "Sending as").

- Authenticated mail (SMTP AUTH on the submission ports) may use only the addresses its login owns
  (gateway.access.SenderRights): the envelope sender, checked at MAIL, and every address of the header From
  and Sender, checked after DATA. A header that cannot be read for sure is refused (fail closed). The null
  sender is for notifications only (RFC 5321 §4.5.5): a delivery or disposition report (multipart/report)
  or an automatic reply (Auto-Submitted other than "no", RFC 3834).
- Mail from outside (the MX port, neither trusted nor authenticated) that claims one of our domains as
  envelope sender or header From, without a passing SPF or an aligned passing DKIM signature for it: the
  check "protected_sender", with the action and score of SMTPPolicy.

A refusal is answered `553 5.7.1` (ownership) or the check's reply, through the enforcer's refuse(), so it
is logged like every other refusal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from email import errors as email_errors
from email.headerregistry import Address
from email.policy import default as default_policy
from email.utils import getaddresses

from django.contrib.auth import get_user_model
from django.db import close_old_connections

from gateway.access import SenderRights, canonical_domain, sender_rights
from gateway.mailauth.dkim import DKIMSignatureResult
from gateway.mailauth.dmarc import is_aligned
from gateway.mailauth.spf import SPFResult
from gateway.mailbytes import header_fields, header_section
from gateway.models import CheckAction, Message

from .config import CheckConfig
from .results import TEMPERROR, CheckResult, decide

Refusal = Message.Refusal
CHECK = "sender_ownership"  # the entry of Message.checks for authenticated mail


def load_rights(username: str) -> SenderRights:
    """What the login `username` may send as, read from the database (run it in the server's thread pool).
    A login that is gone or inactive may send as nothing."""
    close_old_connections()
    User = get_user_model()
    user = User.objects.filter(**{User.USERNAME_FIELD: username}).select_related("mail_profile").first()
    if user is None:
        return SenderRights(username)
    return sender_rights(user)


def _shown(text: str, limit: int = 200) -> str:
    """An address or name fit for our reply line: printable ASCII, no CR/LF, bounded."""
    return re.sub(r"[^\x20-\x7e]", "?", " ".join(str(text).split()))[:limit]


# --- reading the header fields -------------------------------------------------------------------------------

def _fields(data: bytes) -> list[tuple[str, str]]:
    """Every field of the header section as (lower-case name, unfolded value), in order.

    Read from the bytes, not with email.parser: its parser ends the header section at the first line that is
    not a field, where a mail client may read on and show a From further down; and "From :" (obsolete
    syntax, RFC 5322 §4.5.2) is a From to mail clients too.
    """
    head = header_section(data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    found = []
    for lines in header_fields(head, b"\n"):
        name, colon, value = b"".join(lines).partition(b":")
        if colon:
            found.append((name.strip(b" \t").decode("ascii", "replace").lower(),
                          value.decode("utf-8", "replace").strip(" \t")))
    return found


_REGISTRY = default_policy.header_factory
_TOLERATED = (email_errors.ObsoleteHeaderDefect, email_errors.NonASCIILocalPartDefect)


def mailboxes(value: str) -> list[str] | None:
    """The addresses of an address-list field (From, Sender), each `local@domain`; None when the field
    cannot be read for sure.

    Two parsers read it, RFC 5322's (email.headerregistry: encoded display names, groups, comments, the
    obsolete syntax) and email.utils', and every address either finds is returned: where they disagree, a
    mail client may show either one. Anything the RFC parser finds wrong but obsolete syntax and UTF-8 local
    parts (RFC 6532), such as an unterminated comment, an encoded word in place of an address or a NUL, makes
    the field unreadable.
    """
    try:
        header = _REGISTRY("From", value)
        parsed = header.addresses
    except Exception:  # noqa: BLE001 - a value the parser cannot take is unreadable, not an empty From
        return None
    if any(not isinstance(defect, _TOLERATED) for defect in header.defects):
        return None
    found: list[str] = []
    for address in parsed:
        if not address.username or not address.domain:
            return None
        found.append(f"{address.username}@{address.domain}")
    for _name, spec in getaddresses([value]):
        if not spec:
            continue  # the empty entry an empty group leaves
        try:
            address = Address(addr_spec=spec)
            local, domain = address.username, address.domain
        except email_errors.NonASCIILocalPartDefect:
            local, _, domain = spec.rpartition("@")  # a UTF-8 local part (RFC 6532), taken as it was given
        except (ValueError, IndexError, TypeError, email_errors.HeaderParseError):
            return None
        if not local or not domain:
            return None
        found.append(f"{local}@{domain}")
    return list(dict.fromkeys(found))


@dataclass
class Claimed:
    """Who the header section says the message is from: the From and Sender addresses, or why it cannot say."""

    header_from: list[str]
    sender: list[str]
    problem: str = ""


def claimed_senders(data: bytes) -> Claimed:
    """The header From (exactly one field, at least one address) and Sender (at most one field, one address)."""
    fields = _fields(data)
    froms = [value for name, value in fields if name == "from"]
    senders = [value for name, value in fields if name == "sender"]
    if not froms:
        return Claimed([], [], "no From header field")
    if len(froms) > 1:
        return Claimed([], [], "more than one From header field")
    if len(senders) > 1:
        return Claimed([], [], "more than one Sender header field")
    header_from = mailboxes(froms[0])
    if header_from is None:
        return Claimed([], [], "the From header field cannot be parsed")
    if not header_from:
        return Claimed([], [], "the From header field has no address")
    sender: list[str] = []
    if senders:
        found = mailboxes(senders[0])
        if found is None or len(found) != 1:
            return Claimed(header_from, [], "the Sender header field is not one address")
        sender = found
    return Claimed(header_from, sender)


_COMMENT = re.compile(r"\([^()]*\)")


def is_notification(data: bytes) -> str:
    """What makes this message a notification that may use the null sender (RFC 5321 §4.5.5), or '':
    a delivery or disposition report (a multipart/report, RFC 6522), or an automatic message (Auto-Submitted
    other than "no", RFC 3834)."""
    fields = _fields(data)
    content_type = next((value for name, value in fields if name == "content-type"), "")
    if content_type:
        try:
            if _REGISTRY("Content-Type", content_type).content_type == "multipart/report":
                return "multipart/report"
        except Exception:  # noqa: BLE001 - an unreadable Content-Type is no report
            pass
    for name, value in fields:
        if name == "auto-submitted":
            keyword = value
            while _COMMENT.search(keyword):  # comments nest (RFC 5322 §3.2.2)
                keyword = _COMMENT.sub(" ", keyword)
            keyword = keyword.split(";")[0].strip().lower()
            if keyword and keyword != "no":
                return f"Auto-Submitted: {_shown(keyword, 40)}"
    return ""


# --- authenticated mail ----------------------------------------------------------------------------------

def _not_owned(rights: SenderRights, where: str, address: str, reply: str, seconds: float) -> CheckResult:
    return CheckResult(CHECK, "fail", CheckAction.REJECT, seconds,
                       {"user": rights.username, "where": where, "address": address[:320]},
                       reply=reply, reason=Refusal.SENDER_NOT_OWNED)


def envelope_sender_check(rights: SenderRights, sender: str) -> CheckResult | None:
    """MAIL FROM of authenticated mail: a refusal when the login does not own the address, else None.
    The null sender ('') is decided after DATA, when it is known whether the message is a notification."""
    if not sender or rights.may_send_as(sender):
        return None
    return _not_owned(rights, "MAIL FROM", sender,
                      f"553 5.7.1 <{_shown(sender)}>: Sender address rejected: not owned by user "
                      f"{_shown(rights.username, 150)}", 0.0)


def header_check(rights: SenderRights, sender: str, data: bytes) -> CheckResult:
    """After DATA, for authenticated mail: every address of From and Sender owned by the login, and the null
    sender only for a notification. The result refuses (553 5.7.1) or passes."""
    started = time.monotonic()
    user = _shown(rights.username, 150)
    claimed = claimed_senders(data)
    if claimed.problem:
        return CheckResult(CHECK, "fail", CheckAction.REJECT, time.monotonic() - started,
                           {"user": rights.username, "where": "header", "why": claimed.problem},
                           reply=f"553 5.7.1 Message rejected: {claimed.problem}", reason=Refusal.SENDER_NOT_OWNED)
    for where, addresses in (("From", claimed.header_from), ("Sender", claimed.sender)):
        for address in addresses:
            if not rights.may_send_as(address):
                return _not_owned(rights, where, address,
                                  f"553 5.7.1 <{_shown(address)}>: {where} header address rejected: not owned by "
                                  f"user {user}", time.monotonic() - started)
    detail: dict = {"user": rights.username}
    if not sender:
        why = is_notification(data)
        if not why:
            return CheckResult(
                CHECK, "fail", CheckAction.REJECT, time.monotonic() - started,
                {"user": rights.username, "where": "MAIL FROM", "address": "<>",
                 "why": "null sender on a message that is not a notification"},
                reply="553 5.7.1 <>: Sender address rejected: the null sender is for delivery reports and "
                      "automatic replies (RFC 5321 4.5.5), and this message is neither",
                reason=Refusal.SENDER_NOT_OWNED)
        detail["null_sender"] = why
    return CheckResult(CHECK, "pass", seconds=time.monotonic() - started, detail=detail)


# --- mail from outside claiming our domains ------------------------------------------------------------

def claimed_protected_domains(sender: str, from_domains: Iterable[str], ours: Collection[str]) -> list[str]:
    """Those of our domains (`ours`: ServerConfig.domains) that the envelope sender or the header From claims,
    in that order."""
    candidates = [sender.rpartition("@")[2]] if "@" in sender else []
    candidates += list(from_domains)
    claimed: list[str] = []
    for candidate in candidates:
        lowered = candidate.strip().rstrip(".").lower()
        name = lowered if lowered in ours else canonical_domain(lowered)
        if name and name in ours and name not in claimed:
            claimed.append(name)
    return claimed


def _protected_decision(result: str, claimed: Sequence[str], unbacked: Sequence[str], client_ip: str | None,
                        config: CheckConfig, seconds: float, **detail) -> CheckResult:
    domain = unbacked[0] if unbacked else (claimed[0] if claimed else "")
    ip = _shown(client_ip or "unknown", 60)
    text = f"<{domain}>: Sender address rejected: our domain, not authenticated by SPF or DKIM from [{ip}]"
    return decide("protected_sender", result, config.action("protected_sender"),
                  score=config.score("protected_sender"), seconds=seconds,
                  reason=Refusal.PROTECTED_SENDER, reject=f"550 5.7.1 {text}", tempfail=f"450 4.7.1 {text}",
                  temperror=f"451 4.4.3 <{domain}>: Sender address not verified: SPF or DKIM lookup failed, "
                            "try again later",
                  domains=list(claimed), **({"unauthenticated": list(unbacked)} if unbacked else {}), **detail)


def protected_sender_unchecked(claimed: Sequence[str], config: CheckConfig, error: str) -> CheckResult:
    """The check when DKIM could not be verified at all (a broken verifier): as a lookup that failed."""
    return _protected_decision(TEMPERROR, claimed, claimed, None, config, 0.0, error=error[:200])


def protected_sender(claimed: Sequence[str], spf: SPFResult | None, signatures: Sequence[DKIMSignatureResult],
                     client_ip: str | None, config: CheckConfig) -> CheckResult:
    """Each claimed domain of ours must be backed by a passing SPF (the envelope sender's domain, RFC 7208) or
    a passing DKIM signature, aligned with it as DMARC aligns (relaxed: the same organisational domain).
    A lookup that failed (SPF or DKIM temperror) where nothing passed is a temperror: deferred, not waved
    through, when the action refuses."""
    started = time.monotonic()
    backing = [s.domain for s in signatures if s.passed and s.domain]
    if spf is not None and spf.result == "pass" and spf.domain:
        backing.append(spf.domain)
    unbacked = [d for d in claimed if not any(is_aligned(identifier, d, "r") for identifier in backing)]
    if not unbacked:
        result = "pass"
    elif (spf is not None and spf.result == TEMPERROR) or any(s.result == TEMPERROR for s in signatures):
        result = TEMPERROR
    else:
        result = "fail"
    return _protected_decision(result, claimed, unbacked, client_ip, config, time.monotonic() - started)
