"""A domain's IMAP server as the judge of a login, the MailWatch way: the address and password are tried
there, over IMAPS or STARTTLS with the server's certificate verified; the address is the login."""

from __future__ import annotations

import imaplib
import logging
import ssl

from gateway.models import Directory

from . import tls
from .tls import Unreachable

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"imap": 143, "imaps": 993}


def login(directory: Directory, address: str, password: str, client_ip: str | None = None) -> bool:
    """Whether the IMAP server takes this address and password. Raises Unreachable. Synchronous (network).

    The person's own address goes first in an ID command (RFC 2971, x-originating-ip): an IMAP server that
    trusts the gateway (Dovecot's login_trusted_networks) counts failures, and slows down logins after them, per
    person's address instead of for the gateway's, through which everyone logs in."""
    scheme, host, port = tls.server_of(directory.uri.split()[0], default_ports=DEFAULT_PORTS)
    try:
        context = tls.ssl_context(directory)
        if scheme == "imaps":
            conn = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=directory.timeout)
        else:
            conn = imaplib.IMAP4(host, port, timeout=directory.timeout)
            try:
                # Refused when the server offers no STARTTLS: a password never crosses the network in clear.
                conn.starttls(ssl_context=context)
            except Exception:
                conn.shutdown()
                raise
    except (TimeoutError, OSError, ssl.SSLError, imaplib.IMAP4.error) as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}"[:300]) from exc
    try:
        try:
            if client_ip and "ID" in conn.capabilities:
                conn.xatom("ID", f'("x-originating-ip" "{_ip_text(client_ip)}")')
            if "AUTH=PLAIN" in conn.capabilities:
                # AUTHENTICATE PLAIN carries a UTF-8 password; LOGIN's quoted strings are ASCII only.
                credentials = b"\0" + address.encode() + b"\0" + password.encode()
                conn.authenticate("PLAIN", lambda _challenge: credentials)
            else:
                conn.login(address, password)
        except imaplib.IMAP4.error as exc:
            log.info("IMAP login refused for %r by %s: %s", address[:100], directory.name, str(exc)[:200])
            return False
        except UnicodeEncodeError:
            return False  # a password LOGIN cannot carry: this server cannot have it
        return True
    except (OSError, imaplib.IMAP4.abort) as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}"[:300]) from exc
    finally:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def _ip_text(client_ip: str) -> str:
    """The address as it may go inside an IMAP quoted string: an IP address, or nothing."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(client_ip.strip()))
    except ValueError:
        return ""
