"""Envelope addresses as the SMTP server sees them, and the tricks that would make us an open relay."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


class AddressError(ValueError):
    """An address we refuse, with the enhanced status code and text to answer."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


@dataclass(frozen=True)
class Address:
    local: str
    domain: str  # lower case, without a trailing dot; '' for the null sender

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


_SPECIALS = frozenset('()<>[]:;,\\"')
_QUOTED_CONTENT = re.compile(r'(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*')


def parse_address(value: str, *, allow_null: bool = False) -> Address:
    """Split an envelope address and refuse what a downstream server could route elsewhere.

    Refused: source routes (@a,@b:user@c), %-hack and !-bang paths in the local part, quoted
    local parts carrying @, address literals as domains, and syntax that is not an address.
    """
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    if not value:
        if allow_null:
            return Address("", "")
        raise AddressError("5.1.3", "Bad address syntax: empty address")
    if value.startswith("@") or (":" in value and value.split(":", 1)[0].startswith("@")):
        raise AddressError("5.7.1", "Source routes are not accepted")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("5.1.3", f"Bad address syntax: {value}")
    if len(local) > 64 or len(domain) > 255:
        raise AddressError("5.1.3", "Bad address syntax: address too long")
    unquoted = local[1:-1] if len(local) >= 2 and local[0] == local[-1] == '"' else local
    if any(c in unquoted for c in "%!@") or any(c in local for c in "\r\n\0"):
        raise AddressError("5.7.1", "Relaying through the local part (%, !, @) is not accepted")
    if unquoted == local:
        # A Dot-string (RFC 5321 §4.1.2): atoms of atext (and UTF-8, RFC 6531), no specials, no spaces.
        if any(c.isspace() or c in _SPECIALS or ord(c) < 32 or ord(c) == 127 for c in local):
            raise AddressError("5.1.3", f"Bad address syntax: {value}")
    elif not _QUOTED_CONTENT.fullmatch(unquoted):
        # A Quoted-string: printable characters, a quote or backslash only as a quoted pair.
        raise AddressError("5.1.3", f"Bad address syntax: {value}")
    # One trailing dot is the root of the DNS (an absolute name); more are a syntax error.
    domain = (domain[:-1] if domain.endswith(".") else domain).lower()
    if domain.startswith("["):
        raise AddressError("5.7.1", "Address literals are not accepted as a destination")
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        pass
    else:
        raise AddressError("5.1.8", "A bare IP address is not a mail domain")
    labels = domain.split(".")
    if not domain or any(not label for label in labels):
        raise AddressError("5.1.3", f"Bad address syntax: {value}")
    for label in labels:
        try:
            label.encode("idna") if not label.isascii() else None
        except UnicodeError:
            raise AddressError("5.1.3", f"Bad domain name: {domain}") from None
        if label.isascii() and not all(c.isalnum() or c in "-_" for c in label):
            raise AddressError("5.1.3", f"Bad domain name: {domain}")
    return Address(local, domain)
