"""The browser tests' kit: Playwright driving Debian's Chromium (the `browser` and `page` fixtures, provided to
every test by tests/conftest.py) and what the tests do with a page.

- `browser`: one Chromium for the whole session.
- `page`: a fresh context per test; `page.problems` records JavaScript errors, console errors and dialogs,
  `page.problems.check()` asserts there were none.
- `login_as(page, live_server, user)`, `screenshot(page, name)`, `canvas_is_drawn(page, selector)`.

The personas and the message factory are in tests/support/people.py.

Chromium: /usr/bin/chromium (Debian's). Missing: the browser tests skip, unless CI is set, then they fail.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.people import PERSONAS_PASSWORD

# Playwright's sync API runs an event loop in this thread; Django then refuses sync ORM calls from it unless
# told it is fine (the live server runs in its own thread, the test's ORM calls are ours).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# The committed screenshots are rewritten only on purpose (`make screenshots`); other runs write them into
# a scratch folder, so that the capture still runs without leaving the work tree modified.
SCREENSHOTS = (Path(__file__).resolve().parents[2] / "docs" / "screenshots" if os.getenv("UPDATE_SCREENSHOTS")
               else Path(tempfile.gettempdir()) / "mailgate-screenshots")


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


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


def login_as(page, live_server, user, password: str = PERSONAS_PASSWORD) -> None:
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
