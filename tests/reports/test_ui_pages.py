"""The pages of the UI: who sees what, hostile content shown as text, CSRF, security headers."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse

from gateway.models import AuditEvent, Message
from tests.support.people import make_message

MIDDLEWARE = "appliance.middleware.SecurityHeadersMiddleware"

XSS_SUBJECT = '<script>alert("subject")</script><img src=x onerror=alert(1)>'
XSS_FROM = '"<script>alert(2)</script>" <evil@attacker.test>'
XSS_HTML = (b'<html><body><p>Hi</p><script>alert(3)</script><img src="http://tracker.test/p.gif" '
            b'onerror="alert(4)"><a href="javascript:alert(5)">click</a><form action="http://x.test">'
            b'<input name=p></form><iframe src="http://x.test"></iframe></body></html>')


def xss_raw() -> bytes:
    return (b"From: \"<script>alert(2)</script>\" <evil@attacker.test>\r\n"
            b"To: alice@example.com\r\n"
            b"Subject: <script>alert(\"subject\")</script><img src=x onerror=alert(1)>\r\n"
            b"Message-ID: <xss@attacker.test>\r\n"
            b"Received: from mail.attacker.test (mail.attacker.test [198.51.100.7]) by gw.example.com "
            b"with ESMTP id ABC; Mon, 1 Dec 2026 10:00:00 +0000\r\n"
            b"Authentication-Results: gw.example.com; spf=fail smtp.mailfrom=attacker.test; dkim=none\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + XSS_HTML + b"\r\n")


@pytest.fixture(autouse=True)
def security_headers(settings):
    """Until settings.py lists the middleware, the tests add it (after SecurityMiddleware)."""
    if MIDDLEWARE not in settings.MIDDLEWARE:
        settings.MIDDLEWARE = [settings.MIDDLEWARE[0], MIDDLEWARE, *settings.MIDDLEWARE[1:]]


@pytest.fixture
def mail(personas):
    """Alice's, Bob's, an example.org message, and a quarantined hostile one to Alice."""
    return {
        "alice": make_message("friend@sender.test", ["alice@example.com"], subject="For Alice"),
        "bob": make_message("friend@sender.test", ["bob@example.com"], subject="For Bob"),
        "org": make_message("someone@sender.test", ["carol@example.org"], subject="For Carol at org"),
        "xss": make_message("evil@attacker.test", ["alice@example.com"], raw=xss_raw(), subject=XSS_SUBJECT,
                            header_from=XSS_FROM, state=Message.State.QUARANTINED, verdict="high_spam",
                            quarantined=True, spam_score=22.5, action="quarantine",
                            spam_rules=[{"name": "HTML_<b>BOLD</b>", "score": 1.5,
                                         "description": "<script>alert(6)</script>"}],
                            attachments=[{"name": "<img src=x onerror=alert(7)>.exe", "type": "application/x-exe",
                                          "size": 10, "sha256": "ab" * 32, "blocked": True, "reason": "*.exe"}]),
    }


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- Access ------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_pages_need_a_login(mail):
    client = Client()
    for name, args in [("dashboard", []), ("message_log", []), ("message_detail", [mail["alice"].queue_id]),
                       ("reports", []), ("report", ["total-by-date"]), ("audit_log", []), ("message_export", [])]:
        response = client.get(reverse(name, args=args))
        assert response.status_code == 302, name
        assert response["Location"].startswith(reverse("login"))


@pytest.mark.django_db
def test_every_page_renders_for_every_persona(personas, mail):
    pages = [reverse("dashboard"), reverse("message_log"), reverse("reports"),
             reverse("message_log") + "?verdict=spam&sort=-score&sender=@sender.test",
             *[reverse("report", args=[slug]) for slug in ("total-by-date", "top-senders", "top-recipients",
                                                           "top-sender-domains", "top-recipient-domains",
                                                           "viruses", "rules", "score-distribution", "hourly")]]
    for user in (personas.admin, personas.domain_admin, personas.alice, personas.bob):
        client = client_for(user)
        for url in pages:
            response = client.get(url)
            assert response.status_code == 200, (user.username, url)


@pytest.mark.django_db
def test_a_user_sees_only_their_own_mail(personas, mail):
    client = client_for(personas.alice)
    log = client.get(reverse("message_log")).content.decode()
    assert "For Alice" in log
    assert "For Bob" not in log and "For Carol" not in log
    for name in ("message_detail", "message_preview"):
        assert client.get(reverse(name, args=[mail["bob"].queue_id])).status_code == 404
    assert client.get(reverse("message_detail", args=[mail["alice"].queue_id])).status_code == 200
    # The original is for administrators and domain administrators, even of one's own mail.
    assert client.get(reverse("message_download", args=[mail["xss"].queue_id])).status_code == 404
    export = b"".join(client.get(reverse("message_export")).streaming_content).decode()
    assert "For Alice" in export and "For Bob" not in export
    assert client.get(reverse("audit_log")).status_code == 404


@pytest.mark.django_db
def test_a_domain_admin_sees_their_domains_only(personas, mail):
    client = client_for(personas.domain_admin)
    log = client.get(reverse("message_log")).content.decode()
    assert "For Alice" in log and "For Bob" in log
    assert "For Carol" not in log
    assert client.get(reverse("message_detail", args=[mail["org"].queue_id])).status_code == 404
    assert client.get(reverse("message_download", args=[mail["org"].queue_id])).status_code == 404
    download = client.get(reverse("message_download", args=[mail["xss"].queue_id]))
    assert download.status_code == 200
    assert download["Content-Type"] == "message/rfc822"
    assert download.content == xss_raw()
    assert AuditEvent.objects.filter(action="download", message=mail["xss"], user=personas.domain_admin).exists()
    assert client.get(reverse("audit_log")).status_code == 404


@pytest.mark.django_db
def test_an_admin_sees_everything_and_the_audit_log(personas, mail):
    client = client_for(personas.admin)
    log = client.get(reverse("message_log")).content.decode()
    for subject in ("For Alice", "For Bob", "For Carol"):
        assert subject in log
    assert client.get(reverse("message_detail", args=[mail["org"].queue_id])).status_code == 200
    assert client.get(reverse("message_download", args=[mail["xss"].queue_id])).status_code == 200
    audit = client.get(reverse("audit_log"))
    assert audit.status_code == 200
    assert "download" in audit.content.decode()
    filtered = client.get(reverse("audit_log"), {"action": "download", "username": "admin"}).content.decode()
    assert mail["xss"].queue_id in filtered


@pytest.mark.django_db
def test_nav_shows_manage_and_audit_to_admins_only(personas):
    admin_page = client_for(personas.admin).get(reverse("dashboard")).content.decode()
    user_page = client_for(personas.alice).get(reverse("dashboard")).content.decode()
    assert reverse("audit_log") in admin_page
    assert reverse("audit_log") not in user_page
    assert ">Manage<" in admin_page and ">Manage<" not in user_page


# --- Hostile content ---------------------------------------------------------------------------------------

def assert_escaped(html: str) -> None:
    assert "<script>alert" not in html
    assert "<img src=x onerror" not in html
    assert "javascript:alert" not in html


@pytest.mark.django_db
def test_hostile_message_is_shown_as_text_everywhere(personas, mail):
    client = client_for(personas.alice)
    queue_id = mail["xss"].queue_id
    for url in (reverse("dashboard"), reverse("message_log"), reverse("message_detail", args=[queue_id])):
        html = client.get(url).content.decode()
        assert_escaped(html)
        assert "&lt;script&gt;alert(" in html, url  # there, as text
    detail = client.get(reverse("message_detail", args=[queue_id])).content.decode()
    assert "&lt;img src=x onerror=alert(7)&gt;.exe" in detail
    assert "198.51.100.7" in detail  # the relay path
    assert re.search(r'<iframe[^>]+sandbox[^>]+src="/messages/' + queue_id + '/preview"', detail)

    api = client.get(reverse("api_message", args=[queue_id]))
    assert api["Content-Type"] == "application/json"
    assert api.json()["subject"] == XSS_SUBJECT  # JSON carries the text; escaping is the reader's job


@pytest.mark.django_db
def test_preview_is_sanitised_and_locked_down(personas, mail):
    client = client_for(personas.alice)
    response = client.get(reverse("message_preview", args=[mail["xss"].queue_id]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<p>Hi</p>" in html
    for forbidden in ("<script", "alert(3)", "onerror", "javascript:", "tracker.test", "<form", "<input",
                      "<iframe"):
        assert forbidden not in html, forbidden
    csp = response["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "script-src" not in csp
    assert response["X-Frame-Options"] == "SAMEORIGIN"


@pytest.mark.django_db
def test_broken_mime_never_fails_the_page(personas):
    garbage = [
        b"",
        b"\xff\xfe\x00garbage without headers",
        b"Subject: =?utf-8?q?unterminated\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
        b"Content-Type: text/plain; charset=no-such-charset\r\nSubject: \xe9\xe8\r\n\r\n\xff\xfe body",
        b"Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/html\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n--b--",
        b"Received: garbage;;;\r\nAuthentication-Results: ;;;=;\r\n\r\nbody",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
        + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 300,
    ]
    admin = client_for(personas.admin)
    for raw in garbage:
        message = make_message(raw=raw, state=Message.State.QUARANTINED, quarantined=True)
        for name in ("message_detail", "message_preview", "message_download"):
            response = admin.get(reverse(name, args=[message.queue_id]))
            assert response.status_code == 200, (name, raw[:40])


# --- CSRF and headers ----------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_posts_without_csrf_token_are_refused(personas):
    client = Client(enforce_csrf_checks=True)
    client.force_login(personas.alice)
    assert client.post(reverse("saved_filter_create"), {"name": "x", "query": "verdict=spam"}).status_code == 403
    assert client.post(reverse("logout")).status_code == 403
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.post(reverse("login"), {"username": "alice", "password": "x"}).status_code == 403


@pytest.mark.django_db
def test_security_headers(personas):
    client = client_for(personas.alice)
    for url in (reverse("dashboard"), reverse("message_log"), reverse("login")):
        response = client.get(url)
        csp = response["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert response["X-Frame-Options"] == "DENY"
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"] == "same-origin"
        assert "camera=()" in response["Permissions-Policy"]
    assert "no-store" in client.get(reverse("dashboard"))["Cache-Control"]


@pytest.mark.django_db
def test_no_inline_scripts_in_pages(personas, mail):
    """Every <script> is a static file or a JSON island: the CSP could not allow anything else."""
    client = client_for(personas.admin)
    urls = [reverse("dashboard"), reverse("message_log"), reverse("message_detail", args=[mail["xss"].queue_id]),
            reverse("report", args=["hourly"]), reverse("report", args=["total-by-date"]), reverse("audit_log")]
    for url in urls:
        html = client.get(url).content.decode()
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert 'src="/static/' in tag or 'type="application/json"' in tag, (url, tag)
        assert not re.search(r"\son[a-z]+=", html.replace("onerror=alert", "")), url


# --- Saved filters and paging ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_saved_filters_belong_to_their_user(personas):
    alice = client_for(personas.alice)
    response = alice.post(reverse("saved_filter_create"),
                          {"name": "Spam watch", "query": "verdict=spam&after=abc&evil=1&sender=x@y.test"})
    assert response.status_code == 302
    saved = personas.alice.saved_filters.get()
    assert saved.query == "sender=x%40y.test&verdict=spam"  # known filters only, no paging
    assert "Spam watch" in alice.get(reverse("message_log")).content.decode()
    assert "Spam watch" not in client_for(personas.bob).get(reverse("message_log")).content.decode()
    # Bob cannot delete Alice's filter.
    assert client_for(personas.bob).post(reverse("saved_filter_delete", args=[saved.pk])).status_code == 404
    assert alice.post(reverse("saved_filter_delete", args=[saved.pk])).status_code == 302
    assert not personas.alice.saved_filters.exists()


@pytest.mark.django_db
def test_message_log_pages_with_cursors(personas):
    for i in range(120):
        make_message(subject=f"Numbered {i:03d}", ago=timedelta(minutes=i + 1))
    client = client_for(personas.admin)
    seen: list[str] = []
    response = client.get(reverse("message_log"))
    pages = 0
    while True:
        pages += 1
        page = response.context["page"]
        seen += [m.subject for m in page.items]
        if not page.next_cursor:
            break
        response = client.get(reverse("message_log") + "?" + response.context["next_query"])
    assert pages == 3
    assert seen == [f"Numbered {i:03d}" for i in range(120)]
    # And back: the previous page of the last page is the middle page.
    previous = client.get(reverse("message_log") + "?" + response.context["prev_query"]).context["page"]
    assert [m.subject for m in previous.items] == [f"Numbered {i:03d}" for i in range(50, 100)]


@pytest.mark.django_db
def test_message_log_filters(personas):
    make_message("a@spam.test", subject="Cheap pills", verdict="spam", spam_score=9.0, client_ip="203.0.113.5")
    make_message("b@friend.test", ["bob@example.com"], subject="Lunch", spam_score=0.1)
    make_message("c@rbl.test", subject="", state=Message.State.REFUSED, verdict="", spam_score=None,
                 refusal_reason="rbl")
    client = client_for(personas.admin)

    def subjects(**params) -> set[str]:
        page = client.get(reverse("message_log"), params).context["page"]
        return {m.subject for m in page.items}

    assert subjects(verdict="spam") == {"Cheap pills"}
    assert subjects(verdict="refused") == {""}
    assert subjects(sender="@spam.test") == {"Cheap pills"}
    assert subjects(sender="spam.test") == {"Cheap pills"}
    assert subjects(sender="a@spam.test") == {"Cheap pills"}
    assert subjects(sender="friend") == {"Lunch"}
    assert subjects(recipient="bob@example.com") == {"Lunch"}
    assert subjects(subject="pill") == {"Cheap pills"}
    assert subjects(client_ip="203.0.113.5") == {"Cheap pills"}
    assert subjects(client_ip="203.0.113.0/24") == {"Cheap pills"}
    assert subjects(score_min="5") == {"Cheap pills"}
    assert subjects(score_max="1") == {"Lunch"}
    assert [m.subject for m in client.get(reverse("message_log"), {"sort": "-score"}).context["page"].items] == [
        "Cheap pills", "Lunch", ""]
    bad = client.get(reverse("message_log"), {"client_ip": "not-an-ip"})
    assert bad.status_code == 200 and "Not an IP address" in bad.content.decode()


@pytest.mark.django_db
def test_csv_export_is_what_the_filter_shows_and_safe(personas):
    make_message(subject="=HYPERLINK(\"http://evil.test\")", verdict="spam", spam_score=7.0)
    make_message(subject="Plain", spam_score=-1.5)
    client = client_for(personas.admin)
    response = client.get(reverse("message_export"), {"verdict": "spam"})
    assert response["Content-Type"].startswith("text/csv")
    body = b"".join(response.streaming_content).decode()
    lines = body.strip().splitlines()
    assert lines[0].startswith("Received,Queue ID")
    assert len(lines) == 2
    assert "'=HYPERLINK" in body and "Plain" not in body
    everything = b"".join(client.get(reverse("message_export")).streaming_content).decode()
    assert ",-1.5," in everything  # numbers are not mangled
