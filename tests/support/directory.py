"""The test directory and the test mailboxes: OpenLDAP's slapd and Dovecot's IMAP server, started on loopback by
.ci/services.sh from .ci/directory/ (the LDIF, the mailboxes, the test CA), and the Directory rows that point
the gateway at them.

The directory (dc=example,dc=edu, for the domain example.edu): alice (group mail-admins, aliases by
mailAlternateAddress), bob (group mail-domain-admins, aliases by Active Directory's proxyAddresses), carol (an
alias of ours, info@, and one of a domain that is not ours); the gateway searches as its service account. The
mailboxes (example.org): dave and erin. Their passwords are below.

    def test_x(ldap_directory):          # a Directory for example.edu on the shared slapd (StartTLS)
    def test_y(imap_directory):          # a Directory for example.org on Dovecot (IMAPS)
    with private_slapd(tmp_path) as url: # a slapd of the test's own, to stop while the test runs
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.models import Directory, Domain, Route

from .services import unavailable

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / ".ci" / "directory"

BASE = "dc=example,dc=edu"
PEOPLE = f"ou=people,{BASE}"
SERVICE_DN = f"cn=mailgate,ou=services,{BASE}"
SERVICE_PASSWORD = "gateway-bind-secret"
ADMINS = f"cn=mail-admins,ou=groups,{BASE}"
DOMAIN_ADMINS = f"cn=mail-domain-admins,ou=groups,{BASE}"
PASSWORDS = {"alice": "alice-directory-pw", "bob": "bob-directory-pw", "carol": "carol-directory-pw",
             "dave@example.org": "dave-mailbox-pw", "erin@example.org": "erin-mailbox-pw"}


def ldap_url() -> str:
    return os.getenv("LDAP_URL") or "ldap://127.0.0.1:3890"


def ldaps_url() -> str:
    return os.getenv("LDAPS_URL") or "ldaps://127.0.0.1:6360"


def imap_url() -> str:
    return os.getenv("IMAP_URL") or "imap://127.0.0.1:1143"


def imaps_url() -> str:
    return os.getenv("IMAPS_URL") or "imaps://127.0.0.1:1993"


def ca_pem() -> str:
    """The test CA's certificate (PEM text) that slapd's and Dovecot's certificates chain to."""
    path = Path(os.getenv("MAILGATE_TEST_CA") or "/var/lib/mailgate-test/tls/ca.pem")
    if not path.is_file():
        unavailable(f"the test CA {path} is missing")
    return path.read_text()


def _answers(url: str) -> bool:
    host, _, port = url.split("://", 1)[1].partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


def require_slapd() -> str:
    url = ldap_url()
    if not _answers(url):
        unavailable(f"slapd does not answer at {url}")
    return url


def require_dovecot() -> str:
    url = imaps_url()
    if not _answers(url):
        unavailable(f"dovecot does not answer at {url}")
    return url


def route_and_domain(name: str, **domain) -> Domain:
    route, _ = Route.objects.get_or_create(name=f"store-{name}", defaults={"host": "127.0.0.1", "port": 2525})
    return Domain.objects.create(name=name, route=route, **domain)


def make_ldap_directory(domain: Domain | None, *, uri: str | None = None, **fields) -> Directory:
    values = {"name": f"ldap {domain.name if domain else 'everywhere'}", "kind": Directory.Kind.LDAP,
              "domain": domain, "uri": uri or ldap_url(), "ca_certificate": ca_pem(), "bind_dn": SERVICE_DN,
              "bind_password": SERVICE_PASSWORD, "user_base": PEOPLE, "group_base": f"ou=groups,{BASE}",
              "admin_group": ADMINS, "domain_admin_group": DOMAIN_ADMINS, "timeout": 3}
    values.update(fields)
    directory = Directory(**values)
    directory.full_clean()
    directory.save()
    return directory


def make_imap_directory(domain: Domain, *, uri: str | None = None, **fields) -> Directory:
    values = {"name": f"imap {domain.name}", "kind": Directory.Kind.IMAP, "domain": domain,
              "uri": uri or imaps_url(), "ca_certificate": ca_pem(), "timeout": 10}
    values.update(fields)
    directory = Directory(**values)
    directory.full_clean()
    directory.save()
    return directory


@pytest.fixture
def ldap_directory(db) -> Directory:
    """example.edu and its directory on the shared slapd, over StartTLS, with the groups mapped to roles."""
    require_slapd()
    return make_ldap_directory(route_and_domain("example.edu"))


@pytest.fixture
def imap_directory(db) -> Directory:
    """example.org and its IMAP server (Dovecot, IMAPS)."""
    require_dovecot()
    return make_imap_directory(route_and_domain("example.org"))


def fresh_ip() -> str:
    """A client address no earlier run used (198.18.0.0/15, the benchmarking range): Dovecot counts failed
    logins per client address for an hour and slows that address down after them (the gateway tells it the
    person's address), so a test that fails a login on purpose must not slow down the next run's."""
    import ipaddress
    import secrets

    return str(ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.0")) + secrets.randbelow(2 ** 17)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def private_slapd(folder: Path):
    """A slapd of the test's own with the test directory (StartTLS on a free port): yields (ldap_url, stop, start),
    stop() ends it, start() starts it again. Stopped at the end either way."""
    require_slapd()  # the shared one answers: the packages and the test CA are there
    tls = Path(os.getenv("MAILGATE_TEST_CA") or "/var/lib/mailgate-test/tls/ca.pem").parent
    ldap_port, ldaps_port = free_port(), free_port()
    script = str(SCRIPTS / "slapd-instance.sh")

    def start() -> None:
        subprocess.run(["bash", script, "start", str(folder), str(ldap_port), str(ldaps_port), str(tls)],
                       check=True, capture_output=True, timeout=60)

    def stop() -> None:
        subprocess.run(["bash", script, "stop", str(folder)], check=True, capture_output=True, timeout=60)

    start()
    try:
        yield f"ldap://127.0.0.1:{ldap_port}", stop, start
    finally:
        stop()


def modify(url: str, ldif: str) -> None:
    """A change made in the directory by its own administrator (the rootdn of the test directory), with
    ldapmodify over StartTLS: for a slapd of the test's own (private_slapd), never the shared one."""
    tls_ca = os.getenv("MAILGATE_TEST_CA") or "/var/lib/mailgate-test/tls/ca.pem"
    subprocess.run(["ldapmodify", "-x", "-ZZ", "-H", url, "-D", f"cn=admin,{BASE}", "-w", "admin-test-secret"],
                   input=ldif.encode(), check=True, capture_output=True, timeout=30,
                   env={**os.environ, "LDAPTLS_CACERT": tls_ca})
