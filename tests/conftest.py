"""The fixtures every test may ask for, wired from tests/support/ (pytest finds a fixture by its name in
this module), and what holds for every test: the SMTP-time checks off, an empty cache, browser tests last.

- tests/support/servers.py: capture_server, gateway_smtp, gateway_smtp_tls, protected_domain
- tests/support/services.py: spamd, clamd, redis (real services: skip, or fail on CI), scanners_off
- tests/support/policy.py: checks_on, policy_dns (the SMTP-time checks against the DNS stub)
- tests/support/dnsstub.py: dns_stub (one stub per test module)
- tests/support/mail.py: corpus, mail_log (the Postfix-style lines of a test, in a file)
- tests/support/people.py: personas
- tests/support/browser.py: browser, page (Playwright)
- tests/support/directory.py: ldap_directory, imap_directory (slapd and Dovecot on loopback)
"""

from __future__ import annotations

import os

import pytest

from tests.support.appliance import appliance  # noqa: F401  (fixture)
from tests.support.browser import browser, page  # noqa: F401  (fixtures)
from tests.support.directory import imap_directory, ldap_directory  # noqa: F401  (fixtures)
from tests.support.dnsstub import dns_stub  # noqa: F401  (fixture)
from tests.support.mail import corpus, mail_log  # noqa: F401  (fixtures)
from tests.support.people import personas  # noqa: F401  (fixture)
from tests.support.policy import checks_on, policy_dns  # noqa: F401  (fixtures)
from tests.support.servers import (  # noqa: F401  (fixtures)
    capture_server,
    gateway_smtp,
    gateway_smtp_tls,
    protected_domain,
)
from tests.support.services import clamd, redis, scanners_off, spamd  # noqa: F401  (fixtures)

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(autouse=True)
def smtp_policy_checks_off(settings, monkeypatch):
    """The DNS-based checks, greylisting and the greeting delay are off in every test unless it turns them on:
    tests have no DNS of their own (tests/support/dnsstub.py serves it to those that ask), and greylisting
    would answer 451 to every first message. The environment carries the same to the processes tests start
    (runsmtp in the end-to-end tests). The tests of the checks (tests/policy/, and any test that asks for
    `checks_on` of tests/support/policy.py) switch them on explicitly."""
    values = {"SMTP_DNS_CHECKS": "false", "SMTP_GREYLISTING": False, "SMTP_GREET_DELAY": 0.0}
    for name, value in values.items():
        setattr(settings, name, value)
        monkeypatch.setenv(name, str(value).lower())


@pytest.fixture(autouse=True)
def _fresh_cache():
    """The cache is shared by processes (login throttling): each test starts with an empty one."""
    from django.core.cache import cache

    from gateway.delivery import client as delivery_client
    from gateway.snapshot import Snapshot

    cache.clear()
    # The per-process snapshots of the mail-flow settings, the lists and the routes: a new test, a new database.
    for snapshot in Snapshot.every:
        snapshot.clear()
    delivery_client.drop_sessions()  # kept SMTP sessions of this thread belong to the last test's servers
    yield


def pytest_collection_modifyitems(config, items):
    """Browser tests last: Playwright's sync API keeps an event loop running in the main thread for as
    long as its browser lives (one per session), and asyncio.run() refuses to start inside it."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
