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
  (`may_release_virus`) and download an original (`may_download`).

This module reads users and their profiles through their attributes only, so that the models can build
their scoping rule on it.
"""

from __future__ import annotations

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
