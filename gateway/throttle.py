"""The login throttle: one count of failed logins for every door (the site login, the Django admin, SMTP AUTH,
API tokens), kept in Django's cache, which is Redis when CACHE_URL is set so that every web and SMTP process
shares it.

Failures are counted under three keys, each with its own limit (settings LOGIN_THROTTLE_*; docs/security.md):

- the username from one IP: one account guessed from one place (5 in 15 minutes);
- the username from anywhere: one account guessed from many addresses (20);
- the IP for any username: one password sprayed over many accounts from one place (30).

Once a key is over its limit every attempt it covers is refused, the right password too, without checking
the password (and without counting: a user who waits out the window gets in). The window slides: a key is
forgotten LOGIN_THROTTLE_WINDOW seconds after its last failure. A successful login clears its own
username-and-IP count only; the username and IP counts run their course, or an attacker would clear them
with an account of their own.

IPv6 clients are counted by their /64, the block one subscriber is given: counting single addresses would
give an attacker 2^64 fresh starts.

The Django side is `ThrottledModelBackend`, the one entry of AUTHENTICATION_BACKENDS: every call of
django.contrib.auth.authenticate() goes through it, whoever makes it. It checks the local accounts' passwords,
then the organisation's directories (gateway.directory.login). The caller's IP comes from the request,
or from a `client_ip` credential when there is no request (SMTP AUTH).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import unicodedata
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied

from gateway import maillog
from gateway.directory import login as directory_login

log = logging.getLogger(__name__)

PREFIX = "login-throttle"


@dataclass(frozen=True)
class Limit:
    """One key's limit: how many failures within the window lock it, and what the refusal says."""

    scope: str  # "pair", "username", "ip"
    failures: int
    reason: str


def window_seconds() -> int:
    return int(settings.LOGIN_THROTTLE_WINDOW)


def _limits() -> dict[str, Limit]:
    return {
        "pair": Limit("pair", int(settings.LOGIN_THROTTLE_PAIR_FAILURES),
                      "too many failed logins for this username from this address"),
        "username": Limit("username", int(settings.LOGIN_THROTTLE_USERNAME_FAILURES),
                          "too many failed logins for this username"),
        "ip": Limit("ip", int(settings.LOGIN_THROTTLE_IP_FAILURES), "too many failed logins from this address"),
    }


def normal_username(username: str | None) -> str:
    """The username as counted: NFKC and case-folded, so that 'Alice', 'ALICE' and 'Ａｌｉｃｅ' are one count."""
    return unicodedata.normalize("NFKC", (username or "").strip()).casefold()


def normal_ip(ip: str | None) -> str:
    """The client as counted: an IPv4 address, or the /64 of an IPv6 one; 'unknown' when there is none."""
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip.strip().split("%")[0])
    except ValueError:
        return "unknown"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _key(scope: str, *parts: str) -> str:
    # Hashed: usernames are anything a client sends, and a cache key must stay short and printable.
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"{PREFIX}:{scope}:{digest}"


def _keys(username: str | None, ip: str | None) -> dict[str, str]:
    """The keys an attempt is counted under. Without a username (an API token) only the IP counts."""
    client = normal_ip(ip)
    keys = {"ip": _key("ip", client)}
    if username:
        name = normal_username(username)
        keys["pair"] = _key("pair", name, client)
        keys["username"] = _key("username", name)
    return keys


def refusal(username: str | None, ip: str | None) -> str | None:
    """Why an attempt by this username from this IP is refused now ('too many failed logins ...'), or None."""
    keys = _keys(username, ip)
    counts = cache.get_many(list(keys.values()))
    limits = _limits()
    for scope in ("pair", "username", "ip"):
        if scope not in keys:
            continue
        limit = limits[scope]
        if limit.failures and (counts.get(keys[scope]) or 0) >= limit.failures:
            return limit.reason
    return None


def _hit(key: str, window: int) -> int:
    # add() only writes when the key is missing; incr() is atomic on Redis. touch() then restarts the window
    # (the file cache's incr() would otherwise reset it to the cache's default timeout).
    cache.add(key, 0, window)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, window)
        count = 1
    cache.touch(key, window)
    return count


def record_failure(username: str | None, ip: str | None) -> None:
    """Count a failed attempt under each of its keys."""
    window = window_seconds()
    counts = {scope: _hit(key, window) for scope, key in _keys(username, ip).items()}
    limits = _limits()
    for scope, count in counts.items():
        if limits[scope].failures and count == limits[scope].failures:
            log.warning("login throttle: %s for %r from %s (%s failures in %s s)", limits[scope].reason,
                        (username or "")[:100], normal_ip(ip), count, window)


def record_success(username: str | None, ip: str | None) -> None:
    """A successful login clears the count of its username from its IP, and only that."""
    keys = _keys(username, ip)
    if "pair" in keys:
        cache.delete(keys["pair"])


def _named_keys(username: str | None, ip: str | None) -> dict[str, str]:
    """The keys that name this username, this IP, or the two together (for looking at and clearing counts)."""
    keys = {}
    if username:
        keys["username"] = _key("username", normal_username(username))
        if ip:
            keys["pair"] = _key("pair", normal_username(username), normal_ip(ip))
    if ip:
        keys["ip"] = _key("ip", normal_ip(ip))
    return keys


def locks(*, username: str | None = None, ip: str | None = None) -> dict[str, int]:
    """The failures counted now under the keys that name this username and/or IP, by key ('pair', 'username',
    'ip'), and whether each is over its limit: {scope: count}, for `manage.py loginthrottle show`."""
    keys = _named_keys(username, ip)
    counts = cache.get_many(list(keys.values()))
    return {scope: int(counts.get(key) or 0) for scope, key in keys.items()}


def limit_of(scope: str) -> int:
    return _limits()[scope].failures


def clear(*, username: str | None = None, ip: str | None = None) -> None:
    """Forget counts: a username's (from everywhere, and from `ip` when given) and an IP's. What an
    administrator does for a user locked out by someone else's guessing (`manage.py loginthrottle clear`)."""
    cache.delete_many(list(_named_keys(username, ip).values()))


class ThrottledModelBackend(ModelBackend):
    """Django's username-and-password check behind the login throttle: the one authentication path.

    A throttled attempt raises PermissionDenied, which makes authenticate() stop and answer None at once,
    whatever the password; a failure is counted; a success clears its username-and-IP count. The IP is the
    `client_ip` credential when given (SMTP AUTH, which has no request), else the request's.
    """

    def authenticate(self, request, username=None, password=None, client_ip: str | None = None, **kwargs):
        if username is None:
            username = kwargs.get(self._username_field())
        if username is None or password is None:
            return None
        ip = client_ip if client_ip is not None else client_address(request)
        reason = refusal(username, ip)
        # SMTP AUTH (no request) writes its own line for fail2ban (gateway.smtp.login); the web doors, here.
        if reason:
            log.info("login throttle: refused %r from %s: %s", str(username)[:100], normal_ip(ip), reason)
            if request is not None:
                maillog.web_login_failed(client_ip=ip, username=str(username), throttled=True)
            raise PermissionDenied(reason)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            # Not a local account's password: the organisation's directories (LDAP, IMAP), behind the same
            # throttle, so a guess against a directory account counts like any other.
            user = directory_login.authenticate(request, str(username), str(password), client_ip=ip)
        if user is None:
            record_failure(username, ip)
            if request is not None:
                maillog.web_login_failed(client_ip=ip, username=str(username))
        elif not has_second_factor(user):
            # With a second factor the login is not done yet: its code step clears the count when the code passes.
            # Cleared here, a right password would start every round of code guesses afresh.
            record_success(username, ip)
        return user

    @staticmethod
    def _username_field() -> str:
        from django.contrib.auth import get_user_model

        return get_user_model().USERNAME_FIELD


def has_second_factor(user) -> bool:
    """Whether the login has a confirmed two-factor device (django_otp's, as the web login asks for)."""
    from django_otp import user_has_device  # loaded when a login succeeds, not as the SMTP process starts

    return user_has_device(user, confirmed=True)


def client_address(request) -> str | None:
    """The address a web request came from: REMOTE_ADDR, or, when REMOTE_ADDR is one of TRUSTED_PROXIES, the last
    address of X-Forwarded-For that is not a trusted proxy (the client as the proxy saw it). Anything else in
    that header is the client's own writing and is ignored."""
    if request is None:
        return None
    remote = request.META.get("REMOTE_ADDR") or None
    proxies = trusted_proxies()
    if not remote or not proxies or not _in_networks(remote, proxies):
        return remote
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    for hop in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote  # a malformed header: the proxy's address, never a guess
        if not _in_networks(hop, proxies):
            return hop
    return remote


def trusted_proxies() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return _networks(tuple(getattr(settings, "TRUSTED_PROXIES", ()) or ()))


@functools.lru_cache(maxsize=8)
def _networks(items: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            log.warning("TRUSTED_PROXIES: %r is not an IP address or network; ignored", item)
    return tuple(networks)


def _in_networks(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
