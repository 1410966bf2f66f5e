"""Logins against the organisation's directories, and the accounts they become.

`authenticate()` is called by the login throttle (gateway.throttle.ThrottledModelBackend) when the local
password check found nothing, so every door (the site, the Django admin, SMTP AUTH) reaches the directories
behind the same throttle. Which directories a login is tried against (`candidates`):

- a name that is an account already: only that account's own directory (none for a local account, whose
  password is ours);
- an address (user@domain): the directories of that domain (LDAP or IMAP), then those without a domain;
- any other name: the LDAP directories without a domain, then those of a domain (their filter decides).

The first that takes the password wins. The account is named by the person's primary address and belongs
to its directory: its role, addresses and domains are refreshed from the directory at each login, and it
never has a password of its own. A directory of one domain grants only addresses of that domain and at most
the domain administrator's role for it; a directory without a domain grants addresses of our domains, and
its administrators' group makes administrators.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q

from gateway.access import Role, address_domain, canonical_domain
from gateway.models import Directory, Domain, UserProfile, record_audit

from . import imap
from . import ldap as directory_ldap
from .tls import Unreachable

log = logging.getLogger(__name__)


def candidates(login: str) -> list[Directory]:
    """The directories a login is tried against, in order."""
    User = get_user_model()
    login = login.strip()
    account = User.objects.filter(**{f"{User.USERNAME_FIELD}__iexact": login}).select_related(
        "mail_profile__directory").first()
    if account is not None:
        profile = getattr(account, "mail_profile", None)
        directory = profile.directory if profile is not None else None
        return [directory] if directory is not None and directory.active else []
    active = list(Directory.objects.filter(active=True).select_related("domain"))
    everywhere = [d for d in active if d.domain_id is None and d.kind == Directory.Kind.LDAP]
    if "@" in login:
        domain = canonical_domain(login.rpartition("@")[2])
        own = [d for d in active if d.domain_id is not None and d.domain.active and d.domain.name == domain]
        return own + everywhere
    return everywhere + [d for d in active if d.domain_id is not None and d.kind == Directory.Kind.LDAP
                         and d.domain.active]


def claim_account(directory: Directory, addresses: list[str]):
    """(this directory's account of a person with these addresses, whether it is new), named by the first of
    them in the directory's domains; (None, False) when none is, or when an account of that name is someone
    else's: a local one, or another directory's."""
    allowed = granted_domains(directory)
    own = in_domains(addresses, allowed)
    if not own:
        log.warning("directory %s: %s has no address in %s; not logged in", directory.name,
                    addresses[0] if addresses else "an entry", ", ".join(sorted(allowed)) or "our domains")
        return None, False
    address = own[0]
    User = get_user_model()
    user = User.objects.filter(**{f"{User.USERNAME_FIELD}__iexact": address}).select_related("mail_profile").first()
    if user is not None:
        profile = getattr(user, "mail_profile", None)
        if profile is None or profile.directory_id != directory.pk:
            log.warning("directory %s: %s logged in there, but the account %s is not that directory's; refused",
                        directory.name, address, user.get_username())
            return None, False
    if address in owned_elsewhere([address], user.pk if user is not None else None):
        log.warning("directory %s: %s logged in there, but that address is another account's; refused",
                    directory.name, address)
        return None, False
    if user is None:
        return User(**{User.USERNAME_FIELD: address}), True
    return user, False


def owned_elsewhere(addresses: list[str], user_pk: int | None) -> set[str]:
    """Those of the addresses another account has (as its name, its e-mail address or an alias): a directory
    does not give anyone an address that is already someone else's mail."""
    wanted = {a.lower() for a in addresses}
    if not wanted:
        return set()
    User = get_user_model()
    name = User.USERNAME_FIELD
    match = Q()
    for address in wanted:
        match |= Q(email__iexact=address) | Q(**{f"{name}__iexact": address})
    others = User.objects.exclude(pk=user_pk) if user_pk else User.objects.all()
    owned = set()
    for email, username in others.filter(match).values_list("email", name):
        owned |= {(email or "").lower(), (username or "").lower()} & wanted
    aliases = Q()
    for address in wanted:
        aliases |= Q(addresses__icontains=address)
    profiles = UserProfile.objects.exclude(user_id=user_pk) if user_pk else UserProfile.objects.all()
    for text in profiles.filter(aliases).values_list("addresses", flat=True):
        owned |= {line.strip().lower() for line in text.splitlines()} & wanted
    return owned


def authenticate(request, login: str, password: str, client_ip: str | None = None):
    """The account of a login one of the directories takes, refreshed from it; or None. `client_ip` is the
    person's address (the IMAP server is told it)."""
    if not login or not password:
        return None
    for directory in candidates(login):
        try:
            if directory.kind == Directory.Kind.IMAP:
                user = _imap_login(directory, login, password, client_ip)
            else:
                user = _ldap_login(directory, login, password, request)
        except Unreachable as exc:
            log.warning("directory %s cannot be reached for the login of %r: %s", directory.name, login[:100], exc)
            continue
        if user is not None:
            return user
    return None


def _ldap_login(directory: Directory, login: str, password: str, request):
    user, person = directory_ldap.login(directory, login, password, request, claim_account)
    if user is None or person is None:
        return None
    return _refresh(directory, user, person.addresses, admin=person.admin, domain_admin=person.domain_admin,
                    first_name=person.first_name, last_name=person.last_name)


def _imap_login(directory: Directory, login: str, password: str, client_ip: str | None):
    address = login.strip().lower()
    if "@" not in address or not imap.login(directory, address, password, client_ip):
        return None
    user, _built = claim_account(directory, [address])
    if user is None:
        return None
    return _refresh(directory, user, [address])


@dataclass(frozen=True)
class Grant:
    """What a directory's word gives a person here: the addresses (primary first), the role and its domains, and
    what is left out: addresses outside the directory's domains, and addresses another account has."""

    addresses: list[str]
    role: str
    domains: list[str]
    left_out: list[str]
    taken: list[str]


def in_domains(addresses: list[str], allowed: set[str]) -> list[str]:
    return [a for a in addresses if address_domain(a) in allowed]


def grant(directory: Directory, addresses: list[str], *, admin: bool = False, domain_admin: bool = False,
          user_pk: int | None = None) -> Grant:
    """The one reading of what a directory may give (docs/directory.md): addresses of its domains that are no
    other account's; administrator only from a directory without a domain, else at most domain administrator of
    the domains of those addresses. `user_pk`: the account it is for (its own addresses are not "taken")."""
    allowed = granted_domains(directory)
    ours = in_domains(addresses, allowed)
    taken = owned_elsewhere(ours, user_pk)
    own = [a for a in ours if a not in taken]
    if admin and directory.domain_id is None:
        role, domains = Role.ADMIN, []
    elif (admin or domain_admin) and own:
        role, domains = Role.DOMAIN_ADMIN, sorted({address_domain(a) for a in own})
    else:
        role, domains = Role.USER, []
    return Grant(addresses=own, role=role, domains=domains, left_out=[a for a in addresses if a not in ours],
                 taken=sorted(taken))


def granted_domains(directory: Directory) -> set[str]:
    """The domains whose addresses, and whose administration, this directory may give."""
    if directory.domain_id is not None:
        return {directory.domain.name}
    return set(Domain.objects.filter(active=True).values_list("name", flat=True))


@transaction.atomic
def _refresh(directory: Directory, user, addresses: list[str], *, admin: bool = False, domain_admin: bool = False,
             first_name: str = "", last_name: str = ""):
    """Make the account what the directory says: its addresses in the directory's domains, its role and its
    domains. None (no login) when nothing the directory gives is an address of ours, or the account has been
    disabled here."""
    given = grant(directory, addresses, admin=admin, domain_admin=domain_admin, user_pk=user.pk)
    if given.taken:
        log.warning("directory %s: %s is left out of %s: another account's", directory.name,
                    ", ".join(given.taken), user.get_username())
    own, role, domains = given.addresses, given.role, given.domains
    if not own:  # claim_account refused such a person before any account was made
        return None
    if user.pk is not None and not user.is_active:
        log.info("directory %s: %s is disabled here; not logged in", directory.name, user.get_username())
        return None
    user.email = own[0]
    user.first_name, user.last_name = first_name[:150], last_name[:150]
    user.is_superuser = user.is_staff = role == Role.ADMIN
    user.is_active = True
    if user.has_usable_password():
        user.set_unusable_password()  # the directory judges every login: no password of ours
    user.save()
    profile, new = UserProfile.objects.get_or_create(user=user, defaults={"directory": directory})
    before = (profile.role, profile.addresses, sorted(profile.domains.values_list("name", flat=True)))
    profile.directory = directory
    profile.role = role
    profile.addresses = "\n".join(own[1:])
    profile.save()
    profile.domains.set(Domain.objects.filter(name__in=domains))
    after = (role, profile.addresses, domains)
    if new or before != after:
        record_audit("directory_account_created" if new else "directory_account_updated", user=user,
                     target=f"user {user.get_username()}", directory=directory.name, role=role, addresses=own,
                     domains=domains)
    return user


def recheck(user) -> bool:
    """Whether a logged-in directory account is still what its directory says: its entry searched again (as the
    service account, by its primary address) and its role and addresses refreshed. False when the directory no
    longer holds it (or it no longer has an address of ours): the session ends. A directory that cannot be asked
    changes nothing, an outage logs nobody out. IMAP servers say nothing between logins: True."""
    profile = getattr(user, "mail_profile", None)
    directory = profile.directory if profile is not None else None
    if directory is None or directory.kind != Directory.Kind.LDAP:
        return True
    if not directory.active:
        return False
    try:
        person = directory_ldap.lookup_person(directory, user.get_username(), by_address=True)
    except Unreachable as exc:
        log.warning("directory %s cannot be reached to re-check %s: %s", directory.name, user.get_username(), exc)
        return True
    if person is None:
        log.info("directory %s no longer holds %s: logged out", directory.name, user.get_username())
        return False
    return _refresh(directory, user, person.addresses, admin=person.admin, domain_admin=person.domain_admin,
                    first_name=person.first_name, last_name=person.last_name) is not None
