"""Roles and scopes: who a login is to the mail, and for whom it may act. The one reading of roles.

A superuser is an administrator; a login with a mail profile has the profile's role (domain administrator
or user); any other login, and an inactive one, has no role and sees no mail. Every rule below is written
in terms of these three roles, and every page, action, export and API asks them here:

- which messages a login may see: `Message.objects.visible_to(user)` (gateway.models), built on the
  domains and addresses read here;
- for which recipients of a message it may act (release, delete): `recipients_in_scope`; seeing a message
  is not enough, since a user sees mail *from* their addresses and a domain administrator mail from
  their domains;
- to which other address it may release a message (`may_release_to`), whether it may release a virus
  (`may_release_virus`) and download an original (`may_download`);
- which addresses it may send as, over SMTP AUTH, and for which domains its mail is DKIM-signed
  (`sender_rights`, `may_send_as`, `signing_domains`).

This module reads users and their profiles through their attributes only, so that the models can build
their scoping rule on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.conf import settings
from django.db import models


class Role(models.TextChoices):
    ADMIN = "admin", "Administrator"
    DOMAIN_ADMIN = "domain_admin", "Domain administrator"
    USER = "user", "User"


def role_of(user) -> str:
    """Role.ADMIN, Role.DOMAIN_ADMIN, Role.USER, or '' for a login that may see no mail.

    A superuser is an administrator; a login without a mail profile sees nothing.
    """
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return ""
    if user.is_superuser:
        return Role.ADMIN
    profile = getattr(user, "mail_profile", None)
    return profile.role if profile is not None else ""


def role_of_account(user) -> str:
    """The role an account has when it is active: what the user pages show and edit."""
    if user.is_superuser:
        return Role.ADMIN
    profile = getattr(user, "mail_profile", None)
    return profile.role if profile is not None else Role.USER


def is_admin(user) -> bool:
    return role_of(user) == Role.ADMIN


def is_manager(user) -> bool:
    """An administrator or a domain administrator: someone who manages mail other than their own."""
    return role_of(user) in (Role.ADMIN, Role.DOMAIN_ADMIN)


def domains_of(user) -> list[str]:
    """The domain names a domain administrator looks after (empty for everyone else)."""
    profile = getattr(user, "mail_profile", None)
    if profile is None:
        return []
    return list(profile.domains.values_list("name", flat=True))


def addresses_of(user) -> list[str]:
    """A login's own addresses: its e-mail address, then its aliases (lower case, each once)."""
    profile = getattr(user, "mail_profile", None)
    return profile.all_addresses() if profile is not None else []


def address_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def recipients_in_scope(recipients: models.QuerySet, user) -> models.QuerySet:
    """Those of a Recipient queryset that this login may act for: all (administrators), those in their
    domains (domain administrators), their own addresses (users); none for anyone else."""
    role = role_of(user)
    if role == Role.ADMIN:
        return recipients
    if role == Role.DOMAIN_ADMIN:
        return recipients.filter(domain__in=domains_of(user))
    if role == Role.USER:
        return recipients.filter(address__in=addresses_of(user))
    return recipients.none()


def acts_for(user):
    """`recipients_in_scope` as a test of one recipient already read, `test(address, domain)`: the same rule,
    for a page that shows many messages' recipients without asking the database for each."""
    role = role_of(user)
    if role == Role.ADMIN:
        return lambda address, domain: True
    if role == Role.DOMAIN_ADMIN:
        domains = set(domains_of(user))
        return lambda address, domain: domain in domains
    if role == Role.USER:
        addresses = set(addresses_of(user))
        return lambda address, domain: address in addresses
    return lambda address, domain: False


def may_release_to(user, address: str) -> bool:
    """Whether this login may send quarantined mail to an address that is not one of its recipients."""
    role = role_of(user)
    if role == Role.ADMIN:
        return True
    if role == Role.DOMAIN_ADMIN:
        return address_domain(address) in domains_of(user)
    if role == Role.USER:
        return address.lower() in addresses_of(user)
    return False


def may_release_virus(user) -> bool:
    """Viruses are released by administrators only (and by domain administrators when
    DOMAIN_ADMINS_RELEASE_VIRUSES says so). No user: the command line, the machine's administrator."""
    if user is None:
        return True
    role = role_of(user)
    return role == Role.ADMIN or (role == Role.DOMAIN_ADMIN and settings.DOMAIN_ADMINS_RELEASE_VIRUSES)


def may_download(user) -> bool:
    """The original of a message holds everything; only administrators and domain administrators get it."""
    return is_manager(user)


# --- sending as: the envelope sender and the header From / Sender of authenticated mail -------------------

def canonical_domain(domain: str) -> str:
    """A domain as ownership compares it: lower case, no trailing dot, international names in their
    ASCII (IDNA) form, so that bücher.example and xn--bcher-kva.example are the same domain."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def canonical_address(address: str) -> str:
    """An address as ownership compares it: the local part in lower case (as the profile keeps its
    addresses), a quoted local part that needs no quotes without them ("alice"@ is alice@, RFC 5321
    §4.1.2), the domain as canonical_domain."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    if len(local) > 2 and local[0] == local[-1] == '"' and _DOT_ATOM.match(local[1:-1]):
        local = local[1:-1]
    return f"{local.lower()}@{canonical_domain(domain)}"


@dataclass(frozen=True)
class SenderRights:
    """What one login may send as: read once from its user and profile (database reads), then asked for
    every address of a session or of a delivery without the database.

    An administrator may send as anyone; a domain administrator as any address of their domains and as
    their own addresses; a user as their own addresses (their e-mail address and their aliases). An active
    login without a mail profile (made outside the console) owns its e-mail address and nothing else; an
    inactive login owns nothing.
    """

    username: str = ""
    addresses: frozenset[str] = frozenset()  # canonical_address of each
    domains: frozenset[str] = frozenset()  # a domain administrator's domains, canonical_domain of each
    anyone: bool = False  # an administrator

    def may_send_as(self, address: str) -> bool:
        local, at, domain = address.strip().rpartition("@")
        if not at or not local or not domain.strip().rstrip("."):
            return False  # not an address: no one owns it (the null sender has its own rule)
        if self.anyone:
            return True
        return canonical_address(address) in self.addresses or canonical_domain(domain) in self.domains

    def signing_domains(self) -> set[str] | None:
        """The domains whose DKIM key may sign this login's mail: those of the addresses it may send as;
        None for an administrator (any of our domains)."""
        if self.anyone:
            return None
        return set(self.domains) | {address_domain(address) for address in self.addresses}


def sender_rights(user) -> SenderRights:
    """What a login (None: nobody) may send as. Reads its profile and its domains: not on an event loop."""
    if user is None:
        return SenderRights()
    username = user.get_username()
    role = role_of(user)
    if role == Role.ADMIN:
        return SenderRights(username, anyone=True)
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return SenderRights(username)
    own = addresses_of(user) if role else ([user.email] if user.email else [])
    domains = domains_of(user) if role == Role.DOMAIN_ADMIN else []
    return SenderRights(username, frozenset(canonical_address(a) for a in own),
                        frozenset(canonical_domain(d) for d in domains))


def may_send_as(user, address: str) -> bool:
    """Whether this login may use an address as envelope sender, header From or Sender of mail it submits."""
    return sender_rights(user).may_send_as(address)


def signing_domains(user) -> set[str] | None:
    """The domains whose key may DKIM-sign this login's mail; None: any of ours (an administrator)."""
    return sender_rights(user).signing_domains()
