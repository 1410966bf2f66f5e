"""Two-factor login: setting up an authenticator on /account/two-factor/, the second step of the login (the site's
and the admin's), behind the login throttle; replayed codes, recovery codes, the pending step's time limit, and an
administrator who must have it when TWO_FACTOR_REQUIRED_FOR_ADMINS says so."""

from __future__ import annotations

import smtplib
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django_otp.plugins.otp_totp.models import TOTPDevice

from console import twofactor
from console.models import RecoveryCode
from gateway.models import AuditEvent, SMTPPolicy
from tests.support.people import PERSONAS_PASSWORD as PASSWORD
from tests.support.people import make_user
from tests.support.twofactor import code_at, enrol, fresh_code, key_of, now_step

THROTTLED = "Too many failed logins"
IP = "198.51.100.1"

pytestmark = pytest.mark.django_db


def password_step(username: str, password: str = PASSWORD, *, client: Client | None = None, ip: str = IP,
                  url: str | None = None, **extra):
    client = client or Client()
    response = client.post(url or reverse("login"), {"username": username, "password": password, **extra},
                           REMOTE_ADDR=ip)
    return response, client


def code_step(client: Client, code: str, ip: str = IP):
    return client.post(reverse("login_code"), {"code": code}, REMOTE_ADDR=ip)


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def actions(username: str) -> list[str]:
    return list(AuditEvent.objects.filter(target=username).order_by("pk").values_list("action", flat=True))


@pytest.fixture
def root(personas):
    """An administrator who may use the Django admin (staff and superuser)."""
    return make_user("root", role="admin", email="root@example.com", superuser=True, password=PASSWORD)


# --- The second step -------------------------------------------------------------------------------------------


def test_a_login_with_a_device_is_not_in_before_its_code(personas):
    device, _codes = enrol(personas.alice)
    response, client = password_step("alice")
    assert response.status_code == 302 and response["Location"] == reverse("login_code")
    assert not logged_in(client)
    # No page opens on the password alone.
    assert client.get(reverse("dashboard")).status_code == 302
    assert client.get(reverse("account")).status_code == 302
    page = client.get(reverse("login_code"))
    assert page.status_code == 200 and b'name="code"' in page.content and b"alice" in page.content
    response = code_step(client, fresh_code(device))
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert logged_in(client)
    assert client.get(reverse("dashboard")).status_code == 200
    assert actions("alice") == ["login"]


def test_a_login_without_a_device_is_in_after_the_password(personas):
    response, client = password_step("bob")
    assert response.status_code == 302 and response["Location"] == reverse("dashboard") and logged_in(client)


def test_the_next_page_is_kept_across_the_second_step(personas):
    device, _codes = enrol(personas.alice)
    client = Client()
    client.post(reverse("login") + "?next=/account/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR=IP)
    response = code_step(client, fresh_code(device))
    assert response["Location"] == "/account/"


def test_a_wrong_code_counts_as_a_failed_login_and_locks_out(personas):
    device, _codes = enrol(personas.alice)
    response, client = password_step("alice")
    wrong = code_at(device.bin_key, now_step() + 10)
    for attempt in range(5):
        response = code_step(client, wrong)
        assert response.status_code == 200 and not logged_in(client)
        assert ("not right" in response.content.decode()) == (attempt < 4)
    # Five failures of alice from this address: the right code is refused too, in the throttle's words.
    response = code_step(client, fresh_code(device))
    assert THROTTLED in response.content.decode() and not logged_in(client)
    assert actions("alice").count("two_factor_failed") == 5
    assert actions("alice")[-1] == "login_throttled"
    # And the password step is locked for that username and address, as after five wrong passwords.
    response, other = password_step("alice")
    assert THROTTLED in response.content.decode() and not logged_in(other)
    # From another address alice still gets in.
    response, other = password_step("alice", ip="198.51.100.77")
    response = code_step(other, fresh_code(device), ip="198.51.100.77")
    assert response.status_code == 302 and logged_in(other)


def test_the_right_password_again_does_not_start_the_code_guesses_afresh(personas):
    device, _codes = enrol(personas.alice)
    wrong = code_at(device.bin_key, now_step() + 10)
    for _round in range(2):
        response, client = password_step("alice")  # the right password each time
        for _ in range(3):
            code_step(client, wrong)
    # Six wrong codes over two rounds of the password, from one address: locked (the limit is five).
    response, client = password_step("alice")
    assert THROTTLED in response.content.decode() and not logged_in(client)


def test_wrong_passwords_lock_the_second_step(personas):
    device, _codes = enrol(personas.alice)
    response, client = password_step("alice")
    for _ in range(5):
        password_step("alice", "wrong password")
    response = code_step(client, fresh_code(device))
    assert THROTTLED in response.content.decode() and not logged_in(client)


def test_a_code_already_used_is_refused(personas):
    device, _codes = enrol(personas.alice)
    code = fresh_code(device)
    _response, first = password_step("alice")
    assert code_step(first, code).status_code == 302 and logged_in(first)
    # The same code again (a replay, within its 30 seconds): refused, and counted.
    _response, second = password_step("alice")
    response = code_step(second, code)
    assert response.status_code == 200 and not logged_in(second)
    assert "used already" in response.content.decode()
    assert actions("alice").count("two_factor_failed") == 1
    # The next one works.
    assert code_step(second, fresh_code(device)).status_code == 302 and logged_in(second)


def test_a_recovery_code_works_once(personas):
    _device, codes = enrol(personas.alice)
    _response, client = password_step("alice")
    response = code_step(client, codes[3].upper().replace("-", " "))
    assert response.status_code == 302 and logged_in(client)
    assert twofactor.recovery_codes_left(personas.alice) == 9
    assert "9 of them left" in client.get(reverse("dashboard")).content.decode()
    event = AuditEvent.objects.get(action="two_factor_recovery_used")
    assert event.username == "alice" and event.detail["left"] == 9
    _response, again = password_step("alice")
    response = code_step(again, codes[3])
    assert response.status_code == 200 and not logged_in(again)
    assert code_step(again, codes[4]).status_code == 302 and logged_in(again)


def test_recovery_codes_are_kept_as_hashes_only(personas):
    _device, codes = enrol(personas.alice)
    stored = list(RecoveryCode.objects.filter(user=personas.alice).values_list("code_hash", flat=True))
    assert len(codes) == len(set(codes)) == len(stored) == 10
    for code in codes:
        assert all(code not in value and twofactor.normal_code(code) not in value for value in stored)
    # One login's code is no use for another.
    _device, _bobs = enrol(personas.bob)
    assert not twofactor.use_recovery_code(personas.bob, codes[0])


def test_the_second_step_waits_a_few_minutes_only(personas, settings):
    device, _codes = enrol(personas.alice)
    _response, client = password_step("alice")
    settings.TWO_FACTOR_PENDING_SECONDS = 0
    response = code_step(client, fresh_code(device))
    assert response.status_code == 302 and response["Location"] == reverse("login") and not logged_in(client)
    assert client.get(reverse("login_code")).status_code == 302


def test_the_code_page_without_a_password_first_goes_back_to_the_login():
    response = Client().get(reverse("login_code"))
    assert response.status_code == 302 and response["Location"] == reverse("login")


def test_a_session_that_skipped_the_second_factor_is_logged_out(personas):
    """A session opened before the device was set up (or by any way around the login page) is out."""
    client = Client()
    client.force_login(personas.alice)
    assert client.get(reverse("account")).status_code == 200
    enrol(personas.alice)
    response = client.get(reverse("account"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert not logged_in(client)


# --- The Django admin -------------------------------------------------------------------------------------------


def test_the_admin_needs_the_second_factor(root):
    device, _codes = enrol(root)
    response, client = password_step("root", url="/admin/login/", next="/admin/")
    assert response.status_code == 302 and response["Location"] == reverse("login_code")
    assert not logged_in(client)
    assert client.get("/admin/").status_code == 302
    response = code_step(client, fresh_code(device))
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200
    # A session of root that did not pass the second factor does not open the admin.
    other = Client()
    other.force_login(root)
    response = other.get("/admin/")
    assert response.status_code == 302 and not logged_in(other)


def test_the_admin_login_page_is_the_admins(root):
    page = Client().get("/admin/login/?next=/admin/")
    assert page.status_code == 200 and b"Django administration" in page.content
    response, client = password_step("root", url="/admin/login/", next="/admin/")
    assert response.status_code == 302 and response["Location"] == "/admin/" and logged_in(client)
    # Not staff: the admin's form refuses, as before.
    response, client = password_step("alice", url="/admin/login/", next="/admin/")
    assert response.status_code == 200 and not logged_in(client)


# --- Setting it up ---------------------------------------------------------------------------------------------


def test_enrolment_shows_the_qr_code_and_the_secret_and_needs_a_code(personas):
    client = Client()
    client.force_login(personas.alice)
    page = client.get(reverse("two_factor"))
    assert page.status_code == 200 and b"start-setup" in page.content
    client.post(reverse("two_factor_start"))
    page = client.get(reverse("two_factor")).content.decode()
    qr = page.split('id="qr"', 1)[1].split("</div>", 1)[0]
    assert "<svg" in qr and "<script" not in qr and "href" not in qr
    secret = page.split('id="secret">', 1)[1].split("<", 1)[0]
    device = TOTPDevice.objects.get(user=personas.alice)
    assert key_of(secret) == device.bin_key and not device.confirmed
    # Not in force before a code is entered: a login still takes the password alone.
    response, _other = password_step("alice")
    assert response["Location"] == reverse("dashboard")
    response = client.post(reverse("two_factor_confirm"), {"code": code_at(device.bin_key, now_step() + 20)})
    assert response.status_code == 400 and not TOTPDevice.objects.get(pk=device.pk).confirmed
    response = client.post(reverse("two_factor_confirm"), {"code": code_at(key_of(secret), now_step())})
    assert response.status_code == 200
    device.refresh_from_db()
    assert device.confirmed
    shown = response.content.decode().split('id="new-codes">', 1)[1].split("</ul>", 1)[0]
    assert shown.count("<li>") == 10
    assert twofactor.recovery_codes_left(personas.alice) == 10
    # This session proved it holds the device: it stays in.
    assert client.get(reverse("account")).status_code == 200
    assert "two_factor_enrol" in actions("alice")
    page = client.get(reverse("two_factor")).content.decode()
    assert "10 recovery codes left" in page and 'id="secret"' not in page


def test_new_recovery_codes_replace_the_old_ones(personas):
    device, old = enrol(personas.alice)
    client = Client()
    password_step("alice", client=client)
    code_step(client, fresh_code(device))
    response = client.post(reverse("two_factor_recovery_codes"))
    assert response.status_code == 400 and 'id="new-codes"' not in response.content.decode()  # not without asking
    response = client.post(reverse("two_factor_recovery_codes"), {"password": PASSWORD})
    shown = response.content.decode().split('id="new-codes">', 1)[1].split("</ul>", 1)[0]
    new = [item.split("</li>")[0] for item in shown.split("<li>")[1:]]
    assert len(new) == 10
    assert not twofactor.use_recovery_code(personas.alice, old[0])
    assert twofactor.use_recovery_code(personas.alice, new[0])
    assert "two_factor_recovery_codes" in actions("alice")


def test_turning_it_off_needs_a_code_or_the_password(personas):
    device, _codes = enrol(personas.alice)
    client = Client()
    password_step("alice", client=client)
    code_step(client, fresh_code(device))
    response = client.post(reverse("two_factor_disable"), {"password": "wrong password", "code": "123456"})
    assert response.status_code == 400 and twofactor.confirmed_device(personas.alice) is not None
    response = client.post(reverse("two_factor_disable"), {"code": "000000"})
    assert response.status_code == 400 and twofactor.confirmed_device(personas.alice) is not None
    response = client.post(reverse("two_factor_disable"), {"code": fresh_code(device)})
    assert response.status_code == 302
    assert not TOTPDevice.objects.filter(user=personas.alice).exists()
    assert not RecoveryCode.objects.filter(user=personas.alice).exists()
    assert "two_factor_disable" in actions("alice")
    response, _other = password_step("alice")
    assert response["Location"] == reverse("dashboard")


def test_guesses_on_the_settings_page_count_in_the_throttle(personas):
    device, _codes = enrol(personas.alice)
    client = Client()
    password_step("alice", client=client)
    code_step(client, fresh_code(device))
    for _ in range(5):
        assert client.post(reverse("two_factor_disable"), {"password": "guess"}).status_code == 400
    # Locked now, the right password too, here and at the login.
    response = client.post(reverse("two_factor_disable"), {"password": PASSWORD})
    assert response.status_code == 400 and THROTTLED in response.content.decode()
    assert twofactor.confirmed_device(personas.alice) is not None


# --- Required for administrators ----------------------------------------------------------------------------------


def test_an_administrator_must_set_it_up_when_the_setting_says_so(personas, root, settings):
    settings.TWO_FACTOR_REQUIRED_FOR_ADMINS = True
    response, client = password_step("admin")
    assert logged_in(client)
    for url in (reverse("dashboard"), "/manage/", reverse("account"), "/queue/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"] == reverse("two_factor"), url
    page = client.get(reverse("two_factor"))
    assert page.status_code == 200 and b'id="required"' in page.content
    # The Django admin too.
    _response, admin_client = password_step("root", url="/admin/login/", next="/admin/")
    response = admin_client.get("/admin/")
    assert response.status_code == 302 and response["Location"] == reverse("two_factor")
    # Setting it up opens the rest.
    client.post(reverse("two_factor_start"))
    device = TOTPDevice.objects.get(user=personas.admin)
    client.post(reverse("two_factor_confirm"), {"code": code_at(device.bin_key, now_step())})
    assert client.get("/manage/users/").status_code == 200
    # Users and domain administrators are not made to.
    for name in ("alice", "dadmin"):
        _response, other = password_step(name)
        assert other.get(reverse("dashboard")).status_code == 200


def test_logging_out_is_allowed_before_setting_it_up(personas, settings):
    settings.TWO_FACTOR_REQUIRED_FOR_ADMINS = True
    _response, client = password_step("admin")
    assert client.post(reverse("logout")).status_code == 302 and not logged_in(client)


# --- SMTP AUTH: the password alone, or refused ------------------------------------------------------------------


def smtp_auth(server, login: str, password: str) -> int:
    """The reply code of one AUTH PLAIN on the implicit-TLS port."""
    with server.smtps() as client:
        client.ehlo()
        client.user, client.password = login, password
        try:
            return client.auth("PLAIN", client.auth_plain)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


@pytest.fixture
def smtp_user(transactional_db):
    policy = SMTPPolicy.load()
    policy.auth_max_failures = 0
    policy.save()
    user = get_user_model().objects.create_user("carol", "carol@example.org", PASSWORD)
    enrol(user)
    return user


@pytest.mark.django_db(transaction=True)
def test_smtp_auth_takes_the_password_alone_by_default(gateway_smtp_tls, smtp_user):
    assert smtp_auth(gateway_smtp_tls, "carol", PASSWORD) == 235


@pytest.mark.django_db(transaction=True)
def test_smtp_auth_is_refused_for_two_factor_logins_when_the_setting_says_so(gateway_smtp_tls, smtp_user,
                                                                                settings):
    settings.TWO_FACTOR_REFUSE_SMTP_AUTH = True
    assert smtp_auth(gateway_smtp_tls, "carol@example.org", PASSWORD) == 535
    # The right password is not counted as a failure: the web login still works, with its code.
    response, client = password_step("carol")
    assert response["Location"] == reverse("login_code")
    # A login without a device is not concerned.
    get_user_model().objects.create_user("dave", "dave@example.org", PASSWORD)
    assert smtp_auth(gateway_smtp_tls, "dave", PASSWORD) == 235


def test_an_administrator_turns_it_off_from_the_command_line(personas):
    enrol(personas.alice)
    out = StringIO()
    call_command("twofactor", "show", "--user", "alice", stdout=out)
    assert "on, 10 recovery codes left" in out.getvalue()
    call_command("twofactor", "reset", "--user", "alice", stdout=StringIO())
    assert twofactor.confirmed_device(personas.alice) is None
    assert not RecoveryCode.objects.filter(user=personas.alice).exists()
    assert AuditEvent.objects.filter(action="two_factor_disable", target="alice").exists()
    response, _client = password_step("alice")
    assert response["Location"] == reverse("dashboard")


def test_the_admin_deletes_a_device_audited_without_showing_its_secret(root, personas):
    device, _codes = enrol(personas.alice)
    own, _root_codes = enrol(root)
    _response, client = password_step("root", url="/admin/login/", next="/admin/")
    code_step(client, fresh_code(own))
    url = f"/admin/otp_totp/totpdevice/{device.pk}/"
    page = client.get(f"{url}change/")
    assert page.status_code == 200 and device.key not in page.content.decode()
    assert client.get(f"{url}config/").status_code == 403
    assert client.get(f"{url}qrcode/").status_code == 403
    response = client.post(f"{url}delete/", {"post": "yes"})
    assert response.status_code == 302 and not TOTPDevice.objects.filter(pk=device.pk).exists()
    assert AuditEvent.objects.filter(action="admin_delete", username="root").exists()
