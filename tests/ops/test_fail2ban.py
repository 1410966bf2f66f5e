"""conf/fail2ban/: the filter matches the lines the gateway writes for a failed SMTP AUTH and a failed web login,
and nothing else, read by Debian's fail2ban-regex; nothing a client sends can name another address for a ban."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.support.mail import message
from tests.support.servers import insecure_tls, send
from tests.support.services import require_binary

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "conf" / "fail2ban" / "filter.d" / "mailgate.conf"
JAIL = ROOT / "conf" / "fail2ban" / "jail.d" / "mailgate.conf"
PASSWORD = "correct horse battery staple"
pytestmark = pytest.mark.usefixtures("scanners_off")


@pytest.fixture
def fail2ban_config(tmp_path) -> Path:
    """A fail2ban configuration directory with Debian's common.conf (the syslog prefix) and our filter."""
    require_binary("fail2ban-regex")
    common = Path("/etc/fail2ban/filter.d/common.conf")
    if not common.exists():
        pytest.fail("fail2ban is installed without /etc/fail2ban/filter.d/common.conf")
    config = tmp_path / "fail2ban"
    (config / "filter.d").mkdir(parents=True)
    shutil.copy(common, config / "filter.d")
    shutil.copy(FILTER, config / "filter.d")
    return config


def banned(config: Path, log: Path, filter_name: str = "mailgate") -> list[str]:
    """The address of every line the filter matches, as fail2ban-regex reads the file."""
    result = subprocess.run(["fail2ban-regex", "--config", str(config), "-o", "ip", str(log), filter_name],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.fixture
def alice(transactional_db):
    return get_user_model().objects.create_user("alice", "alice@example.org", PASSWORD)


def failed_smtp_auth(server, login: str, password: str) -> None:
    with server.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.user, client.password = login, password
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)


def test_the_filter_matches_our_failure_lines_and_nothing_else(gateway_smtp_tls, protected_domain, alice,
                                                              mail_log, fail2ban_config):
    failed_smtp_auth(gateway_smtp_tls, "alice", "wrong password")
    failed_smtp_auth(gateway_smtp_tls, "x]: SASL PLAIN authentication failed [203.0.113.66]", "wrong")
    with gateway_smtp_tls.submission() as client:  # the right password: no line for fail2ban
        client.starttls(context=insecure_tls())
        client.ehlo()
        assert client.login("alice", PASSWORD)[0] == 235
    web = Client(REMOTE_ADDR="192.0.2.9")
    for username in ("alice", "bob\nDec  7 17:40:01 mx1 mailgate/web[1]: warning: unknown[203.0.113.66]: x"):
        response = web.post("/login/", {"username": username, "password": "not it"})
        assert response.status_code == 200  # the form again, with its error
    assert web.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 302
    send(gateway_smtp_tls, message())  # an accepted message: its lines must not match
    with gateway_smtp_tls.client() as client:  # and a refusal neither
        client.ehlo()
        client.mail("spammer@outside.example")
        assert client.rcpt("victim@foreign.example")[0] == 550

    lines = mail_log.read_text().splitlines()
    assert len([line for line in lines if "authentication failed" in line]) == 4, lines
    assert banned(fail2ban_config, mail_log) == ["127.0.0.1", "127.0.0.1", "192.0.2.9", "192.0.2.9"]
    assert banned(fail2ban_config, mail_log, "mailgate[mode=smtp]") == ["127.0.0.1", "127.0.0.1"]
    assert banned(fail2ban_config, mail_log, "mailgate[mode=web]") == ["192.0.2.9", "192.0.2.9"]


def test_a_throttled_web_login_is_a_line_for_fail2ban_too(transactional_db, alice, mail_log, fail2ban_config,
                                                          settings):
    settings.LOGIN_THROTTLE_PAIR_FAILURES = 1
    web = Client(REMOTE_ADDR="192.0.2.10")
    web.post("/login/", {"username": "alice", "password": "not it"})
    # The form refuses a throttled attempt before authenticating; the admin's and the API's doors meet the
    # backend, which refuses it without looking at the password.
    from django.contrib.auth import authenticate
    from django.test import RequestFactory

    request = RequestFactory().post("/admin/login/", REMOTE_ADDR="192.0.2.10")
    assert authenticate(request, username="alice", password=PASSWORD) is None
    (throttled,) = [line for line in mail_log.read_text().splitlines() if "throttled" in line]
    assert throttled.endswith("warning: unknown[192.0.2.10]: web login authentication refused (throttled): "
                              "user=<alice>")
    assert banned(fail2ban_config, mail_log) == ["192.0.2.10", "192.0.2.10"]


def test_fail2ban_takes_the_jails(tmp_path, mail_log):
    """The jails as fail2ban itself reads them: Debian's configuration (without its own jails), our filter and
    jails with the mail log moved to this test's file; `fail2ban-client -t` checks it all, filter included."""
    client = require_binary("fail2ban-client")
    config = tmp_path / "etc-fail2ban"
    shutil.copytree("/etc/fail2ban", config, ignore=shutil.ignore_patterns("jail.d", "jail.local"))
    (config / "jail.d").mkdir()
    shutil.copy(FILTER, config / "filter.d")
    (config / "jail.d" / "mailgate.conf").write_text(JAIL.read_text().replace("/var/log/mailgate/mail.log",
                                                                               str(mail_log)))
    checked = subprocess.run([client, "--conf", str(config), "-t"], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dumped = subprocess.run([client, "--conf", str(config), "-d"], capture_output=True, text=True, timeout=120).stdout
    assert "['add', 'mailgate-smtp-auth', 'auto']" in dumped and "['add', 'mailgate-web', 'auto']" in dumped
    assert "--dports submission,submissions" in dumped and "--dports http,https" in dumped
