"""The digest end to end with the real parts: runsmtp and a Celery worker as processes, PostgreSQL, Redis, spamd,
clamd, a capture server as the organisation's mail server. GTUBE is quarantined for a user, `manage.py digests
send` sends the digest through the delivery (DKIM-signed for our domain), its release link's GET changes nothing,
the POST of its confirmation page releases the message once, and nothing works twice."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command
from django.test import Client

from digests.models import DigestLink
from gateway.mailauth import dkim
from gateway.mailauth.dns import Resolver
from gateway.models import Recipient
from tests.support.appliance import queue_id_of, settled, wait_until
from tests.support.digests import csrf_of, header, link, parts
from tests.support.mail import GTUBE_PATH, read_mail
from tests.support.people import make_user

pytestmark = pytest.mark.services

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def publish_key(dns_stub) -> Resolver:
    import io
    import re

    out = io.StringIO()
    call_command("dkim", "genkey", "example.org", "--selector", "digest", stdout=out)
    line = next(line for line in out.getvalue().splitlines() if " IN TXT " in line)
    txt = "".join(re.findall(r'"([^"]*)"', line))
    dns_stub.add(line.split()[0].rstrip("."), {"TXT": [txt[i:i + 255] for i in range(0, len(txt), 255)]})
    return Resolver(nameservers=[dns_stub.host], port=dns_stub.port, timeout=2)


def sweep(appliance) -> None:  # noqa: F811 - the fixture
    """What beat runs every minute: due deliveries (here the released message, queued by this process, which
    has no broker of its own) are sent to the worker."""
    result = appliance.manage("shell", "-c", "from gateway.tasks import sweep; sweep.delay()")
    assert result.returncode == 0, result.stderr


def test_gtube_digest_release_once(appliance, capture_server, corpus, dns_stub):  # noqa: F811
    make_user("bob", email="bob@example.org")
    resolver = publish_key(dns_stub)
    ids = []
    for _ in range(2):
        code, reply = appliance.send(read_mail(corpus(GTUBE_PATH)))
        assert code == 250, reply
        ids.append(queue_id_of(reply))
    held = [wait_until(lambda q=q: settled(q), what="GTUBE to be quarantined") for q in ids]
    assert all(m.state == "quarantined" and m.spam_score > 900 for m in held)
    assert capture_server.messages == []

    appliance.env.update(SITE_URL="http://testserver", DIGEST_SENDER="quarantine@example.org")
    result = appliance.manage("digests", "send")
    assert result.returncode == 0, result.stderr
    assert "sent bob <bob@example.org> (own mail) a digest of 2 messages" in result.stdout
    (digest,) = capture_server.wait_for(1)
    assert digest.recipients == ["bob@example.org"] and digest.sender == "quarantine@example.org"
    body = parts(digest.data)  # multipart/alternative: text and HTML
    assert set(body) == {"text/plain", "text/html"}
    assert header(digest.data, "List-Unsubscribe").startswith("<http://testserver/digest/unsubscribe/")
    assert header(digest.data, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    [signature] = dkim.verify(digest.data, resolver)
    assert (signature.result, signature.domain, signature.selector) == ("pass", "example.org", "digest")
    signed = header(digest.data, "DKIM-Signature").replace(" ", "")
    assert "list-unsubscribe:" in signed.lower() and "list-unsubscribe-post" in signed.lower()

    # GET (what a link scanner does): the confirmation page, nothing else.
    release = link(digest.data, "release", ids[0])
    client = Client(enforce_csrf_checks=True)
    page = client.get(release)
    assert page.status_code == 200 and "Release this message?" in page.content.decode()
    sweep(appliance)
    time.sleep(2)
    assert len(capture_server.messages) == 1
    assert Recipient.objects.get(message__queue_id=ids[0]).status == "quarantined"

    # The POST of the confirmation page releases it; the capture server receives it once.
    token = csrf_of(page.content.decode())
    done = client.post(release, {"csrfmiddlewaretoken": token})
    assert done.status_code == 200 and "Released to bob@example.org" in done.content.decode()
    sweep(appliance)
    wait_until(lambda: len(capture_server.messages) == 2, what="the released message")
    released = capture_server.messages[1]
    assert released.recipients == ["bob@example.org"] and GTUBE in released.data

    # A second POST, and a replay after expiry, deliver nothing and say why.
    again = client.post(release, {"csrfmiddlewaretoken": token})
    assert again.status_code == 410 and "used already" in again.content.decode()
    DigestLink.objects.filter(message__queue_id=ids[0]).update(expires_at=held[0].received_at)
    replay = client.post(release, {"csrfmiddlewaretoken": token})
    assert replay.status_code == 410 and "expired" in replay.content.decode()
    sweep(appliance)
    time.sleep(3)
    assert len(capture_server.messages) == 2

    # One character changed, or the link used for the other message: 404.
    secret = release.rsplit("/", 1)[1]
    changed = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert client.get(release.replace(secret, changed)).status_code == 404
    assert client.post(release.replace(secret, changed), {"csrfmiddlewaretoken": token}).status_code == 404
    assert client.get(release.replace(ids[0], ids[1])).status_code == 404
    assert Recipient.objects.get(message__queue_id=ids[1]).status == "quarantined"

    # Nothing new: the second run sends nothing.
    result = appliance.manage("digests", "send")
    assert result.returncode == 0, result.stderr
    assert "0 digests sent" in result.stdout and "nothing new" in result.stdout
    time.sleep(2)
    assert len(capture_server.messages) == 2
