"""`manage.py health`: the health check of one process, for a container's healthcheck or a systemd watchdog
script. Exit status 0 when every check asked for passes, 1 otherwise; one line per check says why.

    manage.py health                      what /healthz says for this environment (database, broker, scanners)
    manage.py health --url URL            the web UI answers URL (its /healthz) with 200
    manage.py health --smtp HOST:PORT     the SMTP server greets with 220
    manage.py health --worker [NAME]      the Celery worker NAME (default celery@this host) answers a ping
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from console import health

TIMEOUT = 5.0


def _host_header() -> str:
    """The name the web UI answers to: its first ALLOWED_HOSTS entry that is a plain name."""
    for host in settings.ALLOWED_HOSTS:
        if host and host != "*" and not host.startswith("."):
            return host
    return "localhost"


def check_url(url: str) -> tuple[bool, str]:
    if urlsplit(url).scheme not in ("http", "https"):
        raise CommandError(f"--url {url!r}: an http:// or https:// address is needed")
    # As the reverse proxy asks it: by a name in ALLOWED_HOSTS and, where the proxy's header is believed, as
    # HTTPS (else SECURE_SSL_REDIRECT answers the probe with a redirect).
    headers = {"Host": _host_header(), "User-Agent": "mailgate-health"}
    if getattr(settings, "SECURE_PROXY_SSL_HEADER", None):
        header, value = settings.SECURE_PROXY_SSL_HEADER
        headers[header.removeprefix("HTTP_").replace("_", "-").title()] = value
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310 - http(s) only, above
            return response.status == 200, f"{response.status} {response.read(300).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code} {exc.read(300).decode(errors='replace')}"
    except (OSError, urllib.error.URLError) as exc:
        return False, f"no answer: {exc}"


def check_smtp(address: str) -> tuple[bool, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--smtp {address!r}: say HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.settimeout(TIMEOUT)
            greeting = b""
            # The greeting may span several lines ("220-..." then "220 ..."): up to the last one.
            while not any(line[3:4] == b" " for line in greeting.split(b"\r\n") if len(line) >= 4):
                chunk = sock.recv(1024)
                if not chunk or len(greeting) > 4096:
                    break
                greeting += chunk
            try:
                sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
    except OSError as exc:
        return False, f"{address}: no greeting: {exc}"
    text = greeting.decode(errors="replace").strip().splitlines()
    last = text[-1] if text else "(nothing)"
    return last.startswith("220 "), f"{address}: {last}"


def check_worker(name: str) -> tuple[bool, str]:
    from appliance.celery import app

    if not settings.CELERY_BROKER_URL:
        return False, "no broker configured (CELERY_BROKER_URL): there is no Celery worker to ask"
    try:
        answers = app.control.ping(destination=[name], timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the broker away is an answer too: unhealthy, and why
        return False, f"{name}: the broker did not answer: {exc.__class__.__name__}: {exc}"
    for answer in answers:
        if name in answer:
            return True, f"{name}: {answer[name]}"
    return False, f"{name}: no answer to a ping within {TIMEOUT:.0f} s"


class Command(BaseCommand):
    help = "Check this process's health (database, broker, scanners) or a web, SMTP or worker process; exit 1 if not."

    def add_arguments(self, parser):
        parser.add_argument("--url", action="append", default=[], help="a /healthz address that must answer 200")
        parser.add_argument("--smtp", action="append", default=[], metavar="HOST:PORT",
                            help="an SMTP server that must greet with 220")
        parser.add_argument("--worker", action="append", nargs="?", const="", default=[], metavar="NAME",
                            help="a Celery worker that must answer a ping (default: celery@this host)")

    def handle(self, *args, url: list[str], smtp: list[str], worker: list[str], **options):
        results: list[tuple[str, bool, str]] = []
        for address in url:
            results.append(("web", *check_url(address)))
        for address in smtp:
            results.append(("smtp", *check_smtp(address)))
        for name in worker:
            results.append(("worker", *check_worker(name or f"celery@{socket.gethostname()}")))
        if not (url or smtp or worker):
            ok, checks = health.health()
            seconds = checks.pop("seconds", "")
            results += [(part, reason == "ok", reason) for part, reason in checks.items()]
            self.stdout.write(f"checked in {seconds} s")
        for part, ok, reason in results:
            self.stdout.write(f"{part}: {'ok' if ok else 'FAIL'}: {reason}")
        if not all(ok for _part, ok, _reason in results):
            raise SystemExit(1)
