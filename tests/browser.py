"""The web UI's test kit: personas, a message factory, and Playwright driving Debian's Chromium.

Use from a test module (pytest imports fixtures by name):

    from tests.browser import browser, page, personas, login_as, make_message  # noqa: F401

(`from browser import …` works too: it is the same module.)

- `personas`: an admin, a domain administrator of example.com, and two users (alice@ and bob@example.com);
  example.org is a second protected domain nobody but the admin sees.
- `make_message(...)`: a logged Message with its Recipients (and RawMessage when `raw=` is given).
- `browser`: one Chromium for the whole session, however many modules import it.
- `page`: a fresh context per test; `page.problems` records JavaScript errors, console errors and dialogs,
  `page.problems.check()` asserts there were none.
- `login_as(page, live_server, user)`, `screenshot(page, name)`, `canvas_is_drawn(page, selector)`.

Chromium: /usr/bin/chromium (Debian's). Missing: the browser tests skip, unless CI is set, then they fail.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

# One module object whether it is imported as `browser` or as `tests.browser`: the shared Chromium below
# must be shared by every test module, however each one spells the import.
sys.modules.setdefault("browser", sys.modules[__name__])
sys.modules.setdefault("tests.browser", sys.modules[__name__])

# Playwright's sync API runs an event loop in this thread; Django then refuses sync ORM calls from it unless
# told it is fine (the live server runs in its own thread, the test's ORM calls are ours).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# The committed screenshots are rewritten only on purpose (`make screenshots`); other runs write them into
# a scratch folder, so that the capture still runs without leaving the work tree modified.
SCREENSHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots" if os.getenv("UPDATE_SCREENSHOTS")
               else Path(tempfile.gettempdir()) / "mailgate-screenshots")
PASSWORD = "correct-horse-battery-staple-42"


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# --- Personas and messages ---------------------------------------------------------------------------------

@dataclass
class Personas:
    admin: object
    domain_admin: object
    alice: object
    bob: object
    example_com: object
    example_org: object


def make_user(username: str, *, role: str = "user", email: str = "", domains=(), addresses: str = ""):
    from django.contrib.auth import get_user_model

    from gateway.models import UserProfile

    user = get_user_model().objects.create_user(username, email=email, password=PASSWORD)
    profile = UserProfile.objects.create(user=user, role=role, addresses=addresses)
    if domains:
        profile.domains.set(domains)
    return user


@pytest.fixture
def personas(db) -> Personas:
    from gateway.models import Domain, Route

    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=2526)
    example_com = Domain.objects.create(name="example.com", route=route)
    example_org = Domain.objects.create(name="example.org", route=route)
    return Personas(
        admin=make_user("admin", role="admin", email="postmaster@example.com"),
        domain_admin=make_user("dadmin", role="domain_admin", email="it@example.com", domains=[example_com]),
        alice=make_user("alice", email="alice@example.com", addresses="sales@example.com"),
        bob=make_user("bob", email="bob@example.com"),
        example_com=example_com,
        example_org=example_org,
    )


def make_message(sender: str = "someone@sender.test", recipients=("alice@example.com",), *, raw: bytes | None = None,
                 ago: timedelta | None = None, **fields):
    """A message as the gateway logs it; defaults: clean, delivered, received a minute ago."""
    from django.utils import timezone

    from gateway.models import Message, RawMessage, Recipient

    defaults = {
        "received_at": timezone.now() - (ago if ago is not None else timedelta(minutes=1)),
        "state": Message.State.DELIVERED, "verdict": "clean", "action": "deliver", "size": len(raw or b"") or 2048,
        "client_ip": "192.0.2.10", "client_name": "mail.sender.test", "helo": "mail.sender.test",
        "subject": "Hello", "header_from": sender, "spam_score": 0.5, "spam_threshold": 5.0,
    }
    defaults.update(fields)
    message = Message.objects.create(envelope_sender=sender, **defaults)
    for address in recipients:
        status = {"delivered": "delivered", "quarantined": "quarantined", "refused": "refused"}.get(
            message.state, "pending")
        Recipient.objects.create(message=message, address=address, status=status, verdict=message.verdict,
                                 reply_code=250 if status == "delivered" else None,
                                 reply_text="2.0.0 Ok: queued as 4XyZ" if status == "delivered" else "")
    if raw is not None:
        RawMessage.objects.create(message=message, data=raw)
    return message


# --- The browser -------------------------------------------------------------------------------------------

_RUNTIME: dict = {}


def shared_browser():
    """The session's one Playwright and one Chromium, started by the first module that asks.

    A session-scoped fixture imported into several test modules is several fixtures; each starting its own
    Playwright fails ("Sync API inside the asyncio loop"), so they all get this one.
    """
    if "browser" not in _RUNTIME:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
        _RUNTIME["playwright"] = playwright
        _RUNTIME["browser"] = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return _RUNTIME["browser"]


@atexit.register
def stop_shared_browser() -> None:
    browser_ = _RUNTIME.pop("browser", None)
    playwright = _RUNTIME.pop("playwright", None)
    if browser_ is not None:
        browser_.close()
    if playwright is not None:
        playwright.stop()


def require_chromium() -> None:
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        if on_ci():
            pytest.fail(f"{CHROMIUM} is missing and CI is set: install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture(scope="session")
def browser(request):
    require_chromium()
    instance = shared_browser()
    request.addfinalizer(stop_shared_browser)
    return instance


class PageProblems:
    """What went wrong in the page while a test drove it: JavaScript errors, console errors, dialogs."""

    def __init__(self):
        self.errors: list[str] = []
        self.dialogs: list[str] = []

    def check(self) -> None:
        assert not self.dialogs, f"unexpected dialogs: {self.dialogs}"
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def page(browser):
    """A fresh browser context and page, recording JavaScript errors, console errors and dialogs (dismissed).

    `page.problems.check()` fails the test if any happened; a test that expects some (Chromium logs a 404 as
    a console error) clears `page.problems.errors` first.
    """
    context = browser.new_context(viewport={"width": 1366, "height": 900}, locale="en-GB")
    new_page = context.new_page()
    problems = PageProblems()
    new_page.problems = problems
    new_page.on("pageerror", lambda exc: problems.errors.append(f"pageerror: {exc}"))
    new_page.on("console", lambda msg: problems.errors.append(f"console: {msg.text}") if msg.type == "error" else None)

    def on_dialog(dialog) -> None:
        problems.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    new_page.on("dialog", on_dialog)
    new_page.set_default_timeout(15_000)
    yield new_page
    context.close()


def login_as(page, live_server, user, password: str = PASSWORD) -> None:
    """Log in through the login form, as a person would."""
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "/login/" not in page.url, f"login as {user.username} failed: still on {page.url}"


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot into docs/screenshots/ (committed, shown in the README)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    # Grow the viewport to the whole page rather than full_page=True: Chromium paints a sandboxed (cross-origin)
    # iframe blank in a full-page capture, and the message preview is one.
    viewport = page.viewport_size
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": viewport["width"], "height": max(height, viewport["height"])})
    page.wait_for_timeout(400)
    page.screenshot(path=str(path))
    page.set_viewport_size(viewport)
    return path


def canvas_is_drawn(page, selector: str) -> bool:
    """True when the canvas has non-transparent pixels: the chart drew something."""
    return page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector);
        if (!canvas || !canvas.width || !canvas.height) return false;
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < data.length; i += 4) { if (data[i] !== 0) painted++; }
        return painted > 500;
    }""", selector)
