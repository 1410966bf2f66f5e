"""LDAP and Active Directory: logins through django-auth-ldap, one backend per Directory row; the person's
addresses, name and role from their entry and groups; an address looked up for the recipient check; every
address of the directory listed for `manage.py directory sync`.

Every connection is encrypted and verifies the server's certificate (gateway.directory.tls); a failure to
reach the server is an `Unreachable`, never "no such user", so that the recipient check can defer instead of
refusing mail for an address that exists.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import ldap
from django_auth_ldap.backend import LDAPBackend, ldap_error
from django_auth_ldap.config import (
    GroupOfNamesType,
    GroupOfUniqueNamesType,
    LDAPSearch,
    LDAPSettings,
    NestedActiveDirectoryGroupType,
    PosixGroupType,
)
from ldap.controls import SimplePagedResultsControl
from ldap.filter import escape_filter_chars

from gateway.access import canonical_domain
from gateway.models import Directory

from . import tls
from .tls import Unreachable

log = logging.getLogger(__name__)

GROUP_CLASSES = {
    Directory.GroupType.GROUP_OF_NAMES: "(objectClass=groupOfNames)",
    Directory.GroupType.GROUP_OF_UNIQUE_NAMES: "(objectClass=groupOfUniqueNames)",
    Directory.GroupType.POSIX: "(objectClass=posixGroup)",
    Directory.GroupType.ACTIVE_DIRECTORY: "(objectClass=group)",
}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def connection_options(directory: Directory) -> dict:
    """python-ldap options for a connection to this directory. Order matters: the TLS options are read when
    the new TLS context is made, which OPT_X_TLS_NEWCTX (last) does."""
    options = {
        ldap.OPT_PROTOCOL_VERSION: ldap.VERSION3,
        ldap.OPT_REFERRALS: 0,  # Active Directory's referrals lead to servers we did not configure
        ldap.OPT_NETWORK_TIMEOUT: float(directory.timeout),
        ldap.OPT_TIMEOUT: float(directory.timeout),
        ldap.OPT_X_TLS_REQUIRE_CERT: ldap.OPT_X_TLS_DEMAND,
        ldap.OPT_X_TLS_PROTOCOL_MIN: 0x303,  # TLS 1.2
    }
    path = tls.ca_file(directory)
    if path:
        options[ldap.OPT_X_TLS_CACERTFILE] = path
    options[ldap.OPT_X_TLS_NEWCTX] = 0
    return options


def uses_start_tls(directory: Directory) -> bool:
    return directory.uri.split()[0].startswith("ldap://")


def connect(directory: Directory):
    """A connection bound as the directory's service account (anonymous without one). Raises Unreachable."""
    try:
        conn = ldap.initialize(directory.uri, bytes_mode=False)
        for option, value in connection_options(directory).items():
            conn.set_option(option, value)
        if uses_start_tls(directory):
            conn.start_tls_s()
        conn.simple_bind_s(directory.bind_dn, directory.bind_password)
    except ldap.LDAPError as exc:
        raise Unreachable(describe(exc)) from exc
    except (ValueError, TypeError, OSError) as exc:  # a CA file the library cannot read, a broken option
        raise Unreachable(f"{type(exc).__name__}: {exc}"[:300]) from exc
    return conn


def describe(exc: ldap.LDAPError) -> str:
    """An LDAP error in one line: its name and what the server or the library said."""
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    words = [str(detail.get("desc") or type(exc).__name__)]
    if detail.get("info"):
        words.append(str(detail["info"]))
    return ": ".join(words)[:300]


# --- what an entry says ---------------------------------------------------------------------------------

def single_address(value: str) -> str | None:
    """The value as one mail address (lower case, its domain in the form ownership compares), or None when it
    is anything else: a directory value is the directory's writing, and one holding a line break, a space or a
    second @ must not become two addresses once stored one per line."""
    if not value or len(value) > 320 or value.count("@") != 1:
        return None
    if any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in value):
        return None  # control characters, line and paragraph separators, every kind of space
    local, _, domain = value.rpartition("@")
    if not local or not domain or domain.startswith(".") or ".." in domain:
        return None
    try:
        domain = canonical_domain(domain)
    except ValueError:
        return None
    return f"{local}@{domain}".lower() if domain else None


def addresses_of_entry(directory: Directory, attrs: dict) -> list[str]:
    """The addresses an entry holds, primary first, lower case, each once. proxyAddresses values are read as
    Active Directory writes them (SMTP:primary, smtp:alias); those of other types (X400:, SIP:) are not mail.
    A value that is not exactly one address is left out (`single_address`)."""
    found: list[str] = []
    names = [directory.mail_attribute, *directory.alias_attribute_list()]
    lowered = {key.lower(): values for key, values in (attrs or {}).items()}
    for name in names:
        for raw in lowered.get(name.lower(), []):
            value = _text(raw).strip()
            if name.lower() == "proxyaddresses":
                kind, _, rest = value.partition(":")
                if kind.lower() != "smtp":
                    continue
                value = rest.strip()
            address = single_address(value)
            if address is not None:
                found.append(address)
            elif value:
                log.warning("directory %s: %r in %s is not one mail address; left out", directory.name,
                            value[:100], name)
    return list(dict.fromkeys(found))


def first_value(attrs: dict, name: str) -> str:
    for key, values in (attrs or {}).items():
        if key.lower() == name.lower() and values:
            return _text(values[0]).strip()
    return ""


# --- logins ---------------------------------------------------------------------------------------------

def _settings(directory: Directory) -> LDAPSettings:
    # A prefix no setting has: every value comes from the Directory row, none from Django's settings.
    config = LDAPSettings(prefix="MAILGATE_DIRECTORY_UNSET_")
    config.SERVER_URI = directory.uri
    config.START_TLS = uses_start_tls(directory)
    config.CONNECTION_OPTIONS = connection_options(directory)
    config.BIND_DN = directory.bind_dn
    config.BIND_PASSWORD = directory.bind_password
    config.USER_SEARCH = LDAPSearch(directory.user_base, ldap.SCOPE_SUBTREE, directory.user_filter)
    config.USER_ATTR_MAP = {}  # the names are set by gateway.directory.login, cut to the length a name may have
    config.ALWAYS_UPDATE_USER = True
    config.PERMIT_EMPTY_PASSWORD = False  # an empty password is an anonymous bind, which always "succeeds"
    config.GROUP_SEARCH = LDAPSearch(directory.group_base or directory.user_base, ldap.SCOPE_SUBTREE,
                                     GROUP_CLASSES[directory.group_type])
    config.GROUP_TYPE = {
        Directory.GroupType.GROUP_OF_NAMES: GroupOfNamesType,
        Directory.GroupType.GROUP_OF_UNIQUE_NAMES: GroupOfUniqueNamesType,
        Directory.GroupType.POSIX: PosixGroupType,
        Directory.GroupType.ACTIVE_DIRECTORY: NestedActiveDirectoryGroupType,
    }[directory.group_type]()
    config.CACHE_TIMEOUT = 0
    return config


@dataclass
class Person:
    """What the directory says of the person who logged in."""

    dn: str
    addresses: list[str]
    first_name: str = ""
    last_name: str = ""
    admin: bool = False
    domain_admin: bool = False
    groups: list[str] = field(default_factory=list)


_current = threading.local()  # the DirectoryBackend checking a login on this thread


def _note_error(sender, context, exception, **_kwargs) -> None:
    # django-auth-ldap answers "no user" when it could not ask the server, and tells only this signal why.
    backend = getattr(_current, "backend", None)
    if backend is not None:
        backend.errors.append(exception)


class DirectoryBackend(LDAPBackend):
    """django-auth-ldap's backend configured from one Directory row. It is not in AUTHENTICATION_BACKENDS:
    gateway.directory.login calls it, behind the login throttle, and turns what it found into the account.

    The account is named by the person's primary address, and found or made only among this directory's own
    accounts: a local account, or another directory's, of the same name is never logged in by this one."""

    def __init__(self, directory: Directory, claim):
        self.directory = directory
        self.settings = _settings(directory)
        self.claim = claim  # gateway.directory.login.claim_account(directory, addresses) -> (user, built)
        self.person: Person | None = None
        self.errors: list[Exception] = []  # what the server could not be asked for, by django-auth-ldap

    def get_or_build_user(self, username, ldap_user):
        addresses = addresses_of_entry(self.directory, ldap_user.attrs)
        if not addresses:
            raise ldap_user.AuthenticationFailed("the entry has no mail address")
        user, built = self.claim(self.directory, addresses)
        if user is None:
            raise ldap_user.AuthenticationFailed("no account of this directory may be made for it")
        return user, built

    def authenticate(self, request, username=None, password=None, **kwargs):
        if not password:
            return None
        _current.backend = self
        try:
            user = super().authenticate(request, username=username, password=password)
        finally:
            _current.backend = None
        if user is None:
            return None
        ldap_user = user.ldap_user
        admin_group, domain_admin_group = self.directory.admin_group.lower(), self.directory.domain_admin_group.lower()
        groups = {dn.lower() for dn in ldap_user.group_dns} if (admin_group or domain_admin_group) else set()
        self.person = Person(
            dn=ldap_user.dn, addresses=addresses_of_entry(self.directory, ldap_user.attrs),
            first_name=first_value(ldap_user.attrs, "givenName"), last_name=first_value(ldap_user.attrs, "sn"),
            admin=bool(admin_group) and admin_group in groups,
            domain_admin=bool(domain_admin_group) and domain_admin_group in groups,
            groups=sorted(groups))
        return user


ldap_error.connect(_note_error, sender=DirectoryBackend, weak=False)


def login(directory: Directory, login_name: str, password: str, request, claim) -> tuple[object | None, Person | None]:
    """Check a login against the directory: (the account, what the directory says of the person), or
    (None, None). Raises Unreachable when the directory could not be asked. Synchronous (network): SMTP AUTH
    runs it in a thread."""
    backend = DirectoryBackend(directory, claim)
    try:
        user = backend.authenticate(request, username=login_name, password=password)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        # What django-auth-ldap lets through (a CA it cannot load, a filter with a stray %): the directory's
        # configuration is broken, which is no login and says why, never a crash of the login page.
        raise Unreachable(f"{type(exc).__name__}: {exc}"[:300]) from exc
    if user is None and backend.errors:
        error = backend.errors[0]
        raise Unreachable(describe(error) if isinstance(error, ldap.LDAPError) else str(error)[:300])
    return (user, backend.person) if user is not None else (None, None)


# --- the recipient check and the listing --------------------------------------------------------------

def find_address(conn, directory: Directory, address: str) -> str | None:
    """The DN of the entry holding this address, or None. Raises Unreachable."""
    filterstr = directory.recipient_filter % {"address": escape_filter_chars(address)}
    try:
        results = conn.search_ext_s(directory.user_base, ldap.SCOPE_SUBTREE, filterstr, ["1.1"],
                                    timeout=directory.timeout, sizelimit=1)
    except ldap.SIZELIMIT_EXCEEDED:
        return "(more than one entry)"
    except ldap.LDAPError as exc:
        raise Unreachable(describe(exc)) from exc
    for dn, _attrs in results:
        if dn:  # search references (Active Directory) have no DN
            return dn
    return None


@dataclass(frozen=True)
class Entry:
    dn: str
    name: str
    addresses: list[str]


PAGE_SIZE = 500


def entries(directory: Directory) -> Iterator[Entry]:
    """Every entry under the people's base that holds a mail address, a page of PAGE_SIZE at a time (Active
    Directory answers at most 1,000 entries to a search that is not paged). Raises Unreachable."""
    conn = connect(directory)
    names = [directory.mail_attribute, *directory.alias_attribute_list(), "cn", "displayName"]
    filterstr = f"(|({directory.mail_attribute}=*)" + "".join(
        f"({name}=*)" for name in directory.alias_attribute_list()) + ")"
    control = SimplePagedResultsControl(True, size=PAGE_SIZE, cookie="")
    try:
        while True:
            msgid = conn.search_ext(directory.user_base, ldap.SCOPE_SUBTREE, filterstr, names,
                                    serverctrls=[control], timeout=max(directory.timeout, 30))
            _type, data, _msgid, controls = conn.result3(msgid, timeout=max(directory.timeout, 30))
            for dn, attrs in data:
                if not dn:
                    continue
                found = addresses_of_entry(directory, attrs)
                if found:
                    yield Entry(dn=dn, name=first_value(attrs, "displayName") or first_value(attrs, "cn"),
                                addresses=found)
            cookie = next((c.cookie for c in controls if c.controlType == SimplePagedResultsControl.controlType),
                          b"")
            if not cookie:
                break
            control.cookie = cookie
    except ldap.LDAPError as exc:
        raise Unreachable(describe(exc)) from exc
    finally:
        conn.unbind_s()


# --- a configuration tested: who a login would be, without logging anyone in ----------------------------

IN_CHAIN = "1.2.840.113556.1.4.1941"  # Active Directory's LDAP_MATCHING_RULE_IN_CHAIN: nested membership


def is_member(conn, directory: Directory, group_dn: str, user_dn: str, attrs: dict) -> bool:
    """Whether the entry is in the group, as the directory's group type reads membership."""
    try:
        if directory.group_type == Directory.GroupType.ACTIVE_DIRECTORY:
            found = conn.search_ext_s(group_dn, ldap.SCOPE_BASE,
                                      f"(member:{IN_CHAIN}:={escape_filter_chars(user_dn)})", ["1.1"],
                                      timeout=directory.timeout)
            return any(dn for dn, _ in found)
        if directory.group_type == Directory.GroupType.POSIX:
            uid = first_value(attrs, "uid")
            return bool(uid) and bool(conn.compare_s(group_dn, "memberUid", uid.encode()))
        attr = "uniqueMember" if directory.group_type == Directory.GroupType.GROUP_OF_UNIQUE_NAMES else "member"
        return bool(conn.compare_s(group_dn, attr, user_dn.encode()))
    except (ldap.NO_SUCH_OBJECT, ldap.NO_SUCH_ATTRIBUTE, ldap.UNDEFINED_TYPE):
        return False
    except ldap.LDAPError as exc:
        raise Unreachable(describe(exc)) from exc


def lookup_person(directory: Directory, login_name: str, *, by_address: bool = False) -> Person | None:
    """What the directory says of a login, searched as the service account (no password asked, no account
    made): the entry, its addresses and the groups that make roles. None when no entry matches. For `directory
    test`, the directory page's test, and (`by_address`: the entry holding an address, by the recipient filter)
    the re-check of an account that is logged in."""
    conn = connect(directory)
    try:
        if by_address:
            filterstr = directory.recipient_filter % {"address": escape_filter_chars(login_name.strip())}
        else:
            # Filled in as django-auth-ldap fills it at a login, so that the test finds what a login would.
            filterstr = directory.user_filter % {"user": escape_filter_chars(login_name.strip())}
        try:
            found = conn.search_ext_s(directory.user_base, ldap.SCOPE_SUBTREE, filterstr, None,
                                      timeout=directory.timeout, sizelimit=2)
        except ldap.SIZELIMIT_EXCEEDED as exc:
            raise Unreachable(f"more than one entry matches {login_name!r}: the filter must find one") from exc
        except ldap.LDAPError as exc:
            raise Unreachable(describe(exc)) from exc
        entries = [(dn, attrs) for dn, attrs in found if dn]
        if len(entries) > 1:
            raise Unreachable(f"more than one entry matches {login_name!r}: the filter must find one")
        if not entries:
            return None
        dn, attrs = entries[0]
        groups = [g for g in (directory.admin_group, directory.domain_admin_group)
                  if g and is_member(conn, directory, g, dn, attrs)]
        return Person(dn=dn, addresses=addresses_of_entry(directory, attrs), first_name=first_value(attrs, "givenName"),
                      last_name=first_value(attrs, "sn"),
                      admin=bool(directory.admin_group) and directory.admin_group in groups,
                      domain_admin=bool(directory.domain_admin_group) and directory.domain_admin_group in groups,
                      groups=groups)
    finally:
        conn.unbind_s()
